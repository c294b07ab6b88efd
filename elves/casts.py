"""Precision casts between float formats, bit-exact and defined here, not by a library.

A reference may be a cast of its source (docs/FORMAT.md, ``ref_cast``): a Hub repo often ships
one model in several precisions, and a BF16 or F16 tensor is then, element for element, the cast
of an F32 tensor already stored. Coded against that cast with ``xor``, it costs only the elements
where it differs. Encoder and decoder must compute the same cast on every machine, so each is
written out on the bit patterns:

- ``rne``: IEEE 754 round to nearest, ties to even (what ``torch.Tensor.to`` and numpy do);
- ``trunc``: dropping the low mantissa bits (F32 to BF16 only: the top half of each word).

NaN stays NaN (quiet, its payload's top bits kept), infinities and signed zeros stay, and a value
beyond the target's range becomes an infinity. F16 <-> BF16 goes through F32, which is exact for
both. Widening casts (F16 or BF16 to F32) are exact and need no rounding mode.
"""
from __future__ import annotations

import numpy as np

ROUNDINGS = ("rne", "trunc")
FLOATS = ("F16", "BF16", "F32")
WIDTH = {"F16": 2, "BF16": 2, "F32": 4}


def supported(src: str, dst: str, rounding: str) -> bool:
    """Whether ``src`` elements can be cast to ``dst`` with ``rounding``."""
    if src not in FLOATS or dst not in FLOATS or src == dst or rounding not in ROUNDINGS:
        return False
    return rounding == "rne" or (src, dst) == ("F32", "BF16")


def _to_f32(raw: np.ndarray, src: str) -> np.ndarray:
    """Little-endian ``src`` elements as F32 words (exact)."""
    words: np.ndarray
    if src == "F32":
        words = raw.view(np.uint32)
    elif src == "BF16":
        words = np.left_shift(raw.view(np.uint16).astype(np.uint32), np.uint32(16))
    else:
        words = raw.view(np.float16).astype(np.float32).view(np.uint32)
    return words


def _f32_to(words: np.ndarray, dst: str, rounding: str) -> np.ndarray:
    if dst == "F32":
        return words
    out: np.ndarray
    if dst == "F16":  # numpy's conversion is IEEE round-to-nearest-even, NaN kept quiet
        out = words.view(np.float32).astype("<f2").view("<u2")
        return out
    if rounding == "trunc":
        out = (words >> np.uint32(16)).astype("<u2")
        return out
    nan = (words & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    lsb = (words >> np.uint32(16)) & np.uint32(1)
    out = ((words + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype("<u2")
    if nan.any():
        out[nan] = ((words[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
    return out


def cast(raw: np.ndarray, src: str, dst: str, rounding: str) -> np.ndarray:
    """The bytes of ``raw`` (whole little-endian ``src`` elements, uint8) cast to ``dst``."""
    n = raw.shape[0] // WIDTH[src]
    with np.errstate(over="ignore", invalid="ignore"):
        out = _f32_to(_to_f32(raw[:n * WIDTH[src]], src), dst, rounding)
    raw_out: np.ndarray = np.ascontiguousarray(out).view(np.uint8)
    return raw_out
