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
else the latest tensors of the same dtype and size. It codes one sample chunk both ways and keeps
the reference only where that is clearly smaller.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from bitx.base import normalize

from .archive import ArchiveWriter, Stream
from .codecs import Pipeline
from .model import Segment, SourceFile

# A reference is kept when the sample chunk coded against it is at most this fraction of the
# chunk coded alone: below a few percent, the gain is within what one chunk says of the rest.
KEEP_BELOW = 0.95
MAX_CANDIDATES = 3


class PayloadSource(Protocol):
    def read_payload(self, stream: Stream, chunk: int) -> bytes: ...


def decode_chunk(source: PayloadSource, stream: Stream, pipeline: Pipeline, i: int,
                 ref: np.ndarray | None = None) -> np.ndarray:
    """Chunk ``i`` of ``stream``, decoded; ``ref`` is its reference chunk, if its pipeline needs one.
    ``source`` is an :class:`~elves.archive.ArchiveReader` (which checks the payload's checksum)
    or the :class:`~elves.archive.ArchiveWriter` that wrote it."""
    payload = source.read_payload(stream, i)
    out = np.empty(stream.chunks[i][2], dtype=np.uint8)
    pipeline.decode(np.frombuffer(payload, dtype=np.uint8), out, ref=ref)
    return out


class RefChooser:
    """Chooses, while an archive is written, which earlier stream each new tensor is coded against."""

    def __init__(self, writer: ArchiveWriter):
        self.writer = writer
        self.by_name: dict[tuple[str, str, int], list[int]] = {}  # (name, dtype, nbytes) -> streams, latest last
        self.by_size: dict[tuple[str, int], list[int]] = {}     # (dtype, nbytes) -> streams, latest last
        self._pipelines: dict[int, Pipeline] = {}

    def remember(self, sf: SourceFile, stream_ids: list[int]) -> None:
        """Offer the tensor streams of a file whose chunks are all written as references."""
        names = segment_names(sf)
        for number, (seg, index) in enumerate(zip(sf.segments, stream_ids)):
            stream = self.writer.streams[index]
            if seg.dtype is None or stream.ref is not None or self.pipeline(index).ref_codec is not None:
                continue
            for key in [(name, seg.dtype, seg.length) for name in names.get(number, [])] + [(seg.dtype, seg.length)]:
                table = self.by_name if len(key) == 3 else self.by_size
                same = table.setdefault(key, [])  # type: ignore[arg-type]
                if index not in same:
                    same.append(index)
        self.writer.flush()

    def pipeline(self, index: int) -> Pipeline:
        if index not in self._pipelines:
            self._pipelines[index] = Pipeline.from_config(self.writer.streams[index].pipeline)
        return self._pipelines[index]

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

    def ref_chunk(self, index: int, i: int) -> np.ndarray:
        """What restore produces for chunk ``i`` of stream ``index``. Thread-safe."""
        return decode_chunk(self.writer, self.writer.streams[index], self.pipeline(index), i)

    def choose(self, seg: Segment, names: list[str], chunk_elems: int, width: int,
               read: Callable[[int, int], bytes],
               size_alone: Callable[[np.ndarray], int],
               size_against: Callable[[np.ndarray, np.ndarray], int]) -> int | None:
        """The stream to code ``seg`` against, or None to code it alone.

        ``names`` are the segment's tensor names (:func:`segment_names`); ``read(offset, length)``
        reads the segment; ``size_alone(chunk)`` and
        ``size_against(chunk, ref)`` code a chunk alone and against a reference chunk.
        """
        cands = [c for c in self.candidates(seg, names) if self.writer.streams[c].chunk_elems == chunk_elems]
        if not cands:
            return None
        step = chunk_elems * width
        nchunks = -(-seg.length // step)
        i = nchunks // 2
        raw = np.frombuffer(read(i * step, min(step, seg.length - i * step)), dtype=np.uint8)
        best, best_size = None, KEEP_BELOW * size_alone(raw)
        for index in cands:
            size = size_against(raw, self.ref_chunk(index, i))
            if size < best_size:
                best, best_size = index, size
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
