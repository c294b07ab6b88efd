"""numba CPU kernels for the ``planes`` and ``rans`` codecs (docs/FORMAT.md).

``split``/``merge`` turn elements into byte planes and back; ``encode_planes``/``decode_planes``
code a chunk's planes, choosing per plane between raw, constant and rANS. Each is one compiled
call per chunk, which keeps Python out of the per-element path, and all release the GIL so the
pipeline runs chunks on threads. ``cache=True`` stores the machine code on disk, so only the first run
after an install pays the compile.

The rANS lanes are interleaved (symbol ``i`` in lane ``i % lanes``): a GPU warp writes adjacent
outputs, and here several lanes at a time run as independent dependency chains in registers,
which the CPU overlaps. A step is bound by its chain (table load, multiply, renormalisation), so the
hot loops keep every value uint64, renormalise without branches, and get the writer's
``prob_bits`` (12) as a constant; ``bench/kernel_speed.py`` measures them against ZipNN.

Numba does not check indices, so every kernel is handed its buffers whole and checks, once per
call, that they hold what it will read and write (``ERR_SIZE`` otherwise): a forged count can make
a kernel refuse, never write past a buffer.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..jit import intrinsic, kernel
from ..vector_ir import vector_ir

# Array types the kernels take (numba compiles from the arguments' types; these are for mypy).
U8 = NDArray[np.uint8]
U16 = NDArray[np.uint16]
U32 = NDArray[np.uint32]
U64 = NDArray[np.uint64]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

MODE_RAW = 0
MODE_CONST = 1
MODE_RANS = 2

# Status codes returned by decode_chunk; the pipeline turns them into CorruptArchiveError.
OK = 0
ERR_HEADER = 1
ERR_OVERRUN = 2
ERR_FINAL_STATE = 3
ERR_TABLE = 4
ERR_SIZE = 5

RANS_L = 1 << 16


def split(src: U8, n: int, w: int, rotate: bool, planes: U8) -> int:
    """Byte planes of ``n`` little-endian ``w``-byte words; plane 0 is the top byte. Returns a status.
    A kernel per word size: a model's first compress compiles only those its dtypes need."""
    return int((_split2 if w == 2 else _split4 if w == 4 else _split_bytes)(src, n, w, rotate, planes))


@kernel("(ro(uint8[::1]), int64, int64, uint8[:, ::1])", internal=True)
def _split_fits(src: U8, n: int, w: int, planes: U8) -> bool:
    return n >= 0 and w >= 1 and src.shape[0] >= n * w and planes.shape[0] >= w and planes.shape[1] >= n


@kernel("(ro(uint8[::1]), int64, int64, boolean, uint8[:, ::1])")
def _split2(src: U8, n: int, w: int, rotate: bool, planes: U8) -> int:
    if w != 2 or not _split_fits(src, n, w, planes):
        return ERR_SIZE
    r = 1 if rotate else 0
    u16 = src[:2 * n].view(np.uint16)
    for i in range(n):
        v = np.uint32(u16[i])
        v = ((v << 1) | (v >> 15)) & 0xFFFF if r else v
        planes[0, i] = v >> 8
        planes[1, i] = v & 0xFF
    return OK


@kernel("(ro(uint8[::1]), int64, int64, boolean, uint8[:, ::1])")
def _split4(src: U8, n: int, w: int, rotate: bool, planes: U8) -> int:
    if w != 4 or not _split_fits(src, n, w, planes):
        return ERR_SIZE
    r = 1 if rotate else 0
    u32 = src[:4 * n].view(np.uint32)
    for i in range(n):
        v = np.uint64(u32[i])
        if r:
            v = ((v << np.uint64(1)) | (v >> np.uint64(31))) & np.uint64(0xFFFFFFFF)
        planes[0, i] = v >> np.uint64(24)
        planes[1, i] = (v >> np.uint64(16)) & np.uint64(0xFF)
        planes[2, i] = (v >> np.uint64(8)) & np.uint64(0xFF)
        planes[3, i] = v & np.uint64(0xFF)
    return OK


@kernel("(ro(uint8[::1]), int64, int64, boolean, uint8[:, ::1])")
def _split_bytes(src: U8, n: int, w: int, rotate: bool, planes: U8) -> int:
    if not _split_fits(src, n, w, planes):
        return ERR_SIZE
    if rotate and w <= 8:
        nbits = 8 * w
        mask = np.uint64(0xFFFFFFFFFFFFFFFF) if w == 8 else np.uint64((1 << nbits) - 1)
        for i in range(n):
            v = np.uint64(0)
            base = i * w
            for b in range(w):
                v |= np.uint64(src[base + b]) << np.uint64(8 * b)
            v = ((v << np.uint64(1)) | (v >> np.uint64(nbits - 1))) & mask
            for p in range(w):
                planes[p, i] = np.uint8((v >> np.uint64(8 * (w - 1 - p))) & np.uint64(0xFF))
    else:
        for i in range(n):
            base = i * w
            for p in range(w):
                planes[p, i] = src[base + w - 1 - p]
    return OK


@kernel("(ro(uint8[::1]), ro(uint8[::1]), int64, boolean, uint8[::1])", internal=True)
def _merge2(r0: U8, r1: U8, n: int, rotate: bool, dst: U8) -> None:
    """16-bit words from their two planes into ``dst`` (sized by the caller); a loop per
    rotation, which LLVM vectorises."""
    u16 = dst[:2 * n].view(np.uint16)
    if rotate:
        for i in range(n):
            v = (np.uint16(r0[i]) << np.uint16(8)) | np.uint16(r1[i])
            u16[i] = (v >> np.uint16(1)) | (v << np.uint16(15))
    else:
        for i in range(n):
            u16[i] = (np.uint16(r0[i]) << np.uint16(8)) | np.uint16(r1[i])


@kernel("(ro(uint8[::1]), ro(uint8[::1]), ro(uint8[::1]), ro(uint8[::1]), int64, boolean, uint8[::1])", internal=True)
def _merge4(r0: U8, r1: U8, r2: U8, r3: U8, n: int, rotate: bool, dst: U8) -> None:
    """32-bit words from their four planes into ``dst`` (sized by the caller), as :func:`_merge2`."""
    u32 = dst[:4 * n].view(np.uint32)
    if rotate:
        for i in range(n):
            v = ((np.uint32(r0[i]) << np.uint32(24)) | (np.uint32(r1[i]) << np.uint32(16))
                 | (np.uint32(r2[i]) << np.uint32(8)) | np.uint32(r3[i]))
            u32[i] = (v >> np.uint32(1)) | (v << np.uint32(31))
    else:
        for i in range(n):
            u32[i] = ((np.uint32(r0[i]) << np.uint32(24)) | (np.uint32(r1[i]) << np.uint32(16))
                      | (np.uint32(r2[i]) << np.uint32(8)) | np.uint32(r3[i]))


@kernel("(ro(uint8[:, ::1]), int64, int64, boolean, uint8[::1])")
def merge(planes: U8, n: int, w: int, rotate: bool, dst: U8) -> int:
    """Inverse of ``split``: words from planes, rotated back, into ``dst`` bytes. Returns a status."""
    if n < 0 or w < 1 or dst.shape[0] < n * w or planes.shape[0] < w or planes.shape[1] < n:
        return ERR_SIZE
    if w == 2:
        _merge2(planes[0], planes[1], n, rotate, dst)
        return OK
    if w == 4:
        _merge4(planes[0], planes[1], planes[2], planes[3], n, rotate, dst)
        return OK
    if rotate and w <= 8:
        nbits = 8 * w
        mask = np.uint64(0xFFFFFFFFFFFFFFFF) if w == 8 else np.uint64((1 << nbits) - 1)
        for i in range(n):
            v = np.uint64(0)
            for p in range(w):
                v |= np.uint64(planes[p, i]) << np.uint64(8 * (w - 1 - p))
            v = ((v >> np.uint64(1)) | (v << np.uint64(nbits - 1))) & mask
            base = i * w
            for b in range(w):
                dst[base + b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(0xFF))
    else:
        for i in range(n):
            base = i * w
            for p in range(w):
                dst[base + w - 1 - p] = planes[p, i]
    return OK


@kernel("(int64[::1], int64, int64, int64[::1])", internal=True)
def _normalize(counts: I64, n: int, prob_bits: int, freq: I64) -> None:
    """Frequencies summing to 2**prob_bits, each present symbol at least 1, close to counts/n."""
    total = 1 << prob_bits
    s = 0
    best = -1
    for c in range(256):
        if counts[c] > 0:
            f = max((counts[c] * total) // n, 1)
            freq[c] = f
            s += f
            if best < 0 or counts[c] > counts[best]:
                best = c
        else:
            freq[c] = 0
    diff = total - s
    if freq[best] + diff >= 1:
        freq[best] += diff
        return
    # Many rare symbols were lifted to 1: take the excess from the largest frequencies.
    while diff < 0:
        m = -1
        for c in range(256):
            if freq[c] > 1 and (m < 0 or freq[c] > freq[m]):
                m = c
        freq[m] -= 1
        diff += 1


@kernel("(int64[::1], int64[::1], int64)", internal=True)
def _rans_bits(counts: I64, freq: I64, prob_bits: int) -> float:
    """Exact-entropy estimate of the rANS payload in bits, for choosing the plane's mode."""
    bits = 0.0
    for c in range(256):
        if counts[c] > 0:
            bits += counts[c] * (prob_bits - np.log2(freq[c]))
    return bits


@kernel("(uint8[::1], int64, ro(uint8[::1]), int64, int64)", internal=True)
def _copy(dst: U8, dpos: int, src: U8, spos: int, n: int) -> None:
    """``dst[dpos:dpos + n] = src[spos:spos + n]`` as a loop: numba compiles the loop to a
    vectorised copy, and the slice assignment to a much slower element-wise one."""
    d = dst[dpos:dpos + n]
    s = src[spos:spos + n]
    for i in range(n):
        d[i] = s[i]


@kernel("(uint8[::1], int64, int64)", internal=True)
def _put_u16(out: U8, pos: int, v: int) -> None:
    out[pos] = v & 0xFF
    out[pos + 1] = (v >> 8) & 0xFF


@kernel("(uint8[::1], int64, int64)", internal=True)
def _put_u32(out: U8, pos: int, v: int) -> None:
    for b in range(4):
        out[pos + b] = (v >> (8 * b)) & 0xFF


@kernel("(ro(uint8[::1]), int64)", internal=True)
def _get_u16(buf: U8, pos: int) -> np.uint64:
    return np.uint64(buf[pos]) | (np.uint64(buf[pos + 1]) << np.uint64(8))


@kernel("(ro(uint8[::1]), int64)", internal=True)
def _get_u32(buf: U8, pos: int) -> np.uint64:
    return _get_u16(buf, pos) | (_get_u16(buf, pos + 2) << np.uint64(16))


@kernel("(uint64, uint64, uint8, uint64[::1], float64[::1], uint64, uint64, uint16[::1])", internal=True)
def _encode_one(x: np.uint64, w: np.uint64, s: np.uint8, tab: U64, rcp: F64, sh: np.uint64,
                pb: np.uint64, words: U16) -> tuple[np.uint64, np.uint64]:
    """One rANS encode step of a lane: code symbol ``s`` into state ``x``, writing the
    renormalisation word (if any) at ``words[w]``; return (state, next word position).

    ``tab`` and ``rcp`` come from :func:`_encode_tables`; ``x`` is below 2**32 after
    renormalisation, where ``x * rcp[s]`` truncates to the exact quotient. Branch-free like the
    decoder: the low word is stored every step and kept only when the state must shrink.
    """
    e = tab[s]
    f = e & _U(0xFFFF)
    need = (x >> sh) >= f
    words[w] = np.uint16(x & _U(0xFFFF))
    x = (x >> _U(16)) if need else x
    q = _U(np.int64(np.float64(x) * rcp[s]))
    return (q << pb) + (x - q * f) + (e >> _U(16)), w + _U(need)


@kernel("(int64[::1], int64[::1])")
def _encode_tables(freq: I64, cum: I64) -> tuple[U64, F64]:
    """Per symbol: ``freq | cum << 16``, and 1/freq rounded up by 2**-40 relative.

    For ``x < 2**32`` the product ``x * rcp`` is then at least ``x/f`` and less than
    ``x/f + 1/f``, so it truncates to ``x // f``: one multiply instead of a division.
    """
    tab = np.zeros(256, dtype=np.uint64)
    rcp = np.zeros(256, dtype=np.float64)
    for c in range(256):
        if freq[c] > 0:
            tab[c] = _U(freq[c]) | (_U(cum[c]) << _U(16))
            rcp[c] = (1.0 / freq[c]) * (1.0 + 2.0 ** -40)
    return tab, rcp


@kernel("(uint64[::1], uint64[::1], int64, ro(uint8[::1]), int64, uint64, uint64[::1], float64[::1], uint64, uint64, "
        "uint16[::1])", internal=True)
def _encode_group(x: U64, w: U64, g: int, sym: U8, steps: int, ul: np.uint64, tab: U64, rcp: F64,
                  sh: np.uint64, pb: np.uint64, words: U16) -> None:
    """Encode lanes ``g .. g + 7`` over all full steps, last first, as eight chains the CPU
    overlaps: the divisions of different lanes run side by side."""
    x0, x1, x2, x3 = x[g], x[g + 1], x[g + 2], x[g + 3]
    x4, x5, x6, x7 = x[g + 4], x[g + 5], x[g + 6], x[g + 7]
    w0, w1, w2, w3 = w[g], w[g + 1], w[g + 2], w[g + 3]
    w4, w5, w6, w7 = w[g + 4], w[g + 5], w[g + 6], w[g + 7]
    b = _U(steps) * ul + _U(g)
    for _ in range(steps):
        b -= ul
        x0, w0 = _encode_one(x0, w0, sym[b], tab, rcp, sh, pb, words)
        x1, w1 = _encode_one(x1, w1, sym[b + _U(1)], tab, rcp, sh, pb, words)
        x2, w2 = _encode_one(x2, w2, sym[b + _U(2)], tab, rcp, sh, pb, words)
        x3, w3 = _encode_one(x3, w3, sym[b + _U(3)], tab, rcp, sh, pb, words)
        x4, w4 = _encode_one(x4, w4, sym[b + _U(4)], tab, rcp, sh, pb, words)
        x5, w5 = _encode_one(x5, w5, sym[b + _U(5)], tab, rcp, sh, pb, words)
        x6, w6 = _encode_one(x6, w6, sym[b + _U(6)], tab, rcp, sh, pb, words)
        x7, w7 = _encode_one(x7, w7, sym[b + _U(7)], tab, rcp, sh, pb, words)
    x[g], x[g + 1], x[g + 2], x[g + 3] = x0, x1, x2, x3
    x[g + 4], x[g + 5], x[g + 6], x[g + 7] = x4, x5, x6, x7
    w[g], w[g + 1], w[g + 2], w[g + 3] = w0, w1, w2, w3
    w[g + 4], w[g + 5], w[g + 6], w[g + 7] = w4, w5, w6, w7


@intrinsic
def _enc32() -> Any:
    """``_enc32(x, w, g, sym, tab, rcp, words, steps, lanes)``: :func:`_encode_group` for lanes
    ``g .. g + 31`` and all ``steps`` full steps, 16 lanes a vector, bit for bit: ``tab`` and
    ``rcp`` are :func:`_encode_tables`' (``tab`` as uint32), read by gathers; the renormalisation
    words go out by a scatter masked to the lanes that shrink, two bytes more than the word each
    (so a lane's ``words`` room holds one more). States and word positions stay in registers."""
    from numba.core import types
    from numba.extending import intrinsic

    t = vector_ir()
    ir, i64, v32, const = t.ir, t.i64, t.v32, t.const
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), t.i32
    f64 = ir.VectorType(ir.DoubleType(), 16)

    def step(builder: Any, x: Any, w: Any, sym: Any, tab: Any, rcp: Any, words: Any, o: Any) -> tuple[Any, Any]:
        at = builder.bitcast(builder.gep(sym, [o]), ir.VectorType(i8, 16).as_pointer())
        s = builder.zext(builder.load(at, align=1), v32)
        e = t.gather(builder, tab, s, i32)
        f = builder.and_(e, const(0xFFFF))
        need = builder.icmp_unsigned(">=", builder.lshr(x, const(20)), f)
        t.scatter(builder, words, w, i16, x, need)
        x = builder.select(need, builder.lshr(x, const(16)), x)
        q = builder.fptoui(builder.fmul(builder.uitofp(x, f64), t.gather(builder, rcp, s, ir.DoubleType(), f64)), v32)
        x = builder.add(builder.add(builder.shl(q, const(12)), builder.sub(x, builder.mul(q, f))),
                        builder.lshr(e, const(16)))
        return x, builder.add(w, builder.zext(need, v32))

    @intrinsic
    def enc32(typingctx: Any, x: Any, w: Any, g: Any, sym: Any, tab: Any, rcp: Any, words: Any, steps: Any,
              lanes: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            g, steps, lanes = args[2], args[7], args[8]
            xs, ws, sym, tab, rcp, words = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                            for i in (0, 1, 3, 4, 5, 6))
            at = [builder.bitcast(builder.gep(a, [builder.add(g, ir.Constant(i64, h))]), v32.as_pointer())
                  for a in (xs, ws) for h in (0, 16)]
            start = [builder.load(a, align=4) for a in at]

            def body(k: Any, state: list[Any]) -> list[Any]:
                o = builder.add(g, builder.mul(k, lanes))
                x0, w0 = step(builder, state[0], state[2], sym, tab, rcp, words, o)
                x1, w1 = step(builder, state[1], state[3], sym, tab, rcp, words, builder.add(o, ir.Constant(i64, 16)))
                return [x0, x1, w0, w1]
            last = builder.sub(steps, ir.Constant(i64, 1))
            for a, v in zip(at, t.loop(builder, last, ir.Constant(i64, -1), -1, start, body)):
                builder.store(v, a, align=4)
            return context.get_dummy_value()
        return types.void(x, w, g, sym, tab, rcp, words, steps, lanes), codegen
    return enc32



@kernel("(ro(uint8[::1]), int64, int64, int64[::1], int64[::1], int64, uint8[::1], int64)", internal=True)
def _rans_encode_plane(sym: U8, n: int, lanes: int, freq: I64, cum: I64, prob_bits: int, out: U8,
                       pos: int) -> int:
    """Write the lane-length table and lane streams at ``out[pos:]``; return the end offset.

    Lanes are encoded from the last symbol back, 32 at a time (:func:`_enc32`) for the writer's
    default, else in groups of eight (:func:`_encode_group`). Lane ``j`` writes its words, last
    first, at ``words[j * (steps + 2):]`` (a word's room more than it can write: the vector
    encoder stores two bytes beyond the word).
    """
    steps = n // lanes
    rem = n - steps * lanes
    room = _U(steps + 2)
    words = np.empty(lanes * (steps + 2), dtype=np.uint16)
    sh = _U(32 - prob_bits)
    pb = _U(prob_bits)
    tab, rcp = _encode_tables(freq, cum)
    # Loops, not array expressions: numba compiles each of those to a kernel of its own.
    x = np.empty(lanes, dtype=np.uint64)
    w = np.empty(lanes, dtype=np.uint64)
    for j in range(lanes):
        x[j] = RANS_L
        w[j] = _U(j) * room
    # The last, partial step is coded first: lanes below rem hold one more symbol.
    for j in range(rem):
        x[j], w[j] = _encode_one(x[j], w[j], sym[steps * lanes + j], tab, rcp, sh, pb, words)
    ul = _U(lanes)
    g = 0
    if prob_bits == 12 and lanes % 32 == 0:
        x32 = np.empty(lanes, dtype=np.uint32)
        w32 = np.empty(lanes, dtype=np.uint32)
        for j in range(lanes):
            x32[j], w32[j] = x[j], w[j]
        tab32 = np.empty(256, dtype=np.uint32)
        for c in range(256):
            tab32[c] = tab[c]
        for h in range(0, lanes, 32):
            _enc32(x32, w32, h, sym, tab32, rcp, words, steps, lanes)
        for j in range(lanes):
            x[j], w[j] = x32[j], w32[j]
        g = lanes
    while g + 8 <= lanes:
        if prob_bits == 12:  # the writer's default, with the shifts as constants
            _encode_group(x, w, g, sym, steps, ul, tab, rcp, _U(20), _U(12), words)
        else:
            _encode_group(x, w, g, sym, steps, ul, tab, rcp, sh, pb, words)
        g += 8
    for j in range(g, lanes):
        xj, wj = x[j], w[j]
        for k in range(steps - 1, -1, -1):
            xj, wj = _encode_one(xj, wj, sym[k * lanes + j], tab, rcp, sh, pb, words)
        x[j], w[j] = xj, wj
    table = pos
    pos += 4 * lanes
    # Sections start on multiples of 4 from the chunk start, so the lane words are 2-aligned.
    out16 = out[:out.shape[0] & ~1].view(np.uint16)
    for j in range(lanes):
        start = pos
        _put_u32(out, pos, x[j])
        pos += 4
        first = j * (steps + 2)
        nw = np.int64(w[j]) - first
        dst = out16[pos >> 1:(pos >> 1) + nw]
        src = words[first:first + nw]
        for t in range(nw):
            dst[t] = src[nw - 1 - t]
        pos += 2 * nw
        _put_u32(out, table + 4 * j, pos - start)
    return pos


@kernel("(ro(uint8[::1]), int64)", internal=True)
def _histogram(sym: U8, n: int) -> I64:
    """Symbol counts of ``sym[:n]``. Four tables take turns, so runs of one symbol (the
    exponent plane is full of them) do not wait on their own previous increment."""
    c = np.zeros(4 * 256, dtype=np.int64)  # flat, and summed by a loop: both compile faster
    m = n & ~3
    for i in range(0, m, 4):
        c[sym[i]] += 1
        c[256 + sym[i + 1]] += 1
        c[512 + sym[i + 2]] += 1
        c[768 + sym[i + 3]] += 1
    for i in range(m, n):
        c[sym[i]] += 1
    total = np.empty(256, dtype=np.int64)
    for s in range(256):
        total[s] = c[s] + c[256 + s] + c[512 + s] + c[768 + s]
    return total


# Planes this long or longer are first judged on a sample (:func:`_looks_raw`): SAMPLE_BLOCKS
# blocks of SAMPLE_BLOCK bytes spread over the plane, an eighth of it at that length.
SAMPLE_BLOCKS = 8
SAMPLE_BLOCK = 1024
SAMPLE_MIN = 8 * SAMPLE_BLOCKS * SAMPLE_BLOCK


@kernel("(ro(uint8[::1]), int64)", internal=True)
def _looks_raw(sym: U8, n: int) -> bool:
    """Whether a sample of ``sym[:n]`` says that rANS cannot shrink the plane by the 1% that
    :func:`_encode_plane` asks: its bytes' entropy at least 99.5% of 8 bits. The mantissa's
    planes are nearly uniform bytes, and a full histogram of each was half of the encode's time.
    An entropy estimated from a sample runs low (the sample misses rare symbols: about 0.02 bits
    at 8,192 bytes), so a plane the sample puts that high is further from the 1% still; a
    plane under it gets the full count, as before."""
    c = np.zeros(256, dtype=np.int64)
    stride = n // SAMPLE_BLOCKS
    for b in range(SAMPLE_BLOCKS):
        start = b * stride
        for i in range(start, start + SAMPLE_BLOCK):
            c[sym[i]] += 1
    total = SAMPLE_BLOCKS * SAMPLE_BLOCK
    bits = 0.0
    for v in range(256):
        if c[v] > 0:
            bits -= c[v] * np.log2(c[v] / total)
    return bits >= 0.995 * 8 * total


@kernel("(ro(uint8[::1]), int64, int64, int64, uint8[::1], int64)", internal=True)
def _encode_plane(sym: U8, n: int, lanes: int, prob_bits: int, out: U8, pos: int) -> int:
    """Write one plane section (mode byte first) at ``out[pos:]``; return the end offset."""
    if n >= SAMPLE_MIN and _looks_raw(sym, n):
        out[pos] = MODE_RAW
        _copy(out, pos + 1, sym, 0, n)
        return pos + 1 + n
    counts = _histogram(sym, n)
    k = 0
    only = 0
    for c in range(256):
        if counts[c] > 0:
            k += 1
            only = c
    if k == 1:
        out[pos] = MODE_CONST
        out[pos + 1] = only
        return pos + 2
    if k > (1 << prob_bits) // 2:
        # Too many symbols for the table to give each a useful frequency (tiny prob_bits).
        out[pos] = MODE_RAW
        _copy(out, pos + 1, sym, 0, n)
        return pos + 1 + n
    freq = np.zeros(256, dtype=np.int64)
    _normalize(counts, n, prob_bits, freq)
    header = 4 + k + (k & 1) + 2 * k
    header += (-header) & 3
    est = header + 8 * lanes + _rans_bits(counts, freq, prob_bits) / 8.0
    # A plane rANS would shrink by under 1% is stored raw: decoding it would cost a pass for nothing.
    if est >= (n + 1) * 0.99:
        out[pos] = MODE_RAW
        _copy(out, pos + 1, sym, 0, n)
        return pos + 1 + n
    start = pos
    out[pos] = MODE_RANS
    out[pos + 1] = prob_bits
    _put_u16(out, pos + 2, k)
    pos += 4
    cum = np.zeros(256, dtype=np.int64)
    acc = 0
    for c in range(256):
        cum[c] = acc
        acc += freq[c]
        if freq[c] > 0:
            out[pos] = c
            pos += 1
    if k & 1:
        out[pos] = 0
        pos += 1
    for c in range(256):
        if freq[c] > 0:
            _put_u16(out, pos, freq[c])
            pos += 2
    while (pos - start) & 3:
        out[pos] = 0
        pos += 1
    end = _rans_encode_plane(sym, n, lanes, freq, cum, prob_bits, out, pos)
    if end - start >= n + 1:
        # The estimate missed (tiny planes): raw is never larger than n + 1.
        out[start] = MODE_RAW
        _copy(out, start + 1, sym, 0, n)
        return start + 1 + n
    return end


@kernel("(int64, int64)")
def max_encoded_size(n: int, w: int) -> int:
    """An upper bound on :func:`encode_planes`' output for ``w`` planes of ``n`` symbols.

    A plane is written as rANS before it is known to beat raw, so the bound covers the worst
    rANS section: the table, 8 bytes a lane, and a word per symbol.
    """
    return 8 + 4 * w + w * (2 * n + 8 * min(max(n, 1), 4096) + 1100)


@kernel("(ro(uint8[:, ::1]), int64, int64, uint8[::1])")
def encode_planes(planes: U8, lanes: int, prob_bits: int, out: U8) -> int:
    """Encode a (n_planes, n) uint8 array as a ``rans`` container in ``out``; return its length,
    or -1 unless ``out`` holds :func:`max_encoded_size` bytes and the header can say it all."""
    w, n = planes.shape
    if w > 255 or n > 0xFFFFFFFF or lanes < 1 or lanes > 4096 or out.shape[0] < max_encoded_size(n, w):
        return -1
    lanes = min(lanes, max(n, 1))
    _put_u32(out, 0, n)
    _put_u16(out, 4, lanes)
    out[6] = w
    out[7] = 0
    pos = 8 + 4 * w
    for p in range(w):
        while pos & 3:
            out[pos] = 0
            pos += 1
        _put_u32(out, 8 + 4 * p, pos)
        pos = _encode_plane(planes[p], n, lanes, prob_bits, out, pos)
    return pos


_U = np.uint64


@kernel("(uint64, uint64, uint64, uint32[::1], ro(uint16[::1]), uint64, uint64, uint8[::1], uint64)", internal=True)
def _decode_one(x: np.uint64, p: np.uint64, q: np.uint64, dec: U32, words: U16, mask: np.uint64,
                pb: np.uint64, out: U8, o: np.uint64) -> tuple[np.uint64, np.uint64]:
    """One rANS decode step of one lane at word position ``p``, reading the word at ``q`` (``p``,
    or ``p`` clamped to the lane's stream): write its symbol to ``out[o]``; return (state, word
    position).

    Everything is uint64 (mixing numba's signed and unsigned integers would go through float64,
    and signed indices pay a negative-index check). The renormalisation is branch-free (on
    high-entropy planes the branch is a coin flip): the next word is loaded every step and kept
    only when the state fell under 2**16.
    """
    e = _U(dec[x & mask])
    x = ((e >> _U(8)) & _U(0xFFF)) * (x >> pb) + (e >> _U(20))
    out[o] = np.uint8(e)
    w = _U(words[q])
    need = x < _U(RANS_L)
    x = ((x << _U(16)) | w) if need else x
    return x, p + _U(need)


@kernel("(uint32[::1], uint32[::1], int64, uint32[::1], ro(uint16[::1]), uint8[::1], int64, uint64, uint64, "
        "uint64)", internal=True)
def _decode_group(x: U32, ptr: U32, g: int, dec: U32, words: U16, out: U8, steps: int, ul: np.uint64,
                  mask: np.uint64, pb: np.uint64) -> None:
    """Decode lanes ``g .. g + 7`` of a plane, all steps, without clamping their reads: eight
    independent chains, which the CPU overlaps (15% faster than four on a Zen 4 core)."""
    x0, x1, x2, x3 = _U(x[g]), _U(x[g + 1]), _U(x[g + 2]), _U(x[g + 3])
    x4, x5, x6, x7 = _U(x[g + 4]), _U(x[g + 5]), _U(x[g + 6]), _U(x[g + 7])
    p0, p1, p2, p3 = _U(ptr[g]), _U(ptr[g + 1]), _U(ptr[g + 2]), _U(ptr[g + 3])
    p4, p5, p6, p7 = _U(ptr[g + 4]), _U(ptr[g + 5]), _U(ptr[g + 6]), _U(ptr[g + 7])
    o = _U(g)
    for _ in range(steps):
        x0, p0 = _decode_one(x0, p0, p0, dec, words, mask, pb, out, o)
        x1, p1 = _decode_one(x1, p1, p1, dec, words, mask, pb, out, o + _U(1))
        x2, p2 = _decode_one(x2, p2, p2, dec, words, mask, pb, out, o + _U(2))
        x3, p3 = _decode_one(x3, p3, p3, dec, words, mask, pb, out, o + _U(3))
        x4, p4 = _decode_one(x4, p4, p4, dec, words, mask, pb, out, o + _U(4))
        x5, p5 = _decode_one(x5, p5, p5, dec, words, mask, pb, out, o + _U(5))
        x6, p6 = _decode_one(x6, p6, p6, dec, words, mask, pb, out, o + _U(6))
        x7, p7 = _decode_one(x7, p7, p7, dec, words, mask, pb, out, o + _U(7))
        o += ul
    x[g], x[g + 1], x[g + 2], x[g + 3] = x0, x1, x2, x3
    x[g + 4], x[g + 5], x[g + 6], x[g + 7] = x4, x5, x6, x7
    ptr[g], ptr[g + 1], ptr[g + 2], ptr[g + 3] = p0, p1, p2, p3
    ptr[g + 4], ptr[g + 5], ptr[g + 6], ptr[g + 7] = p4, p5, p6, p7


def _build_run(vectors: int) -> Any:
    """``run(x, ptr, g, dec, words, out, steps, lanes, first, last)``: lanes ``g .. g + 16 *
    vectors - 1`` of a plane, all ``steps`` steps (symbol ``k`` of lane ``j`` at ``out[k * lanes +
    j]``), as :func:`_decode_one` without clamping, 16 lanes a vector: a step's two table loads
    (the slot's entry, the lane's next word) are gathers, its 16 symbols one store. The vectors'
    states stay in registers over the steps, chains the CPU overlaps. ``words[first:last]`` (the
    lanes' streams) are prefetched first. The writer's 32 lanes are two vectors (``_run32``);
    bench/rans_lanes.py builds wider ones to time containers with more lanes.

    numba cannot vectorise the lane loop itself: LLVM cannot prove that the state arrays do not
    alias the table, so it keeps it scalar. The caller guarantees what numba would not check:
    the lanes at ``g``, the output's length, and a 4-byte read at every ``words[ptr[j] + k]``.
    """
    from numba.core import types
    from numba.extending import intrinsic

    t = vector_ir()
    ir, i64, v32, const = t.ir, t.i64, t.v32, t.const
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), t.i32

    def step(builder: Any, x: Any, p: Any, dec: Any, words: Any, out: Any, o: Any) -> tuple[Any, Any]:
        e = t.gather(builder, dec, builder.and_(x, const(0xFFF)), i32)
        f = builder.and_(builder.lshr(e, const(8)), const(0xFFF))
        x = builder.add(builder.mul(f, builder.lshr(x, const(12))), builder.lshr(e, const(20)))
        at = builder.bitcast(builder.gep(out, [o]), ir.VectorType(i8, 16).as_pointer())
        builder.store(builder.trunc(e, ir.VectorType(i8, 16)), at, align=1)
        word = builder.and_(t.gather(builder, words, p, i16), const(0xFFFF))
        need = builder.icmp_unsigned("<", x, const(RANS_L))
        return builder.select(need, builder.or_(builder.shl(x, const(16)), word), x), builder.add(p, builder.zext(need, v32))

    @intrinsic
    def run(typingctx: Any, x: Any, ptr: Any, g: Any, dec: Any, words: Any, out: Any, steps: Any, lanes: Any,
              first: Any, last: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            g, steps, lanes, first, last = args[2], args[6], args[7], args[8], args[9]
            xs, ps, dec, words, out = (context.make_array(sig.args[i])(context, builder, args[i]).data
                                       for i in (0, 1, 3, 4, 5))
            at = [builder.bitcast(builder.gep(a, [builder.add(g, ir.Constant(i64, h))]), v32.as_pointer())
                  for a in (xs, ps) for h in range(0, 16 * vectors, 16)]
            start = [builder.load(a, align=4) for a in at]
            t.prefetch(builder, words, first, last, 32)

            def body(k: Any, state: list[Any]) -> list[Any]:
                o = builder.add(g, builder.mul(k, lanes))
                stepped = [step(builder, state[h], state[vectors + h], dec, words, out,
                                builder.add(o, ir.Constant(i64, 16 * h))) for h in range(vectors)]
                return [x for x, _ in stepped] + [p for _, p in stepped]
            for a, v in zip(at, t.loop(builder, ir.Constant(i64, 0), steps, 1, start, body)):
                builder.store(v, a, align=4)
            return context.get_dummy_value()
        return types.void(x, ptr, g, dec, words, out, steps, lanes, first, last), codegen
    return run


@intrinsic
def _run32() -> Any:
    """:func:`_build_run` for the writer's 32 lanes."""
    return _build_run(2)


@kernel("(ro(uint32[::1]), int64, int64)", internal=True)
def _span(a: U32, lo: int, hi: int) -> tuple[int, int]:
    """(min, max) of ``a[lo:hi]``, which is not empty."""
    a_min = a_max = np.int64(a[lo])
    for i in range(lo + 1, hi):
        v = np.int64(a[i])
        a_min = min(a_min, v)
        a_max = max(a_max, v)
    return a_min, a_max


@kernel("(uint32[::1], uint32[::1], uint32[::1], uint32[::1], ro(uint16[::1]), uint8[::1], int64, int64, int64)",
        internal=True)
def _decode_lanes(x: U32, ptr: U32, lim: U32, dec: U32, words: U16, out: U8, n: int, lanes: int,
                  prob_bits: int) -> None:
    """Decode all lanes of a plane.

    Lanes run in groups of eight (:func:`_decode_group`). A lane reads at most one word a step,
    so a group whose lanes cannot reach the end of ``words`` (the whole chunk) within the
    plane's steps runs without clamping its reads; a corrupt stream then reads other bytes of
    the chunk and fails the final-state check. The rest (groups near the chunk's end, the last
    lanes % 8 lanes, the last partial step) clamp each read to the lane's last word.
    """
    mask = _U((1 << prob_bits) - 1)
    pb = _U(prob_bits)
    steps = n // lanes
    ul = _U(lanes)
    nwords = words.shape[0]
    # The writer's default (prob_bits 12, lanes a multiple of 32) runs 16 lanes a vector when no
    # lane's 4-byte word reads can pass the end of the chunk.
    # Loops, not array expressions or reductions (ptr.max(), done[:] = True): numba compiles each
    # of those to a function of its own, at a cost on the first run.
    done = np.zeros(lanes, dtype=np.bool_)
    if prob_bits == 12 and lanes % 32 == 0:
        first, last = _span(ptr, 0, lanes)
        if last + steps + 1 <= nwords:
            for g in range(0, lanes, 32):
                lo, hi = _span(ptr, g, g + 32)
                _run32(x, ptr, g, dec, words, out, steps, lanes, lo, hi + steps)
        else:
            # The plane ends within a step count of the chunk's end, as a well-coded last plane
            # does (BitX's residuals: every plane coded, few words a lane). The clamped scalar
            # loop ran 3x slower there, so the vector loop gets a copy of the lanes' words,
            # padded by what their unclamped reads can pass (hence the same checks at the end).
            # ptr[j] <= the lane's end <= nwords, so every read stays in the copy.
            padded = np.zeros(nwords - first + steps + 1, dtype=np.uint16)
            for i in range(first, nwords):
                padded[i - first] = words[i]
            for j in range(lanes):
                ptr[j] -= first
            for g in range(0, lanes, 32):
                lo, hi = _span(ptr, g, g + 32)
                _run32(x, ptr, g, dec, padded, out, steps, lanes, lo, hi + steps)
            for j in range(lanes):
                ptr[j] += first
        for j in range(lanes):
            done[j] = True
    for g in range(0, lanes - 7, 8):
        if done[g] or _span(ptr, g, g + 8)[1] + steps > nwords:
            continue
        if prob_bits == 12:  # the writer's default, with the shift and mask as constants
            _decode_group(x, ptr, g, dec, words, out, steps, ul, _U(0xFFF), _U(12))
        else:
            _decode_group(x, ptr, g, dec, words, out, steps, ul, mask, pb)
        for j in range(g, g + 8):
            done[j] = True
    for j in range(lanes):
        count = steps + (1 if j < n - steps * lanes else 0)
        first = steps if done[j] else 0
        xj, pj, lj = _U(x[j]), _U(ptr[j]), _U(lim[j])
        for k in range(first, count):
            xj, pj = _decode_one(xj, pj, min(pj, lj), dec, words, mask, pb, out, _U(k * lanes + j))
        x[j], ptr[j] = xj, pj


@kernel("(ro(uint8[::1]), int64, int64, int64, int64, uint8[::1])", internal=True)
def _rans_decode_plane(buf: U8, pos: int, end: int, n: int, lanes: int, out: U8) -> int:
    """Decode one rANS plane section's body (after the mode byte) into ``out``; return a status."""
    if pos + 4 > end:
        return ERR_HEADER
    pb = buf[pos]
    k = np.int64(_get_u16(buf, pos + 1))
    if pb < 1 or pb > 12:
        return ERR_TABLE
    prob_bits = np.int64(pb)
    start = pos - 1
    pos += 3
    if k < 1 or k > 256 or pos + k + 1 + 2 * k > end:
        return ERR_TABLE
    syms = np.empty(k, dtype=np.uint8)
    for j in range(k):
        syms[j] = buf[pos + j]
    pos += k + (k & 1)
    M = 1 << prob_bits
    # One 32-bit entry per slot: symbol | (freq - 0) << 8 | (slot - cum) << 20; prob_bits <= 12
    # keeps both fields in 12 bits, so a step is one table load.
    dec = np.empty(M, dtype=np.uint32)
    acc = 0
    for j in range(k):
        f = np.int64(_get_u16(buf, pos + 2 * j))
        if f < 1 or f >= M or acc + f > M or (j > 0 and syms[j] <= syms[j - 1]):
            return ERR_TABLE
        for t in range(f):
            dec[acc + t] = np.uint32(syms[j]) | np.uint32(f << 8) | np.uint32(t << 20)
        acc += f
    if acc != M:
        return ERR_TABLE
    pos += 2 * k
    while (pos - start) & 3:
        pos += 1
    if pos + 4 * lanes > end:
        return ERR_HEADER
    # Lane streams are 2-byte aligned relative to the chunk start, so read words from a u16 view.
    words = buf[:buf.shape[0] & ~1].view(np.uint16)
    ptr = np.empty(lanes, dtype=np.uint32)
    lim = np.empty(lanes, dtype=np.uint32)
    lane_end = np.empty(lanes, dtype=np.int64)
    x = np.empty(lanes, dtype=np.uint32)
    p = pos + 4 * lanes
    for j in range(lanes):
        nb = np.int64(_get_u32(buf, pos + 4 * j))
        if nb < 4 or (nb & 1) or p + nb > end:
            return ERR_OVERRUN
        x[j] = _get_u32(buf, p)
        ptr[j] = (p + 4) >> 1
        p += nb
        lane_end[j] = p >> 1
        lim[j] = max(lane_end[j] - 1, (p - nb) >> 1)
    _decode_lanes(x, ptr, lim, dec, words, out, n, lanes, prob_bits)
    for j in range(lanes):
        if ptr[j] != lane_end[j] or x[j] != RANS_L:
            return ERR_FINAL_STATE
    return OK


@kernel("(ro(uint8[::1]),)")
def container_shape(buf: U8) -> tuple[int, int]:
    """(n_planes, n) of a ``rans`` container, or (-1, -1) if its header is cut short."""
    if buf.shape[0] < 8:
        return -1, -1
    return np.int64(buf[6]), np.int64(_get_u32(buf, 0))


@kernel("(ro(uint8[::1]), int64, int64)", internal=True)
def _container_lanes(buf: U8, w: int, n: int) -> int:
    """The lane count of a ``rans`` container of ``w`` planes of ``n`` symbols, or minus a status
    if its header is cut short or says another shape."""
    if buf.shape[0] < 8 + 4 * w:
        return -ERR_HEADER
    if buf[6] != w or np.int64(_get_u32(buf, 0)) != n:
        return -ERR_SIZE
    lanes = np.int64(_get_u16(buf, 4))
    if lanes < 1 or lanes > 4096:
        return -ERR_HEADER
    return lanes


@kernel("(ro(uint8[::1]), int64, int64)", internal=True)
def _section(buf: U8, w: int, p: int) -> tuple[int, int]:
    """Start and end of plane ``p``'s section, or (-1, -1) if the offset table is malformed."""
    size = buf.shape[0]
    pos = np.int64(_get_u32(buf, 8 + 4 * p))
    end = np.int64(_get_u32(buf, 12 + 4 * p)) if p + 1 < w else size
    if pos < 8 + 4 * w or pos >= end or end > size:
        return -1, -1
    return pos, end


@kernel("(ro(uint8[::1]), int64, int64, int64, int64, uint8[::1])", internal=True)
def _decode_plane(buf: U8, w: int, p: int, n: int, lanes: int, row: U8) -> int:
    """Decode plane ``p`` of a container into ``row``, except a raw plane, whose symbols stay
    where they are: return the offset of a raw plane's symbols in ``buf``, else 0 once ``row``
    holds them, or minus a status."""
    pos, end = _section(buf, w, p)
    if pos < 0:
        return -ERR_HEADER
    mode = buf[pos]
    if mode == MODE_RAW:
        if pos + 1 + n > end:
            return -ERR_OVERRUN
        return pos + 1
    if mode == MODE_CONST:
        if pos + 2 > end:
            return -ERR_OVERRUN
        v = buf[pos + 1]
        for i in range(n):
            row[i] = v
        return 0
    if mode == MODE_RANS:
        return -_rans_decode_plane(buf, pos + 1, end, n, lanes, row)
    return -ERR_HEADER


@kernel("(ro(uint8[::1]), uint8[:, ::1])")
def decode_planes(buf: U8, planes: U8) -> int:
    """Decode a ``rans`` container into ``planes``; return a status. The shape of ``planes`` is
    the capacity: a container whose header says another shape is refused (``ERR_SIZE``)."""
    w, n = planes.shape
    lanes = _container_lanes(buf, w, n)
    if lanes < 0:
        return -lanes
    for p in range(w):
        at = _decode_plane(buf, w, p, n, lanes, planes[p])
        if at < 0:
            return -at
        if at > 0:
            _copy(planes[p], 0, buf, at, n)
    return OK


@kernel("(ro(uint8[::1]), int64, int64, boolean, uint8[::1])")
def decode_words(buf: U8, w: int, n: int, rotate: bool, dst: U8) -> int:
    """``decode_planes`` then ``merge`` in one call, for ``w`` planes of ``n`` symbols: raw planes
    are merged from ``buf`` where they lie, and only the coded planes pass through a plane
    buffer. Returns a status (``ERR_SIZE`` unless ``dst`` holds ``n * w`` bytes)."""
    if n < 0 or w < 1 or dst.shape[0] < n * w:
        return ERR_SIZE
    if w != 2 and w != 4:
        planes = np.empty((w, n), dtype=np.uint8)
        st = decode_planes(buf, planes)
        return st if st != OK else merge(planes, n, w, rotate, dst)
    lanes = _container_lanes(buf, w, n)
    if lanes < 0:
        return -lanes
    coded = 0
    for p in range(w):
        pos, _ = _section(buf, w, p)
        if pos < 0:
            return ERR_HEADER
        coded += buf[pos] != MODE_RAW
    scratch = np.empty((max(coded, 1), n if coded else 0), dtype=np.uint8)
    r0 = r1 = r2 = r3 = buf[:0]
    c = 0
    for p in range(w):
        at = _decode_plane(buf, w, p, n, lanes, scratch[min(c, scratch.shape[0] - 1)])
        if at < 0:
            return -at
        if at > 0:
            row = buf[at:at + n]
        else:
            row = scratch[c]
            c += 1
        if p == 0:
            r0 = row
        elif p == 1:
            r1 = row
        elif p == 2:
            r2 = row
        else:
            r3 = row
    if w == 2:
        _merge2(r0, r1, n, rotate, dst)
    else:
        _merge4(r0, r1, r2, r3, n, rotate, dst)
    return OK
