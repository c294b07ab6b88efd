"""The model of what compress reads: files cut into segments, some of which are tensors.

A reader turns each input file into a :class:`SourceFile` whose segments cover the file's bytes
exactly, in order, with no gap and no overlap. Restoring a file is writing its segments back one
after the other, which is why restore is byte-exact whatever the container (safetensors header
and padding, a checkpoint's zip records, an unknown format) looks like: only the segments that
hold tensor data go through the float codecs, and everything else is kept as bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Segment:
    """A run of ``length`` bytes at ``offset`` in the source file.

    ``dtype`` is set (safetensors spelling) when the bytes are the elements of a tensor or of a
    PyTorch storage, which lets the codec choose the float codec; ``name`` then says which.
    ``dtype is None`` means opaque bytes (headers, pickles, zip records, unknown files).
    """

    offset: int
    length: int
    dtype: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class TensorView:
    """A named tensor the API can hand out: ``shape`` elements of ``dtype``, read from the
    segment at index ``segment`` starting ``offset`` bytes into it, with element ``strides``
    (``None`` for C-contiguous)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segment: int
    offset: int = 0
    strides: tuple[int, ...] | None = None


@dataclass
class SourceFile:
    """One input file: where it is, what kind it is, and its segments and named tensors."""

    path: Path
    relpath: str                   # POSIX path relative to the model root; the name in the archive
    format: str                    # "safetensors", "torch-zip", "torch-legacy" or "opaque"
    size: int
    segments: list[Segment]
    tensors: list[TensorView] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Assert the segments tile the file exactly (a reader bug otherwise)."""
        pos = 0
        for s in self.segments:
            assert s.offset == pos and s.length >= 0, (self.relpath, s, pos)
            pos += s.length
        assert pos == self.size, (self.relpath, pos, self.size)


def opaque_segments(size: int) -> list[Segment]:
    """The segments of a file kept whole as bytes."""
    return [Segment(0, size)] if size else []


def fill_gaps(size: int, tensors: list[Segment]) -> list[Segment]:
    """Tile ``[0, size)`` with the given tensor segments plus opaque segments for every gap.

    ``tensors`` must be sorted by offset and must not overlap (readers check that first).
    """
    out: list[Segment] = []
    pos = 0
    for s in tensors:
        if s.offset > pos:
            out.append(Segment(pos, s.offset - pos))
        if s.length:
            out.append(s)
        pos = s.offset + s.length
    if pos < size:
        out.append(Segment(pos, size - pos))
    return out
