"""The model of what compress reads: files cut into segments, some of which are tensors.

A reader turns each input file into a :class:`SourceFile` whose segments cover the file's bytes
exactly, in order, with no gap and no overlap. Restoring a file is writing its segments back one
after the other, which is why restore is byte-exact whatever the container (safetensors header
and padding, a checkpoint's zip records, an unknown format) looks like: only the segments that
hold tensor data go through the float codecs, and everything else is kept as bytes.
"""
from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager

import xxhash

from .errors import InputError

# The most dimensions a named tensor may have; the archive index holds no more.
MAX_RANK = 64
# The longest tensor name a reader takes from a container whose names are not otherwise bounded
# (a pickle's nested keys, a protobuf field).
MAX_NAME = 4096
# Segments are read and hashed in pieces of this many bytes (a multiple of references.BLOCK).
READ_PIECE = 8 << 20


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
    """One input file: where it is, what kind it is, and its segments and named tensors.

    A symbolic link inside the model folder that points inside it is a ``SourceFile`` of format
    ``"symlink"``, size 0 and no segments, whose ``link`` is the link's text: a relative POSIX
    path from the link's folder to its target, which lies inside the model folder. Nothing is
    read through it; restore makes the same link.
    """

    path: Path
    relpath: str                   # POSIX path relative to the model root; the name in the archive
    format: str                    # "safetensors", "torch-zip", "torch-legacy", "onnx", "opaque", "symlink"
    size: int
    segments: list[Segment]
    tensors: list[TensorView] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    link: str | None = None

    def check(self) -> None:
        """:class:`InputError` unless the segments tile the file exactly and every named tensor
        points at one of them (a reader that let a crafted layout through otherwise)."""
        pos = 0
        for s in self.segments:
            if type(s.offset) is not int or type(s.length) is not int or s.offset != pos or s.length <= 0:
                raise InputError(f"segment at {s.offset} ({s.length} bytes) does not follow the previous "
                                 f"one at {pos}: the layout is inconsistent", self.path)
            pos += s.length
        if pos != self.size:
            raise InputError(f"segments cover {pos} of the file's {self.size} bytes", self.path)
        for t in self.tensors:
            if len(t.shape) > MAX_RANK:
                raise InputError(f"tensor {t.name!r:.80} has {len(t.shape)} dimensions (at most {MAX_RANK})",
                                 self.path)
            # segment -1 stands for "no bytes", which only a tensor with no elements has
            if not -1 <= t.segment < len(self.segments) or (t.segment == -1) != (0 in t.shape):
                raise InputError(f"tensor {t.name!r:.80} of shape {t.shape} points at segment {t.segment} "
                                 f"of {len(self.segments)}", self.path)
        if (self.format == "symlink") != (self.link is not None) or (self.link is not None and self.segments):
            raise InputError("a symbolic link has content, or a file has a link target", self.path)


def open_source(path: Path) -> BinaryIO:
    """``path`` opened for reading, refusing a symbolic link (a file swapped for one after the
    folder walk decided it was a regular file) and anything that is not a regular file (a FIFO
    would block the read for ever, a device has no end)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if os.path.islink(path):
            raise InputError("became a symbolic link while the model was being read", path) from None
        raise InputError(f"cannot open: {e.strerror}", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError("is not a regular file", path)
    return os.fdopen(fd, "rb")


def opened(path: Path, source: BinaryIO | None = None) -> ContextManager[BinaryIO]:
    """``source`` rewound, when given (a file the caller holds and closes: a reader of an archive
    checks the tensors its index lists by parsing the file's restored structure), else ``path``
    opened with :func:`open_source`."""
    if source is None:
        return open_source(path)
    source.seek(0)
    return contextlib.nullcontext(source)


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


def kept_mode(fd: int) -> int | None:
    """The permission bits an archive records for the open source file ``fd``: those of an
    executable (a script shipped with a model), which restore gives back less the umask; None for
    any other file, which restore creates as the umask allows."""
    mode = os.fstat(fd).st_mode & 0o777
    return mode if mode & 0o111 else None


def read_exact(fd: int, offset: int, length: int, path: Path) -> bytes:
    """``length`` bytes of the open source ``path`` at ``offset``; InputError if they are not all
    there (the file changed or shrank after the reader walked it)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise InputError("the file changed or shrank while it was being read", path)
    return data


def hash_segment(fd: int, seg: Segment, path: Path, *sinks: Callable[[bytes], None]) -> str:
    """The segment's xxh3-128, its bytes fed to each of ``sinks`` on the way, in pieces of
    READ_PIECE bytes (all whole but the last)."""
    h = xxhash.xxh3_128()
    for off in range(seg.offset, seg.offset + seg.length, READ_PIECE):
        piece = read_exact(fd, off, min(READ_PIECE, seg.offset + seg.length - off), path)
        h.update(piece)
        for sink in sinks:
            sink(piece)
    return h.hexdigest()
