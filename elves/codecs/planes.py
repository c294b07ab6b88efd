"""``planes``: split each element into byte planes, exponent first.

Floats are rotated left by one bit first, so that the sign drops to bit 0 and the exponent
fills the top byte: plane 0 then holds the exponent, which carries about 2.6 bits of its 8 and
is what the entropy coder compresses; the mantissa planes are close to random.
"""
from __future__ import annotations

import numpy as np

from .. import dtypes
from ..errors import CodecError, CorruptArchiveError
from .base import U8, ArrayPlanesCodec, Config, Expected, expected_of


class Planes(ArrayPlanesCodec):
    codec_id = "planes"

    def __init__(self, dtype: str, rotate: bool | None = None):
        self.check(isinstance(dtype, str), "dtype must be a string")
        self.dtype = dtypes.get(dtype)
        self.width = self.dtype.itemsize
        self.check(self.width >= 1, f"{dtype} elements are not whole bytes")
        self.check(rotate is None or isinstance(rotate, bool), "rotate must be true or false")
        self.rotate = self.dtype.is_float if rotate is None else rotate

    def get_config(self) -> Config:
        return {"id": self.codec_id, "dtype": self.dtype.name, "rotate": self.rotate}

    def encoded_size(self, decoded: Expected) -> Expected:
        w = self.width
        lo, hi = -(-decoded.lo // w) * w, decoded.hi // w * w
        if lo > hi:
            raise CorruptArchiveError(f"planes: a chunk of {decoded.lo} bytes is not whole {self.dtype.name} elements")
        return Expected(lo, hi, w)

    def encode(self, data: U8, ref: U8 | None = None) -> U8:
        from ..kernels import planes_rans as k

        n, rest = divmod(data.shape[0], self.width)
        if rest:
            raise CodecError(f"planes: a chunk of {data.shape[0]} bytes is not whole {self.dtype.name} elements")
        planes = np.empty((self.width, n), dtype=np.uint8)
        k.split(data, n, self.width, self.rotate, planes)  # sized here: cannot fail
        return planes

    def decode(self, data: U8, out: U8 | None = None, ref: U8 | None = None, *,
               expected: Expected | None = None) -> U8:
        from ..kernels import planes_rans as k

        want = expected_of(out, expected)
        if data.ndim != 2 or data.shape[0] != self.width:
            raise CorruptArchiveError(f"planes: {data.shape[0]} byte planes for {self.width}-byte "
                                      f"{self.dtype.name} elements")
        n = data.shape[1]
        want.check(n * self.width, "planes chunk")
        if out is None:
            out = np.empty(n * self.width, dtype=np.uint8)
        if k.merge(data, n, self.width, self.rotate, out):
            raise CorruptArchiveError(f"planes: {n} elements do not fit a {out.shape[0]}-byte chunk")
        return out
