"""numba CPU kernels for the ``planes`` and ``rans`` codecs (docs/FORMAT.md).

``split``/``merge`` turn elements into byte planes and back; ``encode_planes``/``decode_planes``
code a chunk's planes, choosing per plane between raw, constant and rANS. Each is one compiled
call per chunk, which keeps Python out of the per-element path, and all release the GIL so the
pipeline runs chunks on threads. ``cache=True`` stores the machine code on disk, so only the first run
after an install pays the compile.

The rANS lanes are interleaved (symbol ``i`` in lane ``i % lanes``): a GPU warp writes adjacent
outputs, and here the inner loop over lanes runs independent dependency chains that the CPU
overlaps.
"""
from __future__ import annotations

import numpy as np
from numba import njit

MODE_RAW = 0
MODE_CONST = 1
MODE_RANS = 2

# Status codes returned by decode_chunk; the pipeline turns them into CorruptArchiveError.
OK = 0
ERR_HEADER = 1
ERR_OVERRUN = 2
ERR_FINAL_STATE = 3
ERR_TABLE = 4

RANS_L = 1 << 16


@njit(cache=True, nogil=True)
def split(src, n, w, rotate, planes):
    """Byte planes of ``n`` little-endian ``w``-byte words; plane 0 is the top byte."""
    r = 1 if rotate else 0
    if w == 2:
        u16 = src[:2 * n].view(np.uint16)
        for i in range(n):
            v = np.uint32(u16[i])
            v = ((v << 1) | (v >> 15)) & 0xFFFF if r else v
            planes[0, i] = v >> 8
            planes[1, i] = v & 0xFF
        return
    if w == 4:
        u32 = src[:4 * n].view(np.uint32)
        for i in range(n):
            v = np.uint64(u32[i])
            if r:
                v = ((v << np.uint64(1)) | (v >> np.uint64(31))) & np.uint64(0xFFFFFFFF)
            planes[0, i] = v >> np.uint64(24)
            planes[1, i] = (v >> np.uint64(16)) & np.uint64(0xFF)
            planes[2, i] = (v >> np.uint64(8)) & np.uint64(0xFF)
            planes[3, i] = v & np.uint64(0xFF)
        return
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


@njit(cache=True, nogil=True)
def merge(planes, n, w, rotate, dst):
    """Inverse of ``split``: words from planes, rotated back, into ``dst`` bytes."""
    r = 1 if rotate else 0
    if w == 2:
        u16 = dst[:2 * n].view(np.uint16)
        for i in range(n):
            v = (np.uint32(planes[0, i]) << 8) | np.uint32(planes[1, i])
            u16[i] = ((v >> 1) | (v << 15)) & 0xFFFF if r else v
        return
    if w == 4:
        u32 = dst[:4 * n].view(np.uint32)
        for i in range(n):
            v = ((np.uint64(planes[0, i]) << np.uint64(24)) | (np.uint64(planes[1, i]) << np.uint64(16))
                 | (np.uint64(planes[2, i]) << np.uint64(8)) | np.uint64(planes[3, i]))
            if r:
                v = ((v >> np.uint64(1)) | (v << np.uint64(31))) & np.uint64(0xFFFFFFFF)
            u32[i] = v
        return
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


@njit(cache=True, nogil=True)
def _normalize(counts, n, prob_bits, freq):
    """Frequencies summing to 2**prob_bits, each present symbol at least 1, close to counts/n."""
    total = 1 << prob_bits
    s = 0
    best = -1
    for c in range(256):
        if counts[c] > 0:
            f = (counts[c] * total) // n
            if f < 1:
                f = 1
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


@njit(cache=True, nogil=True)
def _rans_bits(counts, freq, prob_bits):
    """Exact-entropy estimate of the rANS payload in bits, for choosing the plane's mode."""
    bits = 0.0
    for c in range(256):
        if counts[c] > 0:
            bits += counts[c] * (prob_bits - np.log2(freq[c]))
    return bits


@njit(cache=True, nogil=True)
def _put_u16(out, pos, v):
    out[pos] = v & 0xFF
    out[pos + 1] = (v >> 8) & 0xFF


@njit(cache=True, nogil=True)
def _put_u32(out, pos, v):
    for b in range(4):
        out[pos + b] = (v >> (8 * b)) & 0xFF


@njit(cache=True, nogil=True)
def _get_u16(buf, pos):
    return np.uint64(buf[pos]) | (np.uint64(buf[pos + 1]) << np.uint64(8))


@njit(cache=True, nogil=True)
def _get_u32(buf, pos):
    return _get_u16(buf, pos) | (_get_u16(buf, pos + 2) << np.uint64(16))


@njit(cache=True, nogil=True)
def _rans_encode_plane(sym, n, lanes, freq, cum, prob_bits, out, pos):
    """Write the lane-length table and lane streams at ``out[pos:]``; return the end offset.

    Lanes are encoded together, step by step from the last symbol back, so the divisions of
    different lanes overlap in the CPU's pipeline instead of forming one long chain.
    """
    steps = (n + lanes - 1) // lanes
    words = np.empty((lanes, steps), dtype=np.uint16)
    nw = np.zeros(lanes, dtype=np.int64)
    x = np.full(lanes, RANS_L, dtype=np.uint64)
    shift = np.uint64(32 - prob_bits)
    pb = np.uint64(prob_bits)
    rcp = np.zeros(256, dtype=np.float64)
    for c in range(256):
        if freq[c] > 0:
            rcp[c] = 1.0 / freq[c]
    for k in range(steps - 1, -1, -1):
        base = k * lanes
        jmax = lanes if base + lanes <= n else n - base
        for j in range(jmax):
            s = sym[base + j]
            f = np.uint64(freq[s])
            xx = x[j]
            need = np.uint64(xx >= (f << shift))
            words[j, nw[j]] = np.uint16(xx & np.uint64(0xFFFF))
            nw[j] += np.int64(need)
            xx >>= need << np.uint64(4)
            # A float64 reciprocal is exact to within one for x < 2**32; fix the quotient up.
            q = np.uint64(np.float64(xx) * rcp[s])
            if q * f > xx:
                q -= np.uint64(1)
            elif (q + np.uint64(1)) * f <= xx:
                q += np.uint64(1)
            x[j] = (q << pb) + (xx - q * f) + np.uint64(cum[s])
    table = pos
    pos += 4 * lanes
    for j in range(lanes):
        start = pos
        _put_u32(out, pos, x[j])
        pos += 4
        for q in range(nw[j] - 1, -1, -1):
            _put_u16(out, pos, words[j, q])
            pos += 2
        _put_u32(out, table + 4 * j, pos - start)
    return pos


@njit(cache=True, nogil=True)
def _encode_plane(sym, n, lanes, prob_bits, out, pos):
    """Write one plane section (mode byte first) at ``out[pos:]``; return the end offset."""
    counts = np.zeros(256, dtype=np.int64)
    for i in range(n):
        counts[sym[i]] += 1
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
        out[pos + 1:pos + 1 + n] = sym[:n]
        return pos + 1 + n
    freq = np.zeros(256, dtype=np.int64)
    _normalize(counts, n, prob_bits, freq)
    header = 4 + k + (k & 1) + 2 * k
    header += (-header) & 3
    est = header + 8 * lanes + _rans_bits(counts, freq, prob_bits) / 8.0
    # A plane rANS would shrink by under 1% is stored raw: decoding it would cost a pass for nothing.
    if est >= (n + 1) * 0.99:
        out[pos] = MODE_RAW
        out[pos + 1:pos + 1 + n] = sym[:n]
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
        out[start + 1:start + 1 + n] = sym[:n]
        return start + 1 + n
    return end


@njit(cache=True, nogil=True)
def encode_planes(planes, lanes, prob_bits, out):
    """Encode a (n_planes, n) uint8 array as a ``rans`` container in ``out``; return its length.

    ``out`` must hold at least :func:`max_encoded_size` bytes.
    """
    w, n = planes.shape
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


def max_encoded_size(n: int, w: int) -> int:
    """An upper bound on :func:`encode_planes`' output for ``w`` planes of ``n`` symbols.

    A plane is written as rANS before it is known to beat raw, so the bound covers the worst
    rANS section: the table, 8 bytes a lane, and a word per symbol.
    """
    return 8 + 4 * w + w * (2 * n + 8 * min(max(n, 1), 4096) + 1100)


@njit(cache=True, nogil=True, inline="always")
def _decode_one(x, p, lim, dec, words, mask, sh):
    """One rANS decode step of one lane: (new state, new word position, symbol).

    32-bit arithmetic and a branch-free renormalisation (on high-entropy planes the branch
    would be a coin flip); a read past the lane's end is clamped to its last word and caught by
    the final-state check.
    """
    e = dec[x & mask]
    x = ((e >> np.uint32(8)) & np.uint32(0xFFF)) * (x >> sh) + (e >> np.uint32(20))
    need = np.uint32(x < np.uint32(RANS_L))
    wv = np.uint32(words[min(p, lim)])
    x = (x << (need << np.uint32(4))) | (wv & (np.uint32(0) - need))
    return x, p + need, np.uint8(e & np.uint32(0xFF))


@njit(cache=True, nogil=True)
def _decode_lanes(x, ptr, lim, dec, words, out, n, lanes, prob_bits):
    """Decode all lanes of a plane. Four lanes at a time run as independent chains held in
    registers, which the CPU overlaps; more spill registers and run slower."""
    mask = np.uint32((1 << prob_bits) - 1)
    sh = np.uint32(prob_bits)
    steps = n // lanes
    g = 0
    while g + 4 <= lanes:
        x0, x1, x2, x3 = x[g], x[g + 1], x[g + 2], x[g + 3]
        p0, p1, p2, p3 = ptr[g], ptr[g + 1], ptr[g + 2], ptr[g + 3]
        l0, l1, l2, l3 = lim[g], lim[g + 1], lim[g + 2], lim[g + 3]
        for k in range(steps):
            b = k * lanes + g
            x0, p0, out[b] = _decode_one(x0, p0, l0, dec, words, mask, sh)
            x1, p1, out[b + 1] = _decode_one(x1, p1, l1, dec, words, mask, sh)
            x2, p2, out[b + 2] = _decode_one(x2, p2, l2, dec, words, mask, sh)
            x3, p3, out[b + 3] = _decode_one(x3, p3, l3, dec, words, mask, sh)
        x[g], x[g + 1], x[g + 2], x[g + 3] = x0, x1, x2, x3
        ptr[g], ptr[g + 1], ptr[g + 2], ptr[g + 3] = p0, p1, p2, p3
        g += 4
    for j in range(g, lanes):
        xj, pj = x[j], ptr[j]
        for k in range(steps):
            xj, pj, out[k * lanes + j] = _decode_one(xj, pj, lim[j], dec, words, mask, sh)
        x[j], ptr[j] = xj, pj
    # The last, partial step: lanes below n % lanes hold one more symbol.
    for j in range(n - steps * lanes):
        x[j], ptr[j], out[steps * lanes + j] = _decode_one(x[j], ptr[j], lim[j], dec, words, mask, sh)


@njit(cache=True, nogil=True)
def _rans_decode_plane(buf, pos, end, n, lanes, out):
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
    syms = buf[pos:pos + k].copy()
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
    words = buf[:end & ~1].view(np.uint16)
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


@njit(cache=True, nogil=True)
def container_shape(buf):
    """(n_planes, n) of a ``rans`` container, or (-1, -1) if its header is cut short."""
    if buf.shape[0] < 8:
        return -1, -1
    return np.int64(buf[6]), np.int64(_get_u32(buf, 0))


@njit(cache=True, nogil=True)
def decode_planes(buf, planes):
    """Decode a ``rans`` container into ``planes`` (shaped by :func:`container_shape`); return a status."""
    size = buf.shape[0]
    w, n = planes.shape
    if size < 8 + 4 * w:
        return ERR_HEADER
    lanes = np.int64(_get_u16(buf, 4))
    if buf[6] != w or np.int64(_get_u32(buf, 0)) != n or lanes < 1 or lanes > 4096:
        return ERR_HEADER
    for p in range(w):
        pos = np.int64(_get_u32(buf, 8 + 4 * p))
        end = np.int64(_get_u32(buf, 12 + 4 * p)) if p + 1 < w else size
        if pos < 8 + 4 * w or pos >= end or end > size:
            return ERR_HEADER
        mode = buf[pos]
        if mode == MODE_RAW:
            if pos + 1 + n > end:
                return ERR_OVERRUN
            planes[p, :] = buf[pos + 1:pos + 1 + n]
        elif mode == MODE_CONST:
            if pos + 2 > end:
                return ERR_OVERRUN
            planes[p, :] = buf[pos + 1]
        elif mode == MODE_RANS:
            st = _rans_decode_plane(buf, pos + 1, end, n, lanes, planes[p])
            if st != OK:
                return st
        else:
            return ERR_HEADER
    return OK
