"""The CUDA kernels (``cuda/rans_decode.cu``, ``cuda/elf_decode.cu``): their sources, compilation,
launch, and the chunk descriptors they read.

A descriptor (:data:`DESC`, the kernel's ``ChunkDesc`` field for field) gives one chunk's payload
address and length, where its decoded bytes go and how many they must be, its element width
(:data:`STORED`: a plain copy, also the gather of a block-mapped reference) and flags, and for
BitX's ``xor`` filter (fused into the decode) the chunk's reference, mask and remap table. A launch decodes a run of descriptors of one width; each
chunk leaves a status word, nonzero when it failed (codes as in :data:`elves.codecs.rans.STATUS`
and :data:`ELF_STATUS`). Which kernel a run of descriptors goes to is its *kernel key*: an element
width (planes + rANS, BitX fused in), :data:`STORED`, :data:`ELF` | width (the ``elf`` filter,
run on what planes + rANS decoded into scratch memory) or :data:`SPARSE` | width (BitX's sparse
form, likewise from scratch memory).
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..codecs.rans import STATUS
from ..errors import CodecError, CorruptArchiveError, GpuUnavailableError
from ..index import Where
from .device import cupy

PAYLOAD_ALIGN = 16         # the kernel reads payloads as aligned words
WIDTHS = (1, 2, 4, 8, 16)  # element widths the decode kernel is instantiated for
STORED = 0                 # "width" of a chunk stored as it is (empty pipeline): a plain copy
PLANE_SMEM = 256 * 4 + 4096  # shared memory per plane: symbol info words + slot -> symbol bytes
DEFAULT_SMEM = 48 << 10    # dynamic shared memory a kernel gets without opting in
COPY_THREADS = 256
ELF = 0x100                # kernel key of the elf dequantiser: ELF | element width
ELF_THREADS = 256
ELF_DELTA, ELF_RELATIVE, ELF_REL_EXACT = 1 << 16, 1 << 17, 1 << 18  # elf descriptor flags (elf_decode.cu)
SPARSE = 0x200             # kernel key of the sparse xor decode: SPARSE | element width
SPARSE_THREADS = 256
SECOND_STAGE = ELF | SPARSE  # keys of kernels that read what planes + rANS decoded into scratch
KERNEL_FILES = ("rans_decode.cu", "elf_decode.cu")

# The elf kernel's status codes, with the CPU decoder's messages (elves/codecs/elf.py).
ELF_STATUS = {
    16: "elf chunk is cut short or not whole words",
    17: "elf chunk: unknown flags",
    18: "elf chunk: bad sub-binade count",
    19: "elf chunk: unknown grid kind",
    20: "elf chunk: bad exception position width",
    21: "elf chunk: the exception section runs past the chunk",
    22: "elf chunk: malformed section",
    23: "elf chunk: bad palette size",
    24: "elf chunk holds another number of bytes than the chunk decodes to",
    25: "elf chunk: malformed binade grid",
    26: "elf chunk: malformed uniform grid",
    27: "elf chunk: malformed palette",
    28: "elf chunk: a palette index is out of range",
    29: "elf chunk: exception positions out of order or range",
    30: "elf chunk: its descriptor is malformed",
    31: "elf chunk: a palette in a delta chunk",
    32: "elf with delta needs a reference chunk as long as the chunk",
}
# The sparse xor kernel's, with the CPU decoder's messages (bitx/codec.py).
SPARSE_STATUS = {
    40: "sparse xor: the chunk is shorter than its bitmap",
    41: "sparse xor: the bitmap does not match the number of elements",
    42: "sparse xor: its descriptor is malformed",
}

DESC = np.dtype([("src", "<u8"), ("src_len", "<u8"), ("dst", "<u8"), ("dst_len", "<u8"),
                 ("width", "<u4"), ("flags", "<u4"), ("ref", "<u8"), ("ref_len", "<u8"), ("mask", "<u8"),
                 ("table", "<u8")])
FLAG_ROTATE = 1
FLAG_XOR = 2    # BitX: each word XORed with the reference at ``ref`` through ``mask``
FLAG_REMAP = 4  # ...and its byte below the sign bit decoded through the table at ``table``

Group = tuple[int, int, int]  # (kernel key, first descriptor, count): one launch


def align(n: int) -> int:
    return -(-n // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def groups(widths: np.ndarray) -> list[Group]:
    """(width, first, count) runs of a sorted width array."""
    kinds, first, counts = np.unique(widths, return_index=True, return_counts=True)
    return [(int(k), int(f), int(c)) for k, f, c in zip(kinds, first, counts)]


def kernel_source(name: str = KERNEL_FILES[0]) -> str:
    """A CUDA source: package data ``elves.cuda`` when installed, else the checkout's cuda/."""
    try:
        resource = importlib.resources.files("elves.cuda").joinpath(name)
        if resource.is_file():
            return resource.read_text()
    except (ModuleNotFoundError, TypeError):
        pass
    path = Path(__file__).resolve().parents[2] / "cuda" / name
    try:
        return path.read_text()
    except OSError:
        raise GpuUnavailableError(f"the CUDA source {name} is missing from this install", path) from None


def kernel_launch(kernel: int) -> tuple[str, int]:
    """The entry point and threads per block of a kernel key."""
    if kernel == STORED:
        return "elves_copy_chunks", COPY_THREADS
    if kernel & ELF:
        return "elves_elf_decode", ELF_THREADS
    if kernel & SPARSE:
        return "elves_xor_sparse", SPARSE_THREADS
    return f"elves_rans_decode_w{kernel}", 32


class Kernels:
    """The compiled kernels for one device (cupy caches the compiled module on disk)."""

    def __init__(self, device: int):
        cp = cupy()
        self.cp = cp
        self.device = device
        with cp.cuda.Device(device):
            modules = [cp.RawModule(code=kernel_source(name), options=("-std=c++17",)) for name in KERNEL_FILES]
            self.functions = {name: modules[0].get_function(name) for name in
                              [*(f"elves_rans_decode_w{w}" for w in WIDTHS), "elves_copy_chunks", "elves_xor_sparse"]}
            self.functions["elves_elf_decode"] = modules[1].get_function("elves_elf_decode")
            for w in WIDTHS:
                if w * PLANE_SMEM > DEFAULT_SMEM:
                    self.functions[f"elves_rans_decode_w{w}"].max_dynamic_shared_size_bytes = w * PLANE_SMEM

    def launch(self, descs: int, status: int, runs: list[Group]) -> None:
        """Enqueue, on the current stream, one launch per group ``(kernel key, first, count)`` of
        consecutive descriptors at device address ``descs``; statuses go to ``status`` + 4 * i."""
        ptr = np.uint64
        for kernel, first, count in runs:
            args = (ptr(descs + first * DESC.itemsize), ptr(status + 4 * first))
            name, threads = kernel_launch(kernel)
            smem = kernel * PLANE_SMEM if kernel in WIDTHS else 0
            self.functions[name]((count,), (threads,), args, shared_mem=smem)


@functools.cache
def kernels(device: int) -> Kernels:
    return Kernels(device)


def raise_status(status: np.ndarray, name: Callable[[int], str], path: Where | None = None) -> None:
    """CorruptArchiveError for the first chunk with a nonzero status; ``name(i)`` says which."""
    bad = np.flatnonzero(status)
    if bad.size:
        i = int(bad[0])
        code = int(status[i])
        message = STATUS.get(code) or ELF_STATUS.get(code) or SPARSE_STATUS.get(code) or f"GPU decode failed ({code})"
        raise CorruptArchiveError(f"{name(i)}: {message}", path)


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
                        FLAG_ROTATE if rotate else 0, 0, 0, 0, 0)
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
        raise_status(self.status.get(), lambda i: f"chunk {i}")


def decode_chunks(payload: Any, chunks: list[tuple[int, int, int]], out: Any, *, width: int,
                  rotate: bool) -> None:
    """Decode ``chunks`` of ``payload`` into ``out`` in one launch and check them (see ChunkDecoder)."""
    decoder = ChunkDecoder(payload, chunks, out, width=width, rotate=rotate)
    decoder()
    decoder.check()
