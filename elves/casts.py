"""Precision casts between float formats, bit-exact and defined here, not by a library.

A reference may be a cast of its source (docs/FORMAT.md, ``ref_cast``): a Hub repo often ships
one model in several precisions, and a BF16 or F16 tensor is then, element for element, the cast
of an F32 tensor already stored. Coded against that cast with ``xor``, it costs only the elements
where it differs. Encoder and decoder must compute the same cast on every machine, so each is
written out on the bit patterns, in kernels (elves/kernels/casts.py):

- ``rne``: IEEE 754 round to nearest, ties to even (what ``torch.Tensor.to`` and numpy do);
- ``trunc``: dropping the low mantissa bits (F32 to BF16 only: the top half of each word).

NaN stays NaN (its payload's top bits kept; BF16 sets the quiet bit, F16 does as numpy, docs/
FORMAT.md), infinities and signed zeros stay, and a value beyond the target's range becomes an
infinity. F16 <-> BF16 goes through F32, which is exact for
both. Widening casts (F16 or BF16 to F32) are exact and need no rounding mode.
"""
from __future__ import annotations

import numpy as np

from .kernels import casts as kernels

ROUNDINGS = ("rne", "trunc")
FLOATS = ("F16", "BF16", "F32")
WIDTH = {"F16": 2, "BF16": 2, "F32": 4}
_KIND = {"F16": kernels.F16, "BF16": kernels.BF16, "F32": kernels.F32}


def supported(src: str, dst: str, rounding: str) -> bool:
    """Whether ``src`` elements can be cast to ``dst`` with ``rounding``."""
    if src not in FLOATS or dst not in FLOATS or src == dst or rounding not in ROUNDINGS:
        return False
    return rounding == "rne" or (src, dst) == ("F32", "BF16")


def cast(raw: np.ndarray, src: str, dst: str, rounding: str) -> np.ndarray:
    """The bytes of ``raw`` (whole little-endian ``src`` elements, uint8) cast to ``dst``."""
    n = raw.shape[0] // WIDTH[src]
    body = _aligned(raw[:n * WIDTH[src]])
    if src == "F32":
        words = body.view(np.uint32)
    else:
        words = np.empty(n, np.uint32)
        kernels.to_f32(body.view(np.uint16), _KIND[src], words)
    if dst == "F32":
        return words.view(np.uint8)
    out = np.empty(n, np.uint16)
    kernels.from_f32(words, _KIND[dst], rounding == "trunc", out)
    return out.view(np.uint8)


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a``, copied if its start is not aligned for the wider words the kernels read it as."""
    return a if a.ctypes.data % 4 == 0 else a.copy()
