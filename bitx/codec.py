"""``xor``: the BitX filter. Each element of a chunk is XORed with the element at the same place in
a reference tensor of the base model, optionally through a bit ``mask``.

XOR is its own inverse, so encoding and decoding are the same operation, and it is lossless
whatever the data. A lightly fine-tuned weight shares its sign, exponent and top mantissa bits
with its base, so the XORed word is mostly zero bits at the top; the ``planes`` and ``rans``
stages that follow code those planes in a fraction of a bit per element.

``mask`` selects which bits are XORed (``word ^ (ref & mask)``): the encoder clears the bits of
the byte planes that XOR would make worse (the low mantissa of a heavily retrained tensor, which
is as random after XOR as before, or worse), so each plane is coded either against the base or
on its own. The reference may be shorter than the chunk (a tensor with rows appended, or a chunk
past the end of the base tensor): the bytes past it pass through unchanged.

With ``sparse``, elements left unchanged are not coded at all: the filter's output is a bitmap
of the elements whose XOR is not zero (one bit each, least significant bit first, padded with zero
bytes to a whole number of words), then those elements' XORed words only. Continued training
leaves many weights bit-for-bit unchanged (an update below half an ulp rounds away), and a
per-plane entropy coder would otherwise pay for each of them once per byte plane.

With ``remap`` (floats of 2 to 8 bytes), the byte just below the sign bit (the exponent of BF16
and F32; what ``planes`` puts in plane 0) is not XORed but coded *given the base's*: for each value
``e`` of that byte in the base element, the fine-tune's values are ranked, most frequent first,
and the rank replaces the byte. ``remap`` lists, per base value, the values in rank order; values
not listed (and every base value not listed) follow in order of distance from ``e``, lower first.
A heavily retrained tensor keeps little of its base's mantissa, but its exponent stays predictable
from the base's: the ranks are coded at close to the conditional entropy, which neither XOR nor
the standalone codec reaches. The decoder has the base element, so the ranking costs only the
table in the config.

The config names the reference by content: ``ref_hash`` (xxh3-128 of the base tensor's raw
bytes) and ``ref_nbytes``; with ``ref_shape`` and ``shape``, the base tensor was smaller along
some dimensions (a widened layer) and sits at the origin of the fine-tune's shape, zeros elsewhere
(``bitx.base.reference`` builds each chunk's reference bytes). The decoder checks that the base it is given holds exactly that.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from elves import dtypes
from elves.codecs.base import U8, ArrayArrayCodec, Config, Expected, as_u8, int_in
from elves.errors import CodecError, CorruptArchiveError

_WORD: dict[int, type[np.unsignedinteger[Any]]] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
Pairs = tuple[tuple[int, tuple[int, ...]], ...]

# NEAR[e] = the 256 byte values in order of distance from e, lower first: the default ranking.
NEAR = np.argsort(np.abs(np.arange(256)[None, :] - np.arange(256)[:, None]) * 512 + np.arange(256)[None, :],
                  axis=1, kind="stable").astype(np.uint8)


@functools.lru_cache(maxsize=256)
def rank_tables(remap: Pairs) -> tuple[U8, U8]:
    """rank[e, v] (the code of fine-tune value v given base value e) and its inverse inv[e, k],
    each with a row of zeros past the 256 that the kernel's vector reads may reach
    (``bitx.kernels.TABLE_ROWS``)."""
    order = NEAR.copy()
    for e, vals in remap:
        if not 0 <= e < 256 or len(set(vals)) != len(vals) or any(not 0 <= v < 256 for v in vals):
            raise CodecError(f"xor: invalid remap entry for {e}")
        rest = np.ones(256, dtype=bool)
        rest[list(vals)] = False
        order[e] = np.concatenate([np.array(vals, dtype=np.uint8), NEAR[e][rest[NEAR[e]]]])
    rank = np.argsort(order, axis=1, kind="stable").astype(np.uint8)
    spare = np.zeros((1, 256), dtype=np.uint8)
    return np.concatenate([rank, spare]), np.concatenate([order, spare])


class Xor(ArrayArrayCodec):
    """A chunk equal to its reference (every XORed word zero) needs no payload: ``encode`` gives
    None for it, and ``decode`` takes None back."""

    codec_id = "xor"
    optional_payload = True

    def __init__(self, dtype: str, ref_hash: str, ref_nbytes: int, mask: int | None = None,
                 sparse: bool = False, remap: list[Any] | None = None, ref_shape: list[int] | None = None,
                 shape: list[int] | None = None):
        self.check(isinstance(dtype, str), "dtype must be a string")
        self.dtype = dtypes.get(dtype)
        self.width = self.dtype.itemsize
        if self.width not in _WORD:
            raise CodecError(f"xor handles 1, 2, 4 and 8-byte elements, not {dtype}")
        full = (1 << (8 * self.width)) - 1
        self.check(mask is None or int_in(mask, 0, full), f"mask {mask!r} does not fit a {self.width}-byte word")
        self.mask = full if mask is None else int(mask)
        self.check(isinstance(ref_hash, str) and re.fullmatch("[0-9a-f]{32}", ref_hash) is not None,
                   "ref_hash must be 32 hex digits (xxh3-128)")
        self.ref_hash = ref_hash
        self.check(int_in(ref_nbytes, 0, 1 << 62), f"ref_nbytes must be a byte count, not {ref_nbytes!r}")
        self.ref_nbytes = int(ref_nbytes)
        self.check(isinstance(sparse, bool), "sparse must be true or false")
        self.sparse = sparse
        # A tensor grown along any dimensions (a widened layer): the base tensor sits at the origin
        # of the fine-tune's shape; the reader builds each chunk's reference from that geometry.
        self.ref_shape: tuple[int, ...] | None = None
        self.shape: tuple[int, ...] | None = None
        if (ref_shape is None) != (shape is None):
            raise CodecError("xor: ref_shape and shape go together")
        if shape is not None and ref_shape is not None:
            self.check(all(isinstance(v, (list, tuple)) and all(int_in(d, 0, 1 << 62) for d in v)
                           for v in (ref_shape, shape)),
                       "ref_shape and shape must be lists of dimensions")
            self.ref_shape, self.shape = tuple(ref_shape), tuple(shape)
            if (len(self.shape) != len(self.ref_shape) or any(not 0 <= b <= f for b, f in zip(self.ref_shape, self.shape))
                    or int(np.prod(self.ref_shape, dtype=np.int64)) * self.width != self.ref_nbytes):
                raise CodecError("xor: ref_shape must fit inside shape and hold ref_nbytes")
        self.remap: Pairs | None = None
        if remap is not None:
            if not self.dtype.is_float or self.width < 2 or self.sparse:
                raise CodecError("xor: remap is for floats of 2 to 8 bytes, without sparse")
            self.check(isinstance(remap, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and int_in(p[0], 0, 255)
                and isinstance(p[1], (list, tuple)) and all(int_in(v, 0, 255) for v in p[1]) for p in remap),
                "remap must be a list of [byte, [bytes...]]")
            self.remap = tuple((int(e), tuple(int(v) for v in vals)) for e, vals in remap)
            self.shift = 8 * self.width - 9
            self.mask &= ~(0xFF << self.shift)  # that byte is ranked, never XORed
            self._rank, self._inv = rank_tables(self.remap)
        self._full = self.mask == full

    @property
    def needs_ref(self) -> bool:
        return True

    @property
    def decodes_in_place(self) -> bool:
        return not self.sparse  # a sparse payload is a bitmap and the changed words only

    def get_config(self) -> Config:
        config: Config = {"id": self.codec_id, "dtype": self.dtype.name, "mask": self.mask,
                  "ref_hash": self.ref_hash, "ref_nbytes": self.ref_nbytes, "sparse": self.sparse}
        if self.remap is not None:
            config["remap"] = [[e, list(vals)] for e, vals in self.remap]
        if self.shape is not None and self.ref_shape is not None:
            config["ref_shape"], config["shape"] = list(self.ref_shape), list(self.shape)
        return config

    def _apply(self, data: U8, ref: U8, out: U8 | None, inverse: bool = False) -> U8:
        if out is None:
            out = np.empty(data.shape[0], dtype=np.uint8)
        elif out.shape[0] != data.shape[0]:
            raise CorruptArchiveError(f"xor: chunk holds {data.shape[0]} bytes, expected {out.shape[0]}")
        # Decoding in place: the codec before it wrote into out (data is out, or a view from
        # its start). Data overlapping out anywhere else is copied first.
        in_place = np.may_share_memory(data, out)
        if in_place and data.ctypes.data != out.ctypes.data:
            data, in_place = data.copy(), False
        n = min(data.shape[0], ref.shape[0])
        n -= n % self.width
        word = _WORD[self.width]
        a, r, o = data[:n].view(word), ref[:n].view(word), out[:n].view(word)
        if self.remap is not None:
            from .kernels import xor_ranked

            if n and not xor_ranked(a, r, word(self.mask), word(self.shift), self._inv if inverse else self._rank, o):
                raise CodecError("xor: the ranked kernel was given buffers shorter than the chunk")
        elif self._full:
            np.bitwise_xor(a, r, out=o)
        elif in_place:  # o holds the residual: masking r into it first would lose it
            o ^= r & word(self.mask)
        else:
            np.bitwise_and(r, word(self.mask), out=o)
            np.bitwise_xor(o, a, out=o)
        out[n:] = data[n:]
        return out

    def _bitmap_bytes(self, n_words: int) -> int:
        nb = -(-n_words // 8)
        return nb + (-nb) % self.width

    def encode(self, data: U8 | bytes, ref: U8 | None = None) -> U8 | None:
        if ref is None:
            raise CodecError("xor needs the reference chunk")
        out = self._sparse(as_u8(data), ref) if self.sparse else self._apply(as_u8(data), ref, None)
        return out if out.any() else None

    def _sparse(self, data: U8, ref: U8) -> U8:
        from .kernels import xor_sparse

        if data.shape[0] % self.width:
            raise CodecError("sparse xor needs a whole number of elements")
        word, n = _WORD[self.width], data.shape[0] // self.width
        m = min(n, ref.shape[0] // self.width)
        nb = self._bitmap_bytes(n)
        out = np.empty(nb + data.shape[0], dtype=np.uint8)
        out[:nb] = 0
        k = xor_sparse(data.view(word), ref[:m * self.width].view(word), word(self.mask), out[:nb],
                       out[nb:].view(word))
        if k < 0:
            raise CodecError("sparse xor: the kernel was given buffers shorter than the chunk")
        return out[:nb + k * self.width]

    def encoded_size(self, decoded: Expected) -> Expected:
        if not self.sparse:
            return decoded
        lo, hi = decoded.lo // self.width, decoded.hi // self.width
        return Expected(self._bitmap_bytes(lo), self._bitmap_bytes(hi) + hi * self.width)

    def decode(self, data: U8 | bytes | None, out: U8 | None = None, ref: U8 | None = None, *,
               expected: Expected | None = None) -> U8:
        """``data`` is None for a chunk that :meth:`encode` left without a payload: every XORed
        word was zero. ``out`` is the chunk's buffer (a codec with a reference comes first)."""
        if ref is None:
            raise CodecError("xor needs the reference chunk")
        if out is None:
            raise CodecError("xor decodes into the chunk's buffer only")
        if data is None:
            return self._apply(np.zeros(out.shape[0], dtype=np.uint8), ref, out, inverse=True)
        if self.sparse:
            return self._unsparse(as_u8(data), ref, out)
        return self._apply(as_u8(data), ref, out, inverse=True)

    def _unsparse(self, data: U8, ref: U8, out: U8) -> U8:
        from .kernels import xor_unsparse

        word, n = _WORD[self.width], out.shape[0] // self.width
        nb = self._bitmap_bytes(n)
        if out.shape[0] % self.width or data.shape[0] < nb:
            raise CorruptArchiveError("sparse xor: the chunk is shorter than its bitmap")
        values = data[nb:]
        m = min(n, ref.shape[0] // self.width)
        count = -1
        if values.shape[0] % self.width == 0:
            count = xor_unsparse(data[:nb], values.view(word), ref[:m * self.width].view(word), word(self.mask),
                                 out.view(word))
        if count * self.width != values.shape[0]:
            raise CorruptArchiveError("sparse xor: the bitmap does not match the number of elements")
        return out
