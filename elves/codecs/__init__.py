"""Codecs and the pipeline that chains them, in the manner of zarr v3 and numcodecs.

A stream is cut into chunks and every chunk goes through the same pipeline, independently of the
others. A pipeline is a list of codecs, each a small class with a JSON-serialisable config:

    array -> array   filters (XOR with a reference, quantisation: later codecs)
    array -> planes  the splitter (``planes``): one byte plane per byte of the element
    planes -> bytes  the entropy coder (``rans``), decodable by the numba and the CUDA kernels
    bytes -> bytes   general-purpose compressors (``zstd``, for opaque files)

Encoding applies the codecs in order; decoding applies them in reverse, and the first codec of
the list writes straight into the caller's output buffer.

A filter that declares ``needs_ref = True`` (BitX's ``xor``) also receives the reference chunk:
the bytes at the same place in a tensor of the base model, which the caller reads and checks. A
chunk whose reference filter (the first codec) leaves nothing but zero bytes (it equals its
reference) is stored as an empty payload when the filter declares ``omits_zero_output`` (``xor``),
and that filter's ``decode`` then gets ``None`` for data: unchanged chunks and tensors cost only
their index entries.

Decoding trusts no number in a payload. Before a stage decodes, the pipeline tells it what it must
produce (:class:`Expected`), derived backwards from the chunk's decoded length, which the index
parser checked against the tensor: each codec maps the size of its decoded data to the sizes its
encoded form can have (:meth:`Codec.encoded_size`), as zarr v3 codecs compute encoded sizes. A
container whose header claims anything else is refused before anything is allocated, and the
kernels are handed the capacity of every buffer they touch.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import numpy as np

from ..errors import CodecError, CorruptArchiveError

Config = dict[str, Any]

# The kinds of data between stages: a 1-D uint8 array, or a (planes, n) uint8 array of byte planes.
BYTES = "bytes"
PLANES = "planes"


class Expected(NamedTuple):  # a tuple: built per chunk, and cheaply
    """What a stage's decode must produce: ``lo`` to ``hi`` bytes, as ``planes`` byte planes of
    equal length (``planes`` 0: flat bytes)."""

    lo: int
    hi: int
    planes: int = 0

    @classmethod
    def exactly(cls, nbytes: int, planes: int = 0) -> "Expected":
        return cls(nbytes, nbytes, planes)

    def check(self, nbytes: int, what: str) -> None:
        """CorruptArchiveError unless ``nbytes`` (what a payload's header claims) is expected."""
        if not self.lo <= nbytes <= self.hi:
            want = str(self.lo) if self.lo == self.hi else f"{self.lo} to {self.hi}"
            raise CorruptArchiveError(f"{what} holds {nbytes} bytes, expected {want}")


def expected_of(out: np.ndarray | None, expected: Expected | None) -> Expected:
    """What a decode must produce: ``expected`` (which the pipeline derives from the size of its
    ``out``), else all of ``out``."""
    if expected is not None:
        return expected
    if out is None:
        raise CodecError("decode needs the output buffer or the expected size")
    return Expected.exactly(out.nbytes, out.shape[0] if out.ndim == 2 else 0)


def int_in(v: Any, lo: int, hi: int) -> bool:
    """``v`` is an integer (not a bool, which Python counts as one) in ``lo..hi``."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= hi


class Codec:
    """One step of a pipeline. Subclasses set ``codec_id`` and implement ``encode``, ``decode``,
    ``encoded_size`` and ``get_config``; ``__init__`` checks every parameter's type and range
    (configs come from untrusted indexes) and raises CodecError."""

    codec_id: ClassVar[str]
    needs_ref: ClassVar[bool] = False
    """True for filters that code a chunk against its reference chunk: their ``encode`` and
    ``decode`` then take a ``ref`` keyword (a 1-D uint8 array, possibly shorter than the chunk).
    Such a filter must be the first codec of its pipeline."""
    omits_zero_output: ClassVar[bool] = False
    """True for a reference filter whose all-zero output (a chunk equal to its reference) is
    stored as an empty payload; its ``decode`` then gets ``None`` for data."""
    decodes_to: ClassVar[str] = BYTES   # what ``decode`` produces (``encode`` takes)
    encodes_to: ClassVar[str] = BYTES   # what ``encode`` produces (``decode`` takes)

    def encode(self, data: Any) -> Any:
        raise NotImplementedError

    def decode(self, data: Any, out: np.ndarray | None = None, *, expected: Expected | None = None) -> Any:
        """Invert :meth:`encode`: into ``out`` when given, else into a new array of a size that
        ``expected`` allows (checked against the payload's header before it is allocated)."""
        raise NotImplementedError

    def encoded_size(self, decoded: Expected) -> Expected:
        """The sizes :meth:`encode` can produce from data of a size ``decoded`` allows;
        CorruptArchiveError if it can produce none (a length that is not whole elements)."""
        raise NotImplementedError

    def get_config(self) -> Config:
        raise NotImplementedError

    def check(self, ok: bool, what: str) -> None:
        """CodecError naming this codec unless ``ok``: for parameter checks in ``__init__``."""
        if not ok:
            raise CodecError(f"bad parameters for codec {self.codec_id!r}: {what}")

    @classmethod
    def from_config(cls, config: Config) -> "Codec":
        params = {k: v for k, v in config.items() if k != "id"}
        try:
            return cls(**params)
        except (TypeError, ValueError, OverflowError) as e:  # a parameter no check foresaw
            raise CodecError(f"bad parameters for codec {cls.codec_id!r}: {e}") from None


_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available to :func:`codec_from_config` by its ``codec_id``."""
    _REGISTRY[cls.codec_id] = cls
    return cls


def codec_from_config(config: Config) -> Codec:
    if not isinstance(config, dict):
        raise CodecError(f"a codec config must be an object, not {type(config).__name__}")
    codec_id = config.get("id")
    if not isinstance(codec_id, str) or codec_id not in _REGISTRY:
        raise CodecError(f"unknown codec {codec_id!r}; this elves knows {sorted(_REGISTRY)}")
    return _REGISTRY[codec_id].from_config(config)


class Pipeline:
    """The codecs one stream's chunks go through. Built only in an order that decodes: each
    codec takes what the one before it produces (bytes or planes), the last produces bytes, and
    a filter that needs a reference comes first (CodecError otherwise)."""

    def __init__(self, codecs: list[Codec]):
        kind = BYTES
        for i, codec in enumerate(codecs):
            if codec.decodes_to != kind or (codec.needs_ref and i):
                raise CodecError(f"codec {codec.codec_id!r} cannot follow "
                                 f"{[c.codec_id for c in codecs[:i]] or 'the start'} in a pipeline")
            kind = codec.encodes_to
        if kind != BYTES:
            raise CodecError(f"a pipeline cannot end with {codecs[-1].codec_id!r}: it does not produce bytes")
        self.codecs = codecs
        self._expected: dict[int, list[Expected]] = {}  # a stream's chunks have one or two sizes

    @classmethod
    def from_config(cls, configs: list[Config]) -> "Pipeline":
        if not isinstance(configs, list):
            raise CodecError(f"a pipeline must be a list of codec configs, not {type(configs).__name__}")
        return cls([codec_from_config(c) for c in configs])

    def get_config(self) -> list[Config]:
        return [c.get_config() for c in self.codecs]

    @property
    def ref_codec(self) -> Codec | None:
        """The filter that needs a reference chunk, if any (the first codec, if any)."""
        return self.codecs[0] if self.codecs and self.codecs[0].needs_ref else None

    def expected(self, nbytes: int) -> list[Expected]:
        """What each codec's decode must produce, for a chunk that decodes to ``nbytes``:
        ``expected(n)[i]`` for ``codecs[i]``. CorruptArchiveError if no payload can decode to
        ``nbytes`` (a length that is not whole elements of the pipeline's dtype)."""
        sizes = self._expected.get(nbytes)
        if sizes is None:
            sizes = [Expected.exactly(nbytes)]
            for codec in self.codecs[:-1]:
                sizes.append(codec.encoded_size(sizes[-1]))
            if len(self._expected) >= 16:
                self._expected.clear()
            self._expected[nbytes] = sizes
        return sizes

    def encode(self, chunk: np.ndarray, ref: np.ndarray | None = None) -> bytes:
        """Encode one chunk given as a 1-D uint8 array of its raw bytes; ``ref`` is its
        reference chunk, given only to a filter that needs one."""
        data: Any = chunk
        for codec in self.codecs:
            if codec.needs_ref:
                if ref is None:
                    raise CodecError(f"codec {codec.codec_id!r} needs a reference chunk")
                data = codec.encode(data, ref=ref)
                if codec.omits_zero_output and codec is self.codecs[0] and not data.any():  # equal to its reference
                    return b""
            else:
                data = codec.encode(data)
        return bytes(data)

    def decode(self, payload: np.ndarray | bytes, out: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
        """Decode one chunk's payload into ``out`` (a 1-D uint8 array of the decoded length);
        ``ref`` is the chunk's reference chunk when the pipeline has a reference filter. Every
        stage is held to the size ``out`` implies (:meth:`expected`)."""
        if not self.codecs:  # stored as it is
            if len(payload) != out.shape[0]:
                raise CorruptArchiveError(f"stored chunk holds {len(payload)} bytes, expected {out.shape[0]}")
            out[:] = np.frombuffer(payload, dtype=np.uint8)
            return out
        codecs = self.codecs
        data: Any = payload
        if len(payload) == 0 and codecs[0].omits_zero_output:  # the reference filter's output was all zero
            codecs, data = codecs[:1], None
        sizes = self._expected.get(out.shape[0]) or self.expected(out.shape[0])
        for i in range(len(codecs) - 1, -1, -1):
            codec = codecs[i]
            target = out if i == 0 else None
            if codec.needs_ref:
                if ref is None:
                    raise CodecError(f"codec {codec.codec_id!r} needs a reference chunk")
                data = codec.decode(data, target, ref=ref, expected=sizes[i])
            else:
                data = codec.decode(data, target, expected=sizes[i])
        return out


# Importing the codec modules registers them; BitX's ``xor`` filter lives in the bitx package.
from . import elf, planes, rans, zstd  # noqa: E402,F401
import bitx.codec  # noqa: E402,F401
