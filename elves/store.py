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

import fcntl
import hashlib
import json
import os
import re
import shutil
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
from .archive import Stream
from .codecs import Pipeline
from .decoder import RestoreSummary, iter_stream, write_files
from .encoder import (
    INLINE_BYTES,
    _hash_segment,
    _read,
    default_threads,
    ordered_map,
    pipeline_for,
)
from .errors import (
    ArchiveError,
    CorruptArchiveError,
    ElvesError,
    OutputError,
    StoreError,
    UnsupportedFormatError,
)
from .model import Segment, SourceFile, TensorView
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


# ---------------------------------------------------------------------------- objects

def object_key(digest: str, dtype: str | None) -> str:
    """The key of a segment: its raw bytes' xxh3-128 and its dtype (``bytes`` for opaque ones)."""
    return f"{digest}.{dtype.lower() if dtype else 'bytes'}"


_KEY_RE = re.compile(r"[0-9a-f]{32}\.[a-z0-9_]+")


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
            "chunks": [[c[1], c[2], c[3]] for c in self.chunks], "refs": self.refs,
        }, use_bin_type=True)


class StoredObject:
    """An object file opened for reading: its trailer checked and parsed, payloads read on demand
    with their checksums checked. It reads like a one-stream :class:`~elves.archive.ArchiveReader`,
    so :func:`elves.decoder.iter_stream` decodes it (with ``base_model`` set for a delta)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.files: list[dict[str, Any]] = []  # no file entries: errors name the object by its path
        self.base_needed = None
        self.base_model: StoreBase | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY)
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
            t = msgpack.unpackb(trailer, raw=False)
            if int(t["v"][0]) > STORE_VERSION[0]:
                raise UnsupportedFormatError(f"object {self.key} was written by a newer elves: upgrade elves",
                                             self.path)
            chunks, pos = [], 0
            for length, dlen, check in t["chunks"]:
                chunks.append((pos, int(length), int(dlen), int(check)))
                pos += int(length)
            meta = ObjectMeta(t["kind"], t["dtype"], int(t["nbytes"]), t["hash"], t["pipeline"],
                              int(t["chunk_elems"]), chunks, refs=[str(r) for r in t["refs"]], size=size)
        except ElvesError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as e:  # the checksum matched: a writer bug or forgery
            raise CorruptArchiveError(f"object {self.key}: malformed trailer: {e}", self.path) from None
        if pos != start or sum(c[2] for c in chunks) != meta.nbytes or \
                object_key(meta.hash, meta.dtype) != self.key:
            raise CorruptArchiveError(f"object {self.key}: its trailer does not match its payloads or its key",
                                      self.path)
        return meta

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
    """Writes one object under ``tmp/``: payloads, then the trailer and footer, then fsync."""

    def __init__(self, tmp_dir: Path, meta: ObjectMeta):
        fd, name = tempfile.mkstemp(prefix="obj.", dir=tmp_dir)
        self.f = os.fdopen(fd, "wb")
        self.tmp = Path(name)
        self.meta = meta
        self.pos = 0

    def write_chunk(self, payload: bytes, decoded: int) -> None:
        self.f.write(payload)
        self.meta.chunks.append((self.pos, len(payload), decoded, xxhash.xxh3_64_intdigest(payload)))
        self.pos += len(payload)

    def finish(self) -> Path:
        trailer = self.meta.to_trailer()
        self.f.write(trailer)
        self.f.write(FOOTER.pack(len(trailer), xxhash.xxh3_64_intdigest(trailer), OBJECT_MAGIC))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.meta.size = self.pos + len(trailer) + FOOTER.size
        return self.tmp

    def abort(self) -> None:
        self.f.close()
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
        obj = StoredObject(self.store._object_path(key), key)
        if obj.meta.refs or obj.meta.kind != "tensor":
            obj.close()
            if strict:
                raise CorruptArchiveError(f"object {key} is referenced by a delta but is not a plain tensor object",
                                          self.store._object_path(key))
            return False
        self.objects[key] = obj
        self._pipelines[key] = Pipeline.from_config(obj.meta.pipeline)
        self._starts[key] = np.array([0] + [c[2] for c in obj.meta.chunks], dtype=np.int64).cumsum()
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
        first = int(np.searchsorted(starts, offset, side="right")) - 1
        end = int(np.searchsorted(starts, offset + length, side="left"))
        decoded = np.empty(int(starts[end] - starts[first]), dtype=np.uint8)
        for i in range(first, end):  # the chunks that overlap the range, decoded side by side
            lo = int(starts[i] - starts[first])
            pipeline.decode(np.frombuffer(obj.read_payload(obj.meta, i), dtype=np.uint8),
                            decoded[lo:lo + obj.meta.chunks[i][2]])
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


def default_name(src: str | os.PathLike[str]) -> str:
    """The name a model gets when none is given: its folder's or file's name."""
    return Path(src).resolve().name


class Store:
    """A model store. ``Store(path)`` opens one; :meth:`Store.init` creates one."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        marker = self.path / MARKER
        try:
            info = json.loads(marker.read_text())
            version = tuple(int(v) for v in info["version"])
            if info.get("format") != "elves-store":
                raise ValueError("not an elves store marker")
        except FileNotFoundError:
            raise StoreError(f"not an elves store (no {MARKER}); create one with `elves store init`",
                             self.path) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{MARKER} is unreadable or malformed: {e}", self.path) from None
        if version[0] > STORE_VERSION[0]:
            raise StoreError(f"written by a newer elves (store version {version[0]}.{version[1]}, this elves "
                             f"reads {STORE_VERSION[0]}.x): upgrade elves", self.path)

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
            cls._write_json(p / "tmp", p / MARKER, {"format": "elves-store", "version": list(STORE_VERSION)})
        except OSError as e:
            raise OutputError(f"cannot create the store: {e.strerror}", p) from None
        return cls(p)

    # -- paths and small files
    def _object_path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise CorruptArchiveError(f"invalid object key {key!r} in a manifest or an object", self.path)
        return self.path / "objects" / key[:2] / key

    def _manifest_path(self, name: str) -> Path:
        return self.path / "models" / f"{quote(name, safe='')}.json"

    def _profile_path(self, name: str) -> Path:
        return self.path / "profiles" / f"{quote(name, safe='')}.json"

    @staticmethod
    def _write_json(tmp_dir: Path, dst: Path, data: Any) -> int:
        blob = json.dumps(data, separators=(",", ":")).encode()
        fd, name = tempfile.mkstemp(prefix="json.", dir=tmp_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, dst)
        _fsync_dir(dst.parent)
        return len(blob)

    def _load_manifest(self, path: Path) -> dict[str, Any]:
        man = json.loads(path.read_text())
        if int(man["version"][0]) > STORE_VERSION[0]:
            raise StoreError(f"model {man.get('name')!r} was added by a newer elves: upgrade elves", path)
        return man

    def _manifest(self, name: str) -> dict[str, Any]:
        try:
            return self._load_manifest(self._manifest_path(name))
        except FileNotFoundError:
            known = ", ".join(sorted(self._names())[:8]) or "none"
            raise StoreError(f"no model named {name!r} in the store (stored: {known})", self.path) from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise CorruptArchiveError(f"the manifest of {name!r} is unreadable: {e}", self._manifest_path(name)) \
                from None

    def _names(self) -> list[str]:
        out = []
        for p in (self.path / "models").glob("*.json"):
            try:
                out.append(json.loads(p.read_text())["name"])
            except (OSError, ValueError, KeyError):
                continue
        return out

    def _manifests(self) -> list[dict[str, Any]]:
        """Every manifest, in the order the models were added."""
        out = []
        for p in (self.path / "models").glob("*.json"):
            try:
                out.append(self._load_manifest(p))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                raise CorruptArchiveError(f"a manifest is unreadable: {e}", p) from None
        return sorted(out, key=lambda m: (m["seq"], m["name"]))

    def _profiles(self, manifests: list[dict[str, Any]]) -> list[Any]:
        from .families import ModelProfile

        out = []
        for m in manifests:
            try:
                out.append(ModelProfile.from_json(json.loads(self._profile_path(m["name"]).read_text())))
            except (OSError, ValueError) as e:
                raise CorruptArchiveError(f"the profile of {m['name']!r} is unreadable: {e}",
                                          self._profile_path(m["name"])) from None
        return out

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The writers' lock: one add, rm, gc or repack at a time, across processes."""
        with open(self.path / "lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _reusable(self, key: str) -> bool:
        """Whether an object already stored can be used as it is: complete, and its references
        present and not deltas themselves (a ``gc`` killed halfway may leave a delta without them)."""
        path = self._object_path(key)
        if not path.exists():
            return False
        try:
            with StoredObject(path, key) as obj:
                refs = obj.meta.refs
            for r in refs:
                with StoredObject(self._object_path(r), r) as ref:
                    if ref.meta.refs:
                        return False
        except ArchiveError:
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
                       progress: ProgressFn | None, commit: bool = True) -> list[tuple[_NewObject, Path]]:
        """Encode ``objects`` chunk by chunk on ``pool`` (in order, a bounded window in flight) and
        write each under ``tmp/``; with ``commit``, rename each into place once complete."""
        tmp_dir = self.path / "tmp"
        done: list[tuple[_NewObject, Path]] = []

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
                    writer = _ObjectWriter(tmp_dir, obj.meta)
                if last and not obj.meta.chunks and len(payload) >= len(raw):
                    # one chunk that coding would not shrink: stored as it is, like in an archive
                    payload, obj.meta.pipeline, obj.meta.refs = raw, [], []
                writer.write_chunk(payload, len(raw))
                if progress:
                    progress(len(raw))
                if last:
                    tmp = writer.finish()
                    writer = None
                    if commit:
                        final = self._object_path(obj.key)
                        final.parent.mkdir(exist_ok=True)
                        os.replace(tmp, final)
                        tmp = final
                    done.append((obj, tmp))
        except BaseException:
            if writer is not None:
                writer.abort()
            if not commit:
                for _, tmp in done:
                    tmp.unlink(missing_ok=True)
            raise
        return done

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
    def _iter_object(self, key: str, pool: Executor, window: int, path: Path | None = None) -> Iterator[np.ndarray]:
        """The decoded chunks of object ``key`` in order, each checked; then its content hash."""
        with StoredObject(path or self._object_path(key), key) as obj:
            codec = Pipeline.from_config(obj.meta.pipeline).ref_codec
            if codec is not None:
                if object_key(codec.ref_hash, obj.meta.dtype) not in obj.meta.refs:  # type: ignore[attr-defined]
                    raise CorruptArchiveError(f"object {key}: its xor filter reads an object it does not list",
                                              obj.path)
                obj.base_model = StoreBase(self, keys=obj.meta.refs)
            yield from iter_stream(obj, 0, pool, window)  # type: ignore[arg-type]

    # -- public API
    def add(self, src: str | os.PathLike[str], name: str | None = None, *, base: str | None = "auto",
            threads: int | None = None, progress: ProgressFn | None = None) -> AddResult:
        """Add the model at ``src`` (a file or a folder) as ``name`` (default: its file or folder name).

        ``base="auto"`` looks for its base among the stored models (:func:`elves.families.find_base`);
        ``base=None`` stores it on its own (a later :meth:`repack` may still find it a base);
        ``base="NAME"`` codes it against that stored model.
        Tensors coded against the base are BitX deltas where that is smaller (``bitx.delta``).
        Segments already in the store cost nothing. When the new model turns out to be the base
        of models stored on their own before it, they are re-coded as its deltas (see :meth:`repack`).
        """
        from . import families

        t0 = time.perf_counter()
        src = Path(src)
        name = name or default_name(src)
        if not NAME_RE.fullmatch(name) or len(name) > 200 or name in ("auto", "none"):
            raise StoreError(f"invalid model name {name!r}: use letters, digits and . _ + @ -, "
                             "with at most one / (org/model)")
        files, single = read_model(src)
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
            try:
                if planner is not None and base not in (None, "auto"):
                    self._check_fits(planner, files, base)
                entries, stats, written = self._add_files(files, planner, pool, nthreads, progress)
            finally:
                if planner is not None:
                    planner.base.close()
            if chosen is not None and stats["tensors"] and stats["delta"] == 0:
                reasons.append(f"no tensor was smaller coded against {chosen!r}")
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
            result = AddResult(name, chosen, reasons, sum(f.size for f in files), added, stats["new"],
                               stats["reused"], stats["delta"])
            report = self._repack(pool, nthreads, only_base=name)
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
                   progress: ProgressFn | None) -> tuple[list[dict[str, Any]], dict[str, int], list[Path]]:
        entries: list[dict[str, Any]] = []
        stats = {"new": 0, "reused": 0, "delta": 0, "tensors": 0}  # tensors: new tensor objects
        known: set[str] = set()      # keys written or checked during this add
        written: list[Path] = []
        for sf in files:
            sha = hashlib.sha256()
            with open(sf.path, "rb") as fh:
                fd = fh.fileno()
                segments: list[list[Any]] = []
                new: list[tuple[int, Segment, str, str, Pipeline, int]] = []
                packs: list[tuple[bytearray, list[int]]] = []   # packed bytes, the entries pointing in
                for index, seg in enumerate(sf.segments):
                    if seg.length < PACK_BELOW:
                        data = _read(fd, seg.offset, seg.length, sf.path)
                        sha.update(data)
                        if not packs or len(packs[-1][0]) + len(data) > PACK_MAX:
                            packs.append((bytearray(), []))
                        packs[-1][1].append(len(segments))
                        segments.append(["", seg.length, len(packs[-1][0])])
                        packs[-1][0].extend(data)
                        continue
                    digest = _hash_segment(fd, seg, sf.path, sha)
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
                            yield _read(fd, off, min(step, seg.offset + seg.length - off), path)
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
                for obj, path in self._write_objects(objs, pool, nthreads, progress):
                    written.append(path)
                    stats["new"] += 1
                    stats["delta"] += bool(obj.meta.refs)
                    stats["tensors"] += obj.meta.kind == "tensor"
            entries.append({
                "path": sf.relpath, "size": sf.size, "sha256": sha.hexdigest(), "format": sf.format,
                "segments": segments,
                "tensors": [[t.name, t.dtype, list(t.shape), t.segment, t.offset,
                             list(t.strides) if t.strides is not None else None] for t in sf.tensors],
            })
        return entries, stats, written

    def models(self) -> list[ModelEntry]:
        """The stored models, in the order they were added."""
        return [ModelEntry(m["name"], m["source"], len(m["files"]), sum(f["size"] for f in m["files"]),
                           m.get("base"), list(m.get("reasons", [])), m["added"]) for m in self._manifests()]

    def restore(self, name: str, dst: str | os.PathLike[str], *, force: bool = False, threads: int | None = None,
                progress: ProgressFn | None = None) -> RestoreSummary:
        """Write model ``name`` to ``dst``, byte for byte: a folder, or a file path for a model
        added as a single file. Every file is checked against its sha256 and renamed into place
        only then; an existing ``dst`` is refused unless ``force``."""
        man = self._manifest(name)
        nthreads = default_threads(threads)
        with ThreadPoolExecutor(nthreads) as pool:
            files = man["files"]
            return write_files(Path(dst), [(f["path"], None) for f in files], man["source"] == "file", force,
                               self._manifest_path(name),
                               lambda i, target: self._restore_file(name, files[i], target, pool, nthreads, progress))

    def _restore_file(self, name: str, entry: dict[str, Any], target: Path, pool: Executor, nthreads: int,
                      progress: ProgressFn | None) -> int:
        window = 2 * nthreads + 2
        sha = hashlib.sha256()
        size = 0
        packs: dict[str, bytes] = {}   # the file's packed small segments, decoded once
        try:
            with open(target, "wb") as out:
                for seg in entry["segments"]:
                    key, length = seg[0], seg[1]
                    if len(seg) == 3:
                        if key not in packs:
                            packs[key] = b"".join(c.tobytes() for c in self._iter_object(key, pool, window))
                        parts: Iterable[Any] = [packs[key][seg[2]:seg[2] + length]]
                    else:
                        parts = self._iter_object(key, pool, window)
                    for part in parts:
                        sha.update(part)
                        out.write(part)
                        size += len(part)
                        if progress:
                            progress(len(part))
        except ArchiveError as e:
            raise type(e)(f"model {name!r}, file {entry['path']}: {e.message}", e.path) from None
        except OSError as e:
            raise OutputError(f"cannot write {entry['path']}: {e.strerror}", target) from None
        if size != entry["size"] or sha.hexdigest() != entry["sha256"]:
            raise CorruptArchiveError(f"model {name!r}, file {entry['path']}: restored bytes do not match its sha256",
                                      self._manifest_path(name))
        return size

    def remove(self, name: str) -> None:
        """Remove model ``name`` from the store. Its data stays until :meth:`gc`, and whatever
        another model's deltas reference stays after that too."""
        with self._locked():
            self._manifest(name)
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
                with StoredObject(self._object_path(key), key) as obj:
                    metas[key] = obj.meta
            except ArchiveError:
                metas[key] = ObjectMeta("bytes", None, 0, "", [], 0, [])  # missing or damaged: kept
                continue
            todo.extend(metas[key].refs)
        return metas

    def _all_objects(self) -> Iterator[Path]:
        for d in (self.path / "objects").iterdir():
            if d.is_dir():
                yield from d.iterdir()

    def gc(self) -> GcReport:
        """Delete the objects nothing references, files left in ``tmp/`` by killed writers, and
        profiles of removed models. Never deletes an object a manifest or a live delta uses."""
        with self._locked():
            live = self._live()
            removed = freed = 0
            for p in list(self._all_objects()):
                if p.name not in live:
                    freed += p.stat().st_size
                    p.unlink()
                    removed += 1
            temp = 0
            for p in (self.path / "tmp").iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
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
        garbage = [p for p in self._all_objects() if p.name not in live]
        return StoreStats(
            models=len(manifests),
            logical_bytes=sum(f["size"] for m in manifests for f in m["files"]),
            stored_bytes=stored,
            objects=len(live),
            delta_objects=sum(1 for m in live.values() if m.refs),
            garbage_objects=len(garbage),
            garbage_bytes=sum(p.stat().st_size for p in garbage),
        )

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
                with StoredObject(p, p.name) as obj:
                    referenced.update(obj.meta.refs)
                    if obj.meta.refs:
                        delta.add(p.name)
            except ArchiveError:
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
                    for _ in self._iter_object(key, pool, window, path=tmp):  # decodes to the same hash
                        pass
                    os.replace(tmp, self._object_path(key))
                    _fsync_dir(self._object_path(key).parent)
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
