"""``planes``: split each element into byte planes, exponent first.

Floats are rotated left by one bit first, so that the sign drops to bit 0 and the exponent
fills the top byte: plane 0 then holds the exponent, which carries about 2.6 bits of its 8 and
is what the entropy coder compresses; the mantissa planes are close to random.
"""
from __future__ import annotations

import numpy as np

from .. import dtypes
from ..errors import CodecError, CorruptArchiveError
from .base import U8, ArrayPlanesCodec, Codec, Config, DecodesThrough, Expected, as_u8, expected_of
from .rans import STATUS, Rans


class Planes(ArrayPlanesCodec, DecodesThrough):
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

    def decodes_through(self, inner: Codec) -> bool:
        return isinstance(inner, Rans)

    def decode_through(self, inner: Codec, data: U8 | bytes, out: U8 | None, expected: Expected) -> U8:
        """Decode a ``rans`` payload straight into elements, with one kernel call: the checks and
        errors of ``rans`` then ``planes``, without the plane buffer between them."""
        from ..kernels import planes_rans as k

        buf = as_u8(data)
        if out is not None:  # the common case, checked by the kernel: a container of out's shape
            status = k.decode_words(buf, self.width, out.shape[0] // self.width, self.rotate, out)
            if status == k.OK:
                return out
            if status != k.ERR_SIZE and status != k.ERR_HEADER:
                raise CorruptArchiveError(STATUS.get(status, f"decode failed ({status})"))
        # Say what in the header is wrong, as rans would.
        w, n = k.container_shape(buf)
        if w < 1:
            raise CorruptArchiveError(STATUS[k.ERR_HEADER])
        if w != self.width:
            raise CorruptArchiveError(f"rans container holds {w} byte planes, expected {self.width}")
        self.encoded_size(expected).check(w * n, "rans container")  # before anything is allocated
        if out is None:
            out = np.empty(n * w, dtype=np.uint8)
        status = k.decode_words(buf, w, n, self.rotate, out)
        if status:
            raise CorruptArchiveError(STATUS.get(status, f"decode failed ({status})"))
        return out
