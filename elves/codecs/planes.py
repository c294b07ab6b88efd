"""``planes``: split each element into byte planes, exponent first.

Floats are rotated left by one bit first, so that the sign drops to bit 0 and the exponent
fills the top byte: plane 0 then holds the exponent, which carries about 2.6 bits of its 8 and
is what the entropy coder compresses; the mantissa planes are close to random.
"""
from __future__ import annotations

import numpy as np

from .. import dtypes
from . import Codec, Config, register


@register
class Planes(Codec):
    codec_id = "planes"

    def __init__(self, dtype: str, rotate: bool | None = None):
        self.dtype = dtypes.get(dtype)
        self.width = self.dtype.itemsize
        self.rotate = self.dtype.is_float if rotate is None else bool(rotate)

    def get_config(self) -> Config:
        return {"id": self.codec_id, "dtype": self.dtype.name, "rotate": self.rotate}

    def encode(self, data: np.ndarray) -> np.ndarray:
        from ..kernels import planes_rans as k

        n = data.shape[0] // self.width
        planes = np.empty((self.width, n), dtype=np.uint8)
        k.split(data, n, self.width, self.rotate, planes)
        return planes

    def decode(self, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        from ..kernels import planes_rans as k

        n = data.shape[1]
        if out is None:
            out = np.empty(n * self.width, dtype=np.uint8)
        k.merge(data, n, self.width, self.rotate, out)
        return out
