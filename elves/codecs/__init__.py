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
reference) is stored as an empty payload, and that filter's ``decode`` then gets ``None`` for
data: unchanged chunks and tensors cost only their index entries.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import CodecError, CorruptArchiveError

Config = dict[str, Any]


class Codec:
    """One step of a pipeline. Subclasses set ``codec_id`` and implement the four methods."""

    codec_id: ClassVar[str]
    needs_ref: ClassVar[bool] = False
    """True for filters that code a chunk against its reference chunk: their ``encode`` and
    ``decode`` then take a ``ref`` keyword (a 1-D uint8 array, possibly shorter than the chunk)."""

    def encode(self, data: Any) -> Any:
        raise NotImplementedError

    def decode(self, data: Any, out: np.ndarray | None = None) -> Any:
        """Invert :meth:`encode`; when ``out`` is given, write the result there."""
        raise NotImplementedError

    def get_config(self) -> Config:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Config) -> "Codec":
        params = {k: v for k, v in config.items() if k != "id"}
        try:
            return cls(**params)
        except TypeError as e:
            raise CodecError(f"bad parameters for codec {cls.codec_id!r}: {e}") from None


_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available to :func:`codec_from_config` by its ``codec_id``."""
    _REGISTRY[cls.codec_id] = cls
    return cls


def codec_from_config(config: Config) -> Codec:
    try:
        cls = _REGISTRY[config["id"]]
    except KeyError:
        raise CodecError(f"unknown codec {config.get('id')!r}; this elves knows {sorted(_REGISTRY)}") from None
    return cls.from_config(config)


class Pipeline:
    """The codecs one stream's chunks go through."""

    def __init__(self, codecs: list[Codec]):
        self.codecs = codecs

    @classmethod
    def from_config(cls, configs: list[Config]) -> "Pipeline":
        return cls([codec_from_config(c) for c in configs])

    def get_config(self) -> list[Config]:
        return [c.get_config() for c in self.codecs]

    @property
    def ref_codec(self) -> Codec | None:
        """The filter that needs a reference chunk, if any (at most one per pipeline)."""
        return next((c for c in self.codecs if c.needs_ref), None)

    def encode(self, chunk: np.ndarray, ref: np.ndarray | None = None) -> bytes:
        """Encode one chunk given as a 1-D uint8 array of its raw bytes; ``ref`` is its
        reference chunk, given only to a filter that needs one."""
        data: Any = chunk
        for codec in self.codecs:
            if codec.needs_ref:
                if ref is None:
                    raise CodecError(f"codec {codec.codec_id!r} needs a reference chunk")
                data = codec.encode(data, ref=ref)
                if codec is self.codecs[0] and not data.any():  # equal to its reference: nothing to code
                    return b""
            else:
                data = codec.encode(data)
        return bytes(data)

    def decode(self, payload: np.ndarray | bytes, out: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
        """Decode one chunk's payload into ``out`` (a 1-D uint8 array of the decoded length);
        ``ref`` is the chunk's reference chunk when the pipeline has a reference filter."""
        if not self.codecs:  # stored as it is
            if len(payload) != out.shape[0]:
                raise CorruptArchiveError(f"stored chunk holds {len(payload)} bytes, expected {out.shape[0]}")
            out[:] = np.frombuffer(payload, dtype=np.uint8)
            return out
        codecs = self.codecs
        data: Any = payload
        if len(payload) == 0 and codecs[0].needs_ref:  # the reference filter's output was all zero
            codecs, data = codecs[:1], None
        last = len(codecs) - 1
        for i, codec in enumerate(reversed(codecs)):
            target = out if i == last else None
            if codec.needs_ref:
                if ref is None:
                    raise CodecError(f"codec {codec.codec_id!r} needs a reference chunk")
                data = codec.decode(data, target, ref=ref)
            else:
                data = codec.decode(data, target)
        return out


# Importing the codec modules registers them; BitX's ``xor`` filter lives in the bitx package.
from . import elf, planes, rans, zstd  # noqa: E402,F401
import bitx.codec  # noqa: E402,F401
