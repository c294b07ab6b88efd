"""What an archive or a stored model holds, file by file and tensor by tensor (``elves ls``):
names, dtypes and shapes, how each stream is coded, what it is coded against, and what it costs.

Everything here comes from the index (or a store's manifest and object trailers): nothing is
decoded. The archive's records go through :func:`files_of` and :func:`tensors_of`; a store, whose
segments are objects rather than streams, describes each segment as a :class:`SegmentFacts` and
calls :func:`list_files` and :func:`list_tensors`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from . import dtypes
from .index import FileEntry, Stream, TensorEntry
from .references import Reference


@dataclass(frozen=True)
class FileInfo:
    """A file of the model, as restore writes it.

    ``stored_bytes`` is the payload of its segments' streams (the chunks as stored, without the
    index). A stream that several files share (deduplicated) counts once, for the first file that
    uses it, so the files' ``stored_bytes`` add up to the archive's payload; a later file that
    shares all its streams shows 0. A link has no bytes: ``link`` is its target, relative to it.
    """

    path: str
    size: int
    format: str
    sha256: str
    tensors: int
    stored_bytes: int
    lossy: bool
    link: str | None

    @property
    def ratio(self) -> float:
        return self.size / max(self.stored_bytes, 1)


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor: where it lives (``file``), what it is, and how it is stored.

    ``codec`` is the ids of its stream's codec pipeline joined by "+" ("planes+rans",
    "xor+planes+rans"); "raw" for bytes stored as they are (and for an empty tensor, which has
    none). ``reference`` says what the stream is coded against: None, "stream N" (with the tensor
    or file that stream holds), "base tensor <hash>" (a base model's tensor, by content) or
    "object <key>" (a store object), with " (block map)", " (grown)" or " (cast from F32, rne)"
    when the reference is laid out or rounded from its source.

    ``nbytes`` is the tensor's own bytes. ``stored_bytes`` is its share of its stream's payload,
    by bytes: all of it for a tensor that is its whole stream (safetensors); for tensors that view
    parts of one stream (a checkpoint's shared storage), the payload split in proportion to the
    byte ranges they cover. Deduplication is not taken off here (two files holding the same tensor
    both show its cost): :class:`FileInfo` counts that.
    """

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    codec: str
    reference: str | None
    stored_bytes: int

    @property
    def ratio(self) -> float:
        return self.nbytes / max(self.stored_bytes, 1)


@dataclass(frozen=True)
class SegmentFacts:
    """What the listing needs of one stored segment: its decoded and stored lengths, its codec
    and its reference (described). Files' segment numbers index a list of these; equal numbers
    are one stored thing, counted once."""

    nbytes: int
    stored_bytes: int
    codec: str
    reference: str | None


def codec_name(pipeline: Sequence[dict[str, Any]]) -> str:
    """A pipeline's codec ids joined by "+"; "raw" for the empty pipeline (bytes as they are)."""
    return "+".join(str(c["id"]) for c in pipeline) or "raw"


def describe_reference(ref: Reference | None, source: Callable[[Reference], str]) -> str | None:
    """``ref`` in words: ``source(ref)`` names where its bytes come from; its layout follows."""
    if ref is None:
        return None
    words = source(ref)
    if ref.map is not None:
        words += " (block map)"
    if ref.grown is not None:
        words += " (grown)"
    if ref.cast is not None:
        words += f" (cast from {ref.cast[0]}, {ref.cast[1]})"
    return words


def share(stored: int, nbytes: int, start: int, length: int) -> int:
    """The part of ``stored`` payload bytes that bytes ``[start, start + length)`` of ``nbytes``
    decoded bytes account for. Ranges that tile the stream get shares that add up to ``stored``."""
    if nbytes <= 0:
        return stored
    start, end = min(max(start, 0), nbytes), min(max(start + length, 0), nbytes)
    return stored * end // nbytes - stored * start // nbytes


def tensor_nbytes(t: TensorEntry, segment_bytes: int) -> int:
    """A tensor's own bytes: a packed (sub-byte) tensor is its whole segment."""
    if t.dtype in dtypes.PACKED:
        return segment_bytes if t.segment >= 0 else 0
    return math.prod(t.shape) * dtypes.get(t.dtype).itemsize


def list_files(facts: Sequence[SegmentFacts], files: Sequence[FileEntry]) -> list[FileInfo]:
    """The files, each segment's stored bytes counted for the first file that uses it."""
    seen: set[int] = set()
    out = []
    for e in files:
        fresh = [i for i in dict.fromkeys(e.segments) if i not in seen]
        seen.update(fresh)
        out.append(FileInfo(e.path, e.size, e.format, e.sha256, len(e.tensors),
                            sum(facts[i].stored_bytes for i in fresh), e.lossy, e.link))
    return out


def list_tensors(facts: Sequence[SegmentFacts], files: Sequence[FileEntry]) -> list[TensorInfo]:
    """The tensors, in file order, each with its share of its segment's stored bytes."""
    out = []
    for e in files:
        for t in e.tensors:
            if t.segment < 0:
                out.append(TensorInfo(t.name, e.path, t.dtype, t.shape, 0, "raw", None, 0))
                continue
            f = facts[e.segments[t.segment]]
            nbytes = tensor_nbytes(t, f.nbytes)
            out.append(TensorInfo(t.name, e.path, t.dtype, t.shape, nbytes, f.codec, f.reference,
                                  share(f.stored_bytes, f.nbytes, t.offset, nbytes)))
    return out


def stream_facts(streams: Sequence[Stream], files: Sequence[FileEntry]) -> list[SegmentFacts]:
    """An archive's streams as :class:`SegmentFacts`, a reference to another stream named by the
    tensor (or file) that stream holds."""
    holder: dict[int, str] = {}
    for e in files:
        for t in e.tensors:
            if t.segment >= 0:
                holder.setdefault(e.segments[t.segment], f"{t.name} in {e.path}")
        for k, i in enumerate(e.segments):
            holder.setdefault(i, f"{e.path}, segment {k}")

    def source(ref: Reference) -> str:
        if ref.stream is not None:
            held = holder.get(ref.stream)
            return f"stream {ref.stream}" + (f" ({held})" if held else "")
        assert ref.content is not None  # a reference is to a stream or to content
        return f"base tensor {ref.content[0][:12]}"

    return [SegmentFacts(s.nbytes, s.stored_bytes, codec_name(s.pipeline), describe_reference(Reference.of(s), source))
            for s in streams]


def files_of(streams: Sequence[Stream], files: Sequence[FileEntry]) -> list[FileInfo]:
    """The files of an archive's index (see :class:`FileInfo`)."""
    return list_files(stream_facts(streams, files), files)


def tensors_of(streams: Sequence[Stream], files: Sequence[FileEntry]) -> list[TensorInfo]:
    """The tensors of an archive's index, in file order (see :class:`TensorInfo`)."""
    return list_tensors(stream_facts(streams, files), files)


def matching_files(infos: list[FileInfo], pattern: str | None) -> list[FileInfo]:
    """The files whose path matches the glob ``pattern`` (``*`` crosses "/"); all for None."""
    return infos if pattern is None else [f for f in infos if fnmatchcase(f.path, pattern)]


def matching_tensors(infos: list[TensorInfo], pattern: str | None) -> list[TensorInfo]:
    """The tensors whose name, or "file:name", matches the glob ``pattern``; all for None."""
    if pattern is None:
        return infos
    return [t for t in infos if fnmatchcase(t.name, pattern) or fnmatchcase(f"{t.file}:{t.name}", pattern)]
