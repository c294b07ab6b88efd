"""Codecs and the pipeline that chains them, in the manner of zarr v3 and numcodecs.

Each codec is a small class with a JSON-serialisable config, of one of these kinds
(:mod:`elves.codecs.base`):

    array -> array   filters: ``xor`` (BitX, against a reference chunk), ``elf`` (quantisation)
    array -> planes  the splitter (``planes``): one byte plane per byte of the element
    planes -> bytes  the entropy coder (``rans``), decodable by the numba and the CUDA kernels
    bytes -> bytes   general-purpose compressors (``zstd``, for opaque files)

:mod:`elves.codecs.registry` names every codec by id; :mod:`elves.codecs.pipeline` chains them
for one stream's chunks.
"""
from .base import Codec, Expected
from .pipeline import Pipeline
from .registry import codec_from_config

__all__ = ["Codec", "Expected", "Pipeline", "codec_from_config"]
