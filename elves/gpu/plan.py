"""Which kernel decodes each chunk, how chunks are cut into batches that fit a staging buffer,
and how a batch is laid out in one: descriptors first, then the payloads, read from the archive
and checked; and where each stream's reference comes from (a BitX delta's base tensor, or a
gather of an earlier stream already on the device). Host side only (no cupy): it runs, and is
tested, on any machine.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from bitx.codec import Xor

from .. import dtypes
from ..archive import ArchiveReader
from ..codecs.base import Expected
from ..codecs.elf import ELF_DTYPES, Elf
from ..codecs.planes import Planes
from ..codecs.rans import Rans
from ..decoder import StreamReader, stream_label
from ..errors import BaseMismatchError, CodecError, CorruptArchiveError, TruncatedArchiveError
from ..index import Stream, checksum
from ..references import Reference
from .base import DeviceBase
from .launcher import (
    DESC,
    ELF,
    ELF_DELTA,
    ELF_REL_EXACT,
    ELF_RELATIVE,
    FLAG_REMAP,
    FLAG_ROTATE,
    FLAG_XOR,
    SECOND_STAGE,
    SPARSE,
    STORED,
    WIDTHS,
    Group,
    align,
    groups,
)

IOV_MAX = 1024  # buffers per preadv call (Linux's IOV_MAX)
XOR_WIDTHS = (1, 2, 4, 8)


def gpu_width(stream: Stream) -> int | None:
    """The kernel that decodes ``stream``'s chunks (an element width, or STORED), or None when
    only the CPU can decode it: ``planes`` + ``rans``, behind an ``xor`` filter (dense, fused in;
    sparse, a second kernel) or an ``elf`` one, or neither."""
    if not stream.pipeline:
        return STORED
    try:
        codecs = stream.decoder().codecs
    except CodecError:
        return None
    xor = codecs[0] if codecs and type(codecs[0]) is Xor else None
    if xor is not None:
        if xor.width not in XOR_WIDTHS:
            return None
        codecs = codecs[1:]
    elf = codecs[0] if codecs and type(codecs[0]) is Elf else None
    if elf is not None:
        codecs = codecs[1:]
    if len(codecs) == 2 and type(codecs[0]) is Planes and type(codecs[1]) is Rans and codecs[0].width in WIDTHS \
            and (xor is None or xor.width == codecs[0].width) and (elf is None or elf.width == codecs[0].width):
        return codecs[0].width
    return None


def elf_flags(dtype: str) -> int:
    """The elf kernel's descriptor flags for a dtype: exponent bits | mantissa bits << 8."""
    _, ebits, mbits = ELF_DTYPES[dtype]
    return ebits | mbits << 8


def elf_delta(elf: Elf) -> tuple[int, int]:
    """The elf kernel's descriptor flags and ``mask`` field for ``elf``: a delta chunk's flags
    (its grid's quantiser needs the bound's kind) and the bound's float64 bits; (flags, 0) else."""
    if not elf.delta:
        return elf_flags(elf.dtype), 0
    relative = elf.mode == "rel"
    exact = relative and math.frexp(elf.bound)[0] == 0.5  # a power of two
    flags = elf_flags(elf.dtype) | ELF_DELTA | (ELF_RELATIVE if relative else 0) | (ELF_REL_EXACT if exact else 0)
    return flags, int(np.float64(elf.bound).view(np.uint64))


def needs_reference(stream: Stream) -> bool:
    """Whether the kernels read a reference for ``stream``'s chunks (``xor``, ``elf`` with delta)."""
    if not stream.pipeline:
        return False
    first = stream.decoder().codecs[0]
    return type(first) is Xor or (type(first) is Elf and first.delta)


def descs_per_chunk(stream: Stream) -> int:
    """Descriptors (and status words) a chunk of ``stream`` takes at most: two where a second
    kernel decodes what planes + rANS put in scratch memory (``elf``, sparse ``xor``)."""
    first = stream.decoder().codecs[0] if stream.pipeline else None
    return 2 if (type(first) is Xor and first.sparse) or type(first) is Elf else 1


def xor_of(stream: Stream) -> Xor | None:
    """The ``xor`` filter of a stream, if it has one."""
    codecs = stream.decoder().codecs
    return codecs[0] if codecs and type(codecs[0]) is Xor else None


def elf_of(stream: Stream) -> Elf | None:
    """The ``elf`` filter of a stream, if it has one."""
    codecs = stream.decoder().codecs
    return codecs[0] if codecs and type(codecs[0]) is Elf else None


class RefPlan(NamedTuple):
    """Where the device copy of a stream's reference (all of it, ``nbytes``) comes from: the
    bytes ``host`` the CPU reads (a base model's tensor; a cast, or a grown shape, of one), or
    ``copies`` (dst, src, length) out of stream ``stream`` decoded on the device, zeros elsewhere
    (an earlier stream of the archive, block-mapped or not: a gather), or ``device``, a base
    tensor already on the device (its uint8 view: used in place, or placed at the origin of
    a grown shape, ``grown`` = (its shape, the stream's shape, element bytes))."""

    nbytes: int
    host: np.ndarray | None = None
    stream: int | None = None
    copies: tuple[tuple[int, int, int], ...] = ()
    device: Any = None
    grown: tuple[tuple[int, ...], tuple[int, ...], int] | None = None


def gathered_from(stream: Stream) -> int | None:
    """The earlier stream of the archive that ``stream``'s reference is gathered from on the
    device (its bytes, block-mapped or not), if any; a cast of one is built on the CPU."""
    ref = Reference.of(stream)
    return ref.stream if ref is not None and ref.stream is not None and ref.cast is None else None


def reference_plan(reader: StreamReader, s: int) -> RefPlan | None:
    """The reference of stream ``s`` (a stream the kernels decode), None when it has none. A base
    model must be attached (``elves.decoder.attach_base``) for references by content."""
    stream = reader.streams[s]
    ref = Reference.of(stream)
    if ref is None:
        return None
    if ref.stream is not None and ref.cast is None:
        source = reader.streams[ref.stream].nbytes
        pieces = ref.map if ref.map is not None else [[0, 0, min(stream.nbytes, source)]]
        # index.check_ref keeps every piece inside both streams
        return RefPlan(stream.nbytes, stream=ref.stream, copies=tuple((d, r, n) for d, r, n in pieces))
    content = reader.references.content
    if ref.content is not None and ref.cast is None and isinstance(content, DeviceBase):
        digest, nbytes = ref.content
        if content.find(digest, nbytes) is None:  # a hash the index's list of base tensors lacks
            raise BaseMismatchError(f"the base has no tensor with xxh3-128 {digest} ({nbytes} bytes)", content.path)
        src = content.bytes_of(digest, nbytes)
        if ref.grown is None:
            return RefPlan(stream.nbytes, device=src)
        ref_shape, shape = ref.grown
        width = dtypes.get(stream.dtype).itemsize if stream.dtype in dtypes.DTYPES else 0
        if not width or math.prod(shape) * width != stream.nbytes or math.prod(ref_shape) * width != nbytes:
            raise CorruptArchiveError(f"{stream_label(reader, s)}: xor: its shapes do not hold its bytes", reader.path)
        return RefPlan(stream.nbytes, device=src, grown=(ref_shape, shape, width))
    # Bytes the CPU builds (elves.references), cut short where a base tensor is shorter.
    host = reader.references.reader(ref, stream.dtype, stream.nbytes)(0, stream.nbytes)
    return RefPlan(stream.nbytes, host=np.ascontiguousarray(host, dtype=np.uint8))


def gather_descs(plan: RefPlan, src_ptr: int, dst_ptr: int) -> np.ndarray:
    """Descriptors of the copy kernel that gathers ``plan``'s pieces from the source stream at
    device address ``src_ptr`` into the reference at ``dst_ptr`` (zeroed beforehand)."""
    descs = np.zeros(len(plan.copies), DESC)
    for k, (d, r, n) in enumerate(plan.copies):
        descs[k]["src"], descs[k]["src_len"], descs[k]["dst"], descs[k]["dst_len"] = src_ptr + r, n, dst_ptr + d, n
        descs[k]["width"] = STORED
    return descs


class DeviceRef(NamedTuple):
    """A stream's reference on the device: its address and length, and the ``xor`` filter's
    remap table (0: none)."""

    ptr: int
    nbytes: int
    table: int = 0


@dataclass
class Chunk:
    stream: int
    index: int        # chunk number within the stream
    offset: int       # in the archive
    length: int
    decoded: int
    checksum: int
    width: int        # an element width, or STORED
    rotate: bool
    dst_offset: int   # where its decoded bytes go in the stream's buffer
    xor: Xor | None = None  # the BitX filter: fused into the decode, or (sparse) a second kernel
    elf: Elf | None = None  # the elf filter: a second kernel, from scratch memory
    second: int = 0         # the second kernel's key (ELF or SPARSE | width), 0 for none
    scratch: Expected | None = None  # second kernel: what planes + rANS must decode to (the CPU's range)


@dataclass
class Batch:
    """Chunks that fill one staging buffer: their descriptors first, then their payloads."""

    chunks: list[Chunk] = field(default_factory=list)
    payload_bytes: int = 0
    descs: int = 0  # descriptors: one per chunk, two for a chunk with a second kernel

    def desc_bytes(self, extra: int = 0) -> int:
        return align((self.descs + extra) * DESC.itemsize)

    def size(self) -> int:
        return self.desc_bytes() + self.payload_bytes


@dataclass
class Layout:
    """A batch laid out in its staging buffer."""

    descs: np.ndarray    # sorted by kernel key: each kernel gets a contiguous run
    groups: list[Group]  # (kernel key, first descriptor, count) per launch
    offsets: list[int]   # payload offset of each chunk, in batch order
    order: list[int]     # the chunk (batch order) of each descriptor
    status_base: int     # the batch's first index in the status array
    links: list[tuple[int, int, int]] = field(default_factory=list)  # second kernel: (chunk, its two descriptors)


def stream_chunks(reader: StreamReader, s: int) -> list[Chunk]:
    """The chunks of stream ``s``, which :func:`gpu_width` found a kernel for."""
    stream = reader.streams[s]
    width = gpu_width(stream)
    if width is None:
        raise ValueError(f"stream {s} has no GPU decoder")
    xor = xor_of(stream) if width != STORED else None
    elf = elf_of(stream) if width != STORED else None
    codec = stream.decoder().codecs[1 if xor or elf else 0] if width != STORED else None
    rotate = isinstance(codec, Planes) and codec.rotate
    out, pos = [], 0
    for i, (offset, length, decoded, check) in enumerate(stream.chunks):
        if width != STORED and decoded % width:
            raise CorruptArchiveError(f"{stream_label(reader, s)}: chunk {i} is not a whole number "
                                      "of elements", reader.path)
        # A chunk the sparse filter left without a payload is the dense filter applied to zeros.
        second = ELF | elf.width if elf is not None else SPARSE | width if xor is not None and xor.sparse and length else 0
        scratch = stream.decoder().expected(decoded)[-1] if second else None
        out.append(Chunk(s, i, offset, length, decoded, check, width, rotate, pos, xor, elf, second, scratch))
        pos += decoded
    if pos != stream.nbytes:
        raise CorruptArchiveError(f"{stream_label(reader, s)}: its chunks do not add up to its size", reader.path)
    return out


def batches(reader: StreamReader, streams: list[int], staging_bytes: int) -> tuple[list[Batch], int]:
    """The chunks of ``streams``, in that order, cut into batches that fit a staging buffer of
    ``staging_bytes``, and the size the buffers need: more, for an archive written with chunks
    bigger than that."""
    out = [Batch()]
    for s in streams:
        for c in stream_chunks(reader, s):
            n = 2 if c.second else 1
            staging_bytes = max(staging_bytes, align(n * DESC.itemsize) + align(c.length))
            b = out[-1]
            if b.chunks and b.desc_bytes(n) + b.payload_bytes + align(c.length) > staging_bytes:
                b = Batch()
                out.append(b)
            b.chunks.append(c)
            b.descs += n
            b.payload_bytes += align(c.length)
    return [b for b in out if b.chunks], staging_bytes


def lay_out(batch: Batch, staging_ptr: int, outputs: Mapping[int, int], status_base: int,
            refs: Mapping[int, DeviceRef] | None = None) -> Layout:
    """Descriptors for ``batch`` in a staging buffer at device address ``staging_ptr``, decoding
    into the stream buffers at ``outputs[stream]``; its statuses start at ``status_base``.
    ``refs[stream]``: the reference of each stream with an ``xor`` filter."""

    def reference(c: Chunk) -> tuple[DeviceRef, int]:
        """The chunk's reference on the device, and its length there (cut short at its end)."""
        if refs is None or c.stream not in refs:
            raise ValueError(f"stream {c.stream} has no reference on the device")
        r = refs[c.stream]
        return r, max(0, min(c.decoded, r.nbytes - c.dst_offset))

    offsets, pos = [], batch.desc_bytes()
    for c in batch.chunks:
        offsets.append(pos)
        pos += align(c.length)
    # (kernel key, chunk): an elf or sparse xor chunk is decoded by planes + rANS into scratch
    # memory (linked once its payload is read: see link), then by its second kernel from there.
    runs = [(c.width, i) for i, c in enumerate(batch.chunks)]
    runs += [(c.second, i) for i, c in enumerate(batch.chunks) if c.second]
    runs.sort(key=lambda r: r[0])
    descs = np.zeros(len(runs), DESC)
    first: dict[int, int] = {}
    links = []
    for d, (key, i) in enumerate(runs):
        c = batch.chunks[i]
        dst = outputs[c.stream] + c.dst_offset
        flags = FLAG_ROTATE if c.rotate else 0
        if c.second and not key & SECOND_STAGE:
            first[i] = d
            descs[d] = (staging_ptr + offsets[i], c.length, 0, 0, c.width, flags, 0, 0, 0, 0)
            continue
        if key & ELF:
            assert c.elf is not None
            links.append((i, first[i], d))
            flags, bound = elf_delta(c.elf)
            r, ref_len = reference(c) if c.elf.delta else (DeviceRef(0, 0), 0)
            descs[d] = (0, 0, dst, c.decoded, c.elf.width, flags, r.ptr + c.dst_offset if ref_len else 0, ref_len,
                        bound, 0)
            continue
        if key & SPARSE:
            assert c.xor is not None
            links.append((i, first[i], d))
            r, ref_len = reference(c)
            descs[d] = (0, 0, dst, c.decoded, c.width, 0, r.ptr + c.dst_offset, ref_len, c.xor.mask, 0)
            continue
        ref = mask = table = ref_len = 0
        if c.xor is not None:
            r, ref_len = reference(c)
            flags |= FLAG_XOR | (FLAG_REMAP if c.xor.remap is not None else 0)
            ref, mask, table = r.ptr + c.dst_offset, c.xor.mask, r.table
        descs[d] = (staging_ptr + offsets[i], c.length, dst, c.decoded, c.width, flags, ref, ref_len, mask, table)
    return Layout(descs, groups(np.array([key for key, _ in runs], dtype=np.int64)), offsets,
                  [i for _, i in runs], status_base, links)


def scratch_sizes(host: np.ndarray, batch: Batch, layout: Layout) -> list[int]:
    """For each chunk of a filled staging buffer with a second kernel (``layout.links``): the
    bytes planes + rANS decode it to, as its payload's header says, or -1 where that is not what the CPU decoder
    accepts (the kernel then refuses the chunk, as the CPU does)."""
    sizes = []
    for i, _, _ in layout.links:
        c, at = batch.chunks[i], layout.offsets[i]
        if c.length < 8:
            sizes.append(0)  # the kernel refuses the header
            continue
        n = int(host[at:at + 4].view("<u4")[0])
        w = int(host[at + 6])
        want = c.scratch
        sizes.append(n * w if want is not None and w == c.width and want.lo <= n * w <= want.hi else -1)
    return sizes


def link(host: np.ndarray, layout: Layout, scratch_ptr: int, sizes: list[int]) -> None:
    """Point the two descriptors of each chunk with a second kernel at its piece of the scratch memory at
    ``scratch_ptr`` (``sizes`` from :func:`scratch_sizes`, each piece aligned), in the staging
    buffer ``host`` and in ``layout``."""
    pos = 0
    descs = layout.descs
    for (_, one, two), size in zip(layout.links, sizes):
        descs[one]["dst"] = descs[two]["src"] = scratch_ptr + pos
        # a size the CPU refuses: a capacity no header can match
        descs[one]["dst_len"] = size if size >= 0 else np.iinfo(np.uint64).max
        descs[two]["src_len"] = max(size, 0)
        pos += align(max(size, 0))
    host[:descs.nbytes] = descs.view(np.uint8)


def scratch_bytes(sizes: list[int]) -> int:
    return sum(align(max(size, 0)) for size in sizes)




def fill(host: np.ndarray, reader: StreamReader, batch: Batch, layout: Layout) -> None:
    """Write ``layout``'s descriptors and ``batch``'s payloads into the staging buffer ``host``,
    reading the payloads and checking their checksums: from an archive, one preadv per run of
    adjacent chunks; from any other source of chunks (a store's objects), its ``read_payload``."""
    chunks, offsets = batch.chunks, layout.offsets
    host[:layout.descs.nbytes] = layout.descs.view(np.uint8)
    mem = host.data
    if not isinstance(reader, ArchiveReader):
        for c, offset in zip(chunks, offsets):
            mem[offset:offset + c.length] = reader.read_payload(reader.streams[c.stream], c.index)
        return
    fd = reader.f.fileno()
    i = 0
    while i < len(chunks):
        j = i + 1
        while (j < len(chunks) and j - i < IOV_MAX
               and chunks[j].offset == chunks[j - 1].offset + chunks[j - 1].length):
            j += 1
        views = [mem[offsets[k]:offsets[k] + chunks[k].length] for k in range(i, j)]
        if _read_into(fd, views, chunks[i].offset) != sum(chunks[k].length for k in range(i, j)):
            raise TruncatedArchiveError(f"{stream_label(reader, chunks[i].stream)}: chunk "
                                        f"{chunks[i].index}: the payload is cut short", reader.path)
        i = j
    for c, offset in zip(chunks, offsets):
        if checksum(mem[offset:offset + c.length]) != c.checksum:
            raise CorruptArchiveError(f"{stream_label(reader, c.stream)}: chunk {c.index}: "
                                      "the payload is corrupted (checksum mismatch)", reader.path)


def _read_into(fd: int, views: list[memoryview], offset: int) -> int:
    """Read consecutive file bytes at ``offset`` into ``views``; the byte count read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, views, offset)
    total = 0
    for view in views:
        data = os.pread(fd, len(view), offset + total)
        view[:len(data)] = data
        total += len(data)
    return total


def staging_for(stream: Stream) -> int:
    """Staging that holds all of ``stream``'s chunks at once."""
    return align(len(stream.chunks) * DESC.itemsize) + sum(align(c[1]) for c in stream.chunks)
