"""The ``.elves`` container: header, chunk payloads, index (docs/FORMAT.md).

:class:`ArchiveWriter` appends chunk payloads to a temporary file and renames it into place only
once the index and header are written, so a crash or a full disk never leaves something that
looks like an archive. :class:`ArchiveReader` checks the header, the index and every chunk it
reads, and names the stream (tensor or file) in any error.
"""
from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack
import xxhash
import zstandard

from .errors import (
    CorruptArchiveError,
    OutputError,
    OutputExistsError,
    TruncatedArchiveError,
    UnsafePathError,
    UnsupportedFormatError,
)

MAGIC = b"ELVES\x00\r\n"
FORMAT_VERSION = (1, 2)
HEADER = struct.Struct("<8sHHIQQQ")  # magic, major, minor, flags, index offset, length, xxh3-64
HEADER_SIZE = 64
DATA_START = 4096
ALIGN = 4096
ALIGN_STREAMS_FROM = 4 << 20
FLAG_LOSSY = 1


@dataclass
class Stream:
    """An index entry: one unique byte stream and the chunks it is stored in."""

    kind: str                 # "tensor" or "bytes"
    dtype: str | None
    nbytes: int
    hash: str                 # xxh3-128 hex of the decoded bytes
    pipeline: list[dict[str, Any]]
    chunk_elems: int
    chunks: list[tuple[int, int, int, int]]  # offset, length, decoded length, xxh3-64 of payload
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

    def to_dict(self) -> dict[str, Any]:
        d = {
            "kind": self.kind, "dtype": self.dtype, "nbytes": self.nbytes, "hash": self.hash,
            "pipeline": self.pipeline, "chunk_elems": self.chunk_elems, "chunks": [list(c) for c in self.chunks],
        }
        if self.decoded_hash is not None:
            d["decoded_hash"] = self.decoded_hash
        if self.ref is not None:
            d["ref"] = self.ref
        if self.ref_map is not None:
            d["ref_map"] = self.ref_map
        return d

    @property
    def expected_hash(self) -> str:
        """The xxh3-128 that decoding this stream must reproduce."""
        return self.decoded_hash or self.hash

    @property
    def stored_bytes(self) -> int:
        return sum(c[1] for c in self.chunks)


def safe_relpath(name: object, archive: Path) -> str:
    """``name`` if it is a relative POSIX path that stays inside its folder; else UnsafePathError."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"invalid file name {name!r} in the index", archive)
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"file name {name!r} would be written outside the output folder", archive)
    return name


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A fresh temporary name next to ``path``, so that renaming it into place is atomic."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".elves-tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


class ArchiveWriter:
    """Writes an archive to ``path`` through a temporary file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], force: bool = False):
        self.path = Path(path)
        if self.path.exists() and not force:
            raise OutputExistsError("already exists (use --force to overwrite)", self.path)
        if not self.path.parent.is_dir():
            raise OutputError("the folder to write into does not exist", self.path.parent)
        self.tmp = temp_sibling(self.path)
        self.f = open(self.tmp, "r+b")
        self.f.write(b"\0" * DATA_START)
        self.pos = DATA_START
        self.streams: list[Stream] = []
        self.files: list[dict[str, Any]] = []
        self.lossy = False
        self.source_kind = "folder"
        self.base: dict[str, Any] | None = None  # the base model the streams reference (BitX)
        self.error_bound: dict[str, Any] | None = None  # the lossy mode asked for (ELF), if any

    def begin_stream(self, nbytes: int) -> None:
        """Start a stream's chunks on a 4 KiB boundary when the stream is large."""
        if nbytes >= ALIGN_STREAMS_FROM and self.pos % ALIGN:
            pad = ALIGN - self.pos % ALIGN
            self._write(b"\0" * pad)

    def write_chunk(self, payload: bytes, decoded_length: int) -> tuple[int, int, int, int]:
        offset = self.pos
        self._write(payload)
        return (offset, len(payload), decoded_length, xxhash.xxh3_64_intdigest(payload))

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        """A chunk payload written earlier, read back (to serve as a reference); call
        :meth:`flush` after writing it. Safe to call from several threads."""
        offset, length, _, _ = stream.chunks[chunk]
        return os.pread(self.f.fileno(), length, offset)

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise OutputError(f"cannot write the archive: {e.strerror}", self.path) from None

    def add_stream(self, stream: Stream) -> int:
        self.streams.append(stream)
        return len(self.streams) - 1

    def add_file(self, entry: dict[str, Any]) -> None:
        self.files.append(entry)

    def _write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise OutputError(f"cannot write the archive: {e.strerror}", self.path) from None
        self.pos += len(data)

    def close(self) -> None:
        from . import __version__

        index = {
            "format": list(FORMAT_VERSION),
            "writer": f"elves {__version__}",
            "lossy": self.lossy,
            "source": self.source_kind,
            "streams": [s.to_dict() for s in self.streams],
            "files": self.files,
        }
        if self.base is not None:
            index["base"] = self.base
        if self.error_bound is not None:
            index["error_bound"] = self.error_bound
        blob = zstandard.ZstdCompressor(level=9).compress(msgpack.packb(index, use_bin_type=True))
        index_offset = self.pos
        self._write(blob)
        head = HEADER.pack(MAGIC, *FORMAT_VERSION, FLAG_LOSSY if self.lossy else 0,
                           index_offset, len(blob), xxhash.xxh3_64_intdigest(blob))
        head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        try:
            self.f.seek(0)
            self.f.write(head)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot finish the archive: {e.strerror}", self.path) from None

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ArchiveReader:
    """Random access to an archive's streams. Cheap to open: reads the header and the index."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self.f = open(self.path, "rb")
        except FileNotFoundError:
            raise CorruptArchiveError("no such archive", self.path) from None
        except IsADirectoryError:
            raise CorruptArchiveError("is a folder, not an archive", self.path) from None
        try:
            self._read_index()
        except BaseException:
            self.f.close()
            raise

    def _read_index(self) -> None:
        size = os.fstat(self.f.fileno()).st_size
        head = self.f.read(HEADER_SIZE)
        if len(head) < 8 or head[:8] != MAGIC:
            if MAGIC.startswith(head[:8]) and len(head) < 8:
                raise TruncatedArchiveError("the archive is truncated: its header is cut short", self.path)
            raise CorruptArchiveError("not an elves archive (bad magic)", self.path)
        if len(head) < HEADER_SIZE:
            raise TruncatedArchiveError("the archive is truncated: its header is cut short", self.path)
        magic, major, minor, flags, index_offset, index_len, index_hash = HEADER.unpack_from(head)
        (head_hash,) = struct.unpack_from("<Q", head, HEADER.size)
        if xxhash.xxh3_64_intdigest(head[:HEADER.size]) != head_hash:
            raise CorruptArchiveError("the archive header is corrupted (checksum mismatch)", self.path)
        if major > FORMAT_VERSION[0]:
            raise UnsupportedFormatError(
                f"written in format {major}.{minor}, newer than this elves reads "
                f"({FORMAT_VERSION[0]}.x): upgrade elves", self.path)
        if index_offset == 0:
            raise CorruptArchiveError("the archive was never finished (no index)", self.path)
        if index_offset + index_len > size:
            raise TruncatedArchiveError(
                f"the archive is truncated: {size} bytes, but its index ends at byte {index_offset + index_len}",
                self.path)
        self.f.seek(index_offset)
        blob = self.f.read(index_len)
        if xxhash.xxh3_64_intdigest(blob) != index_hash:
            raise CorruptArchiveError("the archive index is corrupted (checksum mismatch)", self.path)
        try:
            index = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(blob), raw=False)
            self.streams = [Stream(**{k: s[k] for k in Stream.__dataclass_fields__ if k in s})
                            for s in index["streams"]]
            self.files: list[dict[str, Any]] = index["files"]
            self.lossy = bool(index.get("lossy", False))
            self.writer = index.get("writer", "")
            self.source_kind = index.get("source", "folder")
            # A lossy archive's bound: {"codec": "elf", "mode": "abs"|"rel", "value", "spec"}.
            self.error_bound: dict[str, Any] | None = index.get("error_bound")
            # The base model the archive was compressed against (BitX), if any; bitx.base.attach_base
            # checks a given base against it and sets base_model.
            self.base_needed: dict[str, Any] | None = index.get("base")
            self.base_model: Any = None
            self.owns_base = False
        except Exception as e:  # the checksum matched, so this is a writer bug or a forged index
            raise CorruptArchiveError(f"the archive index is malformed: {e}", self.path) from None
        self.flags = flags
        self.version = (major, minor)
        for entry in self.files:
            safe_relpath(entry.get("path"), self.path)
            for s in entry["segments"]:
                if not isinstance(s, int) or not 0 <= s < len(self.streams):
                    raise CorruptArchiveError(f"{entry['path']}: segment points at no stream", self.path)
        for i, s in enumerate(self.streams):
            for off, length, _, _ in s.chunks:
                if off + length > index_offset:
                    raise CorruptArchiveError("a chunk lies outside the data region", self.path)
            if s.ref is not None:
                self._check_ref(i, s)

    def _check_ref(self, i: int, s: Stream) -> None:
        """A stream's reference must be another stream, itself coded without one (so decoding a
        chunk never needs more than one other stream), as long as this one or laid out by a map
        of sorted, disjoint pieces that lie within both streams."""
        r = s.ref
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(self.streams) or r == i:
            raise CorruptArchiveError(f"stream {i} references no stream", self.path)
        base = self.streams[r]
        if base.ref is not None or (s.ref_map is None and base.nbytes != s.nbytes):
            raise CorruptArchiveError(f"stream {i} references stream {r}, which cannot be its reference",
                                      self.path)
        if s.ref_map is not None:
            end = 0
            for piece in s.ref_map if isinstance(s.ref_map, list) else [None]:
                if not (isinstance(piece, list) and len(piece) == 3
                        and all(isinstance(v, int) and not isinstance(v, bool) for v in piece)):
                    raise CorruptArchiveError(f"stream {i}: malformed reference map", self.path)
                dst, src, length = piece
                if dst < end or length <= 0 or src < 0 or dst + length > s.nbytes or src + length > base.nbytes:
                    raise CorruptArchiveError(f"stream {i}: its reference map points outside the streams",
                                              self.path)
                end = dst + length

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        """The payload of ``chunk`` of ``stream``, its checksum checked."""
        offset, length, _, checksum = stream.chunks[chunk]
        data = os.pread(self.f.fileno(), length, offset)
        if len(data) != length:
            raise TruncatedArchiveError("the payload is cut short", self.path)
        if xxhash.xxh3_64_intdigest(data) != checksum:
            raise CorruptArchiveError("the payload is corrupted (checksum mismatch)", self.path)
        return data

    def close(self) -> None:
        if getattr(self, "base_model", None) is not None and self.owns_base:
            self.base_model.close()
        self.f.close()

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
