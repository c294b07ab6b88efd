"""The lossy mode's policy: which tensors ``elf`` quantises, the pipeline it runs in, and the
check of every chunk's bound against what restore will produce."""
from __future__ import annotations

import numpy as np

from .bounds import ErrorBound
from .codecs import Pipeline
from .codecs.base import U8, Config, as_u8
from .codecs.elf import CODE_DTYPE, ELF_DTYPES, Elf
from .codecs.planes import Planes
from .codecs.rans import Rans


def elf_pays(dtype: str, bound: ErrorBound, sample: bytes | U8) -> bool:
    """Whether quantising a tensor within ``bound`` is worth its while, judged on a sample chunk
    of it: True when the encoder would code the sample with a grid rather than exactly, or
    through a palette. A tensor where it would not (a bound finer than the dtype's own precision,
    a tiny tensor) is better off with the lossless pipeline: the same bytes, and decodable by the
    GPU path."""
    data = as_u8(sample)
    if data.shape[0] < ELF_DTYPES[dtype][0]:
        return False
    elf = Elf(dtype, bound.mode, bound.value)
    return not elf.is_exact(elf.encode(data))


def elf_pipeline(dtype: str, bound: ErrorBound, exact: bool = False, delta: bool = False) -> Pipeline:
    """The pipeline of a lossy float stream: ``elf`` then ``planes`` (unsigned codes) then ``rans``;
    with ``delta``, coded against a reference stream's chunks."""
    w = ELF_DTYPES[dtype][0]
    return Pipeline([Elf(dtype, bound.mode, bound.value, delta, exact=exact),
                     Planes(CODE_DTYPE[w], rotate=False), Rans()])


def bound_of(pipeline: list[Config]) -> ErrorBound | None:
    """The error bound of a stream's pipeline config, or None for a lossless stream."""
    for c in pipeline:
        if c.get("id") == Elf.codec_id:
            return ErrorBound(c["mode"], float(c["bound"]), "")
    return None


def encode_checked(pipeline: Pipeline, raw: U8, ref: U8 | None = None) -> tuple[bytes, U8]:
    """Encode one chunk of a lossy stream (``ref``: its reference chunk, for ``delta``); return
    (payload, the bytes restore will produce).

    The chunk's codes are dequantised by the decoder itself (:meth:`Elf.decode`) and checked
    against the bound once more, independently of the encoder's own per-element check; should
    that ever fail, the chunk is recoded exactly. The stages after ``elf`` are lossless, so the
    returned bytes are what decoding the payload yields, and the stream's decoded hash is of them.
    """
    elf = pipeline.codecs[0]
    assert isinstance(elf, Elf)
    rest = Pipeline(pipeline.codecs[1:])
    codes = elf.encode(raw, ref)
    out = np.empty(raw.shape[0], dtype=np.uint8)
    elf.decode(codes, out, ref)
    if elf.errors(raw, out)[2]:  # never expected: the encoder checked every element; stay correct regardless
        exact = Elf(elf.dtype, elf.mode, elf.bound, elf.delta, exact=True)
        return rest.encode(exact.encode(raw, ref)), raw
    return rest.encode(codes), out


def error_stats(dtype: str, bound: ErrorBound, src: U8, dec: U8) -> tuple[float, float, int]:
    """(max absolute error, max relative error, elements outside the bound) of the decoded bytes
    ``dec`` of a ``dtype`` tensor against its original bytes ``src``: :meth:`Elf.errors`."""
    return Elf(dtype, bound.mode, bound.value).errors(src, dec)
