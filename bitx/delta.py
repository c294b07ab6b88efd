"""Compress against a base: match each fine-tuned tensor to base tensors and choose, per tensor,
between BitX (``xor`` against a reference, then ``planes`` + ``rans``) and the standalone codec.

Matching, in order:

1. content: a tensor whose bytes hash to a base tensor's (same dtype and length) references it;
   every chunk then equals its reference and is stored as an empty payload;
2. name: the tensor's name without wrapper prefixes (``state_dict.``, ``module.``, ``model.``)
   names a base tensor of the same dtype and the same byte length, or a smaller one that fits
   inside it: rows appended (a resized vocabulary: the base is the prefix) or a layer widened
   along other dimensions (the base sits at the origin of the new shape); the new elements pass
   the filter unchanged and are coded on their own.

The choice is measured, not guessed: a few windows of each tensor (the start, the middle and the
end) are read with their references, and one pass of a numba kernel (``bitx.kernels``) counts
the byte histograms of every way to code them: standalone, XORed (per ``planes`` plane), sparse
(unchanged elements dropped, a bitmap instead) and ranked (the fine-tune's exponent given the
base's, with a table built from the same counts). Their order-0 entropies, plus what ``rans``
pays per chunk for tables and lanes, estimate each option's size, plane by plane: the planes
where XOR helps make the ``mask`` of the ``xor`` codec, and the cheapest option wins, table
included. A tensor where nothing beats the standalone codec is coded standalone. Nothing is
encoded to decide, so planning costs a small fraction of encoding.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from elves import casts, dtypes
from elves.codecs import Pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.errors import CodecError
from elves.model import Segment, SourceFile, TensorView
from elves.references import RangeFn, Reference, Sources

from .base import BaseModel, BaseSegment, BaseTensor, normalize
from .codec import NEAR, Xor
from .kernels import rank_counts, sample_stats

Remap = list[list[Any]]  # the xor codec's remap table: [[base byte, [fine-tune bytes, ...]], ...]
WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
MIN_DELTA_BYTES = 128        # smaller tensors cost more as a reference than as bytes
MAX_CANDIDATES = 4
MAX_CASTS = 2                 # casts of one base tensor tried (round to nearest, truncate)
# A reference of a kind the planner did not always offer (a cast, an earlier stream of the archive)
# is kept only when its estimate is below this fraction of the standalone one: on a near tie the
# estimate from a few windows says too little, and the archive stays what it was.
NEW_SOURCE_MARGIN = 0.95
SAMPLE_WINDOWS = 3            # the start, the middle and the end of a tensor...
SAMPLE_BYTES = 64 << 10       # ...this many bytes each


@dataclass
class Cand:
    """A reference to try for a segment: how the index will name it, and its bytes."""

    reference: Reference
    read: RangeFn                 # (offset, length) in the segment -> the reference bytes there
    ref_hash: str                 # xxh3-128 and length of the source (the ``xor`` codec's config)
    ref_nbytes: int
    seg: BaseSegment | None = None  # the base tensor, for a reference into the base model
    identical: bool = False
    margin: float = 1.0           # kept only below this fraction of the standalone estimate

    def xor(self, dtype: str, **kw: Any) -> Xor:
        grown = self.reference.grown
        if grown:
            return Xor(dtype, self.ref_hash, self.ref_nbytes, **kw, ref_shape=list(grown[0]), shape=list(grown[1]))
        return Xor(dtype, self.ref_hash, self.ref_nbytes, **kw)


@dataclass
class Delta:
    """The decision for one segment: code it with ``pipeline`` against ``reference``."""

    pipeline: Pipeline
    reference: Reference
    read: RangeFn                 # (offset, length) in the segment -> reference bytes
    ref: BaseSegment | None = None  # the base tensor referenced, if the source is the base model


def plane_mask(use: list[bool], width: int, rotate: bool) -> int:
    """The word mask that XORs exactly the byte planes marked in ``use`` (plane 0 = top byte of
    the rotated word); planes rotate left by one bit, so the mask is rotated right by one."""
    bits = 8 * width
    m = 0
    for p, on in enumerate(use):
        if on:
            m |= 0xFF << (8 * (width - 1 - p))
    if rotate:
        m = (m >> 1) | ((m & 1) << (bits - 1))
    return m


def ranked(joint: np.ndarray, min_count: int = 2) -> tuple[Remap, np.ndarray]:
    """The ``remap`` table of the ``xor`` codec for the counts ``joint[base value, fine-tune
    value]`` of the byte below the sign: per base value, the fine-tune values seen at least
    ``min_count`` times, most frequent first (the rest keep the default order); and the
    histogram of the codes that table gives those counts."""
    order = np.empty((256, 256), dtype=np.uint8)
    listed = np.zeros(256, dtype=np.int64)
    codes = np.zeros(256, dtype=np.int64)
    rank_counts(joint, NEAR, min_count, order, listed, codes)
    return [[e, order[e, :listed[e]].tolist()] for e in np.flatnonzero(listed).tolist()], codes


def ranking(joint: np.ndarray, min_count: int = 2) -> Remap:
    """The ``remap`` table alone (see :func:`ranked`)."""
    return ranked(joint, min_count)[0]


def table_bytes(remap: Remap | None) -> int:
    """About what a remap table adds to the (msgpack) index."""
    return 0 if not remap else sum(3 + len(vals) for _, vals in remap)


def estimate(hist: np.ndarray, chunks: float, lanes: int) -> np.ndarray:
    """Estimated ``rans`` bytes of planes with byte histograms ``hist`` (..., 256) that stand
    for ``chunks`` chunks: the order-0 entropy, plus the frequency table and the lane states
    each chunk pays; a constant plane costs 2 bytes a chunk, and none more than stored raw."""
    h = hist.astype(np.float64)
    n = h.sum(axis=-1)
    k = np.count_nonzero(hist, axis=-1)
    plogp = (h * np.log2(np.where(h > 0, h, 1.0))).sum(axis=-1)
    bits = n * np.log2(np.maximum(n, 1.0)) - plogp
    coded = bits / 8 + (3 * k + 8 * lanes + 8) * chunks
    return np.where(k <= 1, 2 * chunks, np.minimum(coded, n + chunks))


class Sample:
    """Byte histograms of sample windows of one fine-tuned tensor against one reference, as
    ``bitx.kernels.sample_stats`` counts them (see there)."""

    def __init__(self, width: int, rotate: bool):
        self.width, self.rotate = width, rotate
        self.std = np.zeros((width, 256), dtype=np.int64)
        self.xor = np.zeros((width, 256), dtype=np.int64)
        self.bitmap = np.zeros((width, 256), dtype=np.int64)
        self.joint = np.zeros((256, 256), dtype=np.int64)
        self.tail = np.zeros(256, dtype=np.int64)
        self.elems = 0
        self.nonzero = 0

    def add(self, raw: np.ndarray, ref: np.ndarray) -> None:
        """Count one window: ``raw`` and ``ref`` bytes (``ref`` may be shorter)."""
        word = WORDS[self.width]
        n = raw.shape[0] // self.width
        a = raw[:n * self.width].view(word)
        r = ref[:min(ref.shape[0] // self.width, n) * self.width].view(word)
        nonzero = sample_stats(a, r, self.width, self.rotate, self.std, self.xor, self.bitmap, self.joint, self.tail)
        if nonzero < 0:
            raise CodecError(f"sample_stats was given histograms too small for {self.width}-byte words")
        self.nonzero += nonzero
        self.elems += n

    @property
    def sparse(self) -> np.ndarray:
        """Per plane, the histogram of what the sparse form codes: the bitmap's words and the
        nonzero XORed words (the XORed words less the zero ones, a zero byte in every plane)."""
        out = self.bitmap + self.xor
        out[:, 0] -= self.elems - self.nonzero
        return out


class DeltaPlanner:
    """Chooses, for the encoder and the store, which segments to code against which reference:
    the tensors of a base model (``base``: by content, by name, grown, or at another precision),
    and whatever candidates the caller adds (earlier streams of the archive: ``elves.planner``)."""

    def __init__(self, base: BaseModel | None):
        self.base = base
        self.by_name: dict[str, list[BaseTensor]] = {}
        self.sources: Sources | None = None
        if base is not None:
            base.hash_segments(with_sha256=True)
            self.sources = Sources.of_content(base)
            for t in base.tensors:
                self.by_name.setdefault(normalize(t.name), []).append(t)

    def _cand(self, b: BaseSegment, dtype: str, nbytes: int, identical: bool = False,
              grown: tuple[list[int], list[int]] | None = None, cast: tuple[str, str] | None = None) -> Cand:
        assert b.hash is not None and self.sources is not None
        ref = Reference(content=(b.hash, b.nbytes), cast=cast,
                        grown=None if grown is None else (tuple(grown[0]), tuple(grown[1])))
        return Cand(ref, self.sources.reader(ref, dtype, nbytes), b.hash, b.nbytes, seg=b, identical=identical,
                    margin=NEW_SOURCE_MARGIN if cast is not None else 1.0)

    def candidates(self, sf: SourceFile, index: int, seg: Segment, digest: str,
                   views: list[TensorView] | None = None) -> list[Cand]:
        """Base tensors to try for segment ``index`` of ``sf``; ``views``: the tensors of ``sf``
        that view that segment (all of them by default)."""
        if self.base is None or seg.dtype is None or seg.length < MIN_DELTA_BYTES \
                or dtypes.get(seg.dtype).itemsize > 8:
            return []
        same = self.base.find(digest, seg.length)
        if same is not None and same.dtype == seg.dtype:
            return [self._cand(same, seg.dtype, seg.length, identical=True)]
        out: list[Cand] = []
        casts_of: list[Cand] = []
        width = dtypes.get(seg.dtype).itemsize
        for view in sf.tensors if views is None else views:
            if view.segment != index or view.offset != 0:
                continue
            exact = view.strides is None and int(np.prod(view.shape, dtype=np.int64)) * width == seg.length
            for bt in self.by_name.get(normalize(view.name), []):
                b = bt.segment
                if b.hash is None or any(c.seg is b for c in out + casts_of):
                    continue
                if bt.dtype != seg.dtype:
                    # The same tensor at another precision: coded against its cast.
                    if exact and bt.exact and bt.dtype in casts.WIDTH and seg.dtype in casts.WIDTH \
                            and b.nbytes // casts.WIDTH[bt.dtype] == seg.length // width:
                        casts_of += [self._cand(b, seg.dtype, seg.length, cast=(bt.dtype, r)) for r in casts.ROUNDINGS
                                     if casts.supported(bt.dtype, seg.dtype, r)]
                elif b.nbytes == seg.length:  # the same file name first (one of several versions)
                    out.insert(0 if b.file == sf.relpath else len(out), self._cand(b, seg.dtype, seg.length))
                elif (b.nbytes < seg.length and exact and bt.exact and len(view.shape) >= 1
                      and len(bt.shape) == len(view.shape) and all(x <= y for x, y in zip(bt.shape, view.shape))):
                    if tuple(bt.shape[1:]) == tuple(view.shape[1:]):
                        out.append(self._cand(b, seg.dtype, seg.length))  # rows appended: the base is the prefix
                    else:  # widened along other dimensions: the base sits at the origin
                        out.append(self._cand(b, seg.dtype, seg.length, grown=(list(bt.shape), list(view.shape))))
        return out[:MAX_CANDIDATES] + casts_of[:MAX_CASTS]

    def choose(self, seg: Segment, standalone: Pipeline, chunk_elems: int, cands: list[Cand],
               read: Callable[[int, int], bytes]) -> Delta | None:
        """Estimate every option on sample windows; the cheapest delta, or None for standalone."""
        if not cands or not standalone.codecs or not isinstance(standalone.codecs[0], Planes):
            return None
        planes: Planes = standalone.codecs[0]
        width = planes.width
        if cands[0].identical:  # identical bytes: every chunk is an empty payload
            return self._delta(seg, standalone, cands[0], (1 << (8 * width)) - 1)
        rans = standalone.codecs[1] if len(standalone.codecs) > 1 and isinstance(standalone.codecs[1], Rans) else Rans()
        if seg.length <= SAMPLE_WINDOWS * SAMPLE_BYTES:
            picks = [(0, seg.length)]
        else:
            last = (seg.length - SAMPLE_BYTES) // width * width
            picks = [(0, SAMPLE_BYTES), (last // 2 // width * width, SAMPLE_BYTES), (last, SAMPLE_BYTES)]
        assert seg.dtype is not None
        remap_ok = dtypes.get(seg.dtype).is_float and width >= 2 and planes.rotate
        refs = [cand.read for cand in cands]
        samples = [Sample(width, planes.rotate) for _ in cands]
        for off, length in picks:
            raw = np.frombuffer(read(seg.offset + off, length), dtype=np.uint8)
            for sample, ref in zip(samples, refs):
                sample.add(raw, ref(off, raw.shape[0]))
        if samples[0].elems == 0:
            return None
        # every option's planes, estimated in one call: standalone, then per candidate XORed,
        # sparse and the ranked top byte
        n, width_c = len(cands), width * len(cands)
        remaps: list[Remap | None] = [None] * n
        hists = [samples[0].std] + [s.xor for s in samples] + [s.sparse for s in samples]
        if remap_ok:
            for c, s in enumerate(samples):
                remaps[c], codes = ranked(s.joint)
                hists.append((codes + s.tail)[None, :])
        cost = estimate(np.concatenate(hists), samples[0].elems / chunk_elems, rans.lanes)
        std, xor = cost[:width], cost[width:width + width_c].reshape(n, width)
        sparse = cost[width + width_c:width + 2 * width_c].reshape(n, width).sum(axis=1)
        rest = np.minimum(xor, std[None, :])  # each plane XORed where that helps
        options = [(float(std.sum()), "std", -1)]
        options += [(float(rest[c].sum()), "mask", c) for c in range(n)]
        if seg.length % width == 0:
            options += [(float(sparse[c]), "sparse", c) for c in range(n)]
        if remap_ok:  # the table is paid once per tensor; the sample stands for the whole tensor
            scale = sum(length for _, length in picks) / seg.length
            top = cost[width + 2 * width_c:]
            options += [(float(top[c] + rest[c, 1:].sum()) + table_bytes(remaps[c]) * scale, "remap", c)
                        for c in range(n)]
        # A new kind of source competes only below its margin, and loses ties: the choice among
        # the rest is what it always was.
        options = [o for o in options if o[2] < 0 or cands[o[2]].margin >= 1 or o[0] < cands[o[2]].margin * options[0][0]]
        _, kind, c = min(options, key=lambda o: (o[0], o[2] >= 0 and cands[o[2]].margin < 1))
        if kind == "std":
            return None
        full = (1 << (8 * width)) - 1
        if kind == "sparse":
            return self._delta(seg, standalone, cands[c], full, sparse=True)
        use = [bool(xor[c, p] < std[p]) for p in range(width)]
        if kind == "remap":
            use[0] = False
            return self._delta(seg, standalone, cands[c], plane_mask(use, width, planes.rotate), remap=remaps[c])
        return self._delta(seg, standalone, cands[c], plane_mask(use, width, planes.rotate))

    def _delta(self, seg: Segment, standalone: Pipeline, cand: Cand, mask: int, sparse: bool = False,
               remap: Remap | None = None) -> Delta:
        assert seg.dtype is not None
        xor = cand.xor(seg.dtype, mask=mask, sparse=sparse, remap=remap)
        return Delta(Pipeline([xor, *standalone.codecs]), cand.reference, cand.read, cand.seg)

    def plan(self, sf: SourceFile, fd: int, items: list[tuple[int, Segment, str, Pipeline, int]],
             pool: Executor, more: Callable[[int, Segment, list[TensorView]], list[Cand]] | None = None) -> dict[int, Delta]:
        """Decide for the new segments of one file, in parallel: segment number -> its delta.
        ``items`` are (segment number, segment, its xxh3-128, standalone pipeline, chunk elements);
        ``more(segment number, segment, its views)`` adds candidates of other sources."""

        def read(off: int, length: int) -> bytes:
            return os.pread(fd, length, off)

        views: dict[int, list[TensorView]] = {}
        for t in sf.tensors:
            views.setdefault(t.segment, []).append(t)

        def one(item: tuple[int, Segment, str, Pipeline, int]) -> tuple[int, Delta | None]:
            index, seg, digest, standalone, chunk_elems = item
            cands = self.candidates(sf, index, seg, digest, views.get(index, []))
            if more is not None and not (cands and cands[0].identical):
                cands += more(index, seg, views.get(index, []))
            return index, self.choose(seg, standalone, chunk_elems, cands, read) if cands else None

        out = {}
        for index, d in pool.map(one, items):
            if d is not None:
                out[index] = d
        return out

    def index_entry(self, streams: list[Any]) -> dict[str, Any] | None:
        """The index's ``base`` field: the base tensors the archive's streams reference, and a
        summary of the base model. None when no stream ended up referencing the base."""
        refs: dict[str, dict[str, Any]] = {}
        if self.base is None:
            return None
        for s in streams:
            if s.ref is not None:  # coded against a stream of the archive itself
                continue
            for c in s.pipeline:
                if c.get("id") == "xor" and c["ref_hash"] not in refs:
                    seg = self.base.find(c["ref_hash"], c["ref_nbytes"])
                    assert seg is not None
                    refs[c["ref_hash"]] = {"name": seg.names[0] if seg.names else "", "file": seg.file,
                                           "dtype": seg.dtype, "nbytes": seg.nbytes, "hash": seg.hash}
                    offset = self.base.file_offset(seg)
                    if offset is not None:  # lets restore find it without parsing the base
                        refs[c["ref_hash"]]["offset"] = offset
        if not refs:
            return None
        return {"model": self.base.summary(), "tensors": list(refs.values())}
