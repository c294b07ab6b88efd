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

The choice is measured, not guessed: a few chunks (the first, the middle and the last) are
encoded standalone and XORed against each candidate, and the per-plane sizes that the ``rans``
container records decide, plane by plane, whether XOR helps (the ``mask`` of the ``xor`` codec).
The sparse form (unchanged elements dropped, a bitmap instead) and the ranked exponent (the
fine-tune's exponent coded given the base's, with a table built from the same sample) are
measured too; the cheapest wins, table included. A tensor where nothing beats the standalone
codec is coded standalone. The sample costs 1 + 3 × candidates extra encodes of at most three
chunks per matched tensor.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from elves import dtypes
from elves.codecs import Pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.model import Segment, SourceFile

from .base import BaseModel, BaseSegment, BaseTensor, normalize, reference
from .codec import Xor

WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
MIN_DELTA_BYTES = 128        # smaller tensors cost more as a reference than as bytes
MAX_CANDIDATES = 4
SAMPLE_WINDOWS = 3            # the start, the middle and the end of a tensor...
SAMPLE_BYTES = 64 << 10       # ...this many bytes each


@dataclass
class Cand:
    """A base tensor to try as the reference of a fine-tuned segment."""

    seg: BaseSegment
    identical: bool = False
    shapes: tuple[list[int], list[int]] | None = None  # (base shape, fine-tune shape) of a grown tensor

    def xor(self, dtype: str, **kw: Any) -> Xor:
        shapes = {"ref_shape": self.shapes[0], "shape": self.shapes[1]} if self.shapes else {}
        return Xor(dtype, self.seg.hash, self.seg.nbytes, **kw, **shapes)


@dataclass
class Delta:
    """The decision for one fine-tuned segment: code it with ``pipeline`` against ``ref``."""

    pipeline: Pipeline
    ref: BaseSegment
    read: Callable[[int, int], np.ndarray]  # (offset, length) in the segment -> reference bytes


def plane_sizes(payload: np.ndarray | bytes, width: int) -> list[int]:
    """Bytes per plane of a ``rans`` chunk container (docs/FORMAT.md); all zero for an empty one."""
    if len(payload) == 0:
        return [0] * width
    buf = bytes(payload[:8 + 4 * width])
    n_planes = buf[6]
    offsets = list(struct.unpack_from(f"<{n_planes}I", buf, 8)) + [len(payload)]
    return [offsets[i + 1] - offsets[i] for i in range(n_planes)]


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


def top_byte_joint(raw: np.ndarray, ref: np.ndarray, width: int) -> np.ndarray:
    """Counts of (base, fine-tune) values of the byte below the sign bit, over the overlap."""
    word = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    n = min(raw.shape[0], ref.shape[0]) // width * width
    shift = word(8 * width - 9)
    a = (raw[:n].view(word) >> shift) & word(0xFF)
    r = (ref[:n].view(word) >> shift) & word(0xFF)
    return np.bincount(r.astype(np.intp) * 256 + a.astype(np.intp), minlength=65536).reshape(256, 256)


def ranking(joint: np.ndarray, min_count: int = 2) -> list[list]:
    """The ``remap`` table of the ``xor`` codec: per base value, the fine-tune values seen at
    least ``min_count`` times, most frequent first (the rest keep the default order)."""
    from .codec import _NEAR

    out = []
    for e in np.nonzero(joint.sum(axis=1))[0].tolist():
        row = joint[e]
        order = np.argsort(-row, kind="stable")
        vals = order[row[order] >= min_count].tolist()
        near = _NEAR[e].tolist()
        while vals:  # drop a tail that the default order (by distance from e) gives anyway
            listed = set(vals[:-1])
            if next(v for v in near if v not in listed) != vals[-1]:
                break
            vals.pop()
        if vals:
            out.append([e, vals])
    return out


def table_bytes(remap: list[list] | None) -> int:
    """About what a remap table adds to the (msgpack) index."""
    return 0 if not remap else sum(3 + len(vals) for _, vals in remap)


class DeltaPlanner:
    """Chooses, for the encoder, which fine-tuned segments to code against which base tensors."""

    def __init__(self, base: BaseModel):
        self.base = base
        base.hash_segments(with_sha256=True)
        self.by_name: dict[str, list[BaseTensor]] = {}
        for t in base.tensors:
            self.by_name.setdefault(normalize(t.name), []).append(t)

    def candidates(self, sf: SourceFile, index: int, seg: Segment, digest: str,
                   views: list | None = None) -> list[Cand]:
        """Base tensors to try for segment ``index`` of ``sf``; ``views``: the tensors of ``sf``
        that view that segment (all of them by default)."""
        if seg.dtype is None or seg.length < MIN_DELTA_BYTES or dtypes.get(seg.dtype).itemsize > 8:
            return []
        same = self.base.find(digest, seg.length)
        if same is not None and same.dtype == seg.dtype:
            return [Cand(same, identical=True)]
        out: list[Cand] = []
        width = dtypes.get(seg.dtype).itemsize
        for view in sf.tensors if views is None else views:
            if view.segment != index or view.offset != 0:
                continue
            exact = view.strides is None and int(np.prod(view.shape, dtype=np.int64)) * width == seg.length
            for bt in self.by_name.get(normalize(view.name), []):
                b = bt.segment
                if bt.dtype != seg.dtype or b.hash is None or any(c.seg is b for c in out):
                    continue
                if b.nbytes == seg.length:  # the same file name first (one of several versions)
                    out.insert(0 if b.file == sf.relpath else len(out), Cand(b))
                elif (b.nbytes < seg.length and exact and bt.exact and len(view.shape) >= 1
                      and len(bt.shape) == len(view.shape) and all(x <= y for x, y in zip(bt.shape, view.shape))):
                    if tuple(bt.shape[1:]) == tuple(view.shape[1:]):
                        out.append(Cand(b))  # rows appended: the base is the prefix
                    else:  # widened along other dimensions: the base sits at the origin
                        out.append(Cand(b, shapes=(list(bt.shape), list(view.shape))))
        return out[:MAX_CANDIDATES]

    def choose(self, seg: Segment, standalone: Pipeline, chunk_elems: int, cands: list[Cand],
               read: Callable[[int, int], bytes]) -> Delta | None:
        """Measure the candidates on sample chunks; the cheapest delta, or None for standalone."""
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
        sparse_ok = seg.length % width == 0
        remap_ok = dtypes.get(seg.dtype).is_float and width >= 2 and planes.rotate
        std = np.zeros(width, dtype=np.int64)
        xor = np.zeros((len(cands), width), dtype=np.int64)    # per plane, every bit XORed
        sparse = np.zeros(len(cands), dtype=np.int64)          # total, unchanged elements dropped
        sparse_tried = np.full(len(cands), sparse_ok)
        ranked = np.zeros(len(cands), dtype=np.int64)          # plane 0, ranked given the base's
        joint = np.zeros((len(cands), 256, 256), dtype=np.int64)

        def size(x: np.ndarray) -> np.ndarray:
            return np.array(plane_sizes(rans.encode(planes.encode(x)) if x.any() else b"", width))

        samples = []
        for off, length in picks:
            raw = np.frombuffer(read(seg.offset + off, length), dtype=np.uint8)
            refs = [reference(self.base, cand.xor(seg.dtype))(off, raw.shape[0]) for cand in cands]
            samples.append((raw, refs))
            std += size(raw)
            for c, cand in enumerate(cands):
                x = cand.xor(seg.dtype).encode(raw, ref=refs[c])
                xor[c] += size(x)
                # dropping unchanged elements pays when they would cost more than their bitmap bit
                if sparse_tried[c]:
                    zeros = np.count_nonzero(x.view(WORDS[width]) == 0) / max(1, x.shape[0] // width)
                    sparse_tried[c] = zeros * 8 * width > 1.5
                if sparse_tried[c]:
                    sparse[c] += size(cand.xor(seg.dtype, sparse=True).encode(raw, ref=refs[c])).sum()
                if remap_ok:
                    joint[c] += top_byte_joint(raw, refs[c], width)
        remaps = [ranking(joint[c]) if remap_ok else None for c in range(len(cands))]
        if remap_ok:
            for raw, refs in samples:
                for c, cand in enumerate(cands):
                    ranked[c] += size(cand.xor(seg.dtype, remap=remaps[c]).encode(raw, ref=refs[c]))[0]
        rest = np.minimum(xor, std[None, :])
        masked = rest.sum(axis=1)
        options = [(int(std.sum()), "std", -1)]
        options += [(int(masked[c]), "mask", c) for c in range(len(cands))]
        options += [(int(sparse[c]), "sparse", c) for c in range(len(cands)) if sparse_tried[c]]
        if remap_ok:  # the table is paid once per tensor; the sample stands for the whole tensor
            scale = sum(length for _, length in picks) / seg.length
            options += [(int(ranked[c] + rest[c, 1:].sum() + table_bytes(remaps[c]) * scale), "remap", c)
                        for c in range(len(cands))]
        _, kind, c = min(options, key=lambda o: o[0])
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
               remap: list | None = None) -> Delta:
        xor = cand.xor(seg.dtype, mask=mask, sparse=sparse, remap=remap)
        return Delta(Pipeline([xor, *standalone.codecs]), cand.seg, reference(self.base, xor))

    def plan(self, sf: SourceFile, fd: int, items: list[tuple[int, Segment, str, Pipeline, int]],
             pool: Executor) -> dict[int, Delta]:
        """Decide for the new segments of one file, in parallel: segment number -> its delta.
        ``items`` are (segment number, segment, its xxh3-128, standalone pipeline, chunk elements)."""

        def read(off: int, length: int) -> bytes:
            return os.pread(fd, length, off)

        views: dict[int, list] = {}
        for t in sf.tensors:
            views.setdefault(t.segment, []).append(t)

        def one(item: tuple[int, Segment, str, Pipeline, int]) -> tuple[int, Delta | None]:
            index, seg, digest, standalone, chunk_elems = item
            cands = self.candidates(sf, index, seg, digest, views.get(index, []))
            return index, self.choose(seg, standalone, chunk_elems, cands, read) if cands else None

        out = {}
        for index, d in pool.map(one, items):
            if d is not None:
                out[index] = d
        return out

    def ref_chunk(self, delta: Delta, offset: int, length: int) -> np.ndarray:
        """The reference bytes for the chunk at ``offset`` (within the segment) of ``length`` bytes."""
        return delta.read(offset, length)

    def index_entry(self, streams: list[Any]) -> dict[str, Any] | None:
        """The index's ``base`` field: the base tensors the archive's streams reference, and a
        summary of the base model. None when no stream ended up referencing the base."""
        refs: dict[str, dict[str, Any]] = {}
        for s in streams:
            for c in s.pipeline:
                if c.get("id") == "xor" and c["ref_hash"] not in refs:
                    seg = self.base.find(c["ref_hash"], c["ref_nbytes"])
                    assert seg is not None
                    refs[c["ref_hash"]] = {"name": seg.names[0] if seg.names else "", "file": seg.file,
                                           "dtype": seg.dtype, "nbytes": seg.nbytes, "hash": seg.hash}
        if not refs:
            return None
        return {"model": self.base.summary(), "tensors": list(refs.values())}
