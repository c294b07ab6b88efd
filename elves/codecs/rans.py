"""``rans``: code each byte plane with static-table rANS over interleaved lanes.

A plane whose symbols are all equal costs two bytes, one that rANS cannot shrink is stored raw,
and every other plane gets its own frequency table, per chunk, so the coder follows how the
statistics drift along a tensor. The container (docs/FORMAT.md) is decoded by the numba kernel
here and by the CUDA kernel in ``cuda/``: the lanes are what a GPU runs in parallel.
"""
from __future__ import annotations

import numpy as np

from ..errors import CorruptArchiveError
from . import Codec, Config, register

_STATUS = {
    1: "chunk header is malformed",
    2: "a rANS lane runs past its stream",
    3: "a rANS lane did not end in its initial state",
    4: "a rANS frequency table is invalid",
}


@register
class Rans(Codec):
    codec_id = "rans"

    def __init__(self, lanes: int = 32, prob_bits: int = 12):
        if not 1 <= lanes <= 4096 or not 1 <= prob_bits <= 12:
            raise ValueError("lanes must be in 1..4096 and prob_bits in 1..12")
        self.lanes = lanes
        self.prob_bits = prob_bits

    def get_config(self) -> Config:
        return {"id": self.codec_id, "lanes": self.lanes, "prob_bits": self.prob_bits}

    def encode(self, data: np.ndarray) -> np.ndarray:
        from ..kernels import planes_rans as k

        w, n = data.shape
        out = np.empty(k.max_encoded_size(n, w), dtype=np.uint8)
        size = k.encode_planes(data, self.lanes, self.prob_bits, out)
        return out[:size]

    def decode(self, data: np.ndarray | bytes, out: np.ndarray | None = None) -> np.ndarray:
        from ..kernels import planes_rans as k

        buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        w, n = k.container_shape(buf)
        if w < 1:
            raise CorruptArchiveError(_STATUS[1])
        planes = np.empty((w, n), dtype=np.uint8) if out is None else out.reshape(w, n)
        status = k.decode_planes(buf, planes)
        if status:
            raise CorruptArchiveError(_STATUS.get(status, f"decode failed ({status})"))
        return planes
