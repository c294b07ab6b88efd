"""Bitwise similarity of two models, from the samples of their same-name tensors.

The samples are XORed. A fine-tune keeps most signs and exponents of its base, so the top byte
of the XOR is mostly zero and few bits differ. The bar is the same statistic for two *unrelated*
tensors with the same value distributions, which is known exactly from the samples themselves:
two independent elements share a top byte with probability ``sum_v p_a(v) p_b(v)``, and differ
in bit ``i`` with probability ``f_a(1 - f_b) + f_b(1 - f_a)``. The excess of zero top bytes over
that chance level is a binomial z-score. A candidate is related when the pooled z-score passes
:data:`Z_RELATED` and most compared tensors pass :data:`Z_TENSOR` on their own. Between unrelated
N(0, 0.02) matrices of the sampled size the z-score has mean 0 and standard deviation 0.85; a
fine-tune whose changes are as large as the weights themselves still scores 9 per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitx.base import normalize
from elves import dtypes

from .profiling import FLOAT_DTYPES, ModelProfile, TensorInfo

Z_RELATED = 6.0               # pooled: one-sided p < 1e-9 that chance alone gives this many equal top bytes
Z_TENSOR = 3.0                # one tensor (p < 1.5e-3); most compared tensors must pass it too, so that
                              # one tensor with the same structure in unrelated models proves nothing

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass
class Bits:
    """Bitwise comparison of the samples of same-name tensors."""

    tensors: int = 0              # sample pairs compared
    recast: int = 0               # of which rounded to the coarser of two float precisions first
    related: int = 0              # of which individually past Z_TENSOR
    elements: int = 0
    zero_top: float = 0.0         # observed zero top bytes of the XOR
    zero_top_chance: float = 0.0  # expected if unrelated
    variance: float = 0.0
    hamming: float = 0.0          # summed bits set in the XOR
    hamming_chance: float = 0.0

    @property
    def z(self) -> float:
        sd: float = max(self.variance, 1.0) ** 0.5
        return (self.zero_top - self.zero_top_chance) / sd

    @property
    def similarity(self) -> float:
        """0 for unrelated samples, 1 for identical ones."""
        if not self.hamming_chance:
            return 0.0
        return float(min(1.0, max(0.0, 1.0 - self.hamming / self.hamming_chance)))

    def add(self, a: bytes, b: bytes, width: int) -> None:
        word = _WORDS[width]
        x = np.frombuffer(a, dtype=word)
        y = np.frombuffer(b, dtype=word)
        n = x.shape[0]
        shift = word(8 * width - 8)
        top_x = (x >> shift).astype(np.intp)
        top_y = (y >> shift).astype(np.intp)
        q = float(np.bincount(top_x, minlength=256) @ np.bincount(top_y, minlength=256)) / (n * n)
        k = int(np.count_nonzero(top_x == top_y))
        bits_x = np.unpackbits(np.frombuffer(a, dtype=np.uint8).reshape(n, width), axis=1).mean(axis=0)
        bits_y = np.unpackbits(np.frombuffer(b, dtype=np.uint8).reshape(n, width), axis=1).mean(axis=0)
        var = n * q * (1 - q)
        self.tensors += 1
        self.related += (k - n * q) / max(var, 1.0) ** 0.5 >= Z_TENSOR
        self.elements += n
        self.zero_top += k
        self.zero_top_chance += n * q
        self.variance += var
        self.hamming += int(np.unpackbits((x ^ y).view(np.uint8)).sum())
        self.hamming_chance += n * float((bits_x * (1 - bits_y) + bits_y * (1 - bits_x)).sum())

    def describe(self) -> str:
        n = self.elements
        return (f"sampled XOR of {self.tensors} same-name tensors ({n} elements): "
                f"{self.zero_top / n:.0%} zero top bytes ({self.zero_top_chance / n:.0%} if unrelated, "
                f"z = {self.z:.1f}), mean Hamming {self.hamming / n:.1f} bits "
                f"({self.hamming_chance / n:.1f} if unrelated); {self.related}/{self.tensors} tensors "
                "closer than chance" + (f" ({self.recast} compared in the coarser precision)" if self.recast else ""))


def comparable(a: str, b: str) -> bool:
    """Whether tensors of dtypes ``a`` and ``b`` can pair up: the same dtype, or two float ones
    (a model cast to another precision)."""
    return a == b or (a in FLOAT_DTYPES and b in FLOAT_DTYPES)


def _in(raw: bytes, dtype: str, target: str) -> bytes:
    """Float elements ``raw`` of ``dtype`` rounded to ``target``, as a cast would."""
    if dtype == target:
        return raw
    with np.errstate(over="ignore"):  # a value too large for F16 becomes inf, as a cast makes it
        return np.frombuffer(raw, dtype=dtypes.numpy_dtype(dtype)).astype(dtypes.numpy_dtype(target)).tobytes()


def compare_bits(model: ModelProfile, cand: ModelProfile, names: dict[str, TensorInfo]) -> Bits:
    """XOR the samples of the tensors of ``model`` and ``cand`` (``names``: its tensors by
    prefix-free name) that have the same name and shape; tensors of two float precisions are
    compared in the coarser one, which is what casting the finer one would give."""
    bits = Bits()
    mine: dict[str, TensorInfo] = {}
    for info in model.tensors:
        mine.setdefault(info.name, info)
    theirs = {normalize(n): s for n, s in cand.samples.items()}
    for name, sample in model.samples.items():
        other = theirs.get(normalize(name))
        t, u = mine.get(name), names.get(normalize(name))
        if other is None or t is None or u is None or t.shape != u.shape or not comparable(t.dtype, u.dtype):
            continue
        wt, wu = dtypes.get(t.dtype).itemsize, dtypes.get(u.dtype).itemsize
        if len(sample) % wt or len(other) % wu or len(sample) // wt != len(other) // wu:
            continue
        coarse = min(t.dtype, u.dtype, key=FLOAT_DTYPES.index) if t.dtype != u.dtype else t.dtype
        bits.recast += t.dtype != u.dtype
        bits.add(_in(sample, t.dtype, coarse), _in(other, u.dtype, coarse), dtypes.get(coarse).itemsize)
    return bits
