"""What every codec is: a step of a pipeline with a declared kind and a JSON config.

A codec's kind says what it takes and what it gives (:class:`Form`), as zarr v3 sorts its codecs
into array -> array, array -> bytes and bytes -> bytes. Here the array -> bytes step comes in two,
because the GPU decodes its middle form: ``planes`` cuts an array into byte planes, and ``rans``
codes byte planes into bytes.

Decoding trusts no number in a payload. Before a stage decodes, the pipeline tells it what it must
produce (:class:`Expected`), derived backwards from the chunk's decoded length, which the index
parser checked against the tensor: each codec maps the size of its decoded data to the sizes its
encoded form can have (:meth:`Codec.encoded_size`), as zarr v3 codecs compute encoded sizes. A
container whose header claims anything else is refused before anything is allocated, and the
kernels are handed the capacity of every buffer they touch.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from ..errors import CodecError, CorruptArchiveError

Config = dict[str, Any]
U8 = npt.NDArray[np.uint8]
"""A chunk, its reference, or an output buffer: a 1-D uint8 array of raw bytes."""

C = TypeVar("C", bound="Codec")


class Form(enum.Enum):
    """What a chunk is between two stages of a pipeline."""

    ARRAY = "array"    # elements of a dtype, as their raw bytes: a 1-D uint8 array
    PLANES = "planes"  # one byte plane per byte of the element: a (planes, n) uint8 array
    BYTES = "bytes"    # an encoded byte string: a 1-D uint8 array or bytes

    def feeds(self, wanted: Form) -> bool:
        """Whether data of this form can go to a codec that takes ``wanted``: the same form, or
        an array read as its raw bytes."""
        return self is wanted or (self is Form.ARRAY and wanted is Form.BYTES)


class Expected(NamedTuple):  # a tuple: built per chunk, and cheaply
    """What a stage's decode must produce: ``lo`` to ``hi`` bytes, as ``planes`` byte planes of
    equal length (``planes`` 0: flat bytes)."""

    lo: int
    hi: int
    planes: int = 0

    @classmethod
    def exactly(cls, nbytes: int, planes: int = 0) -> Expected:
        return cls(nbytes, nbytes, planes)

    def check(self, nbytes: int, what: str) -> None:
        """CorruptArchiveError unless ``nbytes`` (what a payload's header claims) is expected."""
        if not self.lo <= nbytes <= self.hi:
            want = str(self.lo) if self.lo == self.hi else f"{self.lo} to {self.hi}"
            raise CorruptArchiveError(f"{what} holds {nbytes} bytes, expected {want}")


def expected_of(out: npt.NDArray[Any] | None, expected: Expected | None) -> Expected:
    """What a decode must produce: ``expected`` (which the pipeline derives from the size of its
    ``out``), else all of ``out``."""
    if expected is not None:
        return expected
    if out is None:
        raise CodecError("decode needs the output buffer or the expected size")
    return Expected.exactly(out.nbytes, out.shape[0] if out.ndim == 2 else 0)


def as_u8(data: U8 | bytes) -> U8:
    """A payload as a uint8 array, without a copy."""
    return data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)


def int_in(v: object, lo: int, hi: int) -> bool:
    """``v`` is an integer (not a bool, which Python counts as one) in ``lo..hi``."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= int(v) <= hi


class Codec(ABC):
    """One step of a pipeline. A codec is one of the kinds below (its class says what it takes
    and gives), has a ``codec_id``, and a config that :meth:`get_config` writes and
    :meth:`from_config` reads back to an equal codec. ``__init__`` checks every parameter's type
    and range (configs come from untrusted indexes) and raises CodecError."""

    codec_id: ClassVar[str]
    decodes_to: ClassVar[Form]   # what ``decode`` produces and ``encode`` takes
    encodes_to: ClassVar[Form]   # what ``encode`` produces and ``decode`` takes
    optional_payload: ClassVar[bool] = False
    """True for a codec whose ``encode`` may return None: the chunk follows from the codec's
    parameters and its reference alone (BitX's ``xor`` of a chunk equal to its reference). The
    pipeline then stores an empty payload, and hands this codec's ``decode`` None for it."""

    @property
    def decodes_in_place(self) -> bool:
        """Whether ``decode`` may be handed its ``out`` as ``data`` (an element-wise filter whose
        payload is as long as the chunk): the codec before it then decodes straight into the
        chunk's buffer, which saves a buffer and a pass over it."""
        return False

    @property
    def needs_ref(self) -> bool:
        """Whether ``encode`` and ``decode`` need ``ref``, the chunk's reference chunk: the bytes
        at the same place in another tensor (a 1-D uint8 array, possibly shorter than the chunk)."""
        return False

    def validate(self, before: Sequence[Codec]) -> None:
        """CodecError unless this codec can follow ``before`` in a pipeline, beyond taking what
        they give (which the pipeline checks): a reference lines up with the chunk's own bytes,
        so a codec that needs one comes first."""
        if self.needs_ref and before:
            raise CodecError(f"codec {self.codec_id!r} codes a chunk against its reference: it cannot follow "
                             f"{[c.codec_id for c in before]} in a pipeline")

    @abstractmethod
    def encode(self, data: Any, ref: U8 | None = None) -> Any:
        """Encode one chunk of the form this codec takes."""

    @abstractmethod
    def decode(self, data: Any, out: U8 | None = None, ref: U8 | None = None, *,
               expected: Expected | None = None) -> Any:
        """Invert :meth:`encode`: into ``out`` when given, else into a new array of a size that
        ``expected`` allows (checked against the payload's header before it is allocated)."""

    @abstractmethod
    def encoded_size(self, decoded: Expected) -> Expected:
        """The sizes :meth:`encode` can produce from data of a size ``decoded`` allows;
        CorruptArchiveError if it can produce none (a length that is not whole elements)."""

    @abstractmethod
    def get_config(self) -> Config:
        """The codec's id and parameters, JSON-serialisable, in the order archives store them."""

    @classmethod
    def from_config(cls: type[C], config: Config) -> C:
        params = {k: v for k, v in config.items() if k != "id"}
        try:
            return cls(**params)
        except (TypeError, ValueError, OverflowError) as e:  # a parameter no check foresaw
            raise CodecError(f"bad parameters for codec {cls.codec_id!r}: {e}") from None

    def check(self, ok: bool, what: str) -> None:
        """CodecError naming this codec unless ``ok``: for parameter checks in ``__init__``."""
        if not ok:
            raise CodecError(f"bad parameters for codec {self.codec_id!r}: {what}")

    # Equal as an archive records them: by config (an encoder's own options, such as elf's
    # ``exact``, are no part of it).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash(repr(self.get_config()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}.from_config({self.get_config()!r})"


class ArrayArrayCodec(Codec):
    """A filter: array -> array (BitX ``xor``, ``elf`` quantisation)."""

    decodes_to = Form.ARRAY
    encodes_to = Form.ARRAY


class ArrayPlanesCodec(Codec):
    """Array -> byte planes (``planes``)."""

    decodes_to = Form.ARRAY
    encodes_to = Form.PLANES


class PlanesBytesCodec(Codec):
    """Byte planes -> bytes, the entropy coder (``rans``)."""

    decodes_to = Form.PLANES
    encodes_to = Form.BYTES


class BytesBytesCodec(Codec):
    """Bytes -> bytes, a general-purpose compressor (``zstd``); it takes an array as its raw bytes."""

    decodes_to = Form.BYTES
    encodes_to = Form.BYTES


class DecodesThrough(ABC):
    """A codec that decodes straight from the payload of the codec after it, in one step, when it
    knows that codec (``planes`` from ``rans``: no plane buffer between the two, one kernel call).
    A base class rather than a runtime-checked protocol: a pipeline is built per stream, and
    ``isinstance`` against a protocol costs microseconds."""

    @abstractmethod
    def decodes_through(self, inner: Codec) -> bool:
        """Whether :meth:`decode_through` can decode ``inner``'s payloads."""

    @abstractmethod
    def decode_through(self, inner: Codec, data: Any, out: U8 | None, expected: Expected) -> Any:
        """``self.decode(inner.decode(data, ...), out, expected=expected)``, with every check of the two."""
