"""The vector rANS kernels (16 lanes a vector, the writer's 32 lanes and prob_bits 12) against the
original bytes and the plane-by-plane decode, on real weights, partial steps and damaged payloads."""
from __future__ import annotations

import os

import numpy as np
import pytest

from elves.codecs import Pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.kernels import planes_rans as k


def real_tensors(folder, dtype: str, limit: int = 6) -> list[np.ndarray]:
    from elves.readers import read_model

    files, _ = read_model(folder)
    out = []
    for f in files:
        with open(f.path, "rb") as fh:
            for seg in f.segments:
                if seg.dtype == dtype and seg.length >= 4096 and len(out) < limit:
                    out.append(np.frombuffer(os.pread(fh.fileno(), min(seg.length, 256 << 10), seg.offset), np.uint8))
    return out


@pytest.mark.parametrize("name, dtype", [("silero", "F32"), ("fall", "F16"), ("merlin-p1", "BF16")])
def test_real_weights_round_trip_through_both_decoders(dataset, name, dtype):
    chunks = real_tensors(dataset(name), dtype)
    assert chunks
    width = Planes(dtype).width
    for chunk in chunks:
        for size in (len(chunk), len(chunk) - 7 * width, 33 * width, 31 * width):  # partial and odd steps
            data = chunk[:size // width * width]
            payload = np.frombuffer(Pipeline([Planes(dtype), Rans()]).encode(data), np.uint8)
            n = len(data) // width
            words = np.empty(len(data), np.uint8)
            assert k.decode_words(payload, width, n, True, words) == k.OK
            assert np.array_equal(words, data)
            planes = np.empty((width, n), np.uint8)
            assert k.decode_planes(payload, planes) == k.OK
            merged = np.empty(len(data), np.uint8)
            assert k.merge(planes, n, width, True, merged) == k.OK
            assert np.array_equal(merged, data)


def test_damaged_lane_streams_are_refused_alike(dataset):
    """A byte changed in the coded plane's lane streams: the vector decoder reads no further than
    its chunk and ends in the same status as the plane-by-plane decode (and the encoder's
    payload decodes exactly, so a damaged one cannot pass unnoticed as the original)."""
    chunk = real_tensors(dataset("silero"), "F32", limit=1)[0]
    payload = np.frombuffer(Pipeline([Planes("F32"), Rans()]).encode(chunk), np.uint8)
    n = len(chunk) // 4
    start = int.from_bytes(payload[8:12].tobytes(), "little")
    end = int.from_bytes(payload[12:16].tobytes(), "little")
    assert payload[start] == k.MODE_RANS
    rng = np.random.default_rng(14)
    refused = 0
    for at in rng.integers(end - (end - start) // 2, end, 40):
        bad = payload.copy()
        bad[at] ^= 1 + rng.integers(255)
        words = np.empty(len(chunk), np.uint8)
        planes = np.empty((4, n), np.uint8)
        status = k.decode_words(bad, 4, n, True, words)
        assert status == k.decode_planes(bad, planes)
        assert status in (k.OK, k.ERR_FINAL_STATE)
        refused += status == k.ERR_FINAL_STATE
    assert refused >= 35
