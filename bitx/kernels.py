"""numba kernels for BitX, GIL released: the ``xor`` codec's ranked byte (``remap``) and sparse form,
one pass per chunk each (numpy needs several temporaries, a gather or a scatter for them; these
loops work in registers), and the planner's histograms of sample windows.

Masks and shifts are passed as numpy scalars of the word type, never as Python ints: numba types
an int by its value (int64 below 2^63, uint64 above) and a dispatcher first specialised on a small
mask then fails to convert a 64-bit mask with the top bit set (the F64 ranked mask).

Numba does not check indices, so the codec's kernels check once, before their loop, that their
buffers hold what they will read and write, and refuse (False, or -1 for a count) otherwise.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from elves.jit import intrinsic, kernel
from elves.vector_ir import vector_ir

# Types the kernels take (numba compiles from the arguments' types; these are for mypy).
# ``Words``: elements as unsigned integers of their width; ``Word``: a scalar of that type.
Word = np.unsignedinteger[Any]
Words = NDArray[np.unsignedinteger[Any]]
U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]


@kernel("(ro(W[::1]), ro(W[::1]), W, W, ro(uint8[:, ::1]), W[::1])", words=("uint16", "uint32", "uint64"))
def xor_ranked(a: Words, r: Words, mask: Word, shift: Word, table: U8, out: Words) -> bool:
    """``out[i] = a[i] ^ (r[i] & mask)``, with the byte at ``shift`` replaced by
    ``table[that byte of r[i], that byte of a[i]]`` (``mask`` has that byte clear). With a row
    past the 256 (:data:`TABLE_ROWS`), 16 words a step (:func:`_ranked16`), else one at a time."""
    n = a.shape[0]
    if r.shape[0] < n or out.shape[0] < n or table.shape[0] < 256 or table.shape[1] != 256:
        return False
    field = a.dtype.type(0xFF) << a.dtype.type(shift)
    s = a.dtype.type(shift)
    m = a.dtype.type(mask)
    keep = ~field
    ff = a.dtype.type(0xFF)
    start = _ranked16(a, r, m, s, table, out, n) if table.shape[0] >= TABLE_ROWS else 0
    for i in range(start, n):
        av = a[i]
        rv = r[i]
        o = (av ^ (rv & m)) & keep
        e = (rv >> s) & ff
        v = (av >> s) & ff
        out[i] = o | (a.dtype.type(table[e, v]) << s)
    return True


# A ranked table's rows: 256, and one more that the vector loop's 4-byte reads of the last entry
# may reach (the x86 gather reads 32-bit words; the table's entries are bytes).
TABLE_ROWS = 257


@intrinsic
def _ranked16() -> Any:
    """``_ranked16(a, r, mask, shift, table, out, n) -> m``: :func:`xor_ranked` on the first
    ``m = n - n % 16`` words, 16 a step (the entry a gather: numba's LLVM leaves the loop
    scalar, at 1.2 ns a word); 64-bit words are left to the scalar loop (``m = 0``). The caller
    has checked the lengths, and that ``table`` has :data:`TABLE_ROWS` rows of 256."""
    from numba.core import types
    from numba.extending import intrinsic

    t = vector_ir()
    ir, i32, i64, const = t.ir, t.i32, t.i64, t.const

    @intrinsic
    def ranked16(typingctx: Any, a: Any, r: Any, mask: Any, shift: Any, table: Any, out: Any, n: Any) -> Any:
        bits = a.dtype.bitwidth

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            if bits > 32:
                return ir.Constant(i64, 0)
            vw = ir.VectorType(ir.IntType(bits), 16)
            pa, pr, tab, po = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 1, 4, 5))

            def wide(v: Any) -> Any:
                return builder.zext(v, i32) if bits < 32 else v
            m, s = t.splat(builder, wide(args[2])), t.splat(builder, wide(args[3]))
            keep = builder.xor(builder.shl(const(0xFF), s), const(-1))
            stop = builder.and_(args[6], ir.Constant(i64, ~15))

            def words(p: Any, i: Any) -> Any:
                return builder.bitcast(builder.gep(p, [i]), vw.as_pointer())

            def body(i: Any, carried: list[Any]) -> list[Any]:
                av, rv = (builder.zext(builder.load(words(p, i), align=bits // 8), t.v32) if bits < 32
                          else builder.load(words(p, i), align=4) for p in (pa, pr))
                o = builder.and_(builder.xor(av, builder.and_(rv, m)), keep)
                e = builder.and_(builder.lshr(rv, s), const(0xFF))
                v = builder.and_(builder.lshr(av, s), const(0xFF))
                entry = builder.and_(t.gather(builder, tab, builder.or_(builder.shl(e, const(8)), v), ir.IntType(8)),
                                     const(0xFF))
                res = builder.or_(o, builder.shl(entry, s))
                builder.store(builder.trunc(res, vw) if bits < 32 else res, words(po, i), align=bits // 8)
                return carried
            t.loop(builder, ir.Constant(i64, 0), stop, 16, [], body)
            return stop
        return types.int64(a, r, mask, shift, table, out, n), codegen
    return ranked16


@kernel("(ro(W[::1]), ro(W[::1]), int64, boolean, int64[:, ::1], int64[:, ::1], int64[:, ::1], int64[:, ::1], int64[::1])",
        words=("uint8", "uint16", "uint32", "uint64"))
def sample_stats(a: Words, r: Words, w: int, rotate: bool, std: I64, xor: I64, bitmap: I64, joint: I64,
                 tail: I64) -> int:
    """Byte histograms of one sample window, for the planner to estimate coded sizes without
    coding. ``a``: the fine-tune's words; ``r``: the reference words (possibly fewer: the words
    past it have no reference). Per rotated byte plane (as ``planes`` splits them): ``std`` of
    the words, ``xor`` of the XORed words, ``bitmap`` of the sparse form's bitmap words (the
    sparse form codes those and the nonzero XORed words). For ``w >= 2``, ``joint[base,
    fine-tune]`` counts the byte below the sign bit over the words with a reference and
    ``tail`` that byte over the rest. Returns the number of nonzero XORed words, or -1 unless
    ``w`` is the words' size and the histograms have the room (w rows of 256, 256 x 256, 256)."""
    n = a.shape[0]
    m = min(n, r.shape[0])
    if w != a.itemsize or min(std.shape[0], xor.shape[0], bitmap.shape[0]) < w \
            or min(std.shape[1], xor.shape[1], bitmap.shape[1], joint.shape[0], joint.shape[1], tail.shape[0]) < 256:
        return -1
    nbits = 8 * a.itemsize  # a constant of each compiled word size: the plane loops unroll
    full = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - nbits)
    top = np.uint64(max(nbits - 9, 0))
    ff = np.uint64(0xFF)
    eight = np.uint64(8)
    one = np.uint64(1)
    back = np.uint64(nbits - 1)
    group = nbits  # elements per bitmap word
    bits = np.uint64(0)
    zeros = 0
    at = 0  # i % group, counted (a division per element cost more than the rest of the step)
    # Two copies of the plane histograms, for even and odd elements: a plane's counts mostly go
    # to one bin (a zero XOR byte), and each increment would wait for the one before it.
    counts = np.zeros((4 * a.itemsize, 256), dtype=np.int64)
    for i in range(n):
        av = np.uint64(a[i])
        rv = np.uint64(r[i]) if i < m else np.uint64(0)
        x = av ^ rv
        if x == 0:
            zeros += 1
        else:
            bits |= one << np.uint64(at)
        if rotate:
            ra = ((av << one) | (av >> back)) & full
            x = ((x << one) | (x >> back)) & full
        else:
            ra = av
        k = (i & 1) * 2 * a.itemsize
        # BF16, F16 and F32 spelled out: numba's loop over the planes costs 40% more
        if nbits == 16:
            counts[k, ra >> eight] += 1
            counts[k + 1, ra & ff] += 1
            counts[k + 2, x >> eight] += 1
            counts[k + 3, x & ff] += 1
        elif nbits == 32:
            counts[k, ra >> np.uint64(24)] += 1
            counts[k + 1, (ra >> np.uint64(16)) & ff] += 1
            counts[k + 2, (ra >> eight) & ff] += 1
            counts[k + 3, ra & ff] += 1
            counts[k + 4, x >> np.uint64(24)] += 1
            counts[k + 5, (x >> np.uint64(16)) & ff] += 1
            counts[k + 6, (x >> eight) & ff] += 1
            counts[k + 7, x & ff] += 1
        else:
            for p in range(a.itemsize):
                sh = np.uint64(nbits - 8 - 8 * p)
                counts[k + p, (ra >> sh) & ff] += 1
                counts[k + a.itemsize + p, (x >> sh) & ff] += 1
        at += 1
        if at == group or i == n - 1:
            if rotate:
                bits = ((bits << one) | (bits >> back)) & full
            for p in range(a.itemsize):
                bitmap[p, (bits >> np.uint64(nbits - 8 - 8 * p)) & ff] += 1
            bits = np.uint64(0)
            at = 0
        if nbits >= 16:
            if i < m:
                joint[(rv >> top) & ff, (av >> top) & ff] += 1
            else:
                tail[(av >> top) & ff] += 1
    for p in range(a.itemsize):
        for c in range(256):
            std[p, c] += counts[p, c] + counts[2 * a.itemsize + p, c]
            xor[p, c] += counts[a.itemsize + p, c] + counts[3 * a.itemsize + p, c]
    return n - zeros


@kernel("(ro(int64[:, ::1]), ro(uint8[:, ::1]), int64, uint8[:, ::1], int64[::1], int64[::1])")
def rank_counts(joint: I64, near: U8, min_count: int, order: U8, listed: I64, codes: I64) -> None:
    """The ranking behind ``remap`` (``bitx.delta.ranking``), from the counts ``joint[base value,
    fine-tune value]``. For each base value ``e`` that has counts: ``order[e, :listed[e]]`` are
    the fine-tune values seen at least ``min_count`` times, most frequent first (the lower value
    first on a tie), less a tail that the default order ``near[e]`` gives anyway; then
    ``order[e]`` goes on with the other values in ``near[e]``'s order. ``codes[k]`` gets the
    counts of the values ranked ``k``: the histogram of the ranked byte."""
    inlist = np.zeros(256, dtype=np.bool_)
    for e in range(256):
        row = joint[e]
        listed[e] = 0
        if row.sum() == 0:
            continue
        idx = np.argsort(-row, kind="mergesort")
        k = 0
        while k < 256 and row[idx[k]] >= min_count:
            k += 1
        while k > 0:  # the last listed value is where the default order would put it anyway
            inlist[:] = False
            for j in range(k - 1):
                inlist[idx[j]] = True
            first = 0
            for j in range(256):
                if not inlist[near[e, j]]:
                    first = near[e, j]
                    break
            if first != idx[k - 1]:
                break
            k -= 1
        listed[e] = k
        inlist[:] = False
        for j in range(k):
            order[e, j] = idx[j]
            inlist[idx[j]] = True
        pos = k
        for j in range(256):
            v = near[e, j]
            if not inlist[v]:
                order[e, pos] = v
                pos += 1
        for j in range(256):
            codes[j] += row[order[e, j]]


@kernel("(ro(W[::1]), ro(W[::1]), W, uint8[::1], W[::1])", words=("uint8", "uint16", "uint32", "uint64"))
def xor_sparse(a: Words, r: Words, mask: Word, bitmap: U8, vals: Words) -> int:
    """The ``sparse`` form of ``a ^ (r & mask)`` (the words past ``r`` unchanged), in one pass:
    bit ``i`` of ``bitmap`` (least significant first; it must come zeroed) is set where XORed
    word ``i`` is not zero, and those words go to ``vals`` in order. Returns their
    count, or -1 unless ``bitmap`` and ``vals`` can hold every word."""
    if bitmap.shape[0] * 8 < a.shape[0] or vals.shape[0] < a.shape[0]:
        return -1
    m = r.shape[0]
    msk = a.dtype.type(mask)
    k = 0
    for i in range(a.shape[0]):
        x = a[i] ^ (r[i] & msk) if i < m else a[i]
        if x != 0:
            bitmap[i >> 3] |= np.uint8(1 << (i & 7))
            vals[k] = x
            k += 1
    return k


@kernel("(ro(uint8[::1]), ro(W[::1]), ro(W[::1]), W, W[::1])", words=("uint8", "uint16", "uint32", "uint64"))
def xor_unsparse(bitmap: U8, vals: Words, r: Words, mask: Word, out: Words) -> int:
    """Inverse of :func:`xor_sparse` into the words ``out``. Returns how many values the bitmap
    asks for; the caller checks that against ``vals``, which is never read past its end. -1
    unless ``bitmap`` has a bit for every word of ``out``."""
    if bitmap.shape[0] * 8 < out.shape[0]:
        return -1
    m = r.shape[0]
    msk = out.dtype.type(mask)
    zero = out.dtype.type(0)
    last = vals.shape[0] - 1
    k = 0
    for i in range(out.shape[0]):
        bit = (bitmap[i >> 3] >> (i & 7)) & 1
        # branch-free (the bitmap is as unpredictable as the fine-tune's changes)
        x = vals[min(k, last)] if last >= 0 else zero
        x = x if bit else zero
        k += bit
        out[i] = x ^ (r[i] & msk) if i < m else x
    return k
