"""numba CPU kernels for the ``elf`` codec (error-bounded quantisation, docs/FORMAT.md).

Every kernel works on a whole chunk in one compiled call and releases the GIL. The decoder's
arithmetic (:func:`dequant_uniform`, :func:`dequant_binade`) is the reference for a CUDA port:
integer code -> float64 value with round-to-nearest-even operations only (no fused
multiply-add), then float64 -> the tensor's dtype with one round-to-nearest-even step
(:func:`_round_bits`; ``__double2float_rn``, ``__double2half_rn``, ``__double2bfloat16`` on a GPU).

The encoder quantises with the decoder's own functions and checks every element against the
bound *exactly* (not merely in float64: see :func:`_le_exact`); an element that fails, even by a
rounding hair, is tried on the neighbouring grid point and otherwise kept as an exception.

Numba does not check indices, so each kernel that a decoder calls gets its buffers whole and
checks once, before its loop, that they hold ``n`` elements: False (or -1 for a count) when they
do not, which the codec reports as a corrupt chunk; nothing is written past a buffer.

Words here are the tensor's elements as unsigned integers of their width (uint16/32/64);
``ebits``/``mbits`` are the exponent and mantissa widths of the float format (F16 5/10, BF16
8/7, F32 8/23, F64 11/52).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray

from ..jit import kernel

# Array types the kernels take (numba compiles from the arguments' types; these are for mypy).
# ``Words``: a tensor's elements as unsigned integers of its width (uint16, uint32 or uint64).
Words = NDArray[np.unsignedinteger[Any]]
U8 = NDArray[np.uint8]
U64 = NDArray[np.uint64]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

KIND_EXACT = 0
KIND_UNIFORM = 1
KIND_BINADE = 2

MODE_ABS = 0
MODE_REL = 1

_M52 = np.uint64((1 << 52) - 1)
_EXP_ONE = np.uint64(1023 << 52)
_U1 = np.uint64(1)
_U0 = np.uint64(0)


# ---------------------------------------------------------------------------------------------
# float64 <-> narrow float formats, on bit patterns (magnitudes: sign handled by the caller)
# ---------------------------------------------------------------------------------------------

@kernel(inline="always")
def _round_bits(b: np.uint64, ebits: int, mbits: int) -> np.uint64:
    """Magnitude bits of the ``(ebits, mbits)`` float nearest to the non-negative finite float64
    whose bits are ``b`` (round to nearest, ties to even; too large -> infinity)."""
    if ebits == 11:
        return b
    if b == _U0:
        return _U0
    e64 = np.int64(b >> np.uint64(52))
    if e64 == 0:  # a float64 subnormal: far below half the smallest subnormal of any narrower format
        return _U0
    sig = (b & _M52) | (_U1 << np.uint64(52))
    bias = (1 << (ebits - 1)) - 1
    maxexp = (1 << ebits) - 1
    ef = e64 - 1023 + bias
    if ef >= 1:
        sh = 52 - mbits
        mag = (np.uint64(ef) << np.uint64(mbits)) | ((sig >> np.uint64(sh)) & np.uint64((1 << mbits) - 1))
    else:
        sh = 52 - mbits + 1 - ef
        if sh >= 64:
            return _U0
        mag = sig >> np.uint64(sh)
    rem = sig & ((_U1 << np.uint64(sh)) - _U1)
    half = _U1 << np.uint64(sh - 1)
    # Round half to even, without a branch (the direction is a coin flip on real data); a carry
    # out of the mantissa steps the exponent up, as it should.
    mag += np.uint64((rem > half) | ((rem == half) & ((mag & _U1) == _U1)))
    inf = np.uint64(maxexp) << np.uint64(mbits)
    return min(mag, inf)


@kernel(inline="always")
def _mag_to_f64bits(mag: np.uint64, ebits: int, mbits: int) -> np.uint64:
    """float64 bits of the ``(ebits, mbits)`` magnitude ``mag`` (exact; inf/NaN map to inf/NaN)."""
    if ebits == 11:
        return mag
    bias = (1 << (ebits - 1)) - 1
    maxexp = (1 << ebits) - 1
    ef = np.int64(mag >> np.uint64(mbits))
    mant = mag & np.uint64((1 << mbits) - 1)
    if ef == maxexp:
        return np.uint64(0x7FF << 52) | (mant << np.uint64(52 - mbits))
    if ef == 0:
        if mant == _U0:
            return _U0
        p = 0  # position of the highest set bit
        while (mant >> np.uint64(p + 1)) != _U0:
            p += 1
        e = p + 1 - bias - mbits
        frac = (mant - (_U1 << np.uint64(p))) << np.uint64(52 - p)
        return (np.uint64(e + 1023) << np.uint64(52)) | frac
    return (np.uint64(ef - bias + 1023) << np.uint64(52)) | (mant << np.uint64(52 - mbits))


@kernel(inline="always")
def _round_value(v: float, ebits: int, mbits: int, tb: U64, tf: F64) -> float:
    """``v`` (non-negative float64) rounded to the dtype, as a float64 (exact)."""
    if ebits == 11:
        return v
    if ebits == 8 and mbits == 23:
        return np.float64(np.float32(v))  # the hardware's conversion is round-to-nearest-even
    tf[0] = v
    tb[0] = _mag_to_f64bits(_round_bits(tb[0], ebits, mbits), ebits, mbits)
    return tf[0]


@kernel(inline="always")
def _pow2(k: int) -> float:
    """2.0 ** k for an integer k (exact; 0 or inf beyond float64's range)."""
    return math.ldexp(1.0, k)


@kernel(inline="always")
def _to_f64(words: Words, w: int, ebits: int, mbits: int, out: F64) -> bool:
    """The values of ``words`` (elements as unsigned ints) as float64, exactly, into ``out``."""
    if out.shape[0] < words.shape[0]:
        return False
    ob = out.view(np.uint64)
    sh = np.uint64(8 * w - 1)
    mask = (_U1 << sh) - _U1
    for i in range(words.shape[0]):
        v = np.uint64(words[i])
        ob[i] = _mag_to_f64bits(v & mask, ebits, mbits) | ((v >> sh) << np.uint64(63))
    return True


# ---------------------------------------------------------------------------------------------
# the bound, checked exactly
# ---------------------------------------------------------------------------------------------

@kernel(inline="always")
def _le_exact(y: float, x: float, lim: float) -> bool:
    """True only if the exact |y - x| <= lim (finite float64s; ``lim`` taken as exact).

    ``d = y - x`` is rounded; TwoSum gives its error ``t``. |d| < lim implies the exact
    difference is <= lim; at |d| == lim it is iff ``t`` is zero or points towards zero.
    """
    d = y - x
    ad = abs(d)
    if ad < lim:
        return True
    if ad > lim or ad != ad:  # NaN: never within
        return False
    bp = d - y
    ap = d - bp
    t = (y - ap) + (-x - bp)
    return t == 0.0 or (t > 0.0) != (d > 0.0)


@kernel(inline="always")
def _within(y: float, x: float, mode: int, bound: float, rel_exact: bool) -> bool:
    """The guarantee for one element: |y - x| <= bound (absolute) or <= bound*|x| (relative),
    in exact arithmetic. ``rel_exact``: bound is a power of two, so bound*|x| is exact when normal."""
    if mode == MODE_ABS:
        return _le_exact(y, x, bound)
    lim = bound * abs(x)
    if not (rel_exact and lim >= 2.2250738585072014e-308):
        lim = lim * (1.0 - 1e-13)  # below the exact product whatever its rounding
    return _le_exact(y, x, lim)


# ---------------------------------------------------------------------------------------------
# decoding arithmetic (shared by encoder and decoder)
# ---------------------------------------------------------------------------------------------

@kernel(inline="always")
def _uniform_mag(a: np.uint64, step: float, M: np.uint64, B: np.uint64, ebits: int, mbits: int, tb: U64,
                 tf: F64) -> np.uint64:
    """Magnitude bits for code magnitude ``a`` of a uniform grid: round(float64(a) * step) below
    ``M``, the dtype's own values from bits ``B`` on."""
    if a >= M:
        return B + (a - M)
    tf[0] = np.float64(np.int64(a)) * step
    return _round_bits(tb[0], ebits, mbits)


@kernel(inline="always")
def _binade_value(a: np.uint64, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64) -> float:
    """float64 value of binade-grid code magnitude ``a >= 1``: binade b, sub-binade i, level j;
    ((S + i) * L[i] + j) / (S * L[i]) * 2^(e0 + b)."""
    t = a - _U1
    b = t // lsum
    r = t - b * lsum
    lo = 0
    hi = S - 1
    while lo < hi:  # the last i with cum[i] <= r
        mid = (lo + hi + 1) >> 1
        if np.uint64(cum[mid]) <= r:
            lo = mid
        else:
            hi = mid - 1
    li = np.uint64(L[lo])
    j = r - np.uint64(cum[lo])
    num = np.float64((np.uint64(S) + np.uint64(lo)) * li + j)
    den = np.float64(np.uint64(S) * li)
    return (num / den) * _pow2(e0 + np.int64(b))


@kernel("(ro(uint16[::1]), int64, int64, W[::1])", "(ro(uint32[::1]), int64, int64, W[::1])",
        "(ro(uint64[::1]), int64, int64, W[::1])", words=("uint16", "uint32", "uint64"))
def dequant_exact(codes: U64, n: int, w: int, out: Words) -> bool:
    """Exact kind: the code is the element rotated left by one bit (sign at bit 0)."""
    if n > codes.shape[0] or n > out.shape[0]:
        return False
    sh = np.uint64(8 * w - 1)
    for i in range(n):
        u = np.uint64(codes[i])
        out[i] = (u >> _U1) | ((u & _U1) << sh)
    return True


@kernel(inline="always")
def _dequant_uniform(codes: U64, n: int, w: int, ebits: int, mbits: int, step: float, M: np.uint64,
                     B: np.uint64, out: Words) -> bool:
    """Uniform kind: magnitude ``round(float64(a) * step)`` for ``a < M``, else bits ``B + a - M``;
    the sign is the code's bit 0."""
    if n > codes.shape[0] or n > out.shape[0]:
        return False
    sh = np.uint64(8 * w - 1)
    mask = (_U1 << sh) - _U1
    if ebits == 8 and mbits == 23:
        of = out.view(np.float32)
        for i in range(n):
            u = np.uint64(codes[i])
            a = u >> _U1
            if a < M:
                v = np.float64(np.int64(a)) * step
                of[i] = np.float32(-v if (u & _U1) else v)
            else:
                out[i] = ((B + (a - M)) & mask) | ((u & _U1) << sh)
        return True
    if ebits == 11:
        of = out.view(np.float64)
        for i in range(n):
            u = np.uint64(codes[i])
            a = u >> _U1
            if a < M:
                v = np.float64(np.int64(a)) * step
                of[i] = -v if (u & _U1) else v
            else:
                out[i] = ((B + (a - M)) & mask) | ((u & _U1) << sh)
        return True
    tf = np.empty(1, np.float64)
    tb = tf.view(np.uint64)
    for i in range(n):
        u = np.uint64(codes[i])
        a = u >> _U1
        mag = _uniform_mag(a, step, M, B, ebits, mbits, tb, tf) & mask
        out[i] = mag | ((u & _U1) << sh)
    return True


@kernel("(int64, ro(int64[::1]), ro(int64[::1]), uint64)")
def binade_table(S: int, L: I64, cum: I64, lsum: np.uint64) -> F64:
    """The in-binade values of codes ``t mod lsum``: ((S + i) * L[i] + j) / (S * L[i])."""
    tab = np.empty(lsum, dtype=np.float64)
    for i in range(S):
        den = np.float64(np.uint64(S) * np.uint64(L[i]))
        base = (np.uint64(S) + np.uint64(i)) * np.uint64(L[i])
        for j in range(L[i]):
            tab[cum[i] + j] = np.float64(base + np.uint64(j)) / den
    return tab


@kernel(inline="always")
def _dequant_binade(codes: U64, n: int, w: int, ebits: int, mbits: int, e0: int, S: int, L: I64, cum: I64,
                    lsum: np.uint64, out: Words) -> bool:
    """Binade kind: magnitude 0 for ``a = 0``; else with t = a - 1, b = t div lsum,
    r = t mod lsum = cum[i] + j: round(((S + i) * L[i] + j) / (S * L[i]) * 2^(e0 + b))."""
    if n > codes.shape[0] or n > out.shape[0] or S > L.shape[0] or S > cum.shape[0]:
        return False
    sh = np.uint64(8 * w - 1)
    tf = np.empty(1, np.float64)
    tb = tf.view(np.uint64)
    small = lsum <= np.uint64(1 << 16)
    tab = binade_table(S, L, cum, lsum) if small else np.empty(0, dtype=np.float64)
    nb = 64
    pw = np.empty(nb, dtype=np.float64)
    for b in range(nb):
        pw[b] = _pow2(e0 + b)
    inv = 1.0 / np.float64(lsum)
    of32 = out.view(np.float32) if (ebits == 8 and mbits == 23) else np.empty(0, np.float32)
    lk = 0
    while (1 << lk) < L[0]:
        lk += 1
    if S == 1 and (1 << lk) == L[0] and lk <= mbits:
        # k kept mantissa bits: in the dtype's normal range every grid point is a dtype value,
        # 2^E (1 + j / 2^k), so its bits come straight from (E, j); the same values as below.
        bias = (1 << (ebits - 1)) - 1
        kk = np.uint64(lk)
        jmask = (_U1 << kk) - _U1
        jsh = np.uint64(mbits - lk)
        for i in range(n):
            u = np.uint64(codes[i])
            a = u >> _U1
            s = u & _U1
            if a == _U0:
                out[i] = s << sh
                continue
            t = a - _U1
            E = e0 + np.int64(t >> kk)
            if E >= 1 - bias and E <= bias:
                out[i] = (np.uint64(E + bias) << np.uint64(mbits)) | ((t & jmask) << jsh) | (s << sh)
            else:
                tf[0] = _binade_value(a, e0, S, L, cum, lsum)
                out[i] = _round_bits(tb[0], ebits, mbits) | (s << sh)
        return True
    if small and ebits != 11 and not (ebits == 8 and mbits == 23):
        # F16, BF16: rounding to nearest is scale-invariant in the dtype's normal range, so
        # RNE(q[r] * 2^E) = RNE(q[r]) * 2^E: round each quotient once, then add the exponent.
        # The same bits as the general formula below, which handles the subnormal range.
        bias = (1 << (ebits - 1)) - 1
        inf = np.uint64((1 << ebits) - 1) << np.uint64(mbits)
        tq = tab.view(np.uint64)
        off = np.empty(lsum, dtype=np.uint64)  # RNE(q[r]) minus the bits of 1.0
        for r in range(lsum):
            off[r] = _round_bits(tq[r], ebits, mbits) - (np.uint64(bias) << np.uint64(mbits))
        for i in range(n):
            u = np.uint64(codes[i])
            a = u >> _U1
            s = u & _U1
            if a == _U0:
                out[i] = s << sh
                continue
            t = a - _U1
            b = np.uint64(np.int64(np.float64(np.int64(t)) * inv))
            while b * lsum > t:
                b -= _U1
            while (b + _U1) * lsum <= t:
                b += _U1
            r = t - b * lsum
            e = e0 + np.int64(b) + bias
            if e >= 1:
                out[i] = min((np.uint64(e) << np.uint64(mbits)) + off[r], inf) | (s << sh)
            else:
                tf[0] = tab[r] * _pow2(e0 + np.int64(b))
                out[i] = _round_bits(tb[0], ebits, mbits) | (s << sh)
        return True
    for i in range(n):
        u = np.uint64(codes[i])
        a = u >> _U1
        s = u & _U1
        if a == _U0:
            out[i] = s << sh
            continue
        if not small:
            v = _binade_value(a, e0, S, L, cum, lsum)
        else:
            t = a - _U1
            b = np.uint64(np.int64(np.float64(np.int64(t)) * inv))
            while b * lsum > t:
                b -= _U1
            while (b + _U1) * lsum <= t:
                b += _U1
            r = t - b * lsum
            v = tab[r] * (pw[b] if b < np.uint64(nb) else _pow2(e0 + np.int64(b)))
        if ebits == 8 and mbits == 23:
            of32[i] = np.float32(-v if s else v)
        else:
            tf[0] = v
            out[i] = _round_bits(tb[0], ebits, mbits) | (s << sh)
    return True


@kernel("(W[::1], ro(int64[::1]), ro(W[::1]))", words=("uint16", "uint32", "uint64"))
def scatter(out: Words, pos: I64, vals: Words) -> bool:
    """Put the exceptions' original bits back; False if a position is out of order or range."""
    n = out.shape[0]
    if vals.shape[0] < pos.shape[0]:
        return False
    prev = -1
    for k in range(pos.shape[0]):
        p = np.int64(pos[k])
        if p <= prev or p >= n:
            return False
        out[p] = vals[k]
        prev = p
    return True


# ---------------------------------------------------------------------------------------------
# encoding: one grid candidate -> codes (uint64) and exception flags
# ---------------------------------------------------------------------------------------------

@kernel(inline="always")
def _quant_uniform(words: Words, xs: F64, w: int, ebits: int, mbits: int, step: float, M: np.uint64,
                   B: np.uint64, mode: int, bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    """Codes of the uniform grid; ``exc[i] = 1`` where element i must be an exception. Returns the
    number of exceptions (-1 unless the buffers hold every element)."""
    n = words.shape[0]
    if xs.shape[0] < n or codes.shape[0] < n or exc.shape[0] < n:
        return -1
    sh = np.uint64(8 * w - 1)
    mask = (_U1 << sh) - _U1
    tf = np.empty(1, np.float64)
    tb = tf.view(np.uint64)
    Mf = np.float64(M)
    inv = 1.0 / step
    nexc = 0
    for i in range(n):
        v = np.uint64(words[i])
        s = v >> sh
        mag = v & mask
        if mag >= B:  # exact zone: the element's own bits (NaN and infinity included)
            if mag - B > mask - M:
                exc[i] = 1
                codes[i] = _U0
                nexc += 1
            else:
                exc[i] = 0
                codes[i] = ((M + (mag - B)) << _U1) | s
            continue
        ax = abs(xs[i])
        q = np.rint(ax * inv)  # ties to even, as ELF's |w| + 1 in float32; the check below decides
        ok = False
        a = _U0
        if q < Mf:
            a = np.uint64(np.int64(q))
            y = _round_value(np.float64(np.int64(a)) * step, ebits, mbits, tb, tf)
            ok = _within(y, ax, mode, bound, rel_exact)
            if not ok:  # a rounding hair outside, or a guess one off: try x's other side
                if y > ax and a > _U0:
                    a -= _U1
                    ok = True
                elif y < ax and a + _U1 < M:
                    a += _U1
                    ok = True
                if ok:
                    y = _round_value(np.float64(np.int64(a)) * step, ebits, mbits, tb, tf)
                    ok = _within(y, ax, mode, bound, rel_exact)
        if not ok:
            exc[i] = 1
            codes[i] = _U0
            nexc += 1
            continue
        if a == _U0 and mag != _U0:
            s = _U0  # a small negative value comes back as +0.0 (within the bound); -0.0 stays -0.0
        exc[i] = 0
        codes[i] = (a << _U1) | s
    return nexc


@kernel("(ro(float64[::1]),)")
def exponent_range(xs: F64) -> tuple[int, int]:
    """(min, max) float64 exponent of the nonzero finite normal-in-float64 values; (1, 0) if none."""
    lo = 1 << 20
    hi = -(1 << 20)
    b = xs.view(np.uint64)
    for i in range(xs.shape[0]):
        e = np.int64((b[i] >> np.uint64(52)) & np.uint64(0x7FF))
        if e == 0 or e == 0x7FF:
            continue
        e -= 1023
        if e < lo:
            lo = e
        if e > hi:
            hi = e
    if hi < lo:
        return 1, 0
    return lo, hi


@kernel(inline="always")
def _quant_binade(words: Words, xs: F64, w: int, ebits: int, mbits: int, e0: int, S: int, L: I64, cum: I64,
                  lsum: np.uint64, mode: int, bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    """Codes of the binade grid (see :func:`dequant_binade`); returns the number of exceptions
    (-1 unless the buffers hold every element and the grid its S sub-binades)."""
    n = words.shape[0]
    if xs.shape[0] < n or codes.shape[0] < n or exc.shape[0] < n or S > L.shape[0] or S > cum.shape[0]:
        return -1
    sh = np.uint64(8 * w - 1)
    mask = (_U1 << sh) - _U1
    tf = np.empty(1, np.float64)
    tb = tf.view(np.uint64)
    xb = xs.view(np.uint64)
    small = lsum <= np.uint64(1 << 16)
    tab = binade_table(S, L, cum, lsum) if small else np.empty(0, dtype=np.float64)
    narrow = small and ebits != 11 and not (ebits == 8 and mbits == 23)
    bias = (1 << (ebits - 1)) - 1
    tabr = np.empty(lsum + 1 if narrow else 0, dtype=np.float64)  # RNE(q[r]), exactly, as float64
    if narrow:
        for r in range(lsum + 1):
            tf[0] = tab[r] if r < lsum else 2.0
            tb[0] = _mag_to_f64bits(_round_bits(tb[0], ebits, mbits), ebits, mbits)
            tabr[r] = tf[0]
    # 2^E and 2^-E for every exponent from e0 up (a libm ldexp per element is most of the time)
    npw = max(1024 - e0 + 1, 1)
    pw = np.empty(npw, dtype=np.float64)
    pwi = np.empty(npw, dtype=np.float64)
    for e in range(npw):
        pw[e] = _pow2(e0 + e)
        pwi[e] = _pow2(-(e0 + e))
    nexc = 0
    for i in range(n):
        v = np.uint64(words[i])
        s = v >> sh
        mag = v & mask
        if mag == _U0:  # +-0.0: code magnitude 0, sign kept
            exc[i] = 0
            codes[i] = s
            continue
        bx = xb[i] & ~(_U1 << np.uint64(63))
        e64 = np.int64(bx >> np.uint64(52))
        E = e64 - 1023
        ok = False
        a = _U0
        if e64 != 0 and e64 != 0x7FF and E >= e0:
            ax = abs(xs[i])
            f = (ax * pwi[E - e0] - 1.0) * S  # exact: powers of two
            ii = np.int64(f)
            if ii > S - 1:
                ii = S - 1
            j = np.uint64(np.int64(math.floor((f - ii) * L[ii] + 0.5)))
            r = np.uint64(cum[ii]) + j
            t = np.uint64(E - e0) * lsum + r
            if t < mask:
                a = t + _U1
                p2 = pw[E - e0]
                if narrow and E + bias >= 1 and E < bias:  # scale-invariant rounding, as the decoder
                    y = tabr[r] * p2
                elif small and r < lsum:
                    y = _round_value(tab[r] * p2, ebits, mbits, tb, tf)
                elif small:  # j rounded up into the next binade
                    y = _round_value(2.0 * p2, ebits, mbits, tb, tf)
                else:
                    y = _round_value(_binade_value(a, e0, S, L, cum, lsum), ebits, mbits, tb, tf)
                ok = _within(y, ax, mode, bound, rel_exact)
                if not ok:
                    if y > ax and a > _U1:
                        a -= _U1
                        ok = True
                    elif y < ax and a < mask:
                        a += _U1
                        ok = True
                    if ok:
                        y = _round_value(_binade_value(a, e0, S, L, cum, lsum), ebits, mbits, tb, tf)
                        ok = _within(y, ax, mode, bound, rel_exact)
        if not ok:
            exc[i] = 1
            codes[i] = _U0
            nexc += 1
            continue
        exc[i] = 0
        codes[i] = (a << _U1) | s
    return nexc


@kernel("(ro(W[::1]), int64, uint64[::1])", words=("uint16", "uint32", "uint64"))
def quant_exact(words: Words, w: int, codes: U64) -> bool:
    """The exact kind's codes (see :func:`dequant_exact`); False unless ``codes`` holds them."""
    if codes.shape[0] < words.shape[0]:
        return False
    sh = np.uint64(8 * w - 1)
    for i in range(words.shape[0]):
        v = np.uint64(words[i])
        codes[i] = (v << _U1) | (v >> sh)
        if w < 8:
            codes[i] &= (_U1 << np.uint64(8 * w)) - _U1
    return True


# ---------------------------------------------------------------------------------------------
# choosing: byte-plane histograms and the rans coder's size, estimated
# ---------------------------------------------------------------------------------------------

@kernel("(ro(uint64[::1]), int64, int64[:, ::1])")
def plane_hist(codes: U64, w: int, hist: I64) -> None:
    """hist[p, s]: how often byte plane p (0 = most significant) holds s (``codes``: uint64).

    Four interleaved counters per plane: a plane of one symbol would otherwise make every
    increment wait for the previous one.
    """
    by = codes.view(np.uint8)  # little-endian: byte b of code i is by[8 i + b]
    n = codes.shape[0]
    sub = np.zeros((4, 256), dtype=np.int64)
    for p in range(w):
        sub[:, :] = 0
        off = w - 1 - p
        n4 = n - n % 4
        for i in range(0, n4, 4):
            sub[0, by[8 * i + off]] += 1
            sub[1, by[8 * i + 8 + off]] += 1
            sub[2, by[8 * i + 16 + off]] += 1
            sub[3, by[8 * i + 24 + off]] += 1
        for i in range(n4, n):
            sub[0, by[8 * i + off]] += 1
        for c in range(256):
            hist[p, c] = sub[0, c] + sub[1, c] + sub[2, c] + sub[3, c]


@kernel("(ro(int64[::1]), int64, int64)", "(ro(float64[::1]), int64, int64)")
def est_plane(h: I64, n: int, lanes: int) -> float:
    """Bytes the ``rans`` codec will spend on a plane with histogram ``h`` (a close estimate)."""
    k = 0
    bits = 0.0
    for s in range(256):
        c = h[s]
        if c > 0:
            k += 1
            bits += c * math.log2(n / c)
    if k <= 1:
        return 2.0
    header = 4 + k + (k & 1) + 2 * k
    header += (-header) & 3
    est = header + 8 * min(lanes, n) + bits / 8.0 * 1.003 + 4
    raw = n + 1.0
    return min(est, raw)


@kernel("(ro(int64[:, ::1]), int64, int64, int64)", "(ro(float64[:, ::1]), int64, int64, int64)")
def est_size(hist: I64, n: int, w: int, lanes: int) -> float:
    total = 8.0 + 4 * w
    for p in range(w):
        total += est_plane(hist[p], n, lanes)
    return total


@kernel("(ro(uint64[::1]), int64)")
def probe_distinct(codes: U64, stride: int) -> tuple[int, int, np.uint64, np.uint64]:
    """(probed, distinct, smallest, largest) over every ``stride``-th code (uint64), counted
    with an open-addressing hash set: a sort (np.unique) would cost more than the answer saves."""
    m = (codes.shape[0] + stride - 1) // stride
    size = 1
    while size < 2 * m:
        size <<= 1
    table = np.zeros(size, dtype=np.uint64)
    used = np.zeros(size, dtype=np.bool_)
    distinct = 0
    lo = codes[0]
    hi = codes[0]
    for i in range(0, codes.shape[0], stride):
        c = np.uint64(codes[i])
        lo = min(lo, c)
        hi = max(hi, c)
        h = np.int64(((c * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & np.uint64(size - 1))
        while used[h] and table[h] != c:
            h = (h + 1) & (size - 1)
        if not used[h]:
            used[h] = True
            table[h] = c
            distinct += 1
    return m, distinct, lo, hi


@kernel("(uint64[::1], uint8[::1], int64, int64, float64)")
def demote_top(codes: U64, exc: U8, w: int, lanes: int, exc_cost: float) -> int:
    """Turn elements whose code uses the top byte into exceptions when that is cheaper.

    A top plane that is all zeros costs 2 bytes; a few elements with a nonzero top byte (values
    far above the rest) cost a whole frequency table and lane set. Updates ``codes`` and
    ``exc``; returns how many elements were demoted.
    """
    n = codes.shape[0]
    top = np.uint64(8 * (w - 1))
    big = 0
    for i in range(n):
        if (np.uint64(codes[i]) >> top) != _U0:
            big += 1
    if big == 0 or big * exc_cost >= n + 1:  # dearer than even a raw top plane
        return 0
    hist = np.zeros((w, 256), dtype=np.int64)
    plane_hist(codes, w, hist)
    alt = hist.copy()
    for i in range(n):
        u = np.uint64(codes[i])
        if (u >> top) != _U0:
            for p in range(w):
                alt[p, np.int64((u >> np.uint64(8 * (w - 1 - p))) & np.uint64(0xFF))] -= 1
                alt[p, 0] += 1
    before = est_size(hist, n, w, lanes)
    after = est_size(alt, n, w, lanes) + big * exc_cost
    if after >= before:
        return 0
    for i in range(n):
        u = np.uint64(codes[i])
        if (u >> top) != _U0:
            codes[i] = _U0
            exc[i] = 1
    return big


# ---------------------------------------------------------------------------------------------
# codes against a reference chunk's codes (``elf`` with ``delta``)
# ---------------------------------------------------------------------------------------------
# A code is (magnitude << 1) | sign, i.e. the zigzag form of the signed integer t = +a or -a - 1;
# a fine-tune's t minus its base's t is small where the weights are close, and zigzag puts small
# differences of either sign in the low bits. The arithmetic is modulo 2^(8w), so every code
# pair maps to a w-byte delta and back, whatever the codes hold (exact-zone bits included).

@kernel(inline="always")
def _signed(v: np.int64, w: int) -> np.int64:
    """The 8w-bit two's complement value of ``v`` (an int64 holding 64 bits), sign-extended."""
    if w == 8:
        return v
    bits = 8 * w
    v = v & ((np.int64(1) << bits) - 1)
    sb = np.int64(1) << (bits - 1)
    return (v ^ sb) - sb


@kernel(inline="always")
def _unzig(c: np.int64) -> np.int64:
    return ((c >> np.int64(1)) & np.int64(0x7FFFFFFFFFFFFFFF)) ^ -(c & np.int64(1))  # a logical shift


@kernel(inline="always")
def _zig(t: np.int64, w: int) -> np.int64:
    z = (t << np.int64(1)) ^ (t >> np.int64(63))
    return z if w == 8 else z & ((np.int64(1) << (8 * w)) - 1)


@kernel("(ro(W[::1]), ro(float64[::1]), int64, float64, uint64, uint64, uint64[::1])", words=("uint16", "uint32", "uint64"))
def nearest_uniform(words: Words, xs: F64, w: int, step: float, M: np.uint64, B: np.uint64, codes: U64) -> bool:
    """A reference chunk's codes on a uniform grid: the nearest grid code of each element, with
    no bound check (the reference only has to be quantised the same way on both sides, and its
    values, restored from the grid, are mostly on it). ``xs`` holds the elements as float64."""
    n = words.shape[0]
    if xs.shape[0] < n or codes.shape[0] < n:
        return False
    sh = np.uint64(8 * w - 1)
    mask = (_U1 << sh) - _U1
    inv = 1.0 / step
    for i in range(n):
        v = np.uint64(words[i])
        s = v >> sh
        mag = v & mask
        if mag >= B:
            codes[i] = _U0 if mag - B > mask - M else ((M + (mag - B)) << _U1) | s
            continue
        q = min(np.rint(abs(xs[i]) * inv), np.float64(M - _U1))
        a = np.uint64(np.int64(q))
        codes[i] = (a << _U1) | (s if a != _U0 or mag == _U0 else _U0)
    return True


@kernel("(uint64[::1], ro(uint64[::1]), int64)")
def delta_codes(codes: U64, ref: U64, w: int) -> None:
    """``codes[i] <- zig(unzig(codes[i]) - unzig(ref[i]))`` in 8w-bit arithmetic, in place."""
    for i in range(codes.shape[0]):
        c = np.int64(codes[i])
        r = np.int64(ref[i])
        codes[i] = np.uint64(_zig(_signed(_unzig(c) - _unzig(r), w), w))


@kernel("(ro(W[::1]), ro(uint64[::1]), int64, W[::1])", words=("uint16", "uint32", "uint64"))
def undelta_codes(deltas: U64, ref: U64, w: int, out: U64) -> bool:
    """The inverse of :func:`delta_codes`: ``out[i]`` (a code) from ``deltas[i]`` and ``ref[i]``."""
    if ref.shape[0] < deltas.shape[0] or out.shape[0] < deltas.shape[0]:
        return False
    for i in range(deltas.shape[0]):
        d = np.int64(deltas[i])
        r = np.int64(ref[i])
        out[i] = np.uint64(_zig(_signed(_unzig(r) + _unzig(d), w), w))
    return True


# ---------------------------------------------------------------------------------------------
# checking a decoded chunk against its source (encoder safety net, ``verify --against``)
# ---------------------------------------------------------------------------------------------

@kernel(inline="always")
def _error_stats(src: Words, dec: Words, w: int, ebits: int, mbits: int, mode: int, bound: float,
                 rel_exact: bool) -> tuple[float, float, int]:
    """(max absolute error, max relative error, elements over the bound) of ``dec`` against
    ``src`` (unsigned words). NaN, infinities and +-0.0 must match bit for bit; relative errors
    are over nonzero finite elements."""
    sh = np.uint64(8 * w - 1)
    mask = (_U1 << sh) - _U1
    inf = np.uint64((1 << ebits) - 1) << np.uint64(mbits)
    tf = np.empty(1, np.float64)
    tb = tf.view(np.uint64)
    max_abs = 0.0
    max_rel = 0.0
    bad = 0
    for i in range(src.shape[0]):
        a = np.uint64(src[i])
        b = np.uint64(dec[i])
        if a == b:
            continue
        ma = a & mask
        mb = b & mask
        if ma >= inf or ma == _U0 or mb >= inf:
            bad += 1
            max_abs = np.inf
            max_rel = np.inf
            continue
        tb[0] = _mag_to_f64bits(ma, ebits, mbits) | ((a >> sh) << np.uint64(63))
        x = tf[0]
        tb[0] = _mag_to_f64bits(mb, ebits, mbits) | ((b >> sh) << np.uint64(63))
        y = tf[0]
        d = abs(y - x)
        r = d / abs(x)
        if d > max_abs:
            max_abs = d
        if r > max_rel:
            max_rel = r
        if not _within(y, x, mode, bound, rel_exact):
            bad += 1
    return max_abs, max_rel, bad


# ---------------------------------------------------------------------------------------------
# entry points, one per dtype: each compiles its loop with the format's widths as constants
# (passed at run time they cost a factor of ten, the generic rounding path staying in the loop),
# and only for the word type it meets. ``kernels(dtype)`` hands out a dtype's set.
# ---------------------------------------------------------------------------------------------

@kernel("(ro(uint16[::1]), int64, float64[::1])")
def to_f64_f16(words: Words, w: int, out: F64) -> bool:
    return _to_f64(words, w, 5, 10, out)

@kernel("(ro(uint16[::1]), int64, float64[::1])")
def to_f64_bf16(words: Words, w: int, out: F64) -> bool:
    return _to_f64(words, w, 8, 7, out)

@kernel("(ro(uint32[::1]), int64, float64[::1])")
def to_f64_f32(words: Words, w: int, out: F64) -> bool:
    return _to_f64(words, w, 8, 23, out)

@kernel("(ro(uint64[::1]), int64, float64[::1])")
def to_f64_f64(words: Words, w: int, out: F64) -> bool:
    return _to_f64(words, w, 11, 52, out)

@kernel("(ro(W[::1]), int64, int64, float64, uint64, uint64, uint16[::1])", words=("uint16", "uint32", "uint64"))
def dequant_uniform_f16(codes: U64, n: int, w: int, step: float, M: np.uint64, B: np.uint64, out: Words) -> bool:
    return _dequant_uniform(codes, n, w, 5, 10, step, M, B, out)

@kernel("(ro(W[::1]), int64, int64, float64, uint64, uint64, uint16[::1])", words=("uint16", "uint32", "uint64"))
def dequant_uniform_bf16(codes: U64, n: int, w: int, step: float, M: np.uint64, B: np.uint64, out: Words) -> bool:
    return _dequant_uniform(codes, n, w, 8, 7, step, M, B, out)

@kernel("(ro(W[::1]), int64, int64, float64, uint64, uint64, uint32[::1])", words=("uint16", "uint32", "uint64"))
def dequant_uniform_f32(codes: U64, n: int, w: int, step: float, M: np.uint64, B: np.uint64, out: Words) -> bool:
    return _dequant_uniform(codes, n, w, 8, 23, step, M, B, out)

@kernel("(ro(W[::1]), int64, int64, float64, uint64, uint64, uint64[::1])", words=("uint16", "uint32", "uint64"))
def dequant_uniform_f64(codes: U64, n: int, w: int, step: float, M: np.uint64, B: np.uint64, out: Words) -> bool:
    return _dequant_uniform(codes, n, w, 11, 52, step, M, B, out)

@kernel("(ro(W[::1]), int64, int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, uint16[::1])",
        words=("uint16", "uint32", "uint64"))
def dequant_binade_f16(codes: U64, n: int, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                       out: Words) -> bool:
    return _dequant_binade(codes, n, w, 5, 10, e0, S, L, cum, lsum, out)

@kernel("(ro(W[::1]), int64, int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, uint16[::1])",
        words=("uint16", "uint32", "uint64"))
def dequant_binade_bf16(codes: U64, n: int, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                        out: Words) -> bool:
    return _dequant_binade(codes, n, w, 8, 7, e0, S, L, cum, lsum, out)

@kernel("(ro(W[::1]), int64, int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, uint32[::1])",
        words=("uint16", "uint32", "uint64"))
def dequant_binade_f32(codes: U64, n: int, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                       out: Words) -> bool:
    return _dequant_binade(codes, n, w, 8, 23, e0, S, L, cum, lsum, out)

@kernel("(ro(W[::1]), int64, int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, uint64[::1])",
        words=("uint16", "uint32", "uint64"))
def dequant_binade_f64(codes: U64, n: int, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                       out: Words) -> bool:
    return _dequant_binade(codes, n, w, 11, 52, e0, S, L, cum, lsum, out)

@kernel("(ro(uint16[::1]), ro(float64[::1]), int64, float64, uint64, uint64, int64, float64, boolean, uint64[::1], "
        "uint8[::1])")
def quant_uniform_f16(words: Words, xs: F64, w: int, step: float, M: np.uint64, B: np.uint64, mode: int,
                      bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_uniform(words, xs, w, 5, 10, step, M, B, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint16[::1]), ro(float64[::1]), int64, float64, uint64, uint64, int64, float64, boolean, uint64[::1], "
        "uint8[::1])")
def quant_uniform_bf16(words: Words, xs: F64, w: int, step: float, M: np.uint64, B: np.uint64, mode: int,
                       bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_uniform(words, xs, w, 8, 7, step, M, B, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint32[::1]), ro(float64[::1]), int64, float64, uint64, uint64, int64, float64, boolean, uint64[::1], "
        "uint8[::1])")
def quant_uniform_f32(words: Words, xs: F64, w: int, step: float, M: np.uint64, B: np.uint64, mode: int,
                      bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_uniform(words, xs, w, 8, 23, step, M, B, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint64[::1]), ro(float64[::1]), int64, float64, uint64, uint64, int64, float64, boolean, uint64[::1], "
        "uint8[::1])")
def quant_uniform_f64(words: Words, xs: F64, w: int, step: float, M: np.uint64, B: np.uint64, mode: int,
                      bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_uniform(words, xs, w, 11, 52, step, M, B, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint16[::1]), ro(float64[::1]), int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, int64, "
        "float64, boolean, uint64[::1], uint8[::1])")
def quant_binade_f16(words: Words, xs: F64, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                     mode: int, bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_binade(words, xs, w, 5, 10, e0, S, L, cum, lsum, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint16[::1]), ro(float64[::1]), int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, int64, "
        "float64, boolean, uint64[::1], uint8[::1])")
def quant_binade_bf16(words: Words, xs: F64, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                      mode: int, bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_binade(words, xs, w, 8, 7, e0, S, L, cum, lsum, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint32[::1]), ro(float64[::1]), int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, int64, "
        "float64, boolean, uint64[::1], uint8[::1])")
def quant_binade_f32(words: Words, xs: F64, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                     mode: int, bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_binade(words, xs, w, 8, 23, e0, S, L, cum, lsum, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint64[::1]), ro(float64[::1]), int64, int64, int64, ro(int64[::1]), ro(int64[::1]), uint64, int64, "
        "float64, boolean, uint64[::1], uint8[::1])")
def quant_binade_f64(words: Words, xs: F64, w: int, e0: int, S: int, L: I64, cum: I64, lsum: np.uint64,
                     mode: int, bound: float, rel_exact: bool, codes: U64, exc: U8) -> int:
    return _quant_binade(words, xs, w, 11, 52, e0, S, L, cum, lsum, mode, bound, rel_exact, codes, exc)

@kernel("(ro(uint16[::1]), ro(uint16[::1]), int64, int64, float64, boolean)")
def error_stats_f16(src: Words, dec: Words, w: int, mode: int, bound: float,
                    rel_exact: bool) -> tuple[float, float, int]:
    return _error_stats(src, dec, w, 5, 10, mode, bound, rel_exact)

@kernel("(ro(uint16[::1]), ro(uint16[::1]), int64, int64, float64, boolean)")
def error_stats_bf16(src: Words, dec: Words, w: int, mode: int, bound: float,
                     rel_exact: bool) -> tuple[float, float, int]:
    return _error_stats(src, dec, w, 8, 7, mode, bound, rel_exact)

@kernel("(ro(uint32[::1]), ro(uint32[::1]), int64, int64, float64, boolean)")
def error_stats_f32(src: Words, dec: Words, w: int, mode: int, bound: float,
                    rel_exact: bool) -> tuple[float, float, int]:
    return _error_stats(src, dec, w, 8, 23, mode, bound, rel_exact)

@kernel("(ro(uint64[::1]), ro(uint64[::1]), int64, int64, float64, boolean)")
def error_stats_f64(src: Words, dec: Words, w: int, mode: int, bound: float,
                    rel_exact: bool) -> tuple[float, float, int]:
    return _error_stats(src, dec, w, 11, 52, mode, bound, rel_exact)


@dataclass(frozen=True)
class _Kernels:
    """One float format's entry points (see :func:`kernels`)."""
    to_f64: Callable[[Words, int, F64], bool]
    dequant_uniform: Callable[[U64, int, int, float, np.uint64, np.uint64, Words], bool]
    dequant_binade: Callable[[U64, int, int, int, int, I64, I64, np.uint64, Words], bool]
    quant_uniform: Callable[[Words, F64, int, float, np.uint64, np.uint64, int, float, bool, U64, U8], int]
    quant_binade: Callable[[Words, F64, int, int, int, I64, I64, np.uint64, int, float, bool, U64, U8], int]
    error_stats: Callable[[Words, Words, int, int, float, bool], tuple[float, float, int]]


_SETS = {
    "F16": _Kernels(to_f64_f16, dequant_uniform_f16, dequant_binade_f16, quant_uniform_f16, quant_binade_f16,
                    error_stats_f16),
    "BF16": _Kernels(to_f64_bf16, dequant_uniform_bf16, dequant_binade_bf16, quant_uniform_bf16,
                     quant_binade_bf16, error_stats_bf16),
    "F32": _Kernels(to_f64_f32, dequant_uniform_f32, dequant_binade_f32, quant_uniform_f32, quant_binade_f32,
                    error_stats_f32),
    "F64": _Kernels(to_f64_f64, dequant_uniform_f64, dequant_binade_f64, quant_uniform_f64, quant_binade_f64,
                    error_stats_f64),
}


def kernels(dtype: str) -> _Kernels:
    """The entry points for ``dtype`` (F16, BF16, F32, F64): ``to_f64(words, w, out)``,
    ``dequant_uniform(codes, n, w, step, M, B, out)``, ``dequant_binade(codes, n, w, e0, S, L, cum,
    lsum, out)``, ``quant_uniform(words, xs, w, step, M, B, mode, bound, rel_exact, codes, exc)``,
    ``quant_binade(words, xs, w, e0, S, L, cum, lsum, mode, bound, rel_exact, codes, exc)`` and
    ``error_stats(src, dec, w, mode, bound, rel_exact)``."""
    return _SETS[dtype]
