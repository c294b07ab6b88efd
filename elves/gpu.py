"""Load an archive's tensors straight into GPU memory, decoding on the GPU.

    >>> import elves.gpu
    >>> tensors = elves.gpu.load_file("model.elves", device="cuda:0")     # dict of torch tensors
    >>> with elves.gpu.open("model.elves", device="cuda:0") as archive:     # lazy, one at a time
    ...     w = archive.get_tensor("lm_head.weight")

Chunk payloads travel compressed: they are read from the archive into pinned host buffers (each
chunk's xxh3-64 checked on the host, as the CPU reader does), copied to the device on one CUDA
stream while the previous batch decodes on another, and decoded by ``cuda/rans_decode.cu``
straight into the tensors' own memory. GPU memory holds the tensors plus a few fixed-size staging
buffers, whatever the model's size. The stream-level xxh3-128 is not recomputed (that needs the
decoded bytes on the host); the kernel instead applies every structural check of the CPU decoder,
rANS final states included, and any failure raises :class:`~elves.errors.CorruptArchiveError`.

Streams the kernel does not decode (zstd bytes that a packed sub-byte tensor points at, codecs
added to the format later) are decoded on the CPU by :func:`elves.decoder.read_stream`, fully
checked, and uploaded.

cupy (``pip install 'elves[gpu]'``) is imported only when a function here is called, so this
module imports anywhere. Output is torch tensors (``framework="pt"``, allocated by torch's caching
allocator) or cupy arrays (``framework="cupy"``; cupy has no bfloat16 or float8, so those come back
as their bits in uint16/uint8).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import xxhash

from . import dtypes
from .archive import ArchiveReader, Stream
from .codecs.planes import Planes
from .codecs.rans import STATUS, Rans
from .decoder import check_tensors, read_stream, stream_label
from .errors import (
    CodecError,
    CorruptArchiveError,
    ElvesError,
    GpuUnavailableError,
    TruncatedArchiveError,
    UsageError,
)
from .index import FileEntry, TensorEntry, tensor_names
from .parallel import default_threads

GpuFramework = Literal["pt", "torch", "cupy"]

STAGING_BYTES = 64 << 20   # one staging buffer (pinned on the host, and on the device)
STAGING_BUFFERS = 3        # read, copy and decode overlap: one buffer each
PAYLOAD_ALIGN = 16         # the kernel reads payloads as aligned words
WIDTHS = (1, 2, 4, 8, 16)  # element widths the decode kernel is instantiated for
STORED = 0                 # "width" of a chunk stored as it is (empty pipeline): a plain copy
PLANE_SMEM = 256 * 4 + 4096  # shared memory per plane: symbol info words + slot -> symbol bytes
DEFAULT_SMEM = 48 << 10    # dynamic shared memory a kernel gets without opting in
COPY_THREADS = 256
KERNEL_FILE = "rans_decode.cu"

# The kernel's ChunkDesc, field for field.
DESC = np.dtype([("src", "<u8"), ("src_len", "<u8"), ("dst", "<u8"), ("dst_len", "<u8"),
                 ("width", "<u4"), ("flags", "<u4")])
FLAG_ROTATE = 1

# ============================================================================ cupy and the kernels

def _cupy() -> Any:
    """The cupy module, with a usable device; GpuUnavailableError otherwise."""
    try:
        import cupy
    except ImportError:
        raise GpuUnavailableError("cupy is not installed: pip install 'elves[gpu]'") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        count = 0
    if count == 0:
        raise GpuUnavailableError("no CUDA device")
    return cupy


def kernel_source() -> str:
    """The CUDA source: package data ``elves.cuda`` when installed, else the checkout's cuda/."""
    try:
        resource = importlib.resources.files("elves.cuda").joinpath(KERNEL_FILE)
        if resource.is_file():
            return resource.read_text()
    except (ModuleNotFoundError, TypeError):
        pass
    path = Path(__file__).resolve().parent.parent / "cuda" / KERNEL_FILE
    try:
        return path.read_text()
    except OSError:
        raise GpuUnavailableError(f"the CUDA source {KERNEL_FILE} is missing from this install", path) from None


class Kernels:
    """The compiled kernels for one device (cupy caches the compiled module on disk)."""

    def __init__(self, device: int):
        cp = _cupy()
        self.cp = cp
        self.device = device
        with cp.cuda.Device(device):
            module = cp.RawModule(code=kernel_source(), options=("-std=c++17",))
            self.decode = {w: module.get_function(f"elves_rans_decode_w{w}") for w in WIDTHS}
            self.copy = module.get_function("elves_copy_chunks")
            for w, kernel in self.decode.items():
                if w * PLANE_SMEM > DEFAULT_SMEM:
                    kernel.max_dynamic_shared_size_bytes = w * PLANE_SMEM

    def launch(self, descs: int, status: int, groups: list[tuple[int, int, int]]) -> None:
        """Enqueue, on the current stream, one launch per group ``(width, first, count)`` of
        consecutive descriptors at device address ``descs``; statuses go to ``status`` + 4 * i."""
        ptr = np.uint64
        for width, first, count in groups:
            args = (ptr(descs + first * DESC.itemsize), ptr(status + 4 * first))
            if width == STORED:
                self.copy((count,), (COPY_THREADS,), args)
            else:
                self.decode[width]((count,), (32,), args, shared_mem=width * PLANE_SMEM)


@functools.cache
def kernels(device: int) -> Kernels:
    return Kernels(device)


def _raise_status(status: np.ndarray, name: Callable[[int], str], path: Path | None = None) -> None:
    """CorruptArchiveError for the first chunk with a nonzero status; ``name(i)`` says which."""
    bad = np.flatnonzero(status)
    if bad.size:
        i = int(bad[0])
        code = int(status[i])
        raise CorruptArchiveError(f"{name(i)}: {STATUS.get(code, f'GPU decode failed ({code})')}", path)


def _groups(widths: np.ndarray) -> list[tuple[int, int, int]]:
    """(width, first, count) runs of a sorted width array."""
    kinds, first, counts = np.unique(widths, return_index=True, return_counts=True)
    return [(int(k), int(f), int(c)) for k, f, c in zip(kinds, first, counts)]


class ChunkDecoder:
    """Decode ``planes`` + ``rans`` chunk payloads that are already on the device.

    ``payload`` is a cupy uint8 array; ``chunks`` lists each chunk's ``(offset, length,
    decoded_length)`` in it (offsets multiples of 16); ``out`` (cupy uint8) receives the decoded
    chunks back to back; each chunk's decoded length is the capacity its descriptor gives the
    kernel, which refuses a payload that claims another size. Calling the object enqueues the
    decode on the current stream (one launch, however many chunks); :meth:`check` waits for it
    and raises CorruptArchiveError if a chunk failed. The building block of the loader, exposed
    for tests and benchmarks.
    """

    def __init__(self, payload: Any, chunks: list[tuple[int, int, int]], out: Any, *, width: int,
                 rotate: bool, device: int | None = None):
        self.kernels = kernels(payload.device.id if device is None else device)
        cp = self.kernels.cp
        if width not in WIDTHS:
            raise CodecError(f"no GPU decoder for {width}-byte elements")
        if any(min(c) < 0 for c in chunks) or sum(c[2] for c in chunks) > out.nbytes:
            raise ValueError("out is smaller than the decoded chunks")
        descs = np.zeros(len(chunks), DESC)
        pos = 0
        for k, (offset, length, decoded) in enumerate(chunks):
            if offset % PAYLOAD_ALIGN or offset + length > payload.nbytes:
                raise ValueError(f"chunk {k}: payload offsets must be multiples of 16 inside the buffer")
            descs[k] = (payload.data.ptr + offset, length, out.data.ptr + pos, decoded, width,
                        FLAG_ROTATE if rotate else 0)
            pos += decoded
        self._keep = (payload, out)
        with cp.cuda.Device(self.kernels.device):
            self.descs = cp.asarray(descs.view(np.uint8))
            self.status = cp.zeros(len(chunks), dtype=cp.uint32)
        self.count = len(chunks)
        self.width = width

    def __call__(self) -> None:
        if self.count:
            self.kernels.launch(self.descs.data.ptr, self.status.data.ptr, [(self.width, 0, self.count)])

    def check(self) -> None:
        _raise_status(self.status.get(), lambda i: f"chunk {i}")


def decode_chunks(payload: Any, chunks: list[tuple[int, int, int]], out: Any, *, width: int,
                  rotate: bool) -> None:
    """Decode ``chunks`` of ``payload`` into ``out`` in one launch and check them (see ChunkDecoder)."""
    decoder = ChunkDecoder(payload, chunks, out, width=width, rotate=rotate)
    decoder()
    decoder.check()


# ============================================================================ output frameworks

class _Target:
    """Where decoded streams live and how tensors are made from them; one per framework.

    A stream's buffer is a 1-D uint8 device array. :meth:`tensor` mirrors
    :meth:`elves.api.Archive.get_tensor`: a tensor that is a whole stream is a view of its buffer
    (no copy); one that is part of a stream, or a strided view of it, is copied out, contiguous.
    """

    device: int
    stream: Any  # the cupy stream that decodes, and that the framework's allocations are ordered on

    def empty(self, nbytes: int) -> tuple[Any, int]:
        """A fresh uint8 buffer and its device address."""
        raise NotImplementedError

    def upload(self, data: np.ndarray) -> Any:
        raise NotImplementedError

    def dtype(self, name: str) -> Any:
        raise NotImplementedError

    def empty_tensor(self, dtype: Any, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def copy(self, x: Any) -> Any:
        raise NotImplementedError

    def strided_copy(self, flat: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
        """A contiguous copy of the view of 1-D ``flat`` with element ``strides``."""
        raise NotImplementedError

    def tensor(self, buf: Any, t: list[Any], stream_nbytes: int, whole: bool) -> Any:
        """The tensor of index entry ``t`` (``[name, dtype, shape, segment, offset, strides]``)
        from its stream's buffer ``buf``; ``whole`` lets it be ``buf`` itself, viewed."""
        _, dt, shape, _, offset, strides = t
        dtype = self.dtype(dt)
        shape, count = _shape_and_count(dt, shape, stream_nbytes)
        item = _itemsize(dt)
        region = buf[offset:]
        if offset % item:  # a typed view needs an aligned start
            region = self.copy(region)
        if strides is None:
            flat = region[:count * item]
            if flat.shape[0] != count * item:
                raise CorruptArchiveError(f"tensor {t[0]!r} lies past the end of its stream")
            out = flat.view(dtype).reshape(shape)
            return out if whole else self.copy(out)
        base = region[:region.shape[0] - region.shape[0] % item].view(dtype)
        span = 1 + sum((n - 1) * st for n, st in zip(shape, strides)) if count else 0
        if span > base.shape[0] or any(st < 0 for st in strides):
            raise CorruptArchiveError(f"tensor {t[0]!r} lies past the end of its stream")
        return self.strided_copy(base, shape, tuple(strides))


class _TorchTarget(_Target):
    def __init__(self, device: int):
        try:
            import torch
        except ImportError:
            raise GpuUnavailableError("torch is not installed: pass framework='cupy' for cupy arrays, "
                                      "or install torch") from None
        cp = _cupy()
        self.torch = torch
        self.device = device
        self.torch_device = torch.device("cuda", device)
        # Decoding on torch's current stream orders it with torch's stream-ordered allocator:
        # tensors allocated here, and scratch buffers freed here, are safe without extra syncs.
        self.stream = cp.cuda.ExternalStream(torch.cuda.current_stream(self.torch_device).cuda_stream, device)

    def empty(self, nbytes: int) -> tuple[Any, int]:
        buf = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.torch_device)
        return buf, buf.data_ptr()

    def upload(self, data: np.ndarray) -> Any:
        return self.torch.from_numpy(data).to(self.torch_device)

    def dtype(self, name: str) -> Any:
        if name not in dtypes.DTYPES:
            return self.torch.uint8
        attr = dtypes.get(name).torch
        if not hasattr(self.torch, attr):
            raise CodecError(f"this torch has no {attr} dtype (for {name} tensors)")
        return getattr(self.torch, attr)

    def empty_tensor(self, dtype: Any, shape: tuple[int, ...]) -> Any:
        return self.torch.empty(shape, dtype=dtype, device=self.torch_device)

    def copy(self, x: Any) -> Any:
        return x.clone()

    def strided_copy(self, flat: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
        return self.torch.as_strided(flat, shape, strides).clone(memory_format=self.torch.contiguous_format)


class _CupyTarget(_Target):
    def __init__(self, device: int):
        self.cp = _cupy()
        self.device = device
        with self.cp.cuda.Device(device):
            self.stream = self.cp.cuda.get_current_stream()

    def empty(self, nbytes: int) -> tuple[Any, int]:
        buf = self.cp.empty(nbytes, dtype=self.cp.uint8)
        return buf, buf.data.ptr

    def upload(self, data: np.ndarray) -> Any:
        return self.cp.asarray(data)

    def dtype(self, name: str) -> Any:
        if name not in dtypes.DTYPES:
            return np.dtype(np.uint8)
        d = dtypes.get(name)
        # bfloat16 and float8 are ml_dtypes types, which cupy cannot hold: hand out their bits.
        return np.dtype(d.numpy) if hasattr(np, d.numpy) else np.dtype(f"<u{d.itemsize}")

    def empty_tensor(self, dtype: Any, shape: tuple[int, ...]) -> Any:
        return self.cp.empty(shape, dtype=dtype)

    def copy(self, x: Any) -> Any:
        return x.copy()

    def strided_copy(self, flat: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
        view = self.cp.lib.stride_tricks.as_strided(flat, shape, tuple(st * flat.itemsize for st in strides))
        return self.cp.array(view, copy=True, order="C")


def _itemsize(dt: str) -> int:
    return dtypes.get(dt).itemsize if dt in dtypes.DTYPES else 1


def _shape_and_count(dt: str, shape: list[int], stream_nbytes: int) -> tuple[tuple[int, ...], int]:
    """Shape and element count as the CPU API hands them out: packed sub-byte kinds come back as
    their bytes, a 1-D uint8 array of the whole stream."""
    if dt in dtypes.PACKED:
        return (stream_nbytes,), stream_nbytes
    return tuple(shape), int(np.prod(shape, dtype=np.int64))


def _target(framework: str, device: int) -> _Target:
    if framework in ("pt", "torch"):
        return _TorchTarget(device)
    if framework == "cupy":
        return _CupyTarget(device)
    raise UsageError(f"framework must be 'pt' or 'cupy' on a GPU, not {framework!r}")


@contextlib.contextmanager
def _on(target: _Target) -> Iterator[None]:
    """Make ``target``'s device and stream cupy's current ones."""
    with _cupy().cuda.Device(target.device), target.stream:
        yield


def _device_index(device: Any) -> int:
    """The CUDA device index of ``device``: an int, "cuda", "cuda:N" or a torch.device."""
    if isinstance(device, int):
        return device
    text = str(device)
    if text == "cuda":
        return _cupy().cuda.runtime.getDevice()
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise UsageError(f"device must be 'cuda', 'cuda:N' or an index, not {device!r}")


# ============================================================================ the archive side

def _stream_of(entry: FileEntry, t: TensorEntry, reader: ArchiveReader) -> int | None:
    """The stream holding tensor ``t``'s bytes, or None when it has none (empty tensors)."""
    _, dt, shape, segment, _, _ = t
    if segment < 0:
        return None
    index = entry.segments[segment]
    _, count = _shape_and_count(dt, shape, reader.streams[index].nbytes)
    return index if count else None


def _is_whole(t: TensorEntry, stream: Stream) -> bool:
    """Whether tensor ``t`` is exactly its stream's bytes, so that it can be the stream's buffer."""
    _, dt, shape, _, offset, strides = t
    _, count = _shape_and_count(dt, shape, stream.nbytes)
    item = dtypes.get(dt).itemsize if dt in dtypes.DTYPES else 1
    return offset == 0 and strides is None and count * item == stream.nbytes


def _gpu_width(stream: Stream) -> int | None:
    """The kernel that decodes ``stream``'s chunks (an element width, or STORED), or None when
    only the CPU can decode it."""
    if not stream.pipeline:
        return STORED
    try:
        codecs = stream.decoder().codecs
    except CodecError:
        return None
    if len(codecs) == 2 and type(codecs[0]) is Planes and type(codecs[1]) is Rans and codecs[0].width in WIDTHS:
        return codecs[0].width
    return None


@dataclass
class _Chunk:
    stream: int
    index: int        # chunk number within the stream
    offset: int       # in the archive
    length: int
    decoded: int
    checksum: int
    width: int        # an element width, or STORED
    rotate: bool
    dst_offset: int   # where its decoded bytes go in the stream's buffer


@dataclass
class _Batch:
    """Chunks that fill one staging buffer: their descriptors first, then their payloads."""

    chunks: list[_Chunk] = field(default_factory=list)
    payload_bytes: int = 0

    def desc_bytes(self, extra: int = 0) -> int:
        return _align((len(self.chunks) + extra) * DESC.itemsize)

    def size(self) -> int:
        return self.desc_bytes() + self.payload_bytes


@dataclass
class _Layout:
    """A batch laid out in its staging buffer."""

    descs: np.ndarray                    # sorted by width: each kernel gets a contiguous run
    groups: list[tuple[int, int, int]]   # (width, first descriptor, count) per launch
    offsets: list[int]                   # payload offset of each chunk, in batch order
    order: list[int]                     # the chunk (batch order) of each descriptor
    status_base: int                     # the batch's first index in the status array


def _align(n: int) -> int:
    return -(-n // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


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


_IOV_MAX = 1024  # buffers per preadv call (Linux's IOV_MAX)


class _Staging:
    """One staging buffer: pinned host memory, its device twin, and the events that guard them."""

    def __init__(self, cp: Any, target: _Target, nbytes: int):
        self.host_mem = cp.cuda.alloc_pinned_memory(nbytes)
        self.host = np.frombuffer(self.host_mem, dtype=np.uint8, count=nbytes)
        self.dev, self.dev_ptr = target.empty(nbytes)
        self.copied = cp.cuda.Event(disable_timing=True)   # upload done: the host side may be refilled
        self.decoded = cp.cuda.Event(disable_timing=True)  # decode done: the device side may be overwritten


class _Loader:
    """Decodes streams of one archive onto one device, batch by batch (see the module docstring).

    Run it inside ``_on(target)``. :meth:`run` yields each stream's buffer once every chunk of it
    has been enqueued: work on it enqueued afterwards on ``target.stream`` is ordered after the
    decode. :meth:`finish` waits for the GPU and raises CorruptArchiveError if a chunk failed.
    """

    def __init__(self, reader: ArchiveReader, target: _Target, staging_bytes: int):
        self.reader = reader
        self.target = target
        self.kernels = kernels(target.device)
        self.cp = self.kernels.cp
        self.staging_bytes = staging_bytes
        self.status: Any = None
        self.status_ptr = 0
        self.status_chunks: list[_Chunk] = []
        self._threads = default_threads(None)
        self._cpu_pool: ThreadPoolExecutor | None = None

    def run(self, streams: list[int]) -> Iterator[tuple[int, Any]]:
        gpu = {s for s in streams if _gpu_width(self.reader.streams[s]) is not None}
        for s in streams:
            if s not in gpu:
                yield s, self._decode_on_cpu(s)
        yield from self._run_gpu(sorted(gpu, key=self._first_offset))

    def _first_offset(self, s: int) -> int:
        chunks = self.reader.streams[s].chunks
        return chunks[0][0] if chunks else -1

    def _decode_on_cpu(self, s: int) -> Any:
        if self._cpu_pool is None:
            self._cpu_pool = ThreadPoolExecutor(self._threads)
        return self.target.upload(read_stream(self.reader, s, self._cpu_pool, 2 * self._threads + 2))

    def _chunks(self, s: int) -> list[_Chunk]:
        stream = self.reader.streams[s]
        width = _gpu_width(stream)
        assert width is not None
        rotate = width != STORED and stream.decoder().codecs[0].rotate
        out, pos = [], 0
        for i, (offset, length, decoded, checksum) in enumerate(stream.chunks):
            if width != STORED and decoded % width:
                raise CorruptArchiveError(f"{stream_label(self.reader, s)}: chunk {i} is not a whole number "
                                          "of elements", self.reader.path)
            out.append(_Chunk(s, i, offset, length, decoded, checksum, width, rotate, pos))
            pos += decoded
        if pos != stream.nbytes:
            raise CorruptArchiveError(f"{stream_label(self.reader, s)}: its chunks do not add up to its size",
                                      self.reader.path)
        return out

    def _batches(self, streams: list[int]) -> list[_Batch]:
        """Chunks in archive order, cut into batches that fit a staging buffer (which grows to fit
        the largest chunk, for archives written with huge chunks)."""
        batches = [_Batch()]
        for s in streams:
            for c in self._chunks(s):
                self.staging_bytes = max(self.staging_bytes, _align(DESC.itemsize) + _align(c.length))
                b = batches[-1]
                if b.chunks and b.desc_bytes(1) + b.payload_bytes + _align(c.length) > self.staging_bytes:
                    b = _Batch()
                    batches.append(b)
                b.chunks.append(c)
                b.payload_bytes += _align(c.length)
        return [b for b in batches if b.chunks]

    def _run_gpu(self, streams: list[int]) -> Iterator[tuple[int, Any]]:
        cp, target = self.cp, self.target
        batches = self._batches(streams)
        # The batch holding each stream's last chunk: once it is enqueued, the stream is handed out.
        done: dict[int, list[int]] = {}
        for k, b in enumerate(batches):
            for c in b.chunks:
                if c.index == len(self.reader.streams[c.stream].chunks) - 1:
                    done.setdefault(k, []).append(c.stream)
        for s in streams:
            if not self.reader.streams[s].chunks:
                yield s, target.empty(0)[0]
        if not batches:
            return
        total = sum(len(b.chunks) for b in batches)
        self.status, self.status_ptr = target.empty(4 * total)
        cp.cuda.runtime.memsetAsync(self.status_ptr, 0, 4 * total, target.stream.ptr)

        staging = [_Staging(cp, target, self.staging_bytes) for _ in range(min(STAGING_BUFFERS, len(batches)))]
        copy_stream = cp.cuda.Stream(non_blocking=True)
        # The allocators are stream-ordered: the staging memory may still be read by work queued
        # earlier on the decode stream, which the copy stream must not overtake.
        allocated = cp.cuda.Event(disable_timing=True)
        allocated.record(target.stream)
        copy_stream.wait_event(allocated)
        buffers: dict[int, tuple[Any, int]] = {}
        layouts: dict[int, _Layout] = {}
        reads: deque[Future[None]] = deque()
        pool = ThreadPoolExecutor(len(staging))

        def submit(k: int) -> None:
            """Allocate the outputs that batch k writes, lay it out, and start reading it."""
            batch, slot = batches[k], staging[k % len(staging)]
            for c in batch.chunks:
                if c.stream not in buffers:
                    buffers[c.stream] = target.empty(self.reader.streams[c.stream].nbytes)
            layout = layouts[k] = self._layout(batch, slot, buffers, len(self.status_chunks))
            self.status_chunks += [batch.chunks[i] for i in layout.order]
            reads.append(pool.submit(self._fill, slot, batch, layout))

        try:
            for k in range(len(staging)):
                submit(k)
            for k, batch in enumerate(batches):
                slot = staging[k % len(staging)]
                layout = layouts.pop(k)
                reads.popleft().result()  # read and checksummed, or raises
                copy_stream.wait_event(slot.decoded)
                cp.cuda.runtime.memcpyAsync(slot.dev_ptr, slot.host_mem.ptr, batch.size(),
                                            cp.cuda.runtime.memcpyHostToDevice, copy_stream.ptr)
                slot.copied.record(copy_stream)
                target.stream.wait_event(slot.copied)
                self.kernels.launch(slot.dev_ptr, self.status_ptr + 4 * layout.status_base, layout.groups)
                slot.decoded.record(target.stream)
                if k + len(staging) < len(batches):
                    submit(k + len(staging))
                for s in done.get(k, []):
                    yield s, buffers.pop(s)[0]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            copy_stream.synchronize()  # no upload may still read a pinned buffer once it is freed
            target.stream.synchronize()

    def _layout(self, batch: _Batch, slot: _Staging, buffers: dict[int, tuple[Any, int]],
                status_base: int) -> _Layout:
        offsets, pos = [], batch.desc_bytes()
        for c in batch.chunks:
            offsets.append(pos)
            pos += _align(c.length)
        order = sorted(range(len(batch.chunks)), key=lambda i: batch.chunks[i].width)
        descs = np.zeros(len(order), DESC)
        for d, i in enumerate(order):
            c = batch.chunks[i]
            descs[d] = (slot.dev_ptr + offsets[i], c.length, buffers[c.stream][1] + c.dst_offset, c.decoded,
                        c.width, FLAG_ROTATE if c.rotate else 0)
        return _Layout(descs, _groups(descs["width"]), offsets, order, status_base)

    def _fill(self, slot: _Staging, batch: _Batch, layout: _Layout) -> None:
        """Worker thread: wait until the buffer's previous upload is done, then read the batch's
        payloads into it (one preadv per run of adjacent chunks) and check their checksums."""
        with self.cp.cuda.Device(self.target.device):
            slot.copied.synchronize()
        host, chunks, offsets = slot.host, batch.chunks, layout.offsets
        host[:layout.descs.nbytes] = layout.descs.view(np.uint8)
        fd = self.reader.f.fileno()
        i = 0
        while i < len(chunks):
            j = i + 1
            while (j < len(chunks) and j - i < _IOV_MAX
                   and chunks[j].offset == chunks[j - 1].offset + chunks[j - 1].length):
                j += 1
            views = [memoryview(host[offsets[k]:offsets[k] + chunks[k].length]) for k in range(i, j)]
            if _read_into(fd, views, chunks[i].offset) != sum(chunks[k].length for k in range(i, j)):
                raise TruncatedArchiveError(f"{stream_label(self.reader, chunks[i].stream)}: chunk "
                                            f"{chunks[i].index}: the payload is cut short", self.reader.path)
            i = j
        for c, offset in zip(chunks, offsets):
            if xxhash.xxh3_64_intdigest(host[offset:offset + c.length]) != c.checksum:
                raise CorruptArchiveError(f"{stream_label(self.reader, c.stream)}: chunk {c.index}: "
                                          "the payload is corrupted (checksum mismatch)", self.reader.path)

    def finish(self) -> None:
        """Wait for the decodes and raise CorruptArchiveError if a chunk failed."""
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown()
        if not self.status_chunks:
            return
        self.target.stream.synchronize()
        status = np.empty(len(self.status_chunks), dtype=np.uint32)
        self.cp.cuda.runtime.memcpy(status.ctypes.data, self.status_ptr, status.nbytes,
                                    self.cp.cuda.runtime.memcpyDeviceToHost)

        def name(i: int) -> str:
            c = self.status_chunks[i]
            return f"{stream_label(self.reader, c.stream)}: chunk {c.index}"

        _raise_status(status, name, self.reader.path)


# ============================================================================ public API

def load_file(path: str | os.PathLike[str], device: Any = "cuda:0", framework: GpuFramework = "pt", *,
              staging_bytes: int = STAGING_BYTES) -> dict[str, Any]:
    """Every tensor of the archive at ``path``, by name (as :func:`elves.load_file` names them),
    decoded on ``device``: torch tensors with ``framework="pt"``, cupy arrays with "cupy".

    Each stream is decoded once, straight into the tensor that is all of it; tensors that are
    part of a stream, or strided views of it (PyTorch storages), are copied out on the device.
    The host holds ``STAGING_BUFFERS`` pinned buffers of ``staging_bytes``, and so does the GPU
    besides the tensors.
    """
    target = _target(framework, _device_index(device))
    with ArchiveReader(path) as reader, _on(target):
        _check_tensors(reader, reader.files)
        named = tensor_names(reader.files)
        users: dict[int, list[str]] = {}
        out: dict[str, Any] = {}
        for name, (entry, t) in named.items():
            s = _stream_of(entry, t, reader)
            if s is None:
                out[name] = _empty(target, t)
            else:
                users.setdefault(s, []).append(name)
        loader = _Loader(reader, target, staging_bytes)
        with contextlib.closing(loader.run(list(users))) as decoded:
            for s, buf in decoded:
                stream = reader.streams[s]
                whole_taken = False
                for name in users[s]:
                    t = named[name][1]
                    whole = not whole_taken and _is_whole(t, stream)
                    whole_taken |= whole
                    out[name] = target.tensor(buf, t, stream.nbytes, whole)
        loader.finish()
    return {name: out[name] for name in named}


def _check_tensors(reader: ArchiveReader, entries: list[FileEntry]) -> None:
    """The files' tensor entries agree with their own headers (:func:`elves.decoder.check_tensors`),
    checked on the CPU: headers are small."""
    with ThreadPoolExecutor(2) as pool:
        for entry in entries:
            check_tensors(reader, entry, pool, 4)


def _empty(target: _Target, t: TensorEntry) -> Any:
    shape, _ = _shape_and_count(t[1], t[2], 0)
    return target.empty_tensor(target.dtype(t[1]), shape)


class GpuArchive:
    """An open archive whose tensors are decoded on a GPU one at a time; see :func:`open`."""

    def __init__(self, path: str | os.PathLike[str], device: Any = "cuda:0", framework: GpuFramework = "pt", *,
                 staging_bytes: int = STAGING_BYTES):
        self._device = _device_index(device)
        self._framework = framework
        self._staging = staging_bytes
        _target(framework, self._device)  # fail now, not at the first tensor: no cupy, no device
        self._reader = ArchiveReader(path)
        self._named = tensor_names(self._reader.files)
        self._checked: set[str] = set()  # files whose tensor entries agree with their own structure

    @property
    def path(self) -> Path:
        return self._reader.path

    def keys(self) -> list[str]:
        """The names of the tensors, in file order."""
        return list(self._named)

    def __contains__(self, name: object) -> bool:
        return name in self._named

    def get_tensor(self, name: str) -> Any:
        """The tensor called ``name``, decoded on the device."""
        try:
            entry, t = self._named[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None
        if entry.path not in self._checked:
            _check_tensors(self._reader, [entry])
            self._checked.add(entry.path)
        target = _target(self._framework, self._device)  # on the caller's current stream
        with _on(target):
            s = _stream_of(entry, t, self._reader)
            if s is None:
                return _empty(target, t)
            stream = self._reader.streams[s]
            # A small tensor needs no 64 MiB of staging.
            loader = _Loader(self._reader, target, min(self._staging, _staging_for(stream)))
            tensor = None
            with contextlib.closing(loader.run([s])) as decoded:
                for _, buf in decoded:
                    tensor = target.tensor(buf, t, stream.nbytes, _is_whole(t, stream))
            loader.finish()
            return tensor

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "GpuArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _staging_for(stream: Stream) -> int:
    """Staging that holds all of ``stream``'s chunks at once."""
    return _align(len(stream.chunks) * DESC.itemsize) + sum(_align(c[1]) for c in stream.chunks)


def open(path: str | os.PathLike[str], device: Any = "cuda:0", framework: GpuFramework = "pt", *,  # noqa: A001
         staging_bytes: int = STAGING_BYTES) -> GpuArchive:
    """Open an archive for lazy loading of single tensors onto ``device``."""
    return GpuArchive(path, device, framework, staging_bytes=staging_bytes)
