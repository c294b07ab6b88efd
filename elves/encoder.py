"""Model -> archive: read, dedup by content hash, choose each stream's pipeline, encode chunks.

Every segment is hashed first (xxh3-128, and the file's sha256 on the way); only a segment whose
(kind, dtype, hash) is new is read again and encoded. Chunks are encoded on a thread pool (the
kernels release the GIL) and written in order, with a bounded number in flight, so memory is set
by the chunk size and the thread count, never by the model's size.
"""
from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash

from . import dtypes
from .archive import ArchiveWriter, Stream
from .bounds import ErrorBound, parse_error_bound
from .codecs import Pipeline
from .codecs.elf import ELF_DTYPES
from .codecs.planes import Planes
from .codecs.rans import Rans
from .codecs.zstd import Zstd
from .errors import InputError
from .index import FileEntry, TensorEntry, checksum
from .lossy import elf_pays, elf_pipeline, encode_checked
from .model import READ_PIECE, Segment, SourceFile, hash_segment, kept_mode, open_source, read_exact
from .parallel import Sha256Beside, batched_map, default_threads
from .planner import ReferencePlanner, block_hashes, segment_names, widest_first
from .readers import read_model
from .readers.packing import pack_small
from .references import Reference

TENSOR_CHUNK_BYTES = 256 << 10
BYTES_CHUNK_BYTES = 4 << 20
# Float tensors of this size or more try their planes unrotated too, on a sample of this size.
ROTATION_MIN_BYTES = 1 << 20
ROTATION_SAMPLE_BYTES = 64 << 10

ProgressFn = Callable[[int], None]


@dataclass
class CompressSummary:
    """What :func:`elves.compress` did."""

    archive: Path
    files: int
    original_bytes: int
    archive_bytes: int
    tensors: int
    unique_streams: int
    warnings: list[str] = field(default_factory=list)
    base_streams: int = 0      # streams coded against the base model (``base=``), identical ones included
    error_bound: str | None = None  # the lossy bound asked for (``lossy="elf"``), e.g. "2^-24"
    lossy_streams: int = 0     # streams that decode to other bytes than the original, within the bound
    ref_streams: int = 0       # streams coded against another stream of the archive (``lossy``)

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.archive_bytes, 1)


def pipeline_for(segment: Segment, lossy: ErrorBound | None = None,
                 read: Callable[[int, int], bytes] | None = None) -> tuple[Pipeline, int]:
    """The pipeline for a segment and its chunk size in elements (bytes for opaque streams).

    With ``lossy`` (an ELF error bound), F16/BF16/F32/F64 tensors are quantised within it
    (``elf``; a chunk that quantising would not shrink stays exact), unless a sample chunk of
    the tensor, read with ``read(offset, length)`` (offsets within the segment), shows that it
    would not pay: such tensors, and everything else, are lossless.
    """
    if segment.dtype is None:
        # Small files (configs, tokenizers) get a strong level; large opaque files (pickles,
        # formats elves does not parse) a fast one, so they do not dominate compress time.
        return Pipeline([Zstd(9 if segment.length <= 1 << 20 else 3)]), BYTES_CHUNK_BYTES
    width = dtypes.get(segment.dtype).itemsize
    if lossy is not None and segment.dtype in ELF_DTYPES and segment.length % width == 0:
        chunk = TENSOR_CHUNK_BYTES // width * width
        middle = max(0, min(segment.length - chunk, segment.length // 2 // width * width))
        if read is None or elf_pays(segment.dtype, lossy, read(middle, min(chunk, segment.length))):
            return elf_pipeline(segment.dtype, lossy), TENSOR_CHUNK_BYTES // width
    return Pipeline([_planes(segment, read), Rans()]), TENSOR_CHUNK_BYTES // width


def _planes(segment: Segment, read: Callable[[int, int], bytes] | None) -> Planes:
    """The float planes rotated (the sign beside the mantissa, the exponent in a plane of its
    own), unless a sample from the middle of a large tensor codes smaller unrotated (Whisper's
    FP16 embedding: the sign and the exponent's top bits share a plane better than a mantissa
    bit does there)."""
    assert segment.dtype is not None
    planes = Planes(segment.dtype)
    if not planes.rotate or read is None or segment.length < ROTATION_MIN_BYTES:
        return planes
    width = planes.width
    at = segment.length // 2 // width * width
    raw = np.frombuffer(read(at, ROTATION_SAMPLE_BYTES // width * width), np.uint8)
    plain = Planes(segment.dtype, rotate=False)
    rotated_size = len(Pipeline([planes, Rans()]).encode(raw))
    return plain if len(Pipeline([plain, Rans()]).encode(raw)) < rotated_size else planes


def _read_in(fd: int, seg: Segment, path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` within the segment."""
    return read_exact(fd, seg.offset + offset, length, path)


def _add_blocks(blocks: list[np.ndarray], piece: bytes) -> None:
    blocks.append(block_hashes(np.frombuffer(piece, np.uint8)))


def _choose_lossy_ref(planner: ReferencePlanner, seg: Segment, names: list[str], blocks: list[np.ndarray] | None,
                      pipeline: Pipeline, chunk_elems: int, lossy: ErrorBound, read: Callable[[int, int], bytes]
                      ) -> tuple[Reference | None, Pipeline]:
    """The earlier stream to code a lossy tensor against, if any, and the pipeline to code it with."""
    assert seg.dtype is not None
    delta = elf_pipeline(seg.dtype, lossy, delta=True)
    # Sizes only: encode_checked's second check of the bound is for what gets written.
    ref = planner.choose_lossy(seg, names, np.concatenate(blocks) if blocks else None, chunk_elems, read,
                               lambda raw: len(pipeline.encode(raw)),
                               lambda raw, r: len(delta.encode(raw, ref=r)))
    return ref, (pipeline if ref is None else delta)


def compress(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    threads: int | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    base: str | os.PathLike[str] | None = None,
    lossy: str | None = None,
    error_bound: str | float | ErrorBound | None = None,
    follow_symlinks: bool = False,
) -> CompressSummary:
    """Compress the model at ``src`` (a file or a folder) into the archive ``dst``. Lossless,
    unless ``lossy="elf"``.

    ``progress`` is called with byte counts of source data as they are processed.

    ``base`` (a model file or folder, or an ``.elves`` archive of one) makes this a fine-tune's
    delta: each tensor that matches a base tensor (by content, or by name, dtype and size) is
    coded with BitX against it when that is cheaper (see ``bitx.delta``). Restoring the archive
    then needs the same base.

    ``lossy="elf"`` with ``error_bound`` (``"2^-24"``, ``"1e-6"``: absolute; ``"rel:1e-3"``:
    relative to each element) quantises float tensors (F16, BF16, F32, F64) so that every element
    restores within the bound (NaN, infinities and the sign of zero exactly); other tensors and
    files stay lossless. Per chunk, the smaller of the quantised and the exact coding is kept. A
    float tensor of a later file may be coded against the restored tensor of the same name (or
    size) in an earlier file, where that is smaller (``elves.references``): versions of one model
    in one folder then cost little more than their differences.

    A symbolic link inside a model folder that points inside it is stored as a link (restore makes
    the same link); one that points outside is refused (:class:`~elves.errors.InputError`) unless
    ``follow_symlinks``, which stores the content it points at.
    """
    bound = _lossy_bound(lossy, error_bound)
    files, single = read_model(src, follow_symlinks=follow_symlinks)
    if bound is None:  # a lossy file's tensors stay in streams of their dtype (docs/FORMAT.md)
        files = [pack_small(f) for f in files]
    if not files:
        raise InputError("the folder holds no files to compress", src)
    nthreads = default_threads(threads)
    seen: dict[tuple[str | None, str], int] = {}
    warnings = [w for f in files for w in f.warnings]
    base_model = None
    if base is not None:
        from bitx.base import open_base

        base_model = open_base(base)
    try:
        with ArchiveWriter(dst, force=force) as writer, ThreadPoolExecutor(nthreads) as pool:
            writer.source_kind = "file" if single else "folder"
            if bound is not None:
                writer.lossy = True
                writer.error_bound = bound.to_index()
            # Block maps cost a hash pass over every float tensor: offered in a lossy archive, and
            # where there is an earlier file to map against.
            several = sum(1 for f in files if any(seg.dtype in ELF_DTYPES for seg in f.segments)) > 1
            planner = ReferencePlanner(writer, base_model, bound is not None or several)
            try:
                for sf in widest_first(files):
                    if sf.link is not None:  # a link inside the model: kept as a link, never read through
                        writer.add_file(FileEntry(sf.relpath, 0, hashlib.sha256(sf.link.encode()).hexdigest(),
                                                  "symlink", [], link=sf.link))
                    else:
                        _compress_file(sf, writer, pool, nthreads, seen, progress, planner, bound)
            finally:
                planner.close()
            writer.base = planner.deltas.index_entry(writer.streams)
            archive_path = writer.path
            base_streams = sum(1 for st in writer.streams
                               if st.ref is None and any(c["id"] == "xor" for c in st.pipeline))
            lossy_streams = sum(1 for st in writer.streams if st.decoded_hash is not None)
            ref_streams = sum(1 for st in writer.streams if st.ref is not None)
    finally:
        if base_model is not None:
            base_model.close()
    return CompressSummary(
        archive=archive_path,
        files=len(files),
        original_bytes=sum(f.size for f in files),
        archive_bytes=archive_path.stat().st_size,
        tensors=sum(len(f.tensors) for f in files),
        unique_streams=len(seen),
        warnings=warnings,
        base_streams=base_streams,
        error_bound=bound.spec if bound is not None else None,
        lossy_streams=lossy_streams,
        ref_streams=ref_streams,
    )


def _lossy_bound(lossy: str | None, error_bound: str | float | ErrorBound | None) -> ErrorBound | None:
    from .errors import BoundError

    if lossy is None:
        if error_bound is not None:
            raise BoundError("an error bound needs a lossy mode: lossy='elf' (--lossy elf)")
        return None
    if lossy != "elf":
        raise BoundError(f"unknown lossy mode {lossy!r}; this elves knows 'elf'")
    if error_bound is None:
        raise BoundError("lossy='elf' needs an error bound, e.g. '2^-24', '1e-6' or 'rel:1e-3' (--error-bound)")
    return parse_error_bound(error_bound)


def _compress_file(sf: SourceFile, writer: ArchiveWriter, pool: Executor, nthreads: int,
                   seen: dict[tuple[str | None, str], int], progress: ProgressFn | None,
                   planner: ReferencePlanner, lossy: ErrorBound | None = None) -> None:
    with open_source(sf.path) as fh, Sha256Beside() as sha:
        fd = fh.fileno()
        sha.read(functools.partial(read_exact, fd, path=sf.path), sf.size, READ_PIECE)
        mode = kept_mode(fd)
        stream_ids: list[int] = []
        new: list[tuple[Segment, Stream, Pipeline]] = []
        to_plan: list[tuple[int, Segment, str, Pipeline, int]] = []  # lossless tensors, which may code against xor
        slot: dict[int, int] = {}  # their segment number -> their place in ``new``
        names = segment_names(sf)
        blocks_of: dict[int, np.ndarray] = {}
        for index, seg in enumerate(sf.segments):
            blocks: list[np.ndarray] | None = [] if planner.blocks and seg.dtype in ELF_DTYPES else None
            sinks = [] if blocks is None else [functools.partial(_add_blocks, blocks)]
            key = (seg.dtype, hash_segment(fd, seg, sf.path, *sinks))
            if key not in seen:
                read = functools.partial(_read_in, fd, seg, sf.path)
                pipeline, chunk_elems = pipeline_for(seg, lossy, read)
                ref = None
                if lossy is not None and pipeline.codecs[0].codec_id == "elf":
                    ref, pipeline = _choose_lossy_ref(planner, seg, names.get(index, []), blocks, pipeline,
                                                      chunk_elems, lossy, read)
                stream = Stream("bytes" if seg.dtype is None else "tensor", seg.dtype, seg.length, key[1],
                                pipeline.get_config(), chunk_elems, [],
                                ref=None if ref is None else ref.stream, ref_map=None if ref is None else ref.map)
                seen[key] = writer.add_stream(stream)
                if blocks:
                    blocks_of[index] = np.concatenate(blocks)
                    planner.add_blocks(seen[key], blocks_of[index])
                new.append((seg, stream, pipeline))
                if seg.dtype is not None and isinstance(pipeline.codecs[0], Planes):
                    to_plan.append((index, seg, key[1], pipeline, chunk_elems))
                    slot[index] = len(new) - 1
            stream_ids.append(seen[key])
        if progress:  # bytes that need no encoding: opaque gaps already seen, duplicate tensors
            progress(sf.size - sum(seg.length for seg, _, _ in new))

        if to_plan:
            for index, d in planner.plan_lossless(sf, fd, to_plan, pool, names, blocks_of).items():
                seg, stream, _ = new[slot[index]]
                stream.pipeline = d.pipeline.get_config()
                stream.ref, stream.ref_map, stream.ref_cast = d.reference.stream, d.reference.map, d.reference.cast
                new[slot[index]] = (seg, stream, d.pipeline)
        # Every chunk's reference, whatever its source, as restore will read it.
        refs = {id(stream): planner.sources.chunk_refs(stream) for _, stream, _ in new}

        def jobs() -> Iterator[tuple[Stream, Pipeline, int, int, int]]:
            for seg, stream, pipeline in new:
                step = stream.chunk_elems * (dtypes.get(seg.dtype).itemsize if seg.dtype else 1)
                for i, off in enumerate(range(seg.offset, seg.offset + seg.length, step)):
                    yield stream, pipeline, off, min(step, seg.offset + seg.length - off), i

        raw_of: dict[int, bytes] = {}

        def encode(job: tuple[Stream, Pipeline, int, int, int]
                   ) -> tuple[Stream, bytes, int, int, bool, "np.ndarray | None"]:
            # The read and the payload's checksum happen here, on the pool: the calling thread
            # orders and writes the chunks, and with many cores it is what bounds the speed.
            stream, pipeline, off, nraw, i = job
            raw = read_exact(fd, off, nraw, sf.path)
            if nraw == stream.nbytes:
                raw_of[id(stream)] = raw
            ref_of = refs[id(stream)]
            ref = ref_of(i) if ref_of is not None else None
            arr = np.frombuffer(raw, dtype=np.uint8)
            decoded = None
            if lossy is not None and pipeline.codecs and pipeline.codecs[0].codec_id == "elf":
                # Also what restore will produce, checked against the bound once more: the
                # stream's decoded hash is of these bytes.
                payload, decoded = encode_checked(pipeline, arr, ref)
            else:
                payload = pipeline.encode(arr, ref=ref)
            return stream, payload, checksum(payload), nraw, i == 0, decoded

        decoded_of: dict[int, tuple["xxhash.xxh3_128", int]] = {}  # lossy streams: hash so far, bytes so far
        for stream, payload, check, nraw, first, decoded in batched_map(pool, encode, jobs(), 2 * nthreads + 2,
                                                                        nbytes=lambda job: job[3]):
            if first:
                writer.begin_stream(stream.nbytes)
            if nraw == stream.nbytes and len(payload) >= nraw:
                # A one-chunk stream that coding would not shrink (a tiny tensor, a zip record)
                # is stored as it is: an empty pipeline.
                payload, stream.pipeline = raw_of[id(stream)], []
                check = checksum(payload)
                stream.ref, stream.ref_map, stream.ref_cast = None, None, None
                decoded = None
            if decoded is not None:
                h, done = decoded_of.get(id(stream), (xxhash.xxh3_128(), 0))
                h.update(decoded.data)
                decoded_of[id(stream)] = h, done + nraw
                if done + nraw == stream.nbytes and h.hexdigest() != stream.hash:
                    stream.decoded_hash = h.hexdigest()
            stream.chunks.append(writer.write_chunk(payload, nraw, check))
            if progress:
                progress(nraw)

    planner.remember(sf, stream_ids)
    lossy_file = any(writer.streams[i].decoded_hash is not None for i in stream_ids)
    writer.add_file(FileEntry(
        sf.relpath, sf.size, sha.hexdigest(),  # the sha256 of the original, also for a lossy file
        sf.format, stream_ids,
        [TensorEntry(t.name, t.dtype, tuple(t.shape), t.segment, t.offset,
                     tuple(t.strides) if t.strides is not None else None) for t in sf.tensors],
        lossy=lossy_file, mode=mode,
    ))
