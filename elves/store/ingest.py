"""Coding segments into objects: which segments of a model are new, their pipelines and deltas,
and the objects written chunk by chunk on a thread pool."""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from bitx.delta import Delta, DeltaPlanner

from .. import dtypes
from ..codecs import Pipeline
from ..encoder import pipeline_for
from ..errors import ElvesError
from ..index import checksum
from ..model import READ_PIECE, Segment, SourceFile, hash_segment, kept_mode, open_source, read_exact
from ..parallel import Sha256Beside, batched_map
from .layout import object_at, object_key
from .manifests import PACK_BELOW, PACK_MAX
from .objects import ObjectMeta, ObjectWriter, StoredObject
from .planner import ref_key
from .storage import Storage

ProgressFn = Callable[[int], None]


@dataclass
class NewObject:
    """An object to encode: its metadata, its raw bytes chunk by chunk, and its references."""

    key: str
    meta: ObjectMeta
    pipeline: Pipeline
    chunks: Callable[[], Iterator[bytes]]
    ref: Callable[[int, int], np.ndarray] | None = None   # (offset, length) -> reference bytes


def new_object(key: str, kind: str, dtype: str | None, nbytes: int, digest: str, pipeline: Pipeline,
               chunk_elems: int, chunks: Callable[[], Iterator[bytes]], delta: Delta | None = None,
               ref_key: str | None = None) -> NewObject:
    if delta is not None:
        pipeline = delta.pipeline
    meta = ObjectMeta(kind, dtype, nbytes, digest, pipeline.get_config(), chunk_elems, [],
                      ref_cast=delta.reference.cast if delta is not None else None, refs=[ref_key] if ref_key else [])
    return NewObject(key, meta, pipeline, chunks, delta.read if delta is not None else None)


def reusable(storage: Storage, key: str) -> bool:
    """Whether an object already stored can be used as it is: complete, and its references
    present and not deltas themselves (a ``gc`` killed halfway may leave a delta without them)."""
    if not storage.exists(object_at(key)):
        return False
    try:
        with StoredObject(storage, key) as obj:
            refs = obj.meta.refs
        for r in refs:
            with StoredObject(storage, r) as ref:
                if ref.meta.refs:
                    return False
    except ElvesError:
        return False
    return True


def write_objects(storage: Storage, objects: Iterable[NewObject], pool: Executor, nthreads: int,
                  progress: ProgressFn | None, commit: bool = True) -> Iterator[tuple[NewObject, str]]:
    """Encode ``objects`` chunk by chunk on ``pool`` (in order, a bounded window in flight) and
    write each; with ``commit``, move each into place once complete. Yields each object and
    where it lies as soon as it is written. On an error (a full disk: OutputError) the object
    being written is removed, and so is every uncommitted one."""
    done: list[str] = []

    def jobs() -> Iterator[tuple[NewObject, bytes, int, bool]]:
        for obj in objects:
            pos = 0
            for raw in obj.chunks():
                yield obj, raw, pos, pos + len(raw) == obj.meta.nbytes
                pos += len(raw)

    def encode(job: tuple[NewObject, bytes, int, bool]) -> tuple[NewObject, bytes, bytes, int, bool]:
        obj, raw, pos, last = job
        ref = obj.ref(pos, len(raw)) if obj.ref is not None else None
        payload = obj.pipeline.encode(np.frombuffer(raw, dtype=np.uint8), ref=ref)
        return obj, raw, payload, checksum(payload), last  # the checksum too, on the pool

    writer: ObjectWriter | None = None
    try:
        for obj, raw, payload, check, last in batched_map(pool, encode, jobs(), 2 * nthreads + 2,
                                                          nbytes=lambda job: len(job[1])):
            if writer is None:
                writer = ObjectWriter(storage, obj.key, obj.meta)
            if last and not obj.meta.chunks and len(payload) >= len(raw):
                # one chunk that coding would not shrink: stored as it is, like in an archive
                payload, obj.meta.pipeline, obj.meta.refs = raw, [], []
                check = checksum(payload)
            writer.write_chunk(payload, len(raw), check)
            if progress:
                progress(len(raw))
            if last:
                at = writer.finish()
                writer = None
                done.append(at)
                if commit:
                    storage.commit(at, object_at(obj.key))
                    at = object_at(obj.key)
                yield obj, at
    except BaseException:
        if writer is not None:
            writer.abort()
        if not commit:
            for at in done:
                storage.delete(at)
        raise


@dataclass
class Added:
    """What storing a model's files did: their manifest entries, the objects it put in place
    (``created``: those that were not there before), and counts."""

    entries: list[dict[str, Any]]
    written: list[tuple[str, ObjectMeta]]   # (key, trailer) of each object put in place
    created: list[str]
    new: int = 0
    reused: int = 0                  # segments already stored (this model's own duplicates too)
    delta: int = 0
    tensors: int = 0                 # new tensor objects


def add_files(storage: Storage, files: list[SourceFile], planner: DeltaPlanner | None, pool: Executor,
              nthreads: int, progress: ProgressFn | None, out: Added) -> None:
    """Store the segments of ``files`` (recording in ``out`` each object put in place as it
    goes, so that a failure can remove them) and their manifest entries."""
    known: set[str] = set()      # keys written or checked during this add
    for sf in files:
        if sf.link is not None:
            out.entries.append({"path": sf.relpath, "size": 0, "sha256": hashlib.sha256().hexdigest(),
                                "format": sf.format, "segments": [], "tensors": [], "link": sf.link})
            continue
        with open_source(sf.path) as fh, Sha256Beside() as sha:
            fd = fh.fileno()
            sha.read(functools.partial(read_exact, fd, path=sf.path), sf.size, READ_PIECE)
            mode = kept_mode(fd)
            segments: list[list[Any]] = []
            new: list[tuple[int, Segment, str, str, Pipeline, int]] = []
            packs: list[tuple[bytearray, list[int]]] = []   # packed bytes, the entries pointing in
            for index, seg in enumerate(sf.segments):
                if seg.length < PACK_BELOW:
                    data = read_exact(fd, seg.offset, seg.length, sf.path)
                    if not packs or len(packs[-1][0]) + len(data) > PACK_MAX:
                        packs.append((bytearray(), []))
                    packs[-1][1].append(len(segments))
                    segments.append(["", seg.length, len(packs[-1][0])])
                    packs[-1][0].extend(data)
                    continue
                digest = hash_segment(fd, seg, sf.path)
                key = object_key(digest, seg.dtype)
                segments.append([key, seg.length])
                if key in known or reusable(storage, key):
                    out.reused += 1
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
                objs.append(new_object(
                    key, "bytes" if seg.dtype is None else "tensor", seg.dtype, seg.length, digest, pipeline,
                    chunk_elems, chunks_of(seg, step), d,
                    ref_key(d) if d is not None else None))
            for blob, where in packs:
                digest = xxhash.xxh3_128_hexdigest(bytes(blob))
                key = object_key(digest, None)
                for i in where:
                    segments[i][0] = key
                if key in known or reusable(storage, key):
                    out.reused += 1
                    if progress:
                        progress(len(blob))
                    continue
                known.add(key)
                pipeline, chunk_elems = pipeline_for(Segment(0, len(blob)))

                def whole(blob: bytearray = blob) -> Iterator[bytes]:
                    return iter([bytes(blob)])

                objs.append(new_object(key, "bytes", None, len(blob), digest, pipeline, chunk_elems, whole))
            fresh = {o.key for o in objs if not storage.exists(object_at(o.key))}
            for obj, at in write_objects(storage, objs, pool, nthreads, progress):
                out.written.append((obj.key, obj.meta))
                if obj.key in fresh:
                    out.created.append(at)
                out.new += 1
                out.delta += bool(obj.meta.refs)
                out.tensors += obj.meta.kind == "tensor"
        out.entries.append({
            "path": sf.relpath, "size": sf.size, "sha256": sha.hexdigest(), "format": sf.format,
            "segments": segments,
            "tensors": [[t.name, t.dtype, list(t.shape), t.segment, t.offset,
                         list(t.strides) if t.strides is not None else None] for t in sf.tensors],
            **({} if mode is None else {"mode": mode}),
        })
