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


def residual_chunks(dataset) -> list[np.ndarray]:
    """BF16 residuals as BitX leaves them: real weights XOR a fine-tune of them (each element
    moved by up to 0.4%), so every plane is coded and the last plane's lanes are short."""
    rng = np.random.default_rng(15)
    out = []
    for chunk in real_tensors(dataset("merlin-p1"), "BF16", limit=3):
        base = chunk.view(np.uint16)
        as_f32 = (base.astype(np.uint32) << 16).view(np.float32)
        tuned = as_f32 * (1 + rng.uniform(-4e-3, 4e-3, len(base)).astype(np.float32))
        out.append((base ^ (tuned.view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8))
    return out


def last_plane_ends_within_a_step_count(payload: np.ndarray, w: int, n: int) -> bool:
    """The last plane is coded and its last lane holds fewer words than the lane has steps, so
    that lane's unclamped reads could pass the chunk's end (docs/FORMAT.md, the rANS section)."""
    def u(at: int, size: int) -> int:
        return int.from_bytes(payload[at:at + size].tobytes(), "little")
    lanes = u(4, 2)
    start = u(8 + 4 * (w - 1), 4)
    symbols = u(start + 2, 2)
    table = start + 4 + symbols + (symbols & 1) + 2 * symbols
    table += -(table - start) % 4
    return payload[start] == k.MODE_RANS and u(table + 4 * (lanes - 1), 4) // 2 < n // lanes


def test_residuals_whose_last_plane_ends_near_the_chunk_end_decode_exactly(dataset):
    for chunk in residual_chunks(dataset):
        for size in (len(chunk), 64 * 2 + 2 * 33, 4096 * 2):
            data = chunk[:size]
            n = len(data) // 2
            payload = np.frombuffer(Pipeline([Planes("BF16"), Rans()]).encode(data), np.uint8)
            if size == len(chunk):
                assert last_plane_ends_within_a_step_count(payload, 2, n)
            words = np.empty(len(data), np.uint8)
            assert k.decode_words(payload, 2, n, True, words) == k.OK
            assert np.array_equal(words, data)


def test_damaged_lanes_of_a_last_plane_near_the_chunk_end_are_refused(dataset):
    """Its lanes read from a padded copy of the chunk's tail: a damaged word sends a lane past
    its stream, into the padding, never past the copy, and the final-state check refuses it."""
    chunk = residual_chunks(dataset)[0]
    n = len(chunk) // 2
    payload = np.frombuffer(Pipeline([Planes("BF16"), Rans()]).encode(chunk), np.uint8)
    assert last_plane_ends_within_a_step_count(payload, 2, n)
    start = int.from_bytes(payload[12:16].tobytes(), "little")
    rng = np.random.default_rng(16)
    refused = 0
    for at in rng.integers(len(payload) - (len(payload) - start) // 2, len(payload), 40):
        bad = payload.copy()
        bad[at] ^= 1 + rng.integers(255)
        words = np.empty(len(chunk), np.uint8)
        status = k.decode_words(bad, 2, n, True, words)
        assert status in (k.OK, k.ERR_FINAL_STATE)
        refused += status == k.ERR_FINAL_STATE
    assert refused >= 35
