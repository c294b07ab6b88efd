"""Small segments packed together: a run of small tensors and the bytes between them as one
opaque segment of an archive (format 1.5).

An ONNX file holds hundreds of tensors of a few elements (shape constants, scales) between short
runs of protobuf; a small model's checkpoint holds a bias and a norm per layer. As segments of
their own, each costs a stream, a chunk and its trip through the codec pipeline: about 60 us of
work for a few hundred bytes, which made such files compress and restore at a third of zstd's
speed. Packed, a run of them is one zstd stream, which also codes smaller (the bytes of a run
share their context). Their tensor entries point into it (:class:`~elves.model.TensorView`
``offset``), so every tensor can still be read by name.

Only the archive writer packs: the store already packs its small objects by content
(``elves.store.ingest``), and its tensor-level dedup and the family profiles need each tensor
as a segment of its own.
"""
from __future__ import annotations

import dataclasses

from .. import dtypes
from ..model import Segment, SourceFile

# A tensor of fewer elements than this is small, whatever its dtype: copies of one model at two
# precisions pack the same tensors, so their other tensors still pair up by name and size.
# 1,024 packed a model's biases and norms too, and cost up to 0.1% of the ratio where those
# had matched a tensor of an earlier file (versions of a checkpoint, a model at two precisions);
# at 256 no dataset of bench/ codes smaller than unpacked.
SMALL_ELEMENTS = 256
# Opaque bytes shorter than this are small: the structure between small tensors.
SMALL_BYTES = 4096


def pack_small(sf: SourceFile) -> SourceFile:
    """``sf`` with each run of two or more consecutive small segments made one opaque segment,
    and the tensor entries in them pointing into it; ``sf`` itself when nothing packs.

    Large segments keep their own stream, so that they dedup across files and get the float
    codecs; a segment that a sub-byte (packed-dtype) tensor covers stays whole, as the index
    wants such a tensor to be its whole segment.
    """
    whole = {t.segment for t in sf.tensors if t.dtype in dtypes.PACKED}
    small = [k not in whole and (s.length < SMALL_BYTES if s.dtype is None
                                 else s.length // dtypes.get(s.dtype).itemsize < SMALL_ELEMENTS)
             for k, s in enumerate(sf.segments)]
    segments: list[Segment] = []
    where: list[tuple[int, int]] = []  # old segment -> (new segment, its offset in it)
    k = 0
    while k < len(sf.segments):
        end = k + 1
        while end < len(sf.segments) and small[k] and small[end]:
            end += 1
        first = sf.segments[k]
        if end - k == 1:
            where.append((len(segments), 0))
            segments.append(first)
        else:
            for s in sf.segments[k:end]:
                where.append((len(segments), s.offset - first.offset))
            last = sf.segments[end - 1]
            segments.append(Segment(first.offset, last.offset + last.length - first.offset))
        k = end
    if len(segments) == len(sf.segments):
        return sf
    tensors = [t if t.segment < 0 else
               dataclasses.replace(t, segment=where[t.segment][0], offset=t.offset + where[t.segment][1])
               for t in sf.tensors]
    return dataclasses.replace(sf, segments=segments, tensors=tensors)
