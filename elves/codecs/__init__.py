"""Codecs and the pipeline that chains them, in the manner of zarr v3 and numcodecs.

A stream is cut into chunks and every chunk goes through the same pipeline, independently of the
others. A pipeline is a list of codecs, each a small class with a JSON-serialisable config:

    array -> array   filters (XOR with a reference, quantisation: later codecs)
    array -> planes  the splitter (``planes``): one byte plane per byte of the element
    planes -> bytes  the entropy coder (``rans``), decodable by the numba and the CUDA kernels
    bytes -> bytes   general-purpose compressors (``zstd``, for opaque files)

Encoding applies the codecs in order; decoding applies them in reverse, and the first codec of
the list writes straight into the caller's output buffer.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import CodecError, CorruptArchiveError

Config = dict[str, Any]


class Codec:
    """One step of a pipeline. Subclasses set ``codec_id`` and implement the four methods."""

    codec_id: ClassVar[str]

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

    def encode(self, chunk: np.ndarray) -> bytes:
        """Encode one chunk given as a 1-D uint8 array of its raw bytes."""
        data: Any = chunk
        for codec in self.codecs:
            data = codec.encode(data)
        return bytes(data)

    def decode(self, payload: np.ndarray | bytes, out: np.ndarray) -> np.ndarray:
        """Decode one chunk's payload into ``out`` (a 1-D uint8 array of the decoded length)."""
        if not self.codecs:  # stored as it is
            if len(payload) != out.shape[0]:
                raise CorruptArchiveError(f"stored chunk holds {len(payload)} bytes, expected {out.shape[0]}")
            out[:] = np.frombuffer(payload, dtype=np.uint8)
            return out
        data: Any = payload
        last = len(self.codecs) - 1
        for i, codec in enumerate(reversed(self.codecs)):
            data = codec.decode(data, out if i == last else None)
        return out


# Importing the codec modules registers them.
from . import planes, rans, zstd  # noqa: E402,F401
