"""numba kernels for the precision casts of ``elves/casts.py`` (docs/FORMAT.md, "Reference casts").

One pass over the elements, each converted on its bit pattern. numpy's F32 -> F16 conversion
takes 2.6 ns an element on a Zen 4 core (0.6 here), its F16 -> F32 1.7 ns (0.6), and a BF16
rounding written in numpy five passes with temporaries (0.9 ns, 0.2 here); every reference cast
is computed again at restore, chunk by chunk.

The conversions are numpy's (``npy_floatbits_to_halfbits`` and its inverse), bit for bit on all
2**32 F32 patterns and all 2**16 F16 ones, so that archives written before these kernels keep
their bytes, and fixed here, not by how numpy was built.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ..jit import kernel

U16 = NDArray[np.uint16]
U32 = NDArray[np.uint32]

# Element kinds, as the kernels take them.
F16, BF16, F32 = 0, 1, 2

_U = np.uint32


@kernel("(uint32,)", internal=True)
def _f32_to_f16(f: np.uint32) -> np.uint32:
    """numpy's F32 -> F16 bits: round to nearest even, overflow to infinity, NaN keeps the top ten
    bits of its payload (0x7c01 when they are all zero), signed zeros and infinities stay."""
    sgn = (f >> _U(16)) & _U(0x8000)
    fe = f & _U(0x7F800000)
    fs = f & _U(0x007FFFFF)
    if fe >= _U(0x47800000):  # too large, infinite or NaN
        if fe == _U(0x7F800000) and fs != _U(0):
            nan = _U(0x7C00) + (fs >> _U(13))
            return sgn | (nan + _U(nan == _U(0x7C00)))
        return sgn | _U(0x7C00)
    if fe <= _U(0x38000000):
        # subnormal or zero: |f| * 2**24 is exact in F32, and rint rounds it to nearest even as
        # the F16 significand (at most 2**-25 rounds to zero)
        magnitude = np.uint32(f & _U(0x7FFFFFFF)).view(np.float32)
        return sgn | _U(np.rint(magnitude * np.float32(2.0 ** 24)))
    # normal: the exponent rebased, the significand rounded (a carry moves into the exponent,
    # up to infinity)
    rounded = fs + (_U(0x1000) if (fs & _U(0x3FFF)) != _U(0x1000) else _U(0))
    return sgn | (((fe - _U(0x38000000)) >> _U(13)) + (rounded >> _U(13)))


@kernel("(uint32,)", internal=True)
def _f16_to_f32(h: np.uint32) -> np.uint32:
    """numpy's F16 -> F32 bits, exact: a subnormal F16 is its significand times 2**-24, which F32
    holds exactly; a NaN's payload moves to the top of the F32 one."""
    sgn = (h & _U(0x8000)) << _U(16)
    he = h & _U(0x7C00)
    hs = h & _U(0x03FF)
    tiny = np.float32(np.float32(hs) * np.float32(2.0 ** -24)).view(np.uint32)
    w = tiny if he == _U(0) else (
        _U(0x7F800000) | (hs << _U(13)) if he == _U(0x7C00) else ((h & _U(0x7FFF)) + _U(0x1C000)) << _U(13))
    return sgn | w


@kernel("(uint32,)", internal=True)
def _f32_to_bf16(f: np.uint32) -> np.uint32:
    """F32 -> BF16 bits, round to nearest even; a NaN keeps its top half with the quiet bit set."""
    nan = (f & _U(0x7FFFFFFF)) > _U(0x7F800000)
    return ((f >> _U(16)) | _U(0x40)) if nan else (f + _U(0x7FFF) + ((f >> _U(16)) & _U(1))) >> _U(16)


@kernel("(ro(uint16[::1]), int64, uint32[::1])", "(ro(uint32[::1]), int64, uint32[::1])")
def to_f32(src: U16 | U32, kind: int, out: U32) -> None:
    """``out[i]`` = the F32 bits of element ``i`` of ``src`` (``kind`` F16, BF16 or F32), exact."""
    n = min(src.shape[0], out.shape[0])
    if kind == F16:
        for i in range(n):
            out[i] = _f16_to_f32(_U(src[i]))
    elif kind == BF16:
        for i in range(n):
            out[i] = _U(src[i]) << _U(16)
    else:
        for i in range(n):
            out[i] = _U(src[i])


@kernel("(ro(uint32[::1]), int64, boolean, uint16[::1])")
def from_f32(words: U32, kind: int, trunc: bool, out: U16) -> None:
    """``out[i]`` = F32 bits ``words[i]`` as ``kind`` (F16 or BF16): rounded to nearest even, or
    (BF16 only) truncated to the top half."""
    n = min(words.shape[0], out.shape[0])
    if kind == F16:
        for i in range(n):
            out[i] = np.uint16(_f32_to_f16(words[i]))
    elif trunc:
        for i in range(n):
            out[i] = np.uint16(words[i] >> _U(16))
    else:
        for i in range(n):
            out[i] = np.uint16(_f32_to_bf16(words[i]))
