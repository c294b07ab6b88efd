"""``zstd``: general-purpose compression for bytes that are not tensors (configs, tokenizers,
pickles, container headers, formats elves does not parse).

A frame may declare any content size, and ``max_output_size`` does not cap a declared one; a frame
that declares none may inflate without end. So decoding checks the declared size against the
expected one before anything is allocated, and streams the frame into a buffer of the expected
size, reading one byte more only to see whether the frame would go on.
"""
from __future__ import annotations

import threading

import numpy as np
import zstandard

from ..errors import CorruptArchiveError
from .base import U8, BytesBytesCodec, Config, Expected, expected_of, int_in

MIN_LEVEL = -(1 << 17)  # zstd's fastest level (ZSTD_minCLevel)
UNKNOWN = -1            # frame_content_size of a frame that declares no size


def compress_bound(n: int) -> int:
    """The largest frame zstd writes for ``n`` bytes (ZSTD_COMPRESSBOUND)."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < 128 << 10 else 0)


def _view(data: U8 | bytes) -> memoryview:
    return data.data if isinstance(data, np.ndarray) else memoryview(data)


class _Contexts(threading.local):
    """Each thread's zstd contexts, kept between chunks: making one costs 10-15 us, more than
    coding the small segments of an ONNX file or a checkpoint's records. A context may be reused
    but not shared between threads, and a reused one writes the same frame as a new one."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        c = self.compressors.get(level)
        if c is None:
            c = self.compressors[level] = zstandard.ZstdCompressor(level=level)
        return c


_contexts = _Contexts()


class Zstd(BytesBytesCodec):
    codec_id = "zstd"

    def __init__(self, level: int = 3):
        self.check(int_in(level, MIN_LEVEL, zstandard.MAX_COMPRESSION_LEVEL),
                   f"level must be an integer in {MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}, not {level!r}")
        self.level = int(level)

    def get_config(self) -> Config:
        return {"id": self.codec_id, "level": self.level}

    def encoded_size(self, decoded: Expected) -> Expected:
        return Expected(0, compress_bound(decoded.hi))

    def encode(self, data: U8 | bytes, ref: U8 | None = None) -> bytes:
        return _contexts.compressor(self.level).compress(_view(data))

    def decode(self, data: U8 | bytes, out: U8 | None = None, ref: U8 | None = None, *,
               expected: Expected | None = None) -> U8:
        want = expected_of(out, expected)
        src = _view(data)
        try:
            declared = zstandard.frame_content_size(src)
            if declared != UNKNOWN:
                want.check(declared, "zstd frame")
            if out is None:
                out = np.empty(want.hi if declared == UNKNOWN else declared, dtype=np.uint8)
            reader = _contexts.decompressor.stream_reader(src, read_across_frames=True)
            view = out.data
            got = 0
            while got < out.shape[0]:
                step = reader.readinto(view[got:])
                if step == 0:
                    break
                got += step
            if got == out.shape[0] and reader.read(1):
                raise CorruptArchiveError(f"zstd frame holds more than the {got} bytes expected")
        except zstandard.ZstdError as e:
            raise CorruptArchiveError(f"zstd frame does not decode: {e}") from None
        want.check(got, "zstd frame")
        return out[:got]
