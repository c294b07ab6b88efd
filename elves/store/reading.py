"""Decoding what a manifest names: objects (a delta with the plain object it reads), and a
model's files, each checked against its sha256."""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from ..chunks import decode_chunk
from ..decoder import FileCheck, LaterChecks, checked, iter_stream, iter_streams, open_new
from ..errors import ArchiveError, CorruptArchiveError, OutputError
from ..index import FileEntry, Stream, TensorEntry
from ..parallel import batched_map
from ..references import Sources
from .layout import manifest_at, object_at
from .manifests import PACK_MAX
from .objects import StoredObject
from .planner import StoreBase
from .storage import Storage

ProgressFn = Callable[[int], None]


def open_object(storage: Storage, key: str, at: str | None = None, nbytes: int | None = None,
                pack: bool = False, refs: bool = False) -> StoredObject:
    """Object ``key`` (lying at ``at``, if not at its place), checked against what a manifest
    says of it before anything is decoded: ``nbytes``, the length it gives it; ``pack``, that it
    reads slices of it (a pack is read whole). With ``refs``, it reads the objects its ``xor``
    filter names (its trailer's check made them the one object it reads)."""
    obj = StoredObject(storage, key, at)
    m = obj.meta
    problem = (f"holds {m.nbytes} bytes, but the manifest says {nbytes}" if nbytes is not None and m.nbytes != nbytes
               else f"is read as a pack, but it is not one ({m.kind}, {m.nbytes} bytes)"
               if pack and (m.kind != "bytes" or m.nbytes > PACK_MAX) else None)
    if problem is not None:
        obj.close()
        raise CorruptArchiveError(f"object {key} {problem}", obj.path)
    if refs and m.refs:
        try:
            base = StoreBase(storage, keys=m.refs)
        except BaseException:
            obj.close()
            raise
        obj.references.content, obj.references.owns_content = base, True
    return obj


def iter_object(storage: Storage, key: str, pool: Executor, window: int, at: str | None = None,
                nbytes: int | None = None, pack: bool = False) -> Iterator[np.ndarray]:
    """The decoded chunks of object ``key`` in order, each checked; then its content hash
    (:func:`open_object` says what is checked first)."""
    with open_object(storage, key, at, nbytes, pack, refs=True) as obj:
        yield from iter_stream(obj, 0, pool, window)


def object_range(storage: Storage, key: str, start: int, stop: int, pool: Executor, window: int,
                 nbytes: int) -> Iterator[np.ndarray]:
    """Bytes ``[start, stop)`` of object ``key``: only the chunks that overlap them are read and
    decoded, each checked against its checksum (the object's hash needs all of it)."""
    with open_object(storage, key, nbytes=nbytes, refs=True) as obj:
        m = obj.meta
        pipeline = m.decoder()
        ref_of = obj.references.chunk_refs(m)
        step = m.chunk_bytes  # every chunk but the last is this long (check_chunks)
        first, last = start // step, (stop - 1) // step

        def decode(i: int) -> np.ndarray:
            try:
                return decode_chunk(obj, m, pipeline, i, ref_of(i) if ref_of is not None else None)
            except ArchiveError as e:
                raise type(e)(f"object {key}: chunk {i}: {e.message}", obj.path) from None

        chunks = batched_map(pool, decode, range(first, last + 1), window, nbytes=lambda i: m.chunks[i][2])
        for i, chunk in zip(range(first, last + 1), chunks):
            lo = max(start - i * step, 0)
            yield chunk[lo:stop - i * step]


def file_range(storage: Storage, name: str, entry: dict[str, Any], start: int, stop: int, pool: Executor,
               window: int) -> Iterator[np.ndarray]:
    """Bytes ``[start, stop)`` of one file of model ``name`` (``0 <= start < stop <= size``), as a
    served Range needs them: only the objects, and the chunks of them, that overlap the range
    are decoded. Each chunk is checked; the file's sha256 is not (:func:`file_parts` checks it)."""
    pos = 0
    try:
        for key, length, *at in entry["segments"]:
            lo, hi = max(start - pos, 0), min(stop - pos, length)
            pos += length
            if lo >= hi:
                continue
            if at:
                pack = np.concatenate([np.empty(0, np.uint8), *iter_object(storage, key, pool, window, pack=True)])
                part = pack[at[0] + lo:at[0] + hi]
                if len(part) != hi - lo:
                    raise CorruptArchiveError(f"a slice of pack object {key} lies outside it",
                                              storage.where(object_at(key)))
                yield part
            else:
                yield from object_range(storage, key, lo, hi, pool, window, length)
    except ArchiveError as e:
        raise type(e)(f"model {name!r}, file {entry['path']}: {e.message}", e.path) from None


def file_parts(storage: Storage, name: str, entry: dict[str, Any], pool: Executor,
               window: int, later: LaterChecks | None = None) -> Iterator[np.ndarray]:
    """The bytes of one file of model ``name``, in order: each object is checked against the
    length the manifest gives it before it is decoded, so a lie stops at its first segment;
    the end checks the file's sha256, computed beside the decode (or, with ``later``, leaves
    that check there: :class:`~elves.decoder.LaterChecks`)."""
    # A check taken later is raised outside restore_file, which names the model and file.
    named = f"model {name!r}, file {entry['path']}: " if later is not None else ""
    check = FileCheck(entry["size"], entry["sha256"], window,
                      f"{named}restored bytes do not match the file's sha256", storage.where(manifest_at(name)))
    yield from checked(_parts(storage, entry, pool, window), check, later)


OPEN_OBJECTS = 32
"""Objects of a file decoded in one window (:func:`_parts`), so open at once: enough to keep the
threads busy on a file of many small objects, and a bound on the descriptors (or connections)
held."""


def _parts(storage: Storage, entry: dict[str, Any], pool: Executor, window: int) -> Iterator[np.ndarray]:
    packs: dict[str, np.ndarray] = {}   # the file's packed small segments, decoded once
    for group in _groups(entry["segments"]):
        with contextlib.ExitStack() as opened:
            # Each object checked against the manifest before anything is decoded, so a lie
            # stops at its first segment; a pack once, at its first slice.
            objects = {i: opened.enter_context(open_object(storage, key, nbytes=None if at is not None else length,
                                                           pack=at is not None, refs=True))
                       for i, (key, length, at, opens) in enumerate(group) if opens}
            # closed (its decodes in flight ended) before the objects are
            decoded = opened.enter_context(contextlib.closing(iter_streams([(obj, 0) for obj in objects.values()],
                                                                           pool, window)))
            for i, (key, length, at, _) in enumerate(group):
                chunks = (next(decoded) for _ in objects[i].meta.chunks) if i in objects else iter(())
                if at is None:
                    yield from chunks
                    continue
                if key not in packs:
                    packs[key] = np.concatenate([np.empty(0, np.uint8), *chunks])
                part = packs[key][at:at + length]
                if len(part) != length:
                    raise CorruptArchiveError(f"a slice of pack object {key} lies outside it",
                                              storage.where(object_at(key)))
                yield part
            collections.deque(decoded, maxlen=0)  # nothing is left but the last object's hash check


def _groups(segments: list[list[Any]]) -> Iterator[list[tuple[str, int, int | None, bool]]]:
    """A file's segments as ``(key, length, offset in its pack or None, whether its object is
    opened there)``, in runs that open at most :data:`OPEN_OBJECTS` objects: every plain
    segment's, and a pack's at its first slice."""
    group: list[tuple[str, int, int | None, bool]] = []
    packs: set[str] = set()
    opens = 0
    for key, length, *at in segments:
        new = not at or key not in packs
        if new and opens == OPEN_OBJECTS:
            yield group
            group, opens = [], 0
        if at:
            packs.add(key)
        opens += new
        group.append((key, length, at[0] if at else None, new))
    if group:
        yield group


def restore_file(storage: Storage, name: str, entry: dict[str, Any], target: Path, pool: Executor, window: int,
                 progress: ProgressFn | None, later: LaterChecks | None = None) -> int:
    """Write one file of model ``name`` to ``target``; its size. With ``later``, its sha256 check
    is left there (:func:`file_parts`)."""
    try:
        with open_new(target) as out:
            for part in file_parts(storage, name, entry, pool, window, later):
                out.write(part.data)
                if progress:
                    progress(len(part))
    except ArchiveError as e:
        raise type(e)(f"model {name!r}, file {entry['path']}: {e.message}", e.path) from None
    except OSError as e:
        raise OutputError(f"cannot write {entry['path']}: {e.strerror}", target) from None
    size: int = entry["size"]
    return size


class ModelObjects:
    """The objects of a stored model's files, read as one archive is: a stream per object (a pack
    object once, its slices' tensors placed at their offset in it), the files' entries numbered
    by them, the references by content (the plain objects its deltas name, ``StoreBase``), and
    each payload read through its object, checksum checked. What the GPU loader decodes from
    (``Store.load(name, device=...)``: :func:`elves.gpu.load_model`). ``files`` picks the
    manifest's file entries to read (links are never read: they name another file's bytes)."""

    def __init__(self, storage: Storage, name: str, man: dict[str, Any],
                 files: Callable[[dict[str, Any]], bool] = lambda f: True):
        self.path = Path(storage.where(manifest_at(name)))
        self.files: list[FileEntry] = []
        self._objects: list[StoredObject] = []
        numbers: dict[str, int] = {}
        try:
            for f in man["files"]:
                if f.get("link") is not None or not files(f):
                    continue
                segments, starts = [], []
                for key, length, *at in f["segments"]:
                    if key not in numbers:
                        numbers[key] = len(self._objects)
                        self._objects.append(open_object(storage, key, nbytes=None if at else length, pack=bool(at)))
                    segments.append(numbers[key])
                    starts.append(at[0] if at else 0)
                tensors = [TensorEntry(n, dt, tuple(shape), seg, off + (starts[seg] if seg >= 0 else 0),
                                       tuple(strides) if strides is not None else None)
                           for n, dt, shape, seg, off, strides in f["tensors"]]
                self.files.append(FileEntry(f["path"], f["size"], f["sha256"], f["format"], segments, tensors))
            self.streams: list[Stream] = [obj.meta for obj in self._objects]
            self.references = Sources(self, self.streams, self.path)
            refs = sorted({r for obj in self._objects for r in obj.meta.refs})
            if refs:
                self.references.content, self.references.owns_content = StoreBase(storage, keys=refs), True
        except BaseException:
            self.close()
            raise
        self._by_stream = {id(obj.meta): obj for obj in self._objects}

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        return self._by_stream[id(stream)].read_payload(stream, chunk)

    def close(self) -> None:
        if hasattr(self, "references"):
            self.references.close()
        for obj in self._objects:
            obj.close()

    def __enter__(self) -> ModelObjects:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
