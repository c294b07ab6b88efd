"""Load an archive's tensors straight into GPU memory, decoding on the GPU.

    >>> import elves.gpu
    >>> tensors = elves.gpu.load_file("model.elves", device="cuda:0")     # dict of torch tensors
    >>> with elves.gpu.open("model.elves", device="cuda:0") as archive:     # lazy, one at a time
    ...     w = archive.get_tensor("lm_head.weight")

Chunk payloads travel compressed: they are read from the archive into pinned host buffers (each
chunk's xxh3-64 checked on the host, as the CPU reader does), copied to the device on one CUDA
stream while the previous batch decodes on another, and decoded by ``cuda/rans_decode.cu``
straight into the tensors' own memory: planes + rANS, with BitX's ``xor`` against a base model
(``base=``: its tensors uploaded, or used in place when they are already on the device) or an
earlier stream of the archive (gathered on the device) fused in; ``elf`` chunks go on through
``cuda/elf_decode.cu``, sparse BitX chunks through a second kernel of the first. GPU memory holds the
tensors plus a few fixed-size staging buffers, whatever the model's size. The stream-level xxh3-128 is not recomputed (that needs the
decoded bytes on the host); the kernel instead applies every structural check of the CPU decoder,
rANS final states included, and any failure raises :class:`~elves.errors.CorruptArchiveError`.

Streams the kernels do not decode (zstd bytes, codecs added to the
format later) are decoded on the CPU by :func:`elves.decoder.read_stream`, fully checked, while
the GPU decodes the others, and uploaded. ``elves.api.load_into`` puts the tensors into a torch
(transformers) module.

cupy (``pip install 'elves[gpu]'``) is imported only when a function here is called, so this
package imports anywhere. Output is torch tensors (``framework="pt"``, allocated by torch's caching
allocator) or cupy arrays (``framework="cupy"``; cupy has no bfloat16 or float8, so those come back
as their bits in uint16/uint8).

The modules, in the order data flows: :mod:`.loader` maps tensors onto streams; :mod:`.decode`
moves the streams' chunks through staging and launches their decode; :mod:`.plan` cuts chunks
into batches and lays out their descriptors (host side only); :mod:`.launcher` compiles and
launches the kernels; :mod:`.device` holds cupy, the output framework and the staging buffers.
"""
from __future__ import annotations

from .decode import STAGING_BUFFERS, STAGING_BYTES
from .device import GpuFramework
from .launcher import ChunkDecoder, decode_chunks
from .loader import GpuArchive, load_file, load_model, open  # noqa: A004

__all__ = ["STAGING_BUFFERS", "STAGING_BYTES", "ChunkDecoder", "GpuArchive", "GpuFramework", "decode_chunks",
           "load_file", "load_model", "open"]
