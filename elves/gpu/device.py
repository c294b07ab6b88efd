"""The device side: cupy and the CUDA device, the framework that owns the output memory, and the
pinned staging buffers payloads travel through.

cupy is imported only when one of these is used, so that ``elves.gpu`` imports anywhere.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Literal

import numpy as np

from .. import dtypes
from ..errors import CodecError, CorruptArchiveError, GpuUnavailableError, UsageError
from ..index import TensorEntry

GpuFramework = Literal["pt", "torch", "cupy"]


def cupy() -> Any:
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


def device_index(device: Any) -> int:
    """The CUDA device index of ``device``: an int, "cuda", "cuda:N" or a torch.device."""
    if isinstance(device, int):
        return device
    text = str(device)
    if text == "cuda":
        return int(cupy().cuda.runtime.getDevice())
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise UsageError(f"device must be 'cuda', 'cuda:N' or an index, not {device!r}")


def itemsize(dt: str) -> int:
    return dtypes.get(dt).itemsize if dt in dtypes.DTYPES else 1


def shape_and_count(dt: str, shape: tuple[int, ...], stream_nbytes: int) -> tuple[tuple[int, ...], int]:
    """Shape and element count as the CPU API hands them out: packed sub-byte kinds come back as
    their bytes, a 1-D uint8 array of the whole stream."""
    if dt in dtypes.PACKED:
        return (stream_nbytes,), stream_nbytes
    return tuple(shape), int(np.prod(shape, dtype=np.int64))


class Target:
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

    def address(self, buf: Any) -> int:
        """The device address of a buffer :meth:`empty` or :meth:`upload` gave."""
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

    def tensor(self, buf: Any, t: TensorEntry, stream_nbytes: int, whole: bool) -> Any:
        """The tensor of index entry ``t`` from its stream's buffer ``buf``; ``whole`` lets it be
        ``buf`` itself, viewed."""
        dtype = self.dtype(t.dtype)
        shape, count = shape_and_count(t.dtype, t.shape, stream_nbytes)
        item = itemsize(t.dtype)
        region = buf[t.offset:]
        if t.offset % item:  # a typed view needs an aligned start
            region = self.copy(region)
        if t.strides is None:
            flat = region[:count * item]
            if flat.shape[0] != count * item:
                raise CorruptArchiveError(f"tensor {t.name!r} lies past the end of its stream")
            out = flat.view(dtype).reshape(shape)
            return out if whole else self.copy(out)
        base = region[:region.shape[0] - region.shape[0] % item].view(dtype)
        span = 1 + sum((n - 1) * st for n, st in zip(shape, t.strides)) if count else 0
        if span > base.shape[0] or any(st < 0 for st in t.strides):
            raise CorruptArchiveError(f"tensor {t.name!r} lies past the end of its stream")
        return self.strided_copy(base, shape, t.strides)

    def grown(self, src: Any, ref_shape: tuple[int, ...], shape: tuple[int, ...], width: int) -> Any:
        """A reference of ``shape`` (elements of ``width`` bytes) with the elements of the 1-D uint8
        buffer ``src``, of ``ref_shape``, at its origin and zeros elsewhere (a widened layer)."""
        buf, _ = self.empty(math.prod(shape) * width)
        buf[:] = 0
        inside = tuple(slice(0, d) for d in ref_shape)
        buf.reshape((*shape, width))[inside] = src.reshape((*ref_shape, width))
        return buf

    def empty_of(self, t: TensorEntry) -> Any:
        """The tensor of an entry with no bytes (an empty shape)."""
        shape, _ = shape_and_count(t.dtype, t.shape, 0)
        return self.empty_tensor(self.dtype(t.dtype), shape)


class TorchTarget(Target):
    def __init__(self, device: int):
        try:
            import torch
        except ImportError:
            raise GpuUnavailableError("torch is not installed: pass framework='cupy' for cupy arrays, "
                                      "or install torch") from None
        cp = cupy()
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
        return self.torch.from_numpy(data if data.flags.writeable else data.copy()).to(self.torch_device)

    def address(self, buf: Any) -> int:
        return int(buf.data_ptr())

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


class CupyTarget(Target):
    def __init__(self, device: int):
        self.cp = cupy()
        self.device = device
        with self.cp.cuda.Device(device):
            self.stream = self.cp.cuda.get_current_stream()

    def empty(self, nbytes: int) -> tuple[Any, int]:
        buf = self.cp.empty(nbytes, dtype=self.cp.uint8)
        return buf, buf.data.ptr

    def upload(self, data: np.ndarray) -> Any:
        return self.cp.asarray(data)

    def address(self, buf: Any) -> int:
        return int(buf.data.ptr)

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


def make_target(framework: str, device: int) -> Target:
    if framework in ("pt", "torch"):
        return TorchTarget(device)
    if framework == "cupy":
        return CupyTarget(device)
    raise UsageError(f"framework must be 'pt' or 'cupy' on a GPU, not {framework!r}")


@contextlib.contextmanager
def on(target: Target) -> Iterator[None]:
    """Make ``target``'s device and stream cupy's current ones."""
    with cupy().cuda.Device(target.device), target.stream:
        yield


class Staging:
    """One staging buffer: pinned host memory, its device twin, and the events that guard them."""

    def __init__(self, cp: Any, target: Target, nbytes: int):
        self.host_mem = cp.cuda.alloc_pinned_memory(nbytes)
        self.host = np.frombuffer(self.host_mem, dtype=np.uint8, count=nbytes)
        self.dev, self.dev_ptr = target.empty(nbytes)
        self.scratch: Any = None  # what planes + rANS decode elf and sparse xor chunks into, for the batch in flight
        self.copied = cp.cuda.Event(disable_timing=True)   # upload done: the host side may be refilled
        self.decoded = cp.cuda.Event(disable_timing=True)  # decode done: the device side may be overwritten
