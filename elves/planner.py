"""The reference planner: which reference, if any, each new tensor of an archive is coded against.

One planner offers every source (``elves.references``) to every tensor and keeps what codes
smallest:

- tensors of the base model (``--base``): by content, by name, grown, or at another precision
  (``bitx.delta.DeltaPlanner``);
- earlier streams of the same archive: the tensor of the same name in an earlier file (versions of
  one model in one folder), the same tensor at another precision (``model.safetensors`` beside
  ``model.fp16.safetensors``: coded against its cast), and the stream holding most of its 4 KiB
  blocks in another order (``ref_map``: an exporter that reorders an LSTM's gates, a layer split
  or fused); in a lossy archive also the latest tensors of the same size.

A lossless tensor is coded with ``xor`` against the best of them, as BitX estimates it from
sample windows (standalone, masked, sparse or ranked). A lossy (``elf``) tensor is coded with
``elf`` and ``delta`` against the reference whose sample chunk codes smallest. A stream that is
itself coded against a reference never serves as one: references stay one level deep.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

import numpy as np

from bitx.base import BaseModel, normalize
from bitx.delta import MIN_DELTA_BYTES, NEW_SOURCE_MARGIN, Cand, Delta, DeltaPlanner

from . import casts, dtypes
from .chunks import ChunkSource
from .codecs import Pipeline
from .index import Stream
from .model import Segment, SourceFile, TensorView
from .references import Reference, RefMap, Sources

# A lossy reference is kept when the sample chunk coded against it is at most this fraction of the
# chunk coded alone: below a few percent, the gain is within what one chunk says of the rest.
KEEP_BELOW = 0.95
MAX_CANDIDATES = 3
# Block matching: blocks of BLOCK bytes at multiples of BLOCK in both tensors; a map is tried when
# it covers at least MIN_COVER of the tensor. The index holds at most MAX_BLOCKS blocks (4 GiB of
# tensors, 24 MiB of index); later tensors are matched against it but not added to it.
BLOCK = 4096
MIN_COVER = 0.25
MAX_BLOCKS = 1 << 20


class Written(ChunkSource, Protocol):
    """An archive being written, as the planner reads it back (``elves.archive.ArchiveWriter``)."""

    streams: list[Stream]
    path: Path  # where errors point

    def flush(self) -> None: ...


def block_hashes(raw: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each whole BLOCK-byte block of ``raw``: a dot product with fixed odd
    multipliers, wrapping. Weak, but a false match only costs size (the sample is coded against
    what the map gives, whatever that is), never correctness."""
    n = raw.shape[0] // BLOCK
    words = raw[: n * BLOCK].view("<u8").reshape(n, BLOCK // 8)
    # A matrix-vector product wraps as the sum of products does, without their temporary: about
    # 12 GB/s, where the hash pass beside it (sha256) runs at under 2.
    hashes: np.ndarray = words.dot(_MULTIPLIERS)
    return hashes


_MULTIPLIERS = np.random.default_rng(0x1E5).integers(1, 1 << 62, BLOCK // 8, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def segment_names(sf: SourceFile) -> dict[int, list[str]]:
    """Tensor segment number -> the names of the tensors it holds, each as written and without
    wrapper prefixes, for matching a tensor to the same tensor of another file. (A bytes segment
    of packed small tensors is matched by content only.)"""
    names: dict[int, list[str]] = {}
    for t in sf.tensors:
        if t.segment >= 0 and sf.segments[t.segment].dtype is not None:
            got = names.setdefault(t.segment, [])
            got += [n for n in (t.name, normalize(t.name)) if n not in got]
    return names


def widest_first(files: list[SourceFile]) -> list[SourceFile]:
    """``files`` in the order to code them: as given, except that copies of one model at several
    precisions (files with the same float tensor names and element counts) are taken widest
    first, in the places they held, so that the narrower copies code against the cast of the
    wider one, which references, pointing backwards, need."""
    def key(sf: SourceFile) -> frozenset[tuple[str, int]]:
        sizes = {seg: s.length // casts.WIDTH[s.dtype] for seg, s in enumerate(sf.segments) if s.dtype in casts.WIDTH}
        return frozenset((normalize(t.name), sizes[t.segment]) for t in sf.tensors if t.segment in sizes)

    def width(sf: SourceFile) -> int:
        return max((casts.WIDTH[s.dtype] for s in sf.segments if s.dtype in casts.WIDTH), default=0)

    groups: dict[frozenset[tuple[str, int]], list[int]] = {}
    for i, sf in enumerate(files):
        k = key(sf)
        if k:
            groups.setdefault(k, []).append(i)
    out = list(files)
    for places in groups.values():
        if len({width(files[i]) for i in places}) > 1:
            for place, i in zip(places, sorted(places, key=lambda i: -width(files[i]))):
                out[place] = files[i]
    return out


class ReferencePlanner:
    """Plans the references of one archive as it is written (``writer``), against its earlier
    streams and, with ``base``, a base model. ``blocks``: block maps are offered (the encoder then
    passes each float tensor's :func:`block_hashes`)."""

    def __init__(self, writer: Written, base: BaseModel | None, blocks: bool):
        self.writer = writer
        self.blocks = blocks
        self.deltas = DeltaPlanner(base)
        self.sources = Sources(writer, writer.streams, writer.path)
        self.sources.content = base
        self.by_name: dict[tuple[str, str, int], list[int]] = {}    # (name, dtype, nbytes) -> streams, latest last
        self.by_size: dict[tuple[str, int], list[int]] = {}        # (dtype, nbytes) -> streams, latest last
        self.by_elems: dict[tuple[str, int], list[int]] = {}       # (name, elements) -> float streams, latest last
        self._pending: dict[int, np.ndarray] = {}                     # stream -> its block hashes
        self._keys = np.zeros(0, dtype=np.uint64)                    # the block index, sorted by hash
        self._where = np.zeros((0, 2), dtype=np.int64)                # (stream, offset) of each

    # -- what the archive holds so far
    def add_blocks(self, index: int, hashes: np.ndarray) -> None:
        """Note the block hashes of a new stream (:func:`block_hashes` of its original bytes); they
        join the index with the stream, in :meth:`remember`."""
        self._pending[index] = hashes

    def remember(self, sf: SourceFile, stream_ids: list[int]) -> None:
        """Offer the tensor streams of a file whose chunks are all written as references."""
        names = segment_names(sf)
        keys, where = [self._keys], [self._where]
        room = MAX_BLOCKS - self._keys.shape[0]
        for number, (seg, index) in enumerate(zip(sf.segments, stream_ids)):
            stream = self.writer.streams[index]
            hashes = self._pending.pop(index, None)
            if seg.dtype is None or Reference.of(stream) is not None:
                continue
            lists = [self.by_name.setdefault((name, seg.dtype, seg.length), []) for name in names.get(number, [])]
            lists.append(self.by_size.setdefault((seg.dtype, seg.length), []))
            if seg.dtype in casts.WIDTH:
                elems = seg.length // casts.WIDTH[seg.dtype]
                lists += [self.by_elems.setdefault((name, elems), []) for name in names.get(number, [])]
            for same in lists:
                if index not in same:
                    same.append(index)
            if hashes is not None and 0 < hashes.shape[0] <= room:
                room -= hashes.shape[0]
                keys.append(hashes)
                where.append(np.stack([np.full(hashes.shape[0], index, np.int64),
                                       BLOCK * np.arange(hashes.shape[0], dtype=np.int64)], axis=1))
        self._pending.clear()
        all_keys, all_where = np.concatenate(keys), np.concatenate(where)
        order = np.argsort(all_keys, kind="stable")
        self._keys, self._where = all_keys[order], all_where[order]
        self.writer.flush()

    # -- candidates among earlier streams
    def named(self, seg: Segment, names: list[str], by_size: bool) -> list[int]:
        """Streams of the same dtype and size, latest first: those of the same name, then (with
        ``by_size``) others."""
        lists = [self.by_name.get((name, seg.dtype or "", seg.length), []) for name in names]
        if by_size:
            lists.append(self.by_size.get((seg.dtype or "", seg.length), []))
        found: list[int] = []
        for same in lists:
            for index in reversed(same):
                if index not in found and len(found) < MAX_CANDIDATES:
                    found.append(index)
        return found

    def block_map(self, seg: Segment, hashes: np.ndarray) -> tuple[int, RefMap] | None:
        """The stream holding most of the segment's blocks (``hashes``: :func:`block_hashes` of
        its bytes), and the map of where, if it covers at least MIN_COVER of the segment."""
        if hashes.shape[0] == 0 or self._keys.shape[0] == 0:
            return None
        pos = np.searchsorted(self._keys, hashes)
        pos[pos == self._keys.shape[0]] = 0
        hit = self._keys[pos] == hashes
        if hit.sum() < MIN_COVER * seg.length / BLOCK:
            return None
        found = self._where[pos[hit]]
        stream = int(np.bincount(found[:, 0]).argmax())
        mine = found[:, 0] == stream
        if mine.sum() < MIN_COVER * seg.length / BLOCK:
            return None
        dsts = np.flatnonzero(hit)[mine] * BLOCK
        ref_map: RefMap = []
        for dst, src in zip(dsts.tolist(), found[mine, 1].tolist()):
            if ref_map and ref_map[-1][0] + ref_map[-1][2] == dst and ref_map[-1][1] + ref_map[-1][2] == src:
                ref_map[-1][2] += BLOCK
            else:
                ref_map.append([dst, src, BLOCK])
        return stream, ref_map

    def _references(self, seg: Segment, names: list[str], blocks: np.ndarray | None, by_size: bool,
                    casts_too: bool) -> list[Reference]:
        refs = [Reference(stream=i) for i in self.named(seg, names, by_size)]
        if casts_too and seg.dtype in casts.WIDTH:
            elems = seg.length // casts.WIDTH[seg.dtype]
            for name in names:
                for i in reversed(self.by_elems.get((name, elems), [])):
                    src = self.writer.streams[i].dtype or ""
                    refs += [Reference(stream=i, cast=(src, r)) for r in casts.ROUNDINGS
                             if casts.supported(src, seg.dtype, r) and Reference(stream=i, cast=(src, r)) not in refs]
        mapped = self.block_map(seg, blocks) if blocks is not None else None
        if mapped is not None:
            refs.append(Reference(stream=mapped[0], map=mapped[1]))
        return refs

    def read(self, ref: Reference, seg: Segment) -> Callable[[int, int], np.ndarray]:
        return self.sources.reader(ref, seg.dtype, seg.length)

    def xor_candidates(self, seg: Segment, names: list[str], blocks: np.ndarray | None) -> list[Cand]:
        """Earlier streams to try as the ``xor`` reference of a lossless tensor."""
        if seg.dtype is None or seg.length < MIN_DELTA_BYTES or dtypes.get(seg.dtype).itemsize > 8:
            return []
        out = []
        for ref in self._references(seg, names, blocks, by_size=False, casts_too=True):
            assert ref.stream is not None
            src = self.writer.streams[ref.stream]
            out.append(Cand(ref, self.read(ref, seg), src.expected_hash, src.nbytes, margin=NEW_SOURCE_MARGIN))
        return out

    # -- choices
    def plan_lossless(self, sf: SourceFile, fd: int, items: list[tuple[int, Segment, str, Pipeline, int]],
                      pool: Executor, names: dict[int, list[str]], blocks: dict[int, np.ndarray]) -> dict[int, Delta]:
        """The ``xor`` deltas of a file's new lossless tensors, against every source (see
        :meth:`bitx.delta.DeltaPlanner.plan`): segment number -> its delta."""
        def more(index: int, seg: Segment, views: list[TensorView]) -> list[Cand]:
            return self.xor_candidates(seg, names.get(index, []), blocks.get(index))

        return self.deltas.plan(sf, fd, items, pool, more)

    def choose_lossy(self, seg: Segment, names: list[str], blocks: np.ndarray | None, chunk_elems: int,
                     read: Callable[[int, int], bytes], size_alone: Callable[[np.ndarray], int],
                     size_against: Callable[[np.ndarray, np.ndarray], int]) -> Reference | None:
        """The earlier stream (and map) to code a lossy tensor against with ``elf`` ``delta``, or
        None to code it alone. ``read(offset, length)`` reads the segment; ``size_alone(chunk)``
        and ``size_against(chunk, ref)`` code a chunk alone and against a reference chunk."""
        assert seg.dtype is not None
        cands = self._references(seg, names, blocks, by_size=True, casts_too=False)
        if not cands:
            return None
        step = chunk_elems * dtypes.get(seg.dtype).itemsize
        i = -(-seg.length // step) // 2
        lo, hi = i * step, min((i + 1) * step, seg.length)
        raw = np.frombuffer(read(lo, hi - lo), dtype=np.uint8)
        best, best_size = None, KEEP_BELOW * size_alone(raw)
        for ref in cands:
            size = size_against(raw, self.read(ref, seg)(lo, hi - lo))
            if size < best_size:
                best, best_size = ref, size
        return best

    def close(self) -> None:
        self.sources.close()
