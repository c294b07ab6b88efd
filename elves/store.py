"""The model store: a folder holding many models, each unique tensor and file stored once, by
content, and fine-tunes coded as BitX deltas against their base (docs/FORMAT.md, "The model store").

    >>> from elves.store import Store
    >>> s = Store.init("hub.store")
    >>> s.add("llama-3-8b/")                       # standalone
    >>> s.add("my-finetune/")                      # base found by elves.families: stored as its delta
    >>> s.restore("my-finetune", "out/")          # bit-exact, checked against each file's sha256

Layout::

    elves-store.json        what this folder is, and the store version
    lock                    writers (add, rm, gc, repack) hold an exclusive flock on it
    objects/ab/<key>        one object per unique segment; <key> = xxh3-128 of its raw bytes + dtype
    models/<name>.json      a model's manifest: its files, each a list of object slices tiling it
    profiles/<name>.json    its family profile (elves.families), to match later models against
    tmp/                    files being written; renamed into place when complete

An object is one segment coded the way the encoder codes an archive stream (``pipeline_for``, the
codec ``Pipeline``, chunks with xxh3-64 checksums), in a small self-describing container. An
object coded against a base tensor (``xor``) names the objects it reads (``refs``); those are
never deltas themselves, so restoring any object reads at most one other. Keys are the raw
content's hash, so re-coding an object (``repack``) keeps its key and no manifest changes.

Crash safety: objects and manifests are written under ``tmp/``, fsynced and renamed into place,
the manifest last; a writer killed at any point leaves only orphans, which :meth:`Store.gc`
deletes. Readers take no lock: every file they read is either absent or complete.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import msgpack
import numpy as np
import xxhash

from bitx.base import BaseModel, BaseSegment, BaseTensor
from bitx.delta import Delta, DeltaPlanner

from . import dtypes
from .codecs import Pipeline
from .decoder import RestoreSummary, Sha256Beside, iter_stream, open_new, write_files
from .encoder import pipeline_for
from .errors import (
    ArchiveError,
    CorruptArchiveError,
    ElvesError,
    OutputError,
    StoreError,
    UnsupportedFormatError,
)
from .index import (
    Chunk,
    Fields,
    FileEntry,
    Stream,
    check_chunks,
    check_paths,
    ints,
    parse_file,
    parse_stream,
)
from .model import (
    Segment,
    SourceFile,
    TensorView,
    hash_segment,
    open_source,
    read_exact,
)
from .parallel import INLINE_BYTES, default_threads, ordered_map
from .readers import read_model

if TYPE_CHECKING:
    from .families import Family

STORE_VERSION = (1, 0)
MARKER = "elves-store.json"
OBJECT_MAGIC = b"ELVOBJ\x00\n"
FOOTER = struct.Struct("<QQ8s")   # trailer length, xxh3-64 of the trailer, magic
PACK_BELOW = 4096                 # segments shorter than this are packed, one object per file
PACK_MAX = 4 << 20                # ...up to this many bytes an object
BASE_CHAIN = 4                    # a delta may reference the base, its base, ... this many models
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]*(/[A-Za-z0-9][A-Za-z0-9._+@-]*)?")

ProgressFn = Callable[[int], None]


# ---------------------------------------------------------------------------- results

@dataclass
class AddResult:
    """What :meth:`Store.add` did."""

    name: str
    base: str | None              # the stored model its tensors were coded against, if any
    reasons: list[str]            # why that base (or why none)
    bytes_in: int                 # the model's files, as given
    bytes_added: int              # what the store grew by: new objects, the manifest, the profile,
                                  # less what re-coding models stored before it saved
    objects_new: int
    objects_reused: int           # segments already in the store (this model's own duplicates too)
    delta_objects: int            # new objects coded against the base
    repacked: list[str] = field(default_factory=list)  # stored models re-coded as deltas of this one
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_in / max(self.bytes_added, 1)


@dataclass
class ModelEntry:
    """A stored model, as :meth:`Store.models` lists it."""

    name: str
    source: str                   # "file" or "folder": what restore writes
    files: int
    bytes: int                    # its files' total size
    base: str | None
    reasons: list[str]
    added: str                    # UTC, ISO 8601


@dataclass
class StoreStats:
    """Sizes of a store (:meth:`Store.stats`)."""

    models: int
    logical_bytes: int            # every model's files, counted once per model
    stored_bytes: int             # live objects plus manifests and profiles
    objects: int                  # live objects
    delta_objects: int
    garbage_objects: int          # objects nothing references (``gc`` deletes them)
    garbage_bytes: int

    @property
    def ratio(self) -> float:
        return self.logical_bytes / max(self.stored_bytes, 1)


@dataclass
class GcReport:
    """What :meth:`Store.gc` deleted and kept."""

    objects_removed: int
    bytes_freed: int
    objects_kept: int
    temp_removed: int


@dataclass
class RepackReport:
    """What :meth:`Store.repack` re-coded."""

    models: list[tuple[str, str]] = field(default_factory=list)  # (model, base) pairs handled
    objects_rewritten: int = 0
    bytes_before: int = 0         # of the rewritten objects
    bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)             # why some were left as they are

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass
class StoreProblem:
    """One thing :meth:`Store.verify` found wrong: the file concerned and what is wrong with it."""

    path: str
    message: str


@dataclass
class StoreVerifyReport:
    """What :meth:`Store.verify` checked and found, problems listed by kind (``PROBLEMS``)."""

    full: bool = False            # models were decoded and their files' sha256 checked
    models: int = 0               # manifests that parse
    objects: int = 0              # objects that manifests reach, checked whole
    bytes_checked: int = 0        # object bytes read, plus with ``full`` the files decoded
    files_checked: int = 0        # files decoded and matched with their sha256 (``full``)
    bad_manifests: list[StoreProblem] = field(default_factory=list)   # unreadable, malformed, or not
                                                                       # matching its objects; its profile
    missing_objects: list[StoreProblem] = field(default_factory=list)  # named, absent
    damaged_objects: list[StoreProblem] = field(default_factory=list)  # footer, trailer or a payload
    bad_refs: list[StoreProblem] = field(default_factory=list)    # a delta reading a delta or a non-tensor
    orphans: list[StoreProblem] = field(default_factory=list)     # in objects/, reached by nothing: gc frees
    bad_files: list[StoreProblem] = field(default_factory=list)   # decoded bytes not the file's sha256
    orphans_checked: bool = True  # False when a manifest is unreadable: what it names is unknown

    PROBLEMS = ("bad_manifests", "missing_objects", "damaged_objects", "bad_refs", "orphans", "bad_files")

    @property
    def problems(self) -> dict[str, list[StoreProblem]]:
        return {k: getattr(self, k) for k in self.PROBLEMS if getattr(self, k)}

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------- objects

def object_key(digest: str, dtype: str | None) -> str:
    """The key of a segment: its raw bytes' xxh3-128 and its dtype (``bytes`` for opaque ones)."""
    return f"{digest}.{dtype.lower() if dtype else 'bytes'}"


_KEY_RE = re.compile(r"[0-9a-f]{32}\.[a-z0-9_]+")
MAX_JSON_BYTES = 256 << 20        # a manifest or profile larger than this is not one elves wrote


class _StoreFields(Fields):
    """Typed reads of one of the store's own records (an object trailer, a manifest)."""

    prefix = ""


def _open_inside(root: Path | None, path: Path, what: str) -> int:
    """``path`` opened for reading without following a link at any level below ``root`` (the
    store; without it, at the last level only): a link planted in a store shared with others must
    not make elves read, or later delete, what lies outside it. A FIFO or a device is refused, not
    waited on. A missing file raises FileNotFoundError."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        if root is None:
            fd = os.open(path, flags)
        else:
            *folders, name = path.relative_to(root).parts
            dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for part in folders:
                    sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                    os.close(dfd)
                    dfd = sub
                fd = os.open(name, flags, dir_fd=dfd)
            finally:
                os.close(dfd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptArchiveError(f"{what} is a symbolic link or lies in one: the store follows no links",
                                      path) from None
        raise StoreError(f"cannot read {what}: {e.strerror}", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptArchiveError(f"{what} is not a regular file", path)
    return fd


def _read_json(root: Path, path: Path, what: str) -> Any:
    """A JSON file of the store, read without following links and refused past MAX_JSON_BYTES
    (FileNotFoundError when it is missing)."""
    fd = _open_inside(root, path, what)
    with os.fdopen(fd, "rb") as f:
        blob = f.read(MAX_JSON_BYTES + 1)
    if len(blob) > MAX_JSON_BYTES:
        raise CorruptArchiveError(f"{what} is over {MAX_JSON_BYTES} bytes: not one elves wrote", path)
    try:
        return json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise CorruptArchiveError(f"{what} is not valid JSON: {str(e)[:100]}", path) from None


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing the store (a full disk, a quota, a read-only or forbidden folder,
    a file-size limit) as OutputError naming ``path``."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write to the store: {e.strerror or e}", path) from None


@dataclass
class ObjectMeta(Stream):
    """An object's trailer: its one stream, as an archive index entry describes a stream (chunk
    offsets within the object file), and the objects it references."""

    refs: list[str] = field(default_factory=list)  # keys of the objects the ``xor`` filter reads
    size: int = 0                 # of the object file

    def to_trailer(self) -> bytes:
        return msgpack.packb({
            "v": list(STORE_VERSION), "kind": self.kind, "dtype": self.dtype, "nbytes": self.nbytes,
            "hash": self.hash, "pipeline": self.pipeline, "chunk_elems": self.chunk_elems,
            "chunks": [[c.length, c.decoded_length, c.checksum] for c in self.chunks], "refs": self.refs,
        }, use_bin_type=True)


class StoredObject:
    """An object file opened for reading: its trailer checked and parsed, payloads read on demand
    with their checksums checked. It reads like a one-stream :class:`~elves.archive.ArchiveReader`,
    so :func:`elves.decoder.iter_stream` decodes it (with ``base_model`` set for a delta).

    The trailer is untrusted (whoever forged it recomputed its checksum): every field is typed and
    checked against the file and its key (:func:`elves.index.parse_stream`, ``check_chunks``)
    before a payload is read. ``root``, the store, is where links stop being followed."""

    def __init__(self, path: Path, key: str, root: Path | None = None):
        self.path, self.key = path, key
        self.files: list[FileEntry] = []  # no file entries: errors name the object by its path
        self.base_needed = None
        self.base_model: StoreBase | None = None
        try:
            self.fd = _open_inside(root, path, f"object {key}")
        except FileNotFoundError:
            raise CorruptArchiveError(f"object {key} is missing: the store is damaged", path) from None
        try:
            self.meta = self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse(self) -> ObjectMeta:
        size = os.fstat(self.fd).st_size
        foot = os.pread(self.fd, FOOTER.size, size - FOOTER.size) if size >= FOOTER.size else b""
        if len(foot) != FOOTER.size or foot[-8:] != OBJECT_MAGIC:
            raise CorruptArchiveError(f"object {self.key} is not a complete object (bad footer)", self.path)
        tlen, thash, _ = FOOTER.unpack(foot)
        start = size - FOOTER.size - tlen
        trailer = os.pread(self.fd, tlen, start) if 0 <= start else b""
        if len(trailer) != tlen or xxhash.xxh3_64_intdigest(trailer) != thash:
            raise CorruptArchiveError(f"object {self.key}: its trailer is corrupted (checksum mismatch)", self.path)
        try:
            raw = msgpack.unpackb(trailer, raw=False)
        except Exception as e:  # msgpack's errors for every kind of malformed input
            raise CorruptArchiveError(f"object {self.key}: its trailer is not valid msgpack: {e}", self.path) from None
        return self._check_trailer(raw, start, size)

    def _check_trailer(self, raw: Any, start: int, size: int) -> ObjectMeta:
        label = f"object {self.key}"
        f = _StoreFields(raw, f"the trailer of {label}", self.path)
        version = f.list("v")
        if not ints(version, 2):
            f.fail("has no valid 'v' (two integers expected)")
        if version[0] > STORE_VERSION[0]:
            raise UnsupportedFormatError(f"{label} was written by a newer elves: upgrade elves", self.path)
        chunks, refs = f.list("chunks"), f.list("refs")
        if not all(ints(c, 3) for c in chunks):
            f.fail("has a malformed chunk (three non-negative integers expected)")
        if not all(isinstance(r, str) and _KEY_RE.fullmatch(r) for r in refs):
            f.fail("has a malformed 'refs' (object keys expected)")
        if any(k in raw for k in ("decoded_hash", "ref", "ref_map")):
            f.fail("has fields of a lossy stream or an in-archive reference, which no object has")
        placed, pos = [], 0
        for length, decoded, check in chunks:  # payloads lie back to back from offset 0
            placed.append([pos, length, decoded, check])
            pos += length
        stream = parse_stream({**raw, "chunks": placed}, label, self.path)
        check_chunks(stream, label, self.path, 0, start)
        if pos != start:
            raise CorruptArchiveError(f"{label}: its payloads end at byte {pos}, but its trailer starts at {start}",
                                      self.path)
        if object_key(stream.hash, stream.dtype) != self.key:
            raise CorruptArchiveError(f"{label}: its trailer's hash and dtype do not give its key", self.path)
        codec = stream.decoder().ref_codec
        ref_hash = getattr(codec, "ref_hash", None)
        if codec is not None and ref_hash is None:
            raise CorruptArchiveError(f"{label}: its pipeline needs a reference that a store cannot give",
                                      self.path)
        wanted = [object_key(ref_hash, stream.dtype)] if ref_hash is not None else []
        if refs != wanted:
            raise CorruptArchiveError(f"{label}: its 'refs' ({', '.join(refs) or 'none'}) are not the objects "
                                      f"its pipeline reads ({', '.join(wanted) or 'none'})", self.path)
        return ObjectMeta(**{k: getattr(stream, k) for k in Stream.__dataclass_fields__}, refs=refs, size=size)

    @property
    def streams(self) -> list[Stream]:
        return [self.meta]

    def read_payload(self, stream: Stream, i: int) -> bytes:
        offset, length, _, check = stream.chunks[i]
        data = os.pread(self.fd, length, offset)
        if len(data) != length or xxhash.xxh3_64_intdigest(data) != check:
            raise CorruptArchiveError(f"object {self.key}: the payload is corrupted (checksum mismatch)", self.path)
        return data

    def close(self) -> None:
        if self.base_model is not None:
            self.base_model.close()
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ObjectWriter:
    """Writes one object under ``tmp/``: payloads, then the trailer and footer, then fsync.
    Errors name ``final``, where the object was going."""

    def __init__(self, tmp_dir: Path, meta: ObjectMeta, final: Path):
        self.final = final
        with _writing(final):
            fd, name = tempfile.mkstemp(prefix="obj.", dir=tmp_dir)
        self.f = os.fdopen(fd, "wb")
        self.tmp = Path(name)
        self.meta = meta
        self.pos = 0

    def write_chunk(self, payload: bytes, decoded: int) -> None:
        with _writing(self.final):
            self.f.write(payload)
        self.meta.chunks.append(Chunk(self.pos, len(payload), decoded, xxhash.xxh3_64_intdigest(payload)))
        self.pos += len(payload)

    def finish(self) -> Path:
        trailer = self.meta.to_trailer()
        with _writing(self.final):
            self.f.write(trailer)
            self.f.write(FOOTER.pack(len(trailer), xxhash.xxh3_64_intdigest(trailer), OBJECT_MAGIC))
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        self.meta.size = self.pos + len(trailer) + FOOTER.size
        return self.tmp

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:  # the buffered rest cannot be written (a full disk): it is not wanted
            pass
        self.tmp.unlink(missing_ok=True)


@dataclass
class _NewObject:
    """An object to encode: its metadata, its raw bytes chunk by chunk, and its references."""

    key: str
    meta: ObjectMeta
    pipeline: Pipeline
    chunks: Callable[[], Iterator[bytes]]
    ref: Callable[[int, int], np.ndarray] | None = None   # (offset, length) -> reference bytes


class StoreBase(BaseModel):
    """A base model whose tensors are store objects, for BitX: planning deltas against stored
    models (``models``) and decoding deltas (``keys``). Only objects that are not deltas
    themselves are offered, so references stay one level deep."""

    kind = "store"

    def __init__(self, store: Store, models: Iterable[str] = (), keys: Iterable[str] = ()):
        super().__init__(store.path)
        self.store = store
        self.objects: dict[str, StoredObject] = {}
        self._pipelines: dict[str, Pipeline] = {}
        self._starts: dict[str, np.ndarray] = {}
        segs: dict[str, BaseSegment] = {}
        try:
            for key in keys:
                if self._open(key, strict=True):
                    segs[key] = self._segment(key, "")
            for name in models:
                man = store._manifest(name)
                for f in man["files"]:
                    for t_name, t_dtype, shape, pos, offset, strides in f["tensors"]:
                        if pos < 0:  # an empty tensor: no bytes to code against
                            continue
                        entry = f["segments"][pos]
                        if len(entry) != 2 or not self._open(entry[0], strict=False):
                            continue
                        key = entry[0]
                        if key not in segs:
                            segs[key] = self._segment(key, f["path"])
                        seg = segs[key]
                        size = int(np.prod(shape, dtype=np.int64)) * dtypes.get(t_dtype).itemsize \
                            if t_dtype in dtypes.DTYPES else -1
                        seg.names.append(t_name)
                        self.tensors.append(BaseTensor(t_name, t_dtype, tuple(shape), seg,
                                                       offset == 0 and strides is None and size == seg.nbytes))
        except BaseException:
            self.close()
            raise

    def _open(self, key: str, strict: bool) -> bool:
        """Open ``key`` if it is a tensor object that is not a delta: ``strict`` makes anything
        else an error (a delta's reference must be such an object)."""
        if key in self.objects:
            return True
        obj = self.store._open_object(key)
        if obj.meta.refs or obj.meta.kind != "tensor":
            obj.close()
            if strict:
                raise CorruptArchiveError(f"object {key} is referenced by a delta but is not a plain tensor object",
                                          self.store._object_path(key))
            return False
        self.objects[key] = obj
        self._pipelines[key] = Pipeline.from_config(obj.meta.pipeline)
        self._starts[key] = np.array([0] + [c.decoded_length for c in obj.meta.chunks], dtype=np.int64).cumsum()
        return True

    def _segment(self, key: str, file: str) -> BaseSegment:
        m = self.objects[key].meta
        seg = BaseSegment(m.dtype, m.nbytes, file, (key, 0), m.hash)  # type: ignore[arg-type]
        self.segments.append(seg)
        return seg

    def _hash(self, wanted: Callable[[BaseSegment], bool], with_sha256: bool) -> None:
        pass  # an object's hash is its key

    def _read_segment(self, seg: BaseSegment, offset: int, length: int) -> np.ndarray:
        key = seg.loc[0]
        obj, pipeline, starts = self.objects[key], self._pipelines[key], self._starts[key]
        if offset < 0 or length < 0 or offset + length > obj.meta.nbytes:  # a delta's reference read
            raise CorruptArchiveError(f"object {key}: a delta reads bytes {offset}..{offset + length} of its "
                                      f"{obj.meta.nbytes}", obj.path)
        first = int(np.searchsorted(starts, offset, side="right")) - 1
        end = int(np.searchsorted(starts, offset + length, side="left"))
        decoded = np.empty(int(starts[end] - starts[first]), dtype=np.uint8)
        for i in range(first, end):  # the chunks that overlap the range, decoded side by side
            lo = int(starts[i] - starts[first])
            pipeline.decode(np.frombuffer(obj.read_payload(obj.meta, i), dtype=np.uint8),
                            decoded[lo:lo + obj.meta.chunks[i].decoded_length])
        start = offset - int(starts[first])
        return decoded[start:start + length]

    def close(self) -> None:
        for obj in self.objects.values():
            obj.close()
        self.objects.clear()


# ---------------------------------------------------------------------------- the store

def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    """Delete ``p``: a link itself (never what it points at), a file, or a folder of ours."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _discard(paths: Iterable[Path]) -> None:
    """Remove what a failed write left, as far as the failing disk lets us: gc does the rest."""
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def default_name(src: str | os.PathLike[str]) -> str:
    """The name a model gets when none is given: its folder's or file's name."""
    return Path(src).resolve().name


class Store:
    """A model store. ``Store(path)`` opens one; :meth:`Store.init` creates one."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        marker = self.path / MARKER
        try:
            info = _read_json(self.path, marker, MARKER)
            version = tuple(info["version"])
            if info.get("format") != "elves-store" or not ints(list(version), 2):
                raise ValueError("not an elves store marker")
        except FileNotFoundError:
            raise StoreError(f"not an elves store (no {MARKER}); create one with `elves store init`",
                             self.path) from None
        except ArchiveError as e:
            raise StoreError(e.message, e.path) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{MARKER} is malformed: {e}", self.path) from None
        if version[0] > STORE_VERSION[0]:
            raise StoreError(f"written by a newer elves (store version {version[0]}.{version[1]}, this elves "
                             f"reads {STORE_VERSION[0]}.x): upgrade elves", self.path)
        for sub in ("objects", "models", "profiles", "tmp"):  # a link here would send writes elsewhere
            try:
                mode = os.lstat(self.path / sub).st_mode
            except FileNotFoundError:
                raise StoreError(f"not a complete store: {sub}/ is missing", self.path) from None
            if not stat.S_ISDIR(mode):
                raise StoreError("is a symbolic link or not a folder: the store follows no links", self.path / sub)

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> Store:
        """Create an empty store at ``path`` (a new or empty folder)."""
        p = Path(path)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise StoreError("already exists and is not an empty folder", p)
        try:
            p.mkdir(parents=True, exist_ok=True)
            for sub in ("objects", "models", "profiles", "tmp"):
                (p / sub).mkdir(exist_ok=True)
            (p / "lock").touch()
        except OSError as e:
            raise OutputError(f"cannot create the store: {e.strerror}", p) from None
        cls._write_json(p / "tmp", p / MARKER, {"format": "elves-store", "version": list(STORE_VERSION)})
        return cls(p)

    # -- paths and small files
    def _object_path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise CorruptArchiveError(f"invalid object key {key!r:.80} in a manifest or an object", self.path)
        return self.path / "objects" / key[:2] / key

    def _open_object(self, key: str, path: Path | None = None) -> StoredObject:
        """Object ``key`` (at ``path``, one being written under tmp/, if given), opened and checked."""
        return StoredObject(path or self._object_path(key), key, self.path)

    def _manifest_path(self, name: str) -> Path:
        return self.path / "models" / f"{quote(name, safe='')}.json"

    def _profile_path(self, name: str) -> Path:
        return self.path / "profiles" / f"{quote(name, safe='')}.json"

    @staticmethod
    def _write_json(tmp_dir: Path, dst: Path, data: Any) -> int:
        blob = json.dumps(data, separators=(",", ":")).encode()
        with _writing(dst):
            fd, name = tempfile.mkstemp(prefix="json.", dir=tmp_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(name, dst)
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
            _fsync_dir(dst.parent)
        return len(blob)

    def _load_manifest(self, path: Path) -> dict[str, Any]:
        """The manifest at ``path``, every field typed and checked (FileNotFoundError if absent)."""
        return self._check_manifest(_read_json(self.path, path, "the manifest"), path)

    def _check_manifest(self, raw: Any, path: Path) -> dict[str, Any]:
        """A manifest is untrusted like an archive's index: its name must be the one its file is
        named after; its files' paths stay inside the model and are unique; their segments are
        object keys (pack slices inside a pack) that add up to each file's size; their tensors lie
        inside their segments, in the segment's dtype (:func:`elves.index.parse_file`)."""
        f = _StoreFields(raw, "the manifest", path)
        version = f.list("version")
        if not ints(version, 2):
            f.fail("has no valid 'version' (two integers expected)")
        if version[0] > STORE_VERSION[0]:
            raise StoreError(f"model {raw.get('name')!r:.80} was added by a newer elves: upgrade elves", path)
        f.choice("format", ("elves-store-model",))
        name = f.str("name")
        if not NAME_RE.fullmatch(name) or self._manifest_path(name) != path:
            f.fail(f"names model {name!r:.80}, not the one its file is named after")
        f.int("seq")
        f.str("added")
        source = f.choice("source", ("file", "folder"))
        base = f.str("base", None, None)
        if base is not None and not NAME_RE.fullmatch(base):
            f.fail(f"has an invalid 'base' {base!r:.80}")
        if not all(isinstance(r, str) for r in f.list("reasons", [])):
            f.fail("has a malformed 'reasons' (strings expected)")
        files = [self._check_file(e, path) for e in f.list("files")]
        if not files or (source == "file" and len(files) != 1):
            f.fail(f"lists {len(files)} files for a model added as a {source}")
        check_paths(files, path)
        return raw

    @staticmethod
    def _check_file(raw: Any, path: Path) -> FileEntry:
        """One file entry of a manifest: its segments are checked here, the rest as an archive's file
        entry, each segment standing for a stream of its key's dtype and its length. A pack slice
        has no dtype of its own: it stands for one of the dtype of the tensor it holds, if any."""
        f = _StoreFields(raw, "a file entry of the manifest", path)
        tensors = f.list("tensors")
        packed = {t[3]: t[1] for t in tensors if isinstance(t, list) and len(t) == 6 and type(t[3]) is int
                  and isinstance(t[1], str) and t[1] in dtypes.DTYPES}
        streams = []
        for i, seg in enumerate(f.list("segments")):
            if not (isinstance(seg, list) and len(seg) in (2, 3) and isinstance(seg[0], str)
                    and _KEY_RE.fullmatch(seg[0]) and ints(seg[1:])):
                f.fail(f"has a malformed segment {str(seg)[:80]} ([key, length] or [key, length, offset])")
            digest, kind = seg[0].split(".")
            if len(seg) == 3 and (kind != "bytes" or seg[1] + seg[2] > PACK_MAX):
                f.fail(f"has a pack slice {str(seg)[:80]} that lies outside any pack")
            dtype = packed.get(i) if len(seg) == 3 else None if kind == "bytes" else kind.upper()
            if dtype is not None and dtype not in dtypes.DTYPES:
                f.fail(f"has a segment of unknown dtype {kind!r}")
            streams.append(Stream("bytes" if dtype is None else "tensor", dtype, seg[1], digest, [], 1, []))
        return parse_file({**raw, "segments": list(range(len(streams)))}, streams, path)

    def _manifest(self, name: str) -> dict[str, Any]:
        try:
            return self._load_manifest(self._manifest_path(name))
        except FileNotFoundError:
            known = ", ".join(sorted(self._names())[:8]) or "none"
            raise StoreError(f"no model named {name!r} in the store (stored: {known})", self.path) from None

    def _manifest_files(self) -> list[Path]:
        return sorted((self.path / "models").glob("*.json"))

    def _names(self) -> list[str]:
        """The stored models' names, for messages and gc: unreadable manifests are skipped."""
        out = []
        for p in self._manifest_files():
            try:
                out.append(self._load_manifest(p)["name"])
            except (OSError, ElvesError):
                continue
        return out

    def _manifests(self) -> list[dict[str, Any]]:
        """Every manifest, in the order the models were added."""
        out = []
        for p in self._manifest_files():
            try:
                out.append(self._load_manifest(p))
            except FileNotFoundError:  # removed since the listing
                continue
        return sorted(out, key=lambda m: (m["seq"], m["name"]))

    def _profile(self, name: str) -> Any:
        from .families import ModelProfile

        path = self._profile_path(name)
        try:
            return ModelProfile.from_json(_read_json(self.path, path, f"the profile of {name!r}"))
        except FileNotFoundError:
            raise CorruptArchiveError(f"the profile of {name!r} is missing", path) from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CorruptArchiveError(f"the profile of {name!r} is malformed: {str(e)[:100]}", path) from None

    def _profiles(self, manifests: list[dict[str, Any]]) -> list[Any]:
        return [self._profile(m["name"]) for m in manifests]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The writers' lock: one add, rm, gc, repack or verify at a time, across processes."""
        try:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open the store's lock: {e.strerror}", self.path / "lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _reusable(self, key: str) -> bool:
        """Whether an object already stored can be used as it is: complete, and its references
        present and not deltas themselves (a ``gc`` killed halfway may leave a delta without them)."""
        if not os.path.lexists(self._object_path(key)):
            return False
        try:
            with self._open_object(key) as obj:
                refs = obj.meta.refs
            for r in refs:
                with self._open_object(r) as ref:
                    if ref.meta.refs:
                        return False
        except ElvesError:
            return False
        return True

    def _chain(self, base: str, exclude: str | None = None) -> list[str]:
        """``base``, its base, ...: the models a delta may reference (stopping at a cycle)."""
        out: list[str] = []
        name: str | None = base
        while name is not None and name not in out and name != exclude and len(out) < BASE_CHAIN:
            if not self._manifest_path(name).exists():
                break
            out.append(name)
            name = self._manifest(name).get("base")
        return out

    # -- encoding
    def _write_objects(self, objects: Iterable[_NewObject], pool: Executor, nthreads: int,
                       progress: ProgressFn | None, commit: bool = True) -> Iterator[tuple[_NewObject, Path]]:
        """Encode ``objects`` chunk by chunk on ``pool`` (in order, a bounded window in flight) and
        write each under ``tmp/``; with ``commit``, rename each into place once complete. Yields
        each object and where it is as soon as it is written. On an error (a full disk:
        OutputError) the object being written is removed, and so is every uncommitted one."""
        tmp_dir = self.path / "tmp"
        done: list[Path] = []

        def jobs() -> Iterator[tuple[_NewObject, bytes, int, bool]]:
            for obj in objects:
                pos = 0
                for raw in obj.chunks():
                    yield obj, raw, pos, pos + len(raw) == obj.meta.nbytes
                    pos += len(raw)

        def encode(job: tuple[_NewObject, bytes, int, bool]) -> tuple[_NewObject, bytes, bytes, bool]:
            obj, raw, pos, last = job
            ref = obj.ref(pos, len(raw)) if obj.ref is not None else None
            return obj, raw, obj.pipeline.encode(np.frombuffer(raw, dtype=np.uint8), ref=ref), last

        writer: _ObjectWriter | None = None
        try:
            for obj, raw, payload, last in ordered_map(pool, encode, jobs(), 2 * nthreads + 2,
                                                       inline=lambda job: len(job[1]) < INLINE_BYTES):
                if writer is None:
                    writer = _ObjectWriter(tmp_dir, obj.meta, self._object_path(obj.key))
                if last and not obj.meta.chunks and len(payload) >= len(raw):
                    # one chunk that coding would not shrink: stored as it is, like in an archive
                    payload, obj.meta.pipeline, obj.meta.refs = raw, [], []
                writer.write_chunk(payload, len(raw))
                if progress:
                    progress(len(raw))
                if last:
                    tmp = writer.finish()
                    writer = None
                    done.append(tmp)
                    if commit:
                        tmp = self._commit(tmp, self._object_path(obj.key))
                    yield obj, tmp
        except BaseException:
            if writer is not None:
                writer.abort()
            if not commit:
                for tmp in done:
                    tmp.unlink(missing_ok=True)
            raise

    def _commit(self, tmp: Path, final: Path) -> Path:
        """Rename the object written at ``tmp`` to ``final``, in a folder of the store that is no
        link; ``tmp`` is removed if that fails."""
        try:
            with _writing(final):
                try:
                    os.mkdir(final.parent)
                except FileExistsError:
                    pass
                if not stat.S_ISDIR(os.lstat(final.parent).st_mode):
                    raise StoreError("is a symbolic link or not a folder: the store writes through no links",
                                     final.parent)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    @staticmethod
    def _new_object(key: str, kind: str, dtype: str | None, nbytes: int, digest: str, pipeline: Pipeline,
                    chunk_elems: int, chunks: Callable[[], Iterator[bytes]], delta: Delta | None = None,
                    ref_key: str | None = None) -> _NewObject:
        if delta is not None:
            pipeline = delta.pipeline
        meta = ObjectMeta(kind, dtype, nbytes, digest, pipeline.get_config(), chunk_elems, [],
                          refs=[ref_key] if ref_key else [])
        return _NewObject(key, meta, pipeline, chunks, delta.read if delta is not None else None)

    # -- reading
    def _iter_object(self, key: str, pool: Executor, window: int, path: Path | None = None,
                     nbytes: int | None = None, pack: bool = False) -> Iterator[np.ndarray]:
        """The decoded chunks of object ``key`` in order, each checked; then its content hash.
        ``nbytes`` is the length a manifest gives it, ``pack`` that the manifest reads slices of
        it (a pack is read whole): both are checked before anything is decoded."""
        with self._open_object(key, path) as obj:
            m = obj.meta
            if nbytes is not None and m.nbytes != nbytes:
                raise CorruptArchiveError(f"object {key} holds {m.nbytes} bytes, but the manifest says {nbytes}",
                                          obj.path)
            if pack and (m.kind != "bytes" or m.nbytes > PACK_MAX):
                raise CorruptArchiveError(f"object {key} is read as a pack, but it is not one ({m.kind}, "
                                          f"{m.nbytes} bytes)", obj.path)
            if m.refs:  # its trailer's check made them the one object its xor filter reads
                obj.base_model = StoreBase(self, keys=m.refs)
            yield from iter_stream(obj, 0, pool, window)  # type: ignore[arg-type]

    # -- public API
    def add(self, src: str | os.PathLike[str], name: str | None = None, *, base: str | None = "auto",
            threads: int | None = None, progress: ProgressFn | None = None,
            follow_symlinks: bool = False) -> AddResult:
        """Add the model at ``src`` (a file or a folder) as ``name`` (default: its file or folder name).

        ``base="auto"`` looks for its base among the stored models (:func:`elves.families.find_base`);
        ``base=None`` stores it on its own (a later :meth:`repack` may still find it a base);
        ``base="NAME"`` codes it against that stored model.
        Tensors coded against the base are BitX deltas where that is smaller (``bitx.delta``).
        Segments already in the store cost nothing. When the new model turns out to be the base
        of models stored on their own before it, they are re-coded as its deltas (see :meth:`repack`).

        Links inside the model folder are stored as links; one that points outside it is refused
        unless ``follow_symlinks``. A write that fails (a full disk) raises OutputError and leaves
        the store as it was: what this add wrote is removed again.
        """
        from . import families

        t0 = time.perf_counter()
        src = Path(src)
        name = name or default_name(src)
        if not NAME_RE.fullmatch(name) or len(name) > 200 or name in ("auto", "none"):
            raise StoreError(f"invalid model name {name!r}: use letters, digits and . _ + @ -, "
                             "with at most one / (org/model)")
        files, single = read_model(src, follow_symlinks)
        prof = families.profile(src, name)
        nthreads = default_threads(threads)
        with self._locked(), ThreadPoolExecutor(nthreads) as pool:
            if self._manifest_path(name).exists():
                raise StoreError(f"a model named {name!r} is already in the store: `rm` it first or add under "
                                 "another name", self.path)
            manifests = self._manifests()
            reasons: list[str] = []
            chosen: str | None = None
            if base == "auto":
                match = families.find_base(prof, self._profiles(manifests))
                if match is None:
                    reasons = ["no stored model looks like its base"]
                else:
                    chosen, reasons = match.base, list(match.evidence)
            elif base is not None:
                self._manifest(base)  # a clear error for an unknown name
                chosen, reasons = base, ["given by hand"]
            planner = DeltaPlanner(StoreBase(self, models=self._chain(chosen))) if chosen else None
            written: list[Path] = []   # the objects this add put in place
            created: list[Path] = []   # ...that were not there before it
            try:
                try:
                    if planner is not None and base not in (None, "auto"):
                        self._check_fits(planner, files, base)
                    entries, stats = self._add_files(files, planner, pool, nthreads, progress, written, created)
                finally:
                    if planner is not None:
                        planner.base.close()
                if chosen is not None and stats["tensors"] and stats["delta"] == 0:
                    reasons.append(f"no tensor was smaller coded against {chosen!r}")
                with _writing(self.path / "objects"):
                    for d in {p.parent for p in written} | {self.path / "objects"}:  # the renames, before the manifest
                        _fsync_dir(d)
                    added = sum(p.stat().st_size for p in written)
                added += self._write_json(self.path / "tmp", self._profile_path(name), prof.to_json())
                added += self._write_json(self.path / "tmp", self._manifest_path(name), {
                    "format": "elves-store-model", "version": list(STORE_VERSION), "name": name,
                    "seq": max((m["seq"] for m in manifests), default=0) + 1, "added": _utcnow(),
                    "source": "file" if single else "folder", "base": chosen, "reasons": reasons,
                    "files": entries,
                })
            except BaseException:
                if not os.path.lexists(self._manifest_path(name)):  # nothing names what it wrote
                    _discard(created + [self._profile_path(name)])
                raise
            result = AddResult(name, chosen, reasons, sum(f.size for f in files), added, stats["new"],
                               stats["reused"], stats["delta"])
            try:
                report = self._repack(pool, nthreads, only_base=name)
            except OutputError as e:  # the model is in; re-coding others can wait for `repack`
                report = RepackReport(skipped=[f"re-coding models stored before it as its deltas stopped: {e}"])
            result.repacked = [m for m, _ in report.models]
            result.notes = report.skipped
            result.bytes_added -= report.bytes_saved
        result.seconds = time.perf_counter() - t0
        return result

    def _check_fits(self, planner: DeltaPlanner, files: list[SourceFile], base: str) -> None:
        """A base given by hand must have a tensor that one of the model's can be coded against: the
        same name (wrapper prefixes aside) and dtype, and the same or a smaller shape."""
        for sf in files:
            for index, seg in enumerate(sf.segments):
                if seg.dtype is not None and planner.candidates(sf, index, seg, "", None):
                    return
        raise StoreError(f"{base!r} cannot be this model's base: no tensor matches one of its by name, "
                         "dtype and size", self.path)

    def _add_files(self, files: list[SourceFile], planner: DeltaPlanner | None, pool: Executor, nthreads: int,
                   progress: ProgressFn | None, written: list[Path], created: list[Path],
                   ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Store the segments of ``files`` (appending each object put in place to ``written``, and to
        ``created`` if it was not there before) and return their manifest entries and counts."""
        entries: list[dict[str, Any]] = []
        stats = {"new": 0, "reused": 0, "delta": 0, "tensors": 0}  # tensors: new tensor objects
        known: set[str] = set()      # keys written or checked during this add
        for sf in files:
            sha = hashlib.sha256()
            if sf.link is not None:
                entries.append({"path": sf.relpath, "size": 0, "sha256": sha.hexdigest(), "format": sf.format,
                                "segments": [], "tensors": [], "link": sf.link})
                continue
            with open_source(sf.path) as fh:
                fd = fh.fileno()
                segments: list[list[Any]] = []
                new: list[tuple[int, Segment, str, str, Pipeline, int]] = []
                packs: list[tuple[bytearray, list[int]]] = []   # packed bytes, the entries pointing in
                for index, seg in enumerate(sf.segments):
                    if seg.length < PACK_BELOW:
                        data = read_exact(fd, seg.offset, seg.length, sf.path)
                        sha.update(data)
                        if not packs or len(packs[-1][0]) + len(data) > PACK_MAX:
                            packs.append((bytearray(), []))
                        packs[-1][1].append(len(segments))
                        segments.append(["", seg.length, len(packs[-1][0])])
                        packs[-1][0].extend(data)
                        continue
                    digest = hash_segment(fd, seg, sf.path, sha)
                    key = object_key(digest, seg.dtype)
                    segments.append([key, seg.length])
                    if key in known or self._reusable(key):
                        stats["reused"] += 1
                        if progress:
                            progress(seg.length)
                    else:
                        pipeline, chunk_elems = pipeline_for(seg)
                        new.append((index, seg, key, digest, pipeline, chunk_elems))
                    known.add(key)
                plans: dict[int, Delta] = {}
                if planner is not None:
                    plans = planner.plan(sf, fd, [(i, s, d, p, c) for i, s, k, d, p, c in new if s.dtype], pool)

                def chunks_of(seg: Segment, step: int, fd: int = fd, path: Path = sf.path) -> Callable[[], Iterator[bytes]]:
                    def gen() -> Iterator[bytes]:
                        for off in range(seg.offset, seg.offset + seg.length, step):
                            yield read_exact(fd, off, min(step, seg.offset + seg.length - off), path)
                    return gen

                objs = []
                for index, seg, key, digest, pipeline, chunk_elems in new:
                    step = chunk_elems * (dtypes.get(seg.dtype).itemsize if seg.dtype else 1)
                    d = plans.get(index)
                    objs.append(self._new_object(
                        key, "bytes" if seg.dtype is None else "tensor", seg.dtype, seg.length, digest, pipeline,
                        chunk_elems, chunks_of(seg, step), d,
                        object_key(d.ref.hash, d.ref.dtype) if d is not None else None))  # type: ignore[arg-type]
                for blob, where in packs:
                    digest = xxhash.xxh3_128_hexdigest(bytes(blob))
                    key = object_key(digest, None)
                    for i in where:
                        segments[i][0] = key
                    if key in known or self._reusable(key):
                        stats["reused"] += 1
                        if progress:
                            progress(len(blob))
                        continue
                    known.add(key)
                    pipeline, chunk_elems = pipeline_for(Segment(0, len(blob)))
                    objs.append(self._new_object(key, "bytes", None, len(blob), digest, pipeline, chunk_elems,
                                                 lambda blob=blob: iter([bytes(blob)])))
                fresh = {o.key for o in objs if not os.path.lexists(self._object_path(o.key))}
                for obj, path in self._write_objects(objs, pool, nthreads, progress):
                    written.append(path)
                    if obj.key in fresh:
                        created.append(path)
                    stats["new"] += 1
                    stats["delta"] += bool(obj.meta.refs)
                    stats["tensors"] += obj.meta.kind == "tensor"
            entries.append({
                "path": sf.relpath, "size": sf.size, "sha256": sha.hexdigest(), "format": sf.format,
                "segments": segments,
                "tensors": [[t.name, t.dtype, list(t.shape), t.segment, t.offset,
                             list(t.strides) if t.strides is not None else None] for t in sf.tensors],
            })
        return entries, stats

    def models(self) -> list[ModelEntry]:
        """The stored models, in the order they were added."""
        return [ModelEntry(m["name"], m["source"], len(m["files"]), sum(f["size"] for f in m["files"]),
                           m.get("base"), list(m.get("reasons", [])), m["added"]) for m in self._manifests()]

    def restore(self, name: str, dst: str | os.PathLike[str], *, force: bool = False, threads: int | None = None,
                progress: ProgressFn | None = None) -> RestoreSummary:
        """Write model ``name`` to ``dst``, byte for byte: a folder, or a file path for a model
        added as a single file. Every file's sha256 is checked as it is written (on a thread beside
        the decode), and the file renamed into place only then; an existing ``dst`` is refused
        unless ``force``."""
        man = self._manifest(name)
        nthreads = default_threads(threads)
        window = 2 * nthreads + 2
        with ThreadPoolExecutor(nthreads) as pool:
            files = man["files"]
            return write_files(Path(dst), [(f["path"], f.get("link")) for f in files], man["source"] == "file",
                               force, self._manifest_path(name),
                               lambda i, target: self._restore_file(name, files[i], target, pool, window, progress))

    def _restore_file(self, name: str, entry: dict[str, Any], target: Path, pool: Executor, window: int,
                      progress: ProgressFn | None) -> int:
        try:
            with open_new(target) as out:
                for part in self._file_parts(name, entry, pool, window):
                    out.write(part)
                    if progress:
                        progress(len(part))
        except ArchiveError as e:
            raise type(e)(f"model {name!r}, file {entry['path']}: {e.message}", e.path) from None
        except OSError as e:
            raise OutputError(f"cannot write {entry['path']}: {e.strerror}", target) from None
        return entry["size"]

    def _file_parts(self, name: str, entry: dict[str, Any], pool: Executor, window: int) -> Iterator[np.ndarray]:
        """The bytes of one file of model ``name``, in order: each object is checked against the
        length the manifest gives it before it is decoded, so a lie stops at its first segment;
        the end checks the file's sha256, computed beside the decode."""
        sha = Sha256Beside(window)
        size = 0
        packs: dict[str, np.ndarray] = {}   # the file's packed small segments, decoded once
        try:
            for key, length, *at in entry["segments"]:
                if at:
                    if key not in packs:
                        packs[key] = np.concatenate([np.empty(0, np.uint8),
                                                     *self._iter_object(key, pool, window, pack=True)])
                    part = packs[key][at[0]:at[0] + length]
                    if len(part) != length:
                        raise CorruptArchiveError(f"a slice of pack object {key} lies outside it",
                                                  self._object_path(key))
                    parts: Iterable[np.ndarray] = [part]
                else:
                    parts = self._iter_object(key, pool, window, nbytes=length)
                for part in parts:
                    sha.update(part)
                    size += len(part)
                    yield part
        finally:
            sha.close()
        if size != entry["size"] or sha.hexdigest() != entry["sha256"]:
            raise CorruptArchiveError("restored bytes do not match the file's sha256", self._manifest_path(name))

    def remove(self, name: str) -> None:
        """Remove model ``name`` from the store. Its data stays until :meth:`gc`, and whatever
        another model's deltas reference stays after that too."""
        with self._locked():
            self._manifest(name)
            with _writing(self._manifest_path(name)):
                self._manifest_path(name).unlink()
                _fsync_dir(self._manifest_path(name).parent)
                self._profile_path(name).unlink(missing_ok=True)

    def _live(self) -> dict[str, ObjectMeta]:
        """Every object a manifest uses, and every object those reference, with its metadata."""
        metas: dict[str, ObjectMeta] = {}
        todo = [seg[0] for m in self._manifests() for f in m["files"] for seg in f["segments"]]
        while todo:
            key = todo.pop()
            if key in metas:
                continue
            try:
                with self._open_object(key) as obj:
                    metas[key] = obj.meta
            except ElvesError:
                metas[key] = ObjectMeta("bytes", None, 0, "", [], 0, [])  # missing or damaged: kept
                continue
            todo.extend(metas[key].refs)
        return metas

    def _all_objects(self) -> Iterator[Path]:
        """Everything in ``objects/``: the entries of its folders, and whatever else lies in it
        (a link to a folder is an entry, never walked into)."""
        with os.scandir(self.path / "objects") as top:
            for d in top:
                if d.is_dir(follow_symlinks=False):
                    with os.scandir(d.path) as sub:
                        yield from (Path(e.path) for e in sub)
                else:
                    yield Path(d.path)

    def _is_object(self, p: Path, live: Iterable[str]) -> bool:
        """Whether ``p`` is where a key of ``live`` is stored."""
        return p.name in live and p.parent.name == p.name[:2] and p.parent.parent.name == "objects"

    def gc(self) -> GcReport:
        """Delete the objects nothing references, files left in ``tmp/`` by killed writers, and
        profiles of removed models. Never deletes an object a manifest or a live delta uses."""
        with self._locked():
            live = self._live()
            removed = freed = 0
            with _writing(self.path):
                for p in list(self._all_objects()):
                    if not self._is_object(p, live):
                        freed += p.lstat().st_size
                        _remove(p)
                        removed += 1
                temp = 0
                for p in (self.path / "tmp").iterdir():
                    _remove(p)
                    temp += 1
                names = {self._profile_path(n).name for n in self._names()}
                for p in (self.path / "profiles").glob("*.json"):
                    if p.name not in names:
                        p.unlink()
            return GcReport(removed, freed, len(live), temp)

    def stats(self) -> StoreStats:
        """Model count, logical and stored bytes, objects and garbage."""
        manifests = self._manifests()
        live = self._live()
        stored = sum(m.size for m in live.values())
        stored += sum(p.stat().st_size for sub in ("models", "profiles") for p in (self.path / sub).glob("*.json"))
        garbage = [p for p in self._all_objects() if not self._is_object(p, live)]
        return StoreStats(
            models=len(manifests),
            logical_bytes=sum(f["size"] for m in manifests for f in m["files"]),
            stored_bytes=stored,
            objects=len(live),
            delta_objects=sum(1 for m in live.values() if m.refs),
            garbage_objects=len(garbage),
            garbage_bytes=sum(p.lstat().st_size for p in garbage),
        )

    def verify(self, full: bool = False, threads: int | None = None,
               progress: ProgressFn | None = None) -> StoreVerifyReport:
        """Check the whole store, as ``git fsck`` checks a repository; nothing is changed.

        Every manifest must parse and pass its checks (its profile too); every object a manifest
        names must exist, with its footer, trailer and every payload's xxh3-64 intact and the
        length the manifest gives it; a delta's reference must be a plain tensor object; nothing
        else may lie in ``objects/`` (orphans, which :meth:`gc` deletes; ``tmp/`` is not looked
        at). With ``full``, every model is decoded and each file's sha256 checked, which finds
        what the checksums cannot (a manifest whose segments were swapped, say). It holds the
        writers' lock, so that the objects of an add under way are not taken for orphans.
        """
        report = StoreVerifyReport(full=full)
        nthreads = default_threads(threads)
        with self._locked(), ThreadPoolExecutor(nthreads) as pool:
            manifests = self._verify_manifests(report)
            users: dict[str, str] = {}   # key -> what names it first, for messages
            for _, man in manifests:
                for f in man["files"]:
                    for seg in f["segments"]:
                        users.setdefault(seg[0], f"model {man['name']!r}, file {f['path']}")
            metas, unusable = self._verify_objects(users, report, pool, progress)
            mismatched = self._verify_segments(manifests, metas, report)
            if report.orphans_checked:
                for p in sorted(self._all_objects()):
                    if not self._is_object(p, users):
                        report.orphans.append(StoreProblem(str(p), "no model reaches it (`elves store gc` "
                                                                   "deletes it)"))
                        if progress:
                            progress(p.lstat().st_size)
            if full:
                self._verify_files([m for m in manifests if m[0] not in mismatched], metas, unusable, report,
                                   pool, 2 * nthreads + 2, progress)
        return report

    def verify_bytes(self, full: bool = False) -> int:
        """What :meth:`verify` reads, in bytes (a progress bar's length): every object file, plus
        with ``full`` every model's files."""
        total = sum(p.lstat().st_size for p in self._all_objects())
        if full:
            for p in self._manifest_files():
                try:
                    total += sum(f["size"] for f in self._load_manifest(p)["files"])
                except (OSError, ElvesError):
                    continue
        return total

    def _verify_manifests(self, report: StoreVerifyReport) -> list[tuple[Path, dict[str, Any]]]:
        """The manifests that pass their checks; the others, and bad profiles, go to the report."""
        out = []
        for p in self._manifest_files():
            try:
                man = self._load_manifest(p)
            except FileNotFoundError:  # removed since the listing
                continue
            except ElvesError as e:
                report.bad_manifests.append(StoreProblem(e.path or str(p), e.message))
                report.orphans_checked = False
                continue
            try:
                self._profile(man["name"])
            except ElvesError as e:
                report.bad_manifests.append(StoreProblem(e.path or str(p), e.message))
            out.append((p, man))
        report.models = len(out)
        return out

    def _verify_objects(self, users: dict[str, str], report: StoreVerifyReport, pool: Executor,
                        progress: ProgressFn | None) -> tuple[dict[str, ObjectMeta], set[str]]:
        """Check every object in ``users`` and those they reference, whole, on ``pool``: the
        metadata of the sound ones, and the keys of those that cannot be restored."""
        metas: dict[str, ObjectMeta] = {}
        unusable: set[str] = set()
        todo = list(users)
        while todo:
            batch = [k for k in dict.fromkeys(todo) if k not in metas and k not in unusable]
            todo = []
            for key, (meta, kind, message) in zip(batch, pool.map(self._verify_object, batch)):
                if meta is None:
                    getattr(report, kind).append(StoreProblem(str(self._object_path(key)), message))
                    unusable.add(key)
                    continue
                metas[key] = meta
                report.bytes_checked += meta.size
                if progress:
                    progress(meta.size)
                for r in meta.refs:
                    users.setdefault(r, f"object {key}")
                    todo.append(r)
        report.objects = len(metas)
        for key, meta in metas.items():
            for r in meta.refs:
                ref = metas.get(r)
                if ref is not None and (ref.refs or ref.kind != "tensor"):
                    report.bad_refs.append(StoreProblem(
                        str(self._object_path(key)), f"object {key} is a delta of object {r}, which is "
                        + ("a delta itself" if ref.refs else "not a tensor") + ": references are one level deep"))
                    unusable.add(key)
        return metas, unusable

    def _verify_object(self, key: str) -> tuple[ObjectMeta | None, str, str]:
        """An object checked whole (trailer and every payload): its metadata, or the kind of
        problem and what it is."""
        if not os.path.lexists(self._object_path(key)):
            return None, "missing_objects", f"object {key} is missing"
        try:
            with self._open_object(key) as obj:
                for i in range(len(obj.meta.chunks)):
                    obj.read_payload(obj.meta, i)
                return obj.meta, "", ""
        except ElvesError as e:
            return None, "damaged_objects", e.message

    @staticmethod
    def _verify_segments(manifests: list[tuple[Path, dict[str, Any]]], metas: dict[str, ObjectMeta],
                         report: StoreVerifyReport) -> set[Path]:
        """Each segment must fit its object: a whole object of the segment's length, or a slice
        inside a pack. The manifests where one does not."""
        bad = set()
        for p, man in manifests:
            for f in man["files"]:
                for key, length, *at in f["segments"]:
                    m = metas.get(key)
                    if m is None or (m.nbytes == length if not at else
                                     m.kind == "bytes" and m.nbytes <= PACK_MAX and at[0] + length <= m.nbytes):
                        continue
                    report.bad_manifests.append(StoreProblem(
                        str(p), f"file {f['path']}: a segment of {length} bytes" + (f" at {at[0]}" if at else "")
                        + f" does not fit object {key} ({m.kind}, {m.nbytes} bytes)"))
                    bad.add(p)
                    break
        return bad

    def _verify_files(self, manifests: list[tuple[Path, dict[str, Any]]], metas: dict[str, ObjectMeta],
                      unusable: set[str], report: StoreVerifyReport, pool: Executor, window: int,
                      progress: ProgressFn | None) -> None:
        """Decode every file whose objects passed and match it with its sha256 (``verify --full``)."""
        seen = {p.path for p in report.damaged_objects}
        for p, man in manifests:
            for f in man["files"]:
                keys = {seg[0] for seg in f["segments"]}
                if any(k not in metas or k in unusable or unusable.intersection(metas[k].refs) for k in keys):
                    continue  # already reported
                try:
                    for part in self._file_parts(man["name"], f, pool, window):
                        report.bytes_checked += len(part)
                        if progress:
                            progress(len(part))
                    report.files_checked += 1
                except ElvesError as e:
                    where = e.path or str(p)
                    if where == str(p):
                        report.bad_files.append(StoreProblem(where, f"model {man['name']!r}, file {f['path']}: "
                                                                    f"{e.message}"))
                    elif where not in seen:  # found only by decoding: the stored hash does not match
                        seen.add(where)
                        report.damaged_objects.append(StoreProblem(where, e.message))

    def families(self) -> list[Family]:
        """The families of the stored models (:func:`elves.families.cluster`): each a root model
        and its derived models, each with the evidence for its base."""
        from .families import cluster

        return cluster(self._profiles(self._manifests()))

    def repack(self, *, threads: int | None = None, progress: ProgressFn | None = None) -> RepackReport:
        """Re-code models stored on their own as deltas of a base that arrived after them (as
        :func:`elves.families.cluster` finds it). Objects keep their keys and are replaced one by
        one, atomically; an object that some delta references, or that is no smaller as a delta,
        stays as it is."""
        nthreads = default_threads(threads)
        with self._locked(), ThreadPoolExecutor(nthreads) as pool:
            return self._repack(pool, nthreads, progress=progress)

    def _repack(self, pool: Executor, nthreads: int, only_base: str | None = None,
                progress: ProgressFn | None = None) -> RepackReport:
        from .families import cluster

        report = RepackReport()
        manifests = self._manifests()
        alone = {m["name"] for m in manifests if m.get("base") is None}
        if not alone or len(manifests) < 2:
            return report
        todo = [(name, match) for fam in cluster(self._profiles(manifests)) for name, match in fam.members
                if name in alone and (only_base is None or match.base == only_base)]
        if not todo:
            return report
        referenced: set[str] = set()   # objects some delta reads: they must stay plain
        delta: set[str] = set()
        for p in self._all_objects():
            try:
                with StoredObject(p, p.name, self.path) as obj:
                    referenced.update(obj.meta.refs)
                    if obj.meta.refs:
                        delta.add(p.name)
            except ElvesError:
                continue
        for name, match in todo:
            self._repack_model(name, match.base, list(match.evidence), pool, nthreads, referenced, delta,
                               report, progress)
        return report

    def _repack_model(self, name: str, base: str, reasons: list[str], pool: Executor, nthreads: int,
                      referenced: set[str], delta: set[str], report: RepackReport,
                      progress: ProgressFn | None) -> None:
        man = self._manifest(name)
        window = 2 * nthreads + 2
        planner = DeltaPlanner(StoreBase(self, models=self._chain(base, exclude=name)))
        base_keys = {s.loc[0] for s in planner.base.segments}
        rewritten = 0
        try:
            for f in man["files"]:
                views: dict[int, list[TensorView]] = {}
                for t in f["tensors"]:
                    views.setdefault(t[3], []).append(TensorView(t[0], t[1], tuple(t[2]), t[3], t[4],
                                                                 tuple(t[5]) if t[5] is not None else None))
                sf = SourceFile(self.path, f["path"], f["format"], f["size"], [])
                for index, seg_entry in enumerate(f["segments"]):
                    key = seg_entry[0]
                    if len(seg_entry) != 2 or key.endswith(".bytes") or key in base_keys:
                        continue
                    if key in referenced:
                        report.skipped.append(f"{name}: object {key} stays plain: another model's deltas read it")
                        continue
                    if key in delta:
                        continue
                    own = StoreBase(self, keys=[key])
                    try:
                        meta = own.objects[key].meta
                        seg = Segment(0, meta.nbytes, meta.dtype)
                        cands = planner.candidates(sf, index, seg, meta.hash, views.get(index, []))
                        pipeline, chunk_elems = pipeline_for(seg)
                        d = planner.choose(seg, pipeline, chunk_elems, cands,
                                           lambda off, n, own=own, h=meta.hash: own.read(h, off, n).tobytes())
                        if d is None:
                            continue
                        ref_key = object_key(d.ref.hash, d.ref.dtype)  # type: ignore[arg-type]
                        chunks = lambda key=key: (c.tobytes() for c in self._iter_object(key, pool, window))
                        obj = self._new_object(key, meta.kind, meta.dtype, meta.nbytes, meta.hash, pipeline,
                                               chunk_elems, chunks, d, ref_key)
                        ((_, tmp),) = self._write_objects([obj], pool, nthreads, progress, commit=False)
                    finally:
                        own.close()
                    if obj.meta.size >= meta.size or not obj.meta.refs:
                        tmp.unlink()
                        continue
                    try:
                        for _ in self._iter_object(key, pool, window, path=tmp):  # decodes to the same hash
                            pass
                    except BaseException:
                        tmp.unlink(missing_ok=True)
                        raise
                    final = self._commit(tmp, self._object_path(key))
                    with _writing(final):
                        _fsync_dir(final.parent)
                    report.objects_rewritten += 1
                    report.bytes_before += meta.size
                    report.bytes_after += obj.meta.size
                    referenced.add(ref_key)
                    delta.add(key)
                    rewritten += 1
        finally:
            planner.base.close()
        man["base"], man["reasons"] = base, reasons + ([] if rewritten else
                                                        [f"no tensor was smaller coded against {base!r}"])
        self._write_json(self.path / "tmp", self._manifest_path(name), man)
        report.models.append((name, base))
