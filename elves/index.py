"""The archive index as typed records, parsed and checked in one place (docs/FORMAT.md).

The index is untrusted: whoever forged an archive also recomputed its checksums. So every field is
checked here, before any byte is decoded, against the archive's own structure: offsets and lengths
lie inside the data region and chunks do not overlap; decoded lengths follow the chunk plan of each
stream's dtype and ``chunk_elems``; codec ids are known and their parameters in range; the segments
of each file add up to its size; tensors lie inside their segments, in their segment's dtype
(anywhere in a bytes segment they are packed into); references point backwards, one level deep.
Past :func:`parse_index`, code reads fields by name and may trust their types and these
invariants; what it cannot know before decoding (the bytes a codec produces) the codecs and
kernels check, and the content hashes check last.

A violation raises :class:`~elves.errors.CorruptArchiveError` naming the archive and the field
(:class:`~elves.errors.CodecError` for a codec or dtype this elves does not know).
"""
from __future__ import annotations

import builtins
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple, NoReturn

import xxhash

from . import casts, dtypes
from .codecs import Pipeline
from .errors import CorruptArchiveError, ElvesError, UnsafePathError
from .model import MAX_RANK

# Where an index or trailer came from, for error messages only: a path, or a store's URL.
Where = str | os.PathLike[str]

# The largest decoded chunk a reader accepts: memory per chunk in flight stays bounded (the writer
# uses 256 KiB tensor chunks and 4 MiB byte chunks).
MAX_CHUNK_BYTES = 64 << 20
# A chunk's payload is read whole, so it is held to what a coding of the chunk can take: rANS
# writes at most two bytes per symbol plus its tables, zstd a few bytes per block.
MAX_EXPANSION = 4
MAX_OVERHEAD = 1 << 20
FILE_FORMATS = ("safetensors", "torch-zip", "torch-legacy", "onnx", "gguf", "ctranslate2", "opaque", "symlink")
KINDS = ("tensor", "bytes")
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
U64 = (1 << 64) - 1


class Chunk(NamedTuple):
    """Where one chunk's payload lies in the archive and how long it decodes."""

    offset: int
    length: int
    decoded_length: int
    checksum: int          # xxh3-64 of the payload: :func:`checksum`


def checksum(payload: bytes | memoryview) -> int:
    """What :attr:`Chunk.checksum` holds for ``payload``: its xxh3-64."""
    return xxhash.xxh3_64_intdigest(payload)


@dataclass
class Stream:
    """An index entry: one unique byte stream and the chunks it is stored in."""

    kind: str                 # "tensor" or "bytes"
    dtype: str | None
    nbytes: int
    hash: str                 # xxh3-128 hex of the decoded bytes
    pipeline: list[dict[str, Any]]
    chunk_elems: int
    chunks: list[Chunk]
    # Lossy streams (``elf``) only: xxh3-128 hex of what decoding yields, which is not the
    # original (``hash``); None when decoding gives the original bytes back.
    decoded_hash: str | None = None
    # The stream of the same archive whose decoded chunks are this one's reference chunks (a
    # pipeline that starts with a filter needing a reference, e.g. ``elf`` with ``delta``), or None.
    ref: int | None = None
    # How the reference is laid out: [[dst, src, length], ...] (bytes ``[dst, dst + length)`` of the
    # reference are bytes ``[src, src + length)`` of stream ``ref``; zeros elsewhere), or None: the
    # referenced stream's bytes at the same places (it is as long as this one).
    ref_map: list[list[int]] | None = None
    # The reference is a precision cast of its source (format 1.4): (the source's dtype, rounding),
    # see elves.casts; None: the source's bytes as they are.
    ref_cast: tuple[str, str] | None = None
    # The pipeline built from ``pipeline`` when the index was parsed (None for a stream being written).
    codecs: Pipeline | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind, "dtype": self.dtype, "nbytes": self.nbytes, "hash": self.hash,
            "pipeline": self.pipeline, "chunk_elems": self.chunk_elems, "chunks": [list(c) for c in self.chunks],
        }
        if self.decoded_hash is not None:
            d["decoded_hash"] = self.decoded_hash
        if self.ref is not None:
            d["ref"] = self.ref
        if self.ref_map is not None:
            d["ref_map"] = self.ref_map
        if self.ref_cast is not None:
            d["ref_cast"] = {"from": self.ref_cast[0], "round": self.ref_cast[1]}
        return d

    def decoder(self) -> Pipeline:
        """The pipeline that decodes this stream's chunks: built once when the index was parsed,
        else (a stream being written) from ``pipeline`` now."""
        return self.codecs if self.codecs is not None else Pipeline.from_config(self.pipeline)

    @property
    def expected_hash(self) -> str:
        """The xxh3-128 that decoding this stream must reproduce."""
        return self.decoded_hash or self.hash

    @property
    def stored_bytes(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def chunk_bytes(self) -> int:
        """Decoded bytes per chunk (the last may be shorter)."""
        return self.chunk_elems * (dtypes.get(self.dtype).itemsize if self.kind == "tensor" and self.dtype else 1)


class TensorEntry(NamedTuple):
    """A named tensor of a file: ``segment`` indexes the file's ``segments`` (-1: an empty tensor
    with no bytes), ``offset`` is in bytes within that segment, ``strides`` in elements (None:
    contiguous)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segment: int
    offset: int
    strides: tuple[int, ...] | None

    @property
    def count(self) -> int:  # type: ignore[override]  # NamedTuple's count(value) is not used on entries
        return math.prod(self.shape)


@dataclass
class FileEntry:
    """A file of the model: the streams whose bytes, concatenated, are the file."""

    path: str
    size: int
    sha256: str               # of the original file (also for a lossy one)
    format: str
    segments: list[int]
    tensors: list[TensorEntry] = field(default_factory=list)
    lossy: bool = False       # some segment restores within a bound, not exactly
    link: str | None = None   # 1.3, format "symlink": the link's target, relative, inside the model
    mode: int | None = None   # 1.4: permission bits of an executable source file (model.kept_mode)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.lossy:
            d["lossy"] = True
        d["format"] = self.format
        d["segments"] = self.segments
        d["tensors"] = [[t.name, t.dtype, list(t.shape), t.segment, t.offset,
                         list(t.strides) if t.strides is not None else None] for t in self.tensors]
        if self.link is not None:
            d["link"] = self.link
        if self.mode is not None:
            d["mode"] = self.mode
        return d


@dataclass
class Index:
    """A parsed, checked index."""

    writer: str
    lossy: bool
    source: str               # "file" or "folder"
    streams: list[Stream]
    files: list[FileEntry]
    base: dict[str, Any] | None = None          # 1.1: the base model the streams are coded against
    error_bound: dict[str, Any] | None = None   # 1.1: the lossy mode the archive was written with


# ---------------------------------------------------------------------------- field checks

class Fields:
    """Typed reads of one untrusted map, each naming the archive and the field when it fails."""

    prefix = "the index is malformed: "

    def __init__(self, raw: Any, where: str, path: Where):
        self.where, self.path = where, path
        if not isinstance(raw, dict):
            self.fail("is not a map")
        self.raw: dict[Any, Any] = raw

    def fail(self, problem: str) -> NoReturn:
        raise CorruptArchiveError(f"{self.prefix}{self.where} {problem}", self.path)

    def int(self, key: str, lo: int = 0, hi: int = U64, default: Any = ...) -> Any:
        v = self.raw.get(key, default)
        if v is ... or (v is not default and not (type(v) is int and lo <= v <= hi)):
            self.fail(f"has no valid {key!r} (an integer in {lo}..{hi} expected, got {_short(v)})")
        return v

    def str(self, key: str, pattern: re.Pattern[str] | None = None, default: Any = ...) -> Any:
        v = self.raw.get(key, default)
        if v is ... or (v is not default and not (isinstance(v, str) and (pattern is None or pattern.match(v)))):
            self.fail(f"has no valid {key!r} (got {_short(v)})")
        return v

    def choice(self, key: builtins.str, options: tuple[Any, ...], default: Any = ...) -> Any:
        v = self.raw.get(key, default)
        if v is ... or (v is not default and v not in options):
            self.fail(f"has {key!r} = {_short(v)}, not one of {', '.join(map(repr, options))}")
        return v

    def list(self, key: builtins.str, default: Any = ...) -> Any:
        v = self.raw.get(key, default)
        if v is ... or (v is not default and not isinstance(v, list)):
            self.fail(f"has no valid {key!r} (a list expected)")
        return v

    def map(self, key: builtins.str) -> dict[builtins.str, Any] | None:
        v = self.raw.get(key)
        if v is not None and not isinstance(v, dict):
            self.fail(f"has no valid {key!r} (a map expected)")
        return v


_REPR = reprlib.Repr()  # keywords only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def _short(v: Any) -> str:
    """A forged value for an error message: its repr, cut short before it is built whole."""
    return _REPR.repr(v)


def ints(v: Any, n: int | None = None, lo: int = 0) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(type(x) is int and lo <= x <= U64 for x in v)


def safe_relpath(name: object, archive: Where) -> str:
    """``name`` if it is a relative POSIX path that stays inside its folder; else UnsafePathError."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"invalid file name {_short(name)} in the index", archive)
    p = PurePosixPath(name)
    if (p.is_absolute() or ".." in p.parts or "." in name.split("/") or "" in name.split("/")
            or (len(name) > 1 and name[1] == ":")):
        raise UnsafePathError(f"file name {_short(name)} would be written outside the output folder", archive)
    return name


def link_target_inside(path: str, link: str) -> bool:
    """Whether a link at ``path`` (relative to the model folder) with text ``link`` resolves to a
    place inside the model folder (lexically: the folder holds no other links to follow)."""
    if not link or link.startswith("/") or "\\" in link or "\x00" in link:
        return False
    depth = len(PurePosixPath(path).parts) - 1
    for part in PurePosixPath(link).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return True


# ---------------------------------------------------------------------------- streams

def parse_stream(raw: Any, label: str, path: Where, checked: dict[str, Pipeline] | None = None) -> Stream:
    """One stream record, its fields typed and its pipeline known (not yet placed in a file).
    ``checked`` remembers the pipelines already checked, for an index of many streams."""
    f = Fields(raw, label, path)
    kind = f.choice("kind", KINDS)
    dtype = f.raw.get("dtype")
    if kind == "tensor":
        if not (isinstance(dtype, str) and dtype in dtypes.DTYPES):
            raise CorruptArchiveError(f"{label}: unknown dtype {_short(dtype)} for a tensor stream", path)
    elif dtype is not None:
        f.fail("is a bytes stream with a dtype")
    chunks = f.list("chunks")
    if not all(ints(c, 4) for c in chunks):
        f.fail("has a malformed chunk (four non-negative integers expected)")
    ref_map = f.raw.get("ref_map")
    if ref_map is not None and not (isinstance(ref_map, list) and ref_map and all(ints(p, 3) for p in ref_map)):
        f.fail("has a malformed reference map")
    pipeline = f.list("pipeline")
    if not all(isinstance(c, dict) for c in pipeline):
        f.fail("has a malformed pipeline")
    ref_cast = None
    cast = f.map("ref_cast")
    if cast is not None:
        g = Fields(cast, f"{label}'s ref_cast", path)
        ref_cast = (g.choice("from", casts.FLOATS), g.choice("round", casts.ROUNDINGS))
        if not casts.supported(ref_cast[0], str(dtype), ref_cast[1]):
            f.fail(f"has a reference cast from {ref_cast[0]} to {_short(dtype)} ({ref_cast[1]}) that elves does not make")
    s = Stream(kind, dtype, f.int("nbytes"), f.str("hash", _HEX32), pipeline, f.int("chunk_elems", 1),
               [Chunk(*c) for c in chunks], decoded_hash=f.str("decoded_hash", _HEX32, None),
               ref=f.int("ref", 0, U64, None), ref_map=ref_map, ref_cast=ref_cast)
    s.codecs = check_pipeline(s, label, path, checked)
    if ref_map is not None and s.ref is None:
        f.fail("has a reference map but no reference")
    return s


def check_pipeline(s: Stream, label: str, path: Where, checked: dict[str, Pipeline] | None = None) -> Pipeline:
    """The stream's codec pipeline, built from its configs: every codec known, its parameters in
    range, in an order that decodes, and a filter's element type as wide as the stream's.
    ``checked`` holds the pipelines already built, by config: streams share them."""
    key = repr((s.kind, s.dtype, len(s.chunks) > 1, s.pipeline))
    if checked is not None and key in checked:
        return checked[key]
    try:
        pipeline = Pipeline.from_config(s.pipeline)
    except ElvesError as e:
        raise type(e)(f"{label}: {e.message}", path) from None
    except Exception as e:  # a codec's own checks, whatever they raise on forged parameters
        raise CorruptArchiveError(f"{label}: invalid codec parameters: {e}", path) from None
    # Filters keep the element width (``elf`` maps floats to unsigned words of the same width), so
    # every codec that names a dtype names one as wide as the stream's elements.
    width = dtypes.get(s.dtype).itemsize if s.kind == "tensor" and s.dtype is not None else None
    for c in s.pipeline:
        named = c.get("dtype")
        if named is not None and (width is None or not isinstance(named, str) or dtypes.get(named).itemsize != width):
            raise CorruptArchiveError(f"{label}: its pipeline codes {named} elements, but it holds "
                                      f"{s.dtype or 'bytes'}", path)
    if not s.pipeline and len(s.chunks) > 1:
        raise CorruptArchiveError(f"{label}: a stream stored as it is has more than one chunk", path)
    if checked is not None:
        checked[key] = pipeline
    return pipeline


def check_chunks(s: Stream, label: str, path: Where, data_start: int, data_end: int) -> None:
    """The chunks follow the stream's plan (every one ``chunk_bytes`` long when decoded, the last
    what remains, adding up to ``nbytes``) and their payloads lie in ``[data_start, data_end)``."""
    step = s.chunk_bytes
    if step > MAX_CHUNK_BYTES:
        raise CorruptArchiveError(f"{label}: chunks of {step} bytes exceed the {MAX_CHUNK_BYTES}-byte limit", path)
    if s.kind == "tensor" and s.nbytes % dtypes.get(s.dtype or "").itemsize:
        raise CorruptArchiveError(f"{label}: {s.nbytes} bytes is not a whole number of {s.dtype} elements", path)
    if len(s.chunks) != -(-s.nbytes // step):
        raise CorruptArchiveError(f"{label}: {len(s.chunks)} chunks cannot hold {s.nbytes} bytes "
                                  f"in chunks of {step}", path)
    for i, c in enumerate(s.chunks):
        if c.decoded_length != min(step, s.nbytes - i * step):
            raise CorruptArchiveError(f"{label}: chunk {i} decodes to {c.decoded_length} bytes, "
                                      f"expected {min(step, s.nbytes - i * step)}", path)
        if c.length > MAX_EXPANSION * c.decoded_length + MAX_OVERHEAD:  # it would be read whole
            raise CorruptArchiveError(f"{label}: chunk {i} has a {c.length}-byte payload, more than any coding "
                                      f"of {c.decoded_length} bytes", path)
        if c.offset < data_start or c.offset + c.length > data_end:
            raise CorruptArchiveError(f"{label}: chunk {i} lies outside the data region", path)
    if s.chunks and s.codecs is not None:  # the codecs can decode chunks of these lengths (whole elements)
        for n in {s.chunks[0].decoded_length, s.chunks[-1].decoded_length}:
            try:
                s.codecs.expected(n)
            except ElvesError as e:
                raise CorruptArchiveError(f"{label}: {e.message}", path) from None


def check_no_overlap(streams: list[Stream], path: Where) -> None:
    """No two chunk payloads share a byte (a forger's way to make one payload mean two things)."""
    spans = sorted((c.offset, c.offset + c.length) for s in streams for c in s.chunks if c.length)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise CorruptArchiveError(f"the index is malformed: two chunk payloads overlap at byte {start}", path)


def check_ref(streams: list[Stream], i: int, path: Where) -> None:
    """A stream's reference is an earlier stream, itself coded without one (so decoding a chunk
    never needs more than one other stream), as long as this one or laid out by a map of sorted,
    disjoint pieces that lie within both streams; a cast reference has a source of as many
    elements; and an ``xor`` filter names the bytes it is given (hash and length)."""
    s = streams[i]
    codec = s.decoder().ref_codec
    if s.ref is None:
        if codec is not None and codec.codec_id != "xor":  # only xor names a source outside the archive
            raise CorruptArchiveError(f"stream {i}: its pipeline needs a reference, but it names none", path)
        if s.ref_cast is not None:
            if codec is None:
                raise CorruptArchiveError(f"stream {i}: it has a reference cast but no reference", path)
            cfg = s.pipeline[0]
            if cfg.get("shape") is not None or \
                    cfg["ref_nbytes"] // casts.WIDTH[s.ref_cast[0]] * casts.WIDTH[s.dtype or ""] != s.nbytes:
                raise CorruptArchiveError(f"stream {i}: its reference cast has a source of another size", path)
        return
    r = s.ref
    if not r < i:
        raise CorruptArchiveError(f"stream {i} references stream {r}, which does not come before it", path)
    base = streams[r]
    if codec is None:
        raise CorruptArchiveError(f"stream {i} references stream {r}, but its pipeline takes no reference", path)
    if base.ref is not None or base.decoder().ref_codec is not None:
        raise CorruptArchiveError(f"stream {i} references stream {r}, which cannot be its reference", path)
    if codec.codec_id == "xor" and (s.pipeline[0]["ref_hash"] != base.expected_hash
                                    or s.pipeline[0]["ref_nbytes"] != base.nbytes or "shape" in s.pipeline[0]):
        raise CorruptArchiveError(f"stream {i}: its xor filter names other bytes than stream {r}'s", path)
    if s.ref_cast is not None:
        if s.ref_map is not None or base.dtype != s.ref_cast[0] or \
                base.nbytes // casts.WIDTH[s.ref_cast[0]] != s.nbytes // casts.WIDTH[s.dtype or ""]:
            raise CorruptArchiveError(f"stream {i} references stream {r}, which cannot be its cast", path)
        return
    if s.ref_map is None and base.nbytes != s.nbytes:
        raise CorruptArchiveError(f"stream {i} references stream {r}, which cannot be its reference", path)
    end = 0
    for dst, src, length in s.ref_map or []:
        if dst < end or length <= 0 or dst + length > s.nbytes or src + length > base.nbytes:
            raise CorruptArchiveError(f"stream {i}: its reference map points outside the streams", path)
        end = dst + length


# ---------------------------------------------------------------------------- files

def parse_file(raw: Any, streams: list[Stream], path: Where) -> FileEntry:
    f = Fields(raw, "a file entry", path)
    name = safe_relpath(raw.get("path"), path)
    f.where = f"file {name!r}"
    fmt = f.choice("format", FILE_FORMATS)
    segments = f.list("segments")
    if not all(type(s) is int and 0 <= s < len(streams) for s in segments):
        f.fail("has a segment that points at no stream")
    entry = FileEntry(name, f.int("size"), f.str("sha256", _HEX64), fmt, segments,
                      lossy=f.raw.get("lossy", False), link=f.str("link", None, None),
                      mode=f.int("mode", 0, 0o777, None))
    if not isinstance(entry.lossy, bool):
        f.fail("has a non-boolean 'lossy'")
    if sum(streams[s].nbytes for s in segments) != entry.size:
        f.fail(f"has segments that do not add up to its size ({entry.size} bytes)")
    if (fmt == "symlink") != (entry.link is not None) or \
            (entry.link is not None and (segments or not link_target_inside(name, entry.link))):
        f.fail("is a malformed symbolic link (a relative target inside the model, and no content)")
    if entry.lossy != any(streams[s].decoded_hash is not None for s in segments):
        f.fail("says it is lossy, and its streams disagree" if entry.lossy else "has lossy streams, unmarked")
    tensors = f.list("tensors")
    # Tensor entries are claims that readers check against the file's own structure
    # (decoder.check_tensors); an opaque file or a link has none to check them against, and no
    # writer gives it any.
    if tensors and fmt in ("opaque", "symlink"):
        f.fail(f"names tensors, which a file of format {fmt!r} does not have")
    entry.tensors = [_parse_tensor(t, entry, streams, f) for t in tensors]
    return entry


def _parse_tensor(t: Any, entry: FileEntry, streams: list[Stream], f: Fields) -> TensorEntry:
    if not (isinstance(t, list) and len(t) == 6 and isinstance(t[0], str) and isinstance(t[1], str)
            and ints(t[2]) and len(t[2]) <= MAX_RANK and type(t[3]) is int and type(t[4]) is int and t[4] >= 0
            and (t[5] is None or ints(t[5], len(t[2])))):
        f.fail(f"has a malformed tensor entry {str(t)[:80]}")
    name, dt, shape, segment, offset, strides = t
    te = TensorEntry(name, dt, tuple(shape), segment, offset, tuple(strides) if strides is not None else None)
    packed = dt in dtypes.PACKED
    if dt not in dtypes.DTYPES and not packed:  # dt is a str: checked with the entry's shape
        f.fail(f"has tensor {_short(name)} of unknown dtype {_short(dt)}")
    count = te.count
    if segment == -1:
        if count and not packed:
            f.fail(f"has tensor {_short(name)} of {count} elements and no bytes")
        return te
    if not 0 <= segment < len(entry.segments):
        f.fail(f"has tensor {_short(name)} in segment {segment}, which it does not have")
    stream = streams[entry.segments[segment]]
    if packed:  # sub-byte elements: the tensor is its segment's bytes
        if stream.kind != "bytes" or offset or strides is not None:
            f.fail(f"has tensor {_short(name)} of packed dtype {dt} that is not a whole bytes segment")
        return te
    # A tensor packed with others into a bytes stream (1.5) lies where the file put it, aligned
    # or not; in a tensor stream it is elements of the stream's dtype. Only in a lossless file:
    # there the file's sha256 shows streams swapped in a forged index, which a lossy file, whose
    # bytes are not the original's, cannot; its tensors keep the dtype of their streams to bind
    # them.
    in_bytes = stream.kind == "bytes" and not entry.lossy
    if not in_bytes and stream.dtype != dt:
        f.fail(f"has tensor {_short(name)} of dtype {dt} in a stream of {stream.dtype or 'bytes'}")
    item = dtypes.get(dt).itemsize
    if count == 0:
        extent = 0
    elif strides is None:
        extent = count * item
    else:
        extent = (sum((d - 1) * s for d, s in zip(shape, strides)) + 1) * item
    if (offset % item and not in_bytes) or offset + extent > stream.nbytes:
        f.fail(f"has tensor {_short(name)} that lies outside its segment ({offset} + {extent} > {stream.nbytes} bytes)")
    if entry.format == "safetensors" and not in_bytes and (offset or strides is not None or extent != stream.nbytes):
        f.fail(f"has tensor {_short(name)} whose shape does not cover its segment ({extent} of {stream.nbytes} bytes)")
    return te


def tensor_names(files: list[FileEntry]) -> dict[str, tuple[FileEntry, TensorEntry]]:
    """Every named tensor as ``name -> (file, tensor)``. Names are plain unless two files share
    one (five versions of a checkpoint, say): then every key is qualified as "file:name"."""
    pairs = [(entry, t) for entry in files for t in entry.tensors]
    plain = len({t.name for _, t in pairs}) == len(pairs)
    return {(t.name if plain else f"{entry.path}:{t.name}"): (entry, t) for entry, t in pairs}


def check_paths(files: list[FileEntry], path: Where) -> None:
    """Paths are unique, and none is a folder of another (restore would write through it)."""
    names = {e.path for e in files}
    if len(names) != len(files):
        raise CorruptArchiveError("the index is malformed: two files have the same path", path)
    for e in files:
        parts = e.path.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in names:
                raise CorruptArchiveError(f"the index is malformed: {'/'.join(parts[:k])!r} is a file and "
                                          f"the folder of {e.path!r}", path)


def _check_base(base: dict[str, Any], path: Where) -> None:
    f = Fields(base, "the base model entry", path)
    for t in f.list("tensors"):
        g = Fields(t, "a base tensor entry", path)
        g.str("hash", _HEX32)
        g.int("nbytes")
        g.int("offset", 0, U64, None)
        g.str("name", None, "")
        g.str("file", None, "")
    model = f.map("model") or {}
    for e in Fields(model, "the base model summary", path).list("files", []):
        g = Fields(e, "a base file entry", path)
        g.str("path")
        g.int("size")
        g.str("sha256", _HEX64)


def _check_error_bound(bound: dict[str, Any], path: Where) -> None:
    f = Fields(bound, "the error bound", path)
    f.choice("mode", ("abs", "rel"))
    f.str("spec")
    v = bound.get("value")
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
        f.fail("has no valid 'value'")


# ---------------------------------------------------------------------------- the index

def parse_index(raw: Any, path: Where, version: tuple[int, int], data_start: int, data_end: int) -> Index:
    """Check every invariant of a decoded index (msgpack) of an archive of format ``version`` whose
    chunk payloads lie in ``[data_start, data_end)``, and return it typed."""
    f = Fields(raw, "index", path)
    fmt = f.raw.get("format")
    if not (ints(fmt, 2) and tuple(fmt or ()) == version):
        f.fail(f"has format {_short(fmt)}, but the header says {version[0]}.{version[1]}")
    checked: dict[str, Pipeline] = {}
    streams = [parse_stream(s, f"stream {i}", path, checked) for i, s in enumerate(f.list("streams"))]
    for i, s in enumerate(streams):
        check_chunks(s, f"stream {i}", path, data_start, data_end)
        check_ref(streams, i, path)
    check_no_overlap(streams, path)
    files = [parse_file(e, streams, path) for e in f.list("files")]
    if not files:
        raise CorruptArchiveError("the index lists no files (compress never writes such an archive)", path)
    check_paths(files, path)
    used = {i for e in files for i in e.segments}
    if len(used) != len(streams):  # compress writes a stream only for a file's segment
        unused = min(set(range(len(streams))) - used)
        raise CorruptArchiveError(f"the index is malformed: stream {unused} belongs to no file (a file was "
                                  "removed from the index?)", path)
    index = Index(writer=f.str("writer", None, ""), lossy=f.raw.get("lossy", False),
                  source=f.choice("source", ("file", "folder"), "folder"), streams=streams, files=files,
                  base=f.map("base"), error_bound=f.map("error_bound"))
    if not isinstance(index.lossy, bool) or (any(e.lossy for e in files) and not index.lossy):
        f.fail("has a 'lossy' flag that its files disagree with")
    if index.source == "file" and len(files) != 1:
        f.fail("is of a single-file model with several files")
    if index.base is not None:
        _check_base(index.base, path)
    if index.error_bound is not None:
        _check_error_bound(index.error_bound, path)
    return index
