"""``rans``: code each byte plane with static-table rANS over interleaved lanes.

A plane whose symbols are all equal costs two bytes, one that rANS cannot shrink is stored raw,
and every other plane gets its own frequency table, per chunk, so the coder follows how the
statistics drift along a tensor. The container (docs/FORMAT.md) is decoded by the numba kernel
here and by the CUDA kernel in ``cuda/``: the lanes are what a GPU runs in parallel.
"""
from __future__ import annotations

import numpy as np

from ..errors import CodecError, CorruptArchiveError
from .base import U8, Config, Expected, PlanesBytesCodec, as_u8, expected_of, int_in

# The status codes of the numba and the CUDA decoders (elves.gpu reports the kernel's with these).
STATUS = {
    1: "chunk header is malformed",
    2: "a rANS lane runs past its stream",
    3: "a rANS lane did not end in its initial state",
    4: "a rANS frequency table is invalid",
    5: "the container's size differs from the chunk's decoded length",
}


class Rans(PlanesBytesCodec):
    codec_id = "rans"

    def __init__(self, lanes: int = 32, prob_bits: int = 12):
        self.check(int_in(lanes, 1, 4096), f"lanes must be an integer in 1..4096, not {lanes!r}")
        self.check(int_in(prob_bits, 1, 12), f"prob_bits must be an integer in 1..12, not {prob_bits!r}")
        self.lanes = int(lanes)
        self.prob_bits = int(prob_bits)

    def get_config(self) -> Config:
        return {"id": self.codec_id, "lanes": self.lanes, "prob_bits": self.prob_bits}

    def encoded_size(self, decoded: Expected) -> Expected:
        from ..kernels import planes_rans as k

        w = decoded.planes
        return Expected(8 + 4 * w, k.max_encoded_size(decoded.hi // w, w))

    def encode(self, data: U8, ref: U8 | None = None) -> U8:
        from ..kernels import planes_rans as k

        w, n = data.shape
        out = np.empty(k.max_encoded_size(n, w), dtype=np.uint8)
        size = k.encode_planes(data, self.lanes, self.prob_bits, out)
        if size < 0:
            raise CodecError(f"rans codes at most 255 planes of 2^32 symbols, not {w} of {n}")
        return out[:size]

    def decode(self, data: U8 | bytes, out: U8 | None = None, ref: U8 | None = None, *,
               expected: Expected | None = None) -> U8:
        from ..kernels import planes_rans as k

        want = expected_of(out, expected)
        buf = as_u8(data)
        w, n = k.container_shape(buf)
        if w < 1:
            raise CorruptArchiveError(STATUS[k.ERR_HEADER])
        if want.planes and w != want.planes:
            raise CorruptArchiveError(f"rans container holds {w} byte planes, expected {want.planes}")
        want.check(w * n, "rans container")  # before the planes are allocated
        planes = np.empty((w, n), dtype=np.uint8) if out is None else out.reshape(w, n)
        status = k.decode_planes(buf, planes)
        if status:
            raise CorruptArchiveError(STATUS.get(status, f"decode failed ({status})"))
        return planes
