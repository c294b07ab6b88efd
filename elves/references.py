"""In-archive references: coding a tensor against another tensor of the same archive.

A folder often holds several versions of one model (checkpoints of one run, releases of one
network, the same weights in two formats); their tensors are close, and coded against each other
they cost a fraction of what each costs alone. A stream with ``ref`` (docs/FORMAT.md) takes, as
each chunk's reference, the decoded chunk at the same place of the referenced stream, and its
pipeline's first filter codes the chunk against it (``elf`` with ``delta``). References are one
level deep: a referenced stream is coded on its own, so decoding any chunk needs at most one other
chunk and random access stays cheap. The reference is what restore produces, read back from the
archive as it is written, so encoder and decoder see the same bytes, lossy or not.

:class:`RefChooser` offers each new float tensor the streams of earlier files that could serve:
the tensor of the same name (or the same name without wrapper prefixes such as ``state_dict.``),
the latest tensors of the same dtype and size, and the tensor most of whose 4 KiB blocks it
holds, in another order (``ref_map``: an exporter that reorders an LSTM's gates, a layer split
or fused). It codes one sample chunk against each and alone, and keeps the best reference only
where that is clearly smaller.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from bitx.base import normalize

from .archive import ArchiveWriter, Stream
from .chunks import ChunkSource, decode_chunk
from .model import Segment, SourceFile

# A reference is kept when the sample chunk coded against it is at most this fraction of the
# chunk coded alone: below a few percent, the gain is within what one chunk says of the rest.
KEEP_BELOW = 0.95
MAX_CANDIDATES = 3
# Block matching: blocks of BLOCK bytes at multiples of BLOCK in both tensors; a map is tried when
# it covers at least MIN_COVER of the tensor. The index holds at most MAX_BLOCKS blocks (4 GiB of
# tensors, 24 MiB of index); later tensors are matched against it but not added to it.
BLOCK = 4096
MIN_COVER = 0.25
MAX_BLOCKS = 1 << 20
CACHED_CHUNKS = 8

RefMap = list[list[int]]  # [[dst, src, length], ...]: bytes of the reference copied from the referenced stream


def block_hashes(raw: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each whole BLOCK-byte block of ``raw``: a dot product with fixed odd
    multipliers, wrapping. Weak, but a false match only costs size (the sample chunk is coded
    against what the map gives, whatever that is), never correctness."""
    n = raw.shape[0] // BLOCK
    words = raw[: n * BLOCK].view("<u8").reshape(n, BLOCK // 8)
    with np.errstate(over="ignore"):
        return (words * _MULTIPLIERS).sum(axis=1, dtype=np.uint64)


_MULTIPLIERS = np.random.default_rng(0x1E5).integers(1, 1 << 62, BLOCK // 8, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class RefReader:
    """Reads the decoded bytes of a referenced stream at any offset, decoding the chunks it needs
    and keeping the last few (a block map jumps between them). Thread-safe."""

    def __init__(self, source: ChunkSource, stream: Stream):
        self.source = source
        self.stream = stream
        self.pipeline = stream.decoder()
        self.starts = np.concatenate(([0], np.cumsum([c[2] for c in stream.chunks], dtype=np.int64)))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, i: int) -> np.ndarray:
        with self._lock:
            got = self._cache.get(i)
            if got is not None:
                self._cache.move_to_end(i)
                return got
        got = decode_chunk(self.source, self.stream, self.pipeline, i)
        with self._lock:
            self._cache[i] = got
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return got

    def read(self, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` with the stream's decoded bytes from ``offset``."""
        pos = 0
        i = int(np.searchsorted(self.starts, offset, side="right")) - 1
        while pos < out.shape[0]:
            chunk = self._chunk(i)
            a = offset + pos - int(self.starts[i])
            take = min(chunk.shape[0] - a, out.shape[0] - pos)
            out[pos:pos + take] = chunk[a:a + take]
            pos += take
            i += 1

    def reference(self, ref_map: RefMap | None, lo: int, hi: int) -> np.ndarray:
        """The reference bytes ``[lo, hi)`` of a stream that references this one through
        ``ref_map`` (None: the same bytes at the same place); zeros where the map has none."""
        if ref_map is None:
            ref_map = [[0, 0, int(self.starts[-1])]]
        out = np.zeros(hi - lo, dtype=np.uint8)
        for dst, src, length in ref_map:
            a, b = max(lo, dst), min(hi, dst + length)
            if a < b:
                self.read(src + a - dst, out[a - lo:b - lo])
        return out


class RefChooser:
    """Chooses, while an archive is written, which earlier stream each new tensor is coded against.
    Used without a base model (``base=``), so no stream it sees is itself coded against one."""

    def __init__(self, writer: ArchiveWriter):
        self.writer = writer
        self.by_name: dict[tuple[str, str, int], list[int]] = {}  # (name, dtype, nbytes) -> streams, latest last
        self.by_size: dict[tuple[str, int], list[int]] = {}     # (dtype, nbytes) -> streams, latest last
        self._readers: dict[int, RefReader] = {}
        self._pending: dict[int, np.ndarray] = {}                  # stream -> its block hashes
        self._keys = np.zeros(0, dtype=np.uint64)                 # the block index, sorted by hash
        self._where = np.zeros((0, 2), dtype=np.int64)             # (stream, offset) of each

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
            if seg.dtype is None or stream.ref is not None:
                continue
            lists = [self.by_name.setdefault((name, seg.dtype, seg.length), []) for name in names.get(number, [])]
            lists.append(self.by_size.setdefault((seg.dtype, seg.length), []))
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

    def reader(self, index: int) -> RefReader:
        if index not in self._readers:
            self._readers[index] = RefReader(self.writer, self.writer.streams[index])
        return self._readers[index]

    def candidates(self, seg: Segment, names: list[str]) -> list[int]:
        """Streams of the same dtype and size, latest first: those of the same name, then others."""
        lists = [self.by_name.get((name, seg.dtype or "", seg.length), []) for name in names]
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

    def ref_chunk(self, index: int, ref_map: RefMap | None, lo: int, hi: int) -> np.ndarray:
        """What restore gives as the reference of bytes ``[lo, hi)`` of a stream coded against
        stream ``index`` through ``ref_map``. Thread-safe."""
        return self.reader(index).reference(ref_map, lo, hi)

    def choose(self, seg: Segment, names: list[str], blocks: np.ndarray | None, chunk_elems: int, width: int,
               read: Callable[[int, int], bytes],
               size_alone: Callable[[np.ndarray], int],
               size_against: Callable[[np.ndarray, np.ndarray], int]) -> tuple[int, RefMap | None] | None:
        """The stream to code ``seg`` against and the map (None: the same place), or None to
        code it alone.

        ``names`` are the segment's tensor names (:func:`segment_names`), ``blocks`` the hashes of
        its blocks (:func:`block_hashes`; None: no block matching); ``read(offset, length)``
        reads the segment; ``size_alone(chunk)`` and ``size_against(chunk, ref)`` code a chunk
        alone and against a reference chunk.
        """
        cands: list[tuple[int, RefMap | None]] = [(c, None) for c in self.candidates(seg, names)]
        mapped = self.block_map(seg, blocks) if blocks is not None else None
        if mapped is not None:
            cands.append(mapped)
        if not cands:
            return None
        step = chunk_elems * width
        i = -(-seg.length // step) // 2
        lo, hi = i * step, min((i + 1) * step, seg.length)
        raw = np.frombuffer(read(lo, hi - lo), dtype=np.uint8)
        best, best_size = None, KEEP_BELOW * size_alone(raw)
        for cand in cands:
            size = size_against(raw, self.ref_chunk(cand[0], cand[1], lo, hi))
            if size < best_size:
                best, best_size = cand, size
        return best


def segment_names(sf: SourceFile) -> dict[int, list[str]]:
    """Segment number -> the names of the tensors it holds, each as written and without wrapper
    prefixes, for matching a tensor to the same tensor of another file."""
    names: dict[int, list[str]] = {}
    for t in sf.tensors:
        if t.segment >= 0:
            got = names.setdefault(t.segment, [])
            got += [n for n in (t.name, normalize(t.name)) if n not in got]
    return names
