"""``elf``: error-bounded quantisation of float tensors, the opt-in lossy filter.

ELF (Su et al., VLDB 2024) keeps ``round(|w| * 2^23)`` and the sign of every F32 weight in
(-1, 1), an absolute error of at most 2^-24, and stores the rest exactly. This codec generalises
it to any bound, absolute (``|y - x| <= e``) or relative (``|y - x| <= r|x|``), and to F16, BF16,
F32 and F64, and lets the ``planes`` + ``rans`` stages after it entropy-code the integer codes:
a code's high bytes are mostly zero for small weights, and a plane of zeros costs two bytes.

Per chunk the encoder tries a few grids and keeps the one the coder will store smallest:

- ``uniform`` (absolute bounds): code ``a = round(|x| / step)`` with ``step = 2e`` (or the power
  of two below it, which BF16 and F16 can represent exactly); above a threshold where the dtype's
  own spacing is already coarse, the element's own bits (an *exact zone*, which also carries
  NaN and infinity).
- ``binade`` (relative bounds): per power-of-two binade, S sub-binades each holding L[i] evenly
  spaced levels, L[i] sized so that half a spacing is within r of the sub-binade's smallest
  value: close to a logarithmic grid, where keeping k mantissa bits (S = 1, L = 2^k) wastes up
  to a bit per element.
- ``exact``: the element's bits, rotated (the lossless codes): used when quantising would not pay.

Then, whatever the kind, a chunk whose codes are a few distinct values repeated (a Fourier basis,
a lookup table) can code them through a *palette*: its distinct codes once, and an index per
element, which the byte planes after it code far more cheaply than the repeats themselves.

With ``delta``, a chunk is coded against a reference chunk: what restore produces for the same
place of another tensor of the archive (an earlier version of the same weights, say). The
reference is quantised on the chunk's own grid, and the codes stored are the differences of the
chunk's codes from the reference's, zigzagged: small numbers where the weights moved little. The
decoder has the reference, so it quantises it the same way and adds the differences back.

Every element is dequantised with the decoder's own arithmetic and checked against the bound in
exact arithmetic; anything outside (a rounding hair, a value the grid cannot reach, NaN or
infinity without an exact zone) becomes an *exception*: its position and original bits are
stored in the chunk's section and written back after dequantisation. So the bound holds for
every element, always. The chunk layout is in docs/FORMAT.md.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CodecError, CorruptArchiveError
from .base import U8, ArrayArrayCodec, Config, Expected, as_u8, expected_of, int_in

# dtype -> (item size, exponent bits, mantissa bits)
ELF_DTYPES: dict[str, tuple[int, int, int]] = {
    "F16": (2, 5, 10), "BF16": (2, 8, 7), "F32": (4, 8, 23), "F64": (8, 11, 52),
}
WORD: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
CODE_DTYPE = {2: "U16", 4: "U32", 8: "U64"}

KIND_EXACT, KIND_UNIFORM, KIND_BINADE = 0, 1, 2
FLAG_PALETTE = 1                         # the codes are indices into the chunk's distinct codes
SECTION_HEAD = struct.Struct("<BBBBI")   # kind, pos_bytes, S, flags, exception count
PALETTE_COUNT = struct.Struct("<I")
UNIFORM_PARAMS = struct.Struct("<dQQ")   # step, M, B
BINADE_E0 = struct.Struct("<i")
MAX_SUB = 64


def _ceil_log2(v: float) -> int:
    m, e = math.frexp(v)
    return e - 1 if m == 0.5 else e


def _is_pow2(v: float) -> bool:
    return math.frexp(v)[0] == 0.5


Words = npt.NDArray[np.unsignedinteger[Any]]
Quantiser = Callable[[Words, npt.NDArray[np.float64], npt.NDArray[np.uint64], U8], int]


class Elf(ArrayArrayCodec):
    """Quantise a float chunk to integer codes within an error bound (docs/FORMAT.md, ``elf``).

    ``delta`` codes every chunk against a reference chunk (``encode`` and ``decode`` then take
    ``ref``, the reference's decoded bytes, as long as the chunk). ``lanes`` is the ``rans`` lane
    count the encoder assumes when it estimates sizes; ``exact`` makes every chunk use the exact
    kind (lossless); ``palette=False`` never codes a chunk through a palette. Of these, only
    ``delta`` is part of the config.
    """

    codec_id = "elf"

    def __init__(self, dtype: str, mode: str = "abs", bound: float = 2.0 ** -24, delta: bool = False, *,
                 lanes: int = 32, exact: bool = False, palette: bool = True):
        if not isinstance(dtype, str) or dtype not in ELF_DTYPES:
            raise CodecError(f"elf codes float tensors of {', '.join(ELF_DTYPES)}, not {dtype!r}")
        self.check(mode in ("abs", "rel"), f"mode must be 'abs' or 'rel', not {mode!r}")
        self.check(isinstance(bound, (int, float)) and not isinstance(bound, bool)
                   and math.isfinite(bound) and 0 < bound and (mode == "abs" or bound < 1),
                   f"bound must be a positive finite number (below 1 when relative), not {bound!r}")
        self.check(isinstance(delta, bool), "delta must be true or false")
        self.check(int_in(lanes, 1, 4096), "lanes must be an integer in 1..4096")
        self.dtype = dtype
        self.mode = mode
        self.bound = float(bound)
        self.width, self.ebits, self.mbits = ELF_DTYPES[dtype]
        self.delta = delta
        self.lanes = lanes
        self.exact = bool(exact)
        self.palette = bool(palette) and not self.delta  # differences from a reference hardly repeat

    @property
    def needs_ref(self) -> bool:
        return self.delta

    @classmethod
    def from_config(cls, config: Config) -> Elf:
        extra = set(config) - {"id", "dtype", "mode", "bound", "delta"}
        if extra:  # the encoder's own options are no part of an archive
            raise CodecError(f"bad parameters for codec 'elf': unknown {sorted(extra)}")
        return super().from_config(config)

    def encoded_size(self, decoded: Expected) -> Expected:
        """A section of at least the header's words, and at most every element an exception;
        then one code per element, or (palette) at most as many distinct codes again."""
        w = self.width
        lo, hi = -(-decoded.lo // w), decoded.hi // w
        if lo > hi:
            raise CorruptArchiveError(f"elf: a chunk of {decoded.lo} bytes is not whole {self.dtype} elements")
        most = SECTION_HEAD.size + BINADE_E0.size + 4 * MAX_SUB + PALETTE_COUNT.size + hi * (4 + w)
        return Expected(w * (-(-SECTION_HEAD.size // (w - 1)) + lo), w * (-(-most // (w - 1)) + 2 * hi))

    def get_config(self) -> Config:
        config = {"id": self.codec_id, "dtype": self.dtype, "mode": self.mode, "bound": self.bound}
        if self.delta:
            config["delta"] = True
        return config

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, data: U8, ref: U8 | None = None) -> U8:
        from ..kernels import elf as k

        w = self.width
        n = data.shape[0] // w
        if data.shape[0] != n * w:
            raise CodecError(f"elf: a {self.dtype} chunk of {data.shape[0]} bytes is not whole elements")
        if self.delta and (ref is None or ref.shape[0] != data.shape[0]):
            raise CodecError("elf with delta needs a reference chunk as long as the chunk")
        words = _words(data[: n * w], w)
        codes = np.empty(n, dtype=np.uint64)
        if self.exact or n == 0:
            return self._finish(words, KIND_EXACT, b"", np.empty(0, np.float64), codes, ref)
        xs = np.empty(n, dtype=np.float64)
        k.kernels(self.dtype).to_f64(words, w, xs)
        pos_bytes = 2 if n <= 65536 else 4
        exc_cost = (pos_bytes + w) * w / (w - 1)
        # Choose the grid on every 8th element (the estimate is all a choice needs), then run
        # only the winner on the whole chunk.
        stride = 8 if n >= 16384 else 1
        sw = np.ascontiguousarray(words[::stride])
        sx = np.ascontiguousarray(xs[::stride])
        m = sw.shape[0]
        scale = n / m
        scodes = np.empty(m, dtype=np.uint64)
        sexc = np.empty(m, dtype=np.uint8)
        hist = np.zeros((w, 256), dtype=np.int64)
        k.quant_exact(sw, w, scodes)
        k.plane_hist(scodes, w, hist)
        best: tuple[float, tuple[int, bytes] | None] = (k.est_size(hist * scale, n, w, self.lanes), None)
        for cand in self._candidates(xs):
            kind, params = cand
            nexc = self._quantiser(kind, params)(sw, sx, scodes, sexc) * scale
            k.plane_hist(scodes, w, hist)
            est = k.est_size(hist * scale, n, w, self.lanes) + (
                SECTION_HEAD.size + len(params) + nexc * (pos_bytes + w)) * w / (w - 1)
            if est < best[0]:
                best = est, cand
        kind, params = best[1] if best[1] is not None else (KIND_EXACT, b"")
        return self._finish(words, kind, params, xs, codes, ref, exc_cost)

    def _finish(self, words: np.ndarray, kind: int, params: bytes, xs: npt.NDArray[np.float64],
                codes: np.ndarray, ref: np.ndarray | None, exc_cost: float = 0.0) -> np.ndarray:
        """Quantise the whole chunk on the chosen grid, subtract the reference's codes (delta),
        and pack the chunk."""
        from ..kernels import elf as k

        n = words.shape[0]
        exc = np.zeros(n, dtype=np.uint8)
        self._quantiser(kind, params)(words, xs, codes, exc)
        if ref is not None:
            self._subtract_ref(kind, params, codes, exc, ref)
        if kind != KIND_EXACT:
            k.demote_top(codes, exc, self.width, self.lanes, exc_cost)
        return self._pack(words, kind, params, codes, exc)

    def _quantiser(self, kind: int, params: bytes) -> Quantiser:
        """``run(words, xs, codes, exc)``: the quantiser of a grid, from its packed parameters;
        it writes each element's code and exception flag and returns the exception count."""
        from ..kernels import elf as k

        w = self.width
        quantise: Quantiser
        if kind == KIND_EXACT:
            quantise = lambda words, xs, codes, exc: 0 if k.quant_exact(words, w, codes) else -1  # noqa: E731
        else:
            kk = k.kernels(self.dtype)
            mode = k.MODE_ABS if self.mode == "abs" else k.MODE_REL
            bound = self.bound
            rel_exact = self.mode == "rel" and _is_pow2(bound)
            if kind == KIND_UNIFORM:
                step, m_code, b_bits = UNIFORM_PARAMS.unpack_from(params)
                quantise = lambda words, xs, codes, exc: kk.quant_uniform(  # noqa: E731
                    words, xs, w, step, np.uint64(m_code), np.uint64(b_bits), mode, bound, rel_exact, codes, exc)
            else:
                e0, L, cum, lsum = _binade_grid(params)
                quantise = lambda words, xs, codes, exc: kk.quant_binade(  # noqa: E731
                    words, xs, w, e0, L.shape[0], L, cum, lsum, mode, bound, rel_exact, codes, exc)

        def run(words: Words, xs: npt.NDArray[np.float64], codes: npt.NDArray[np.uint64], exc: U8) -> int:
            nexc = quantise(words, xs, codes, exc)
            if nexc < 0:
                raise CodecError("elf: a quantiser was given buffers shorter than the chunk")
            return nexc
        return run

    def _ref_codes(self, kind: int, params: bytes, ref: np.ndarray) -> np.ndarray:
        """The reference chunk's codes on this chunk's grid, the same on the encoder's side and
        the decoder's: on a uniform grid each element's nearest code, else the grid's quantiser."""
        from ..kernels import elf as k

        w = self.width
        words = _words(ref, w)
        n = words.shape[0]
        xs = np.empty(n, dtype=np.float64)
        if kind != KIND_EXACT:
            _ok(k.kernels(self.dtype).to_f64(words, w, xs))
        codes = np.empty(n, dtype=np.uint64)
        if kind == KIND_UNIFORM:
            step, m_code, b_bits = UNIFORM_PARAMS.unpack_from(params)
            _ok(k.nearest_uniform(words, xs, w, step, np.uint64(m_code), np.uint64(b_bits), codes))
        else:
            self._quantiser(kind, params)(words, xs, codes, np.empty(n, dtype=np.uint8))
        return codes

    def _subtract_ref(self, kind: int, params: bytes, codes: np.ndarray, exc: np.ndarray,
                      ref: np.ndarray) -> None:
        """Turn ``codes`` into differences from the reference's codes; an exception's difference
        is zero (its bits come from the exception section)."""
        from ..kernels import elf as k

        rcodes = self._ref_codes(kind, params, ref)
        flagged = exc.view(bool)
        codes[flagged] = rcodes[flagged]
        k.delta_codes(codes, rcodes, self.width)

    def _candidates(self, xs: npt.NDArray[np.float64]) -> Iterator[tuple[int, bytes]]:
        """(kind, packed parameters) for each grid worth trying on this chunk."""
        from ..kernels import elf as k

        w, eb, mb = self.width, self.ebits, self.mbits
        bound = self.bound
        mask = (1 << (8 * w - 1)) - 1
        bias = (1 << (eb - 1)) - 1
        emax, emin = bias, 1 - bias
        if self.mode == "abs":
            steps = [(2 * bound, 1.0 if _is_pow2(2 * bound) else 0.125)]
            if not _is_pow2(2 * bound):
                steps.append((math.ldexp(1.0, _ceil_log2(2 * bound) - 1), 1.0))
            for step, theta in steps:
                if step * theta <= math.ldexp(1.0, emin - mb):
                    continue  # finer than the dtype's subnormals: the exact kind says it all
                et = mb + _ceil_log2(step * theta)      # the zone starts where the spacing reaches step*theta
                if et > emax:  # only infinity and NaN are in the zone
                    b_bits = ((1 << eb) - 1) << mb
                    tval = math.ldexp(1.0, emax) * 2.0 if emax < 1023 else math.inf
                else:
                    et = max(et, emin)
                    b_bits = (et + bias) << mb
                    tval = math.ldexp(1.0, et)
                m_code = mask if tval / step >= mask else min(int(math.floor(tval / step)) + 2, mask)
                yield KIND_UNIFORM, UNIFORM_PARAMS.pack(step, m_code, b_bits)
            return
        lo, hi = k.exponent_range(xs)
        if hi < lo:
            return
        grids = []
        sub = 8
        levels = [max(1, math.ceil(1.0 / (2 * bound * (sub + i)) * (1 + 2.0 ** -40))) for i in range(sub)]
        if sum(levels) < (1 << mb) and max(levels) <= 1 << 40:
            grids.append((sub, levels))
        kbits = _ceil_log2(1.0 / (2 * bound))
        if 0 <= kbits < mb:
            grids.append((1, [1 << kbits]))
        for sub, levels in grids:
            e0 = max(lo, hi + 1 - (mask - 1) // sum(levels))
            yield KIND_BINADE, BINADE_E0.pack(e0) + np.array(levels, dtype="<u4").tobytes()

    def _palette(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The chunk's distinct codes, as first differences, and each element's index among them;
        None unless coding those is estimated to cost less than coding the codes.

        Tensors built from a few values (a Fourier basis, a table of a function) repeat them
        many times, and byte planes cannot see that: every repeat pays for all its planes. An
        index pays only for its own entropy, and the sorted distinct codes, differenced, are
        small numbers. A probe of about 2048 codes rules out, before the full count (a sort),
        chunks where an index could not win: codes that hardly repeat (ordinary weights at a
        tight bound), an index that would need as many bytes as a code (BF16, F16, or a loose
        bound: the byte planes already see the distribution), and distinct codes dense in their
        range (what the planes code well).
        """
        from ..kernels import elf as k

        n, w = codes.shape[0], self.width
        if n < 64:
            return None
        m, distinct, lo, hi = k.probe_distinct(codes, max(1, n // 2048))
        repeats = m - distinct
        if repeats <= m // 64 or -(-(distinct - 1).bit_length() // 8) >= -(-int(hi).bit_length() // 8):
            return None
        # With most of the probe repeats, it saw (nearly) every distinct code; else estimate
        # their number from the collisions, as in the birthday problem.
        expected = distinct if 2 * repeats > m else m * m / (2 * repeats)
        if expected * 16 > int(hi - lo) + 1:
            return None
        values, index = np.unique(codes, return_inverse=True)
        if values.size > n // 2:
            return None
        body = np.empty(values.size + n, dtype=np.uint64)
        body[0] = values[0]
        body[1: values.size] = np.diff(values)
        body[values.size:] = index.reshape(-1)
        hist = np.zeros((w, 256), dtype=np.int64)
        k.plane_hist(codes, w, hist)
        plain = k.est_size(hist, n, w, self.lanes)
        k.plane_hist(body, w, hist)
        if k.est_size(hist, body.size, w, self.lanes) + PALETTE_COUNT.size * w / (w - 1) >= plain:
            return None
        return body[: values.size], body[values.size:]

    def _pack(self, words: np.ndarray, kind: int, params: bytes, codes: np.ndarray,
              exc: np.ndarray) -> np.ndarray:
        w = self.width
        n = words.shape[0]
        pos = np.flatnonzero(exc)
        pos_bytes = 2 if n <= 65536 else 4
        sub = len(params[BINADE_E0.size:]) // 4 if kind == KIND_BINADE else 0
        pal = self._palette(codes) if self.palette else None
        if pal is not None:
            params += PALETTE_COUNT.pack(pal[0].size)
            codes = np.concatenate(pal)
        section = b"".join([
            SECTION_HEAD.pack(kind, pos_bytes, sub, 0 if pal is None else FLAG_PALETTE, pos.size), params,
            pos.astype("<u2" if pos_bytes == 2 else "<u4").tobytes(),
            words[pos].astype(WORD[w]).tobytes(),
        ])
        ns = -(-len(section) // (w - 1))
        sec = np.zeros((ns, w), dtype=np.uint8)
        flat = np.zeros(ns * (w - 1), dtype=np.uint8)
        flat[: len(section)] = np.frombuffer(section, dtype=np.uint8)
        sec[:, : w - 1] = flat.reshape(ns, w - 1)
        out = np.empty(ns * w + codes.size * w, dtype=np.uint8)
        out[: ns * w] = sec.reshape(-1)
        out[ns * w:].view(WORD[w])[:] = codes
        return out

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, data: U8 | bytes, out: U8 | None = None, ref: U8 | None = None, *,
               expected: Expected | None = None) -> U8:
        from ..kernels import elf as k

        want = expected_of(out, expected)
        w = self.width
        buf = as_u8(data)
        if buf.shape[0] % w or buf.shape[0] < w * -(-SECTION_HEAD.size // (w - 1)):
            raise CorruptArchiveError("elf chunk is cut short or not whole words")
        total_words = buf.shape[0] // w
        grid = buf.reshape(total_words, w)
        head = _unpack(grid, w, SECTION_HEAD.size)
        kind, pos_bytes, sub, flags, m = SECTION_HEAD.unpack(head)
        if flags & ~FLAG_PALETTE:
            raise CorruptArchiveError("elf chunk: unknown flags")
        if kind == KIND_UNIFORM:
            plen = UNIFORM_PARAMS.size
        elif kind == KIND_BINADE:
            if not 1 <= sub <= MAX_SUB or sub & (sub - 1):
                raise CorruptArchiveError("elf chunk: bad sub-binade count")
            plen = BINADE_E0.size + 4 * sub
        elif kind == KIND_EXACT:
            plen = 0
        else:
            raise CorruptArchiveError(f"elf chunk: unknown grid kind {kind}")
        if pos_bytes not in (2, 4):
            raise CorruptArchiveError("elf chunk: bad exception position width")
        pcount = PALETTE_COUNT.size if flags & FLAG_PALETTE else 0
        slen = SECTION_HEAD.size + plen + pcount + m * (pos_bytes + w)
        ns = -(-slen // (w - 1))
        if ns > total_words:
            raise CorruptArchiveError("elf chunk: the exception section runs past the chunk")
        if grid[:ns, w - 1].any():
            raise CorruptArchiveError("elf chunk: malformed section")
        section = _unpack(grid, w, slen)
        body = _words(buf[ns * w:], w)
        p = SECTION_HEAD.size
        params = section[p: p + plen]
        npal = PALETTE_COUNT.unpack_from(section, p + plen)[0] if pcount else 0
        n = body.shape[0] - npal
        if not npal <= n:  # the writer's palettes are at most half the chunk
            raise CorruptArchiveError("elf chunk: bad palette size")
        want.check(n * w, "elf chunk")
        if kind == KIND_BINADE:
            e0, L, cum, lsum = _binade_grid(params)
            if (L < 1).any() or not -1022 <= e0 <= 1023:  # the encoder's e0 is a float64 exponent
                raise CorruptArchiveError("elf chunk: malformed binade grid")
        elif kind == KIND_UNIFORM:
            step, m_code, b_bits = UNIFORM_PARAMS.unpack_from(params)
            if not (math.isfinite(step) and step > 0):
                raise CorruptArchiveError("elf chunk: malformed uniform grid")
        if self.delta:
            if pcount:
                raise CorruptArchiveError("elf chunk: a palette in a delta chunk")
            if ref is None or ref.shape[0] != n * w:
                raise CodecError("elf with delta needs a reference chunk as long as the chunk")
            codes = np.empty_like(body)
            _ok(k.undelta_codes(body, self._ref_codes(kind, params, ref), w, codes))
        elif pcount:
            codes = _unpalette(body, npal, w)
        else:
            codes = body
        if out is None:
            out = np.empty(n * w, dtype=np.uint8)
        dst = out.view(WORD[w])
        if kind == KIND_EXACT:
            _ok(k.dequant_exact(codes, n, w, dst))
        elif kind == KIND_UNIFORM:
            _ok(k.kernels(self.dtype).dequant_uniform(codes, n, w, step, np.uint64(m_code), np.uint64(b_bits), dst))
        else:
            _ok(k.kernels(self.dtype).dequant_binade(codes, n, w, e0, sub, L, cum, lsum, dst))
        if m:
            p += plen + pcount
            pos = np.frombuffer(section, dtype="<u2" if pos_bytes == 2 else "<u4", count=m, offset=p)
            vals = np.frombuffer(section, dtype=WORD[w], count=m, offset=p + m * pos_bytes)
            if not k.scatter(dst, pos.astype(np.int64), vals.astype(dst.dtype)):
                raise CorruptArchiveError("elf chunk: exception positions out of order or range")
        return out


    # -- what an encoded chunk is, and how far a decoded one strays ----------------------------

    def is_exact(self, encoded: U8) -> bool:
        """Whether a chunk :meth:`encode` gave holds its elements' own bits: neither quantised on
        a grid nor coded through a palette."""
        w = self.width
        kind, _, _, flags = _unpack(encoded.reshape(-1, w), w, 4)
        return kind == KIND_EXACT and not flags & FLAG_PALETTE

    def errors(self, src: U8, dec: U8) -> tuple[float, float, int]:
        """(max absolute error, max relative error, elements outside the bound) of the decoded
        bytes ``dec`` against the original bytes ``src`` (1-D uint8 arrays).

        NaN, infinities and +-0.0 must come back bit for bit; anything else must lie within the
        bound in exact arithmetic. The relative error is over nonzero finite elements.
        """
        from ..kernels import elf as k

        w = self.width
        n = min(src.shape[0], dec.shape[0]) // w
        rel_exact = self.mode == "rel" and _is_pow2(self.bound)
        stats: tuple[float, float, int] = k.kernels(self.dtype).error_stats(
            _words(src[: n * w], w), _words(dec[: n * w], w), w, 0 if self.mode == "abs" else 1, self.bound, rel_exact)
        return stats


def _ok(done: bool) -> None:
    """A kernel's capacity check failed: the codec sized a buffer wrong for the chunk it read."""
    if not done:
        raise CorruptArchiveError("elf chunk: its parts disagree in size")


def _binade_grid(params: bytes) -> tuple[int, np.ndarray, np.ndarray, np.uint64]:
    """A binade grid's ``e0``, levels ``L`` per sub-binade, their prefix sums and total."""
    (e0,) = BINADE_E0.unpack_from(params)
    L = np.frombuffer(params, dtype="<u4", offset=BINADE_E0.size).astype(np.int64)
    cum = np.concatenate(([0], np.cumsum(L)[:-1])).astype(np.int64)
    return e0, L, cum, np.uint64(int(L.sum()))


def _words(data: np.ndarray, w: int) -> np.ndarray:
    """A chunk's bytes as w-byte words (copied only when they are not aligned)."""
    words = np.frombuffer(data, dtype=np.uint8).view(WORD[w])
    return words if words.flags.aligned else words.copy()


def _unpalette(body: np.ndarray, npal: int, w: int) -> np.ndarray:
    """The codes of a palette chunk: ``body`` is ``npal`` first differences of the strictly
    increasing distinct codes, then one index per element."""
    if npal < 1:
        raise CorruptArchiveError("elf chunk: bad palette size")
    values = np.cumsum(body[:npal], dtype=np.uint64)
    # A zero difference, or a sum that wrapped around 2^64, breaks the strict increase; a code
    # wider than the word cannot be a code.
    if (values[1:] <= values[:-1]).any() or (w < 8 and int(values[-1]) >> (8 * w)):
        raise CorruptArchiveError("elf chunk: malformed palette")
    index = body[npal:]
    if int(index.max()) >= npal:
        raise CorruptArchiveError("elf chunk: a palette index is out of range")
    codes: Words = values[index].astype(WORD[w])
    return codes


def _unpack(grid: np.ndarray, w: int, nbytes: int) -> bytes:
    """The first ``nbytes`` section bytes: each leading word carries ``w - 1`` of them."""
    rows = -(-nbytes // (w - 1))
    return grid[:rows, : w - 1].tobytes()[:nbytes]
