"""``zstd``: general-purpose compression for bytes that are not tensors (configs, tokenizers,
pickles, container headers, formats elves does not parse)."""
from __future__ import annotations

import numpy as np
import zstandard

from ..errors import CorruptArchiveError
from . import Codec, Config, register


@register
class Zstd(Codec):
    codec_id = "zstd"

    def __init__(self, level: int = 3):
        self.level = level

    def get_config(self) -> Config:
        return {"id": self.codec_id, "level": self.level}

    def encode(self, data: np.ndarray | bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(memoryview(data))

    def decode(self, data: np.ndarray | bytes, out: np.ndarray | None = None) -> np.ndarray:
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                memoryview(data), max_output_size=out.shape[0] if out is not None else 0
            )
        except zstandard.ZstdError as e:
            raise CorruptArchiveError(f"zstd frame does not decode: {e}") from None
        arr = np.frombuffer(raw, dtype=np.uint8)
        if out is None:
            return arr
        if arr.shape[0] != out.shape[0]:
            raise CorruptArchiveError(f"zstd frame holds {arr.shape[0]} bytes, expected {out.shape[0]}")
        out[:] = arr
        return out
