"""The float codec (planes + rANS) on its own: bit-exact on any input, and robust to garbage."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elves import dtypes
from elves.codecs import Pipeline, codec_from_config
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.errors import CodecError, CorruptArchiveError

FLOATS = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]
ALL = FLOATS + ["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "C64", "C128", "F8_E8M0"]

# Bit patterns every float codec must carry exactly: +-0, +-inf, quiet and signalling NaNs with
# payloads, the smallest and largest denormals, the largest finite values.
SPECIAL = {
    2: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0001, 0x03FF, 0x7BFF, 0x7F80, 0xFF80, 0x7FC1, 0x0080],
    4: [0x0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x1, 0x007FFFFF, 0x7F7FFFFF],
    8: [0x0, 0x8000000000000000, 0x7FF0000000000000, 0x7FF8000000000001, 0x1, 0x000FFFFFFFFFFFFF],
}


def cpu_decode(pipeline: Pipeline, payload: bytes, nbytes: int) -> bytes | None:
    """The numba decoder's output, or None if it refuses the payload (the reference that the CUDA
    decoder and its host emulation are checked against)."""
    out = np.empty(nbytes, dtype=np.uint8)
    try:
        pipeline.decode(np.frombuffer(payload, dtype=np.uint8), out)
    except CorruptArchiveError:
        return None
    return out.tobytes()


def roundtrip(dtype: str, raw: np.ndarray, **rans) -> tuple[bytes, np.ndarray]:
    p = Pipeline([Planes(dtype), Rans(**rans)])
    enc = p.encode(raw)
    out = np.full(raw.shape[0], 0xA5, dtype=np.uint8)  # poisoned: every byte must be written
    Pipeline.from_config(p.get_config()).decode(enc, out)
    return enc, out


def weights_like(dtype: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian weights (std 0.02) in ``dtype``'s bits, salted with the special values."""
    d = dtypes.get(dtype)
    if d.is_float and d.itemsize > 1:
        vals = (rng.standard_normal(n) * 0.02).astype(dtypes.numpy_dtype(dtype))
        raw = vals.view(np.uint8).copy()
        words = raw.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[d.itemsize])
        specials = np.array(SPECIAL[d.itemsize], dtype=words.dtype)
        idx = rng.integers(0, n, size=min(n, len(specials)))
        words[idx] = specials[: len(idx)]
        return raw
    return rng.integers(0, 256, size=n * d.itemsize, dtype=np.uint8)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 1000, 70001])
def test_every_dtype_roundtrips(dtype: str, n: int) -> None:
    raw = weights_like(dtype, n, np.random.default_rng(n))
    _, out = roundtrip(dtype, raw)
    assert np.array_equal(out, raw)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS + ["I64", "U8", "C64"]),
    data=st.binary(min_size=0, max_size=6000),
    lanes=st.sampled_from([1, 2, 5, 32, 256]),
    prob_bits=st.integers(min_value=1, max_value=12),
)
def test_any_bits_roundtrip(dtype: str, data: bytes, lanes: int, prob_bits: int) -> None:
    """Arbitrary bit patterns, not just plausible weights: NaNs, infinities, denormals, -0.0."""
    w = dtypes.get(dtype).itemsize
    raw = np.frombuffer(data[: len(data) // w * w] or b"\0" * w, dtype=np.uint8).copy()
    _, out = roundtrip(dtype, raw, lanes=lanes, prob_bits=prob_bits)
    assert np.array_equal(out, raw)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
                    min_size=1, max_size=3000),
)
def test_float_values_roundtrip(values: list[float]) -> None:
    raw = np.array(values, dtype=np.float32).view(np.uint8)
    _, out = roundtrip("F32", raw)
    assert np.array_equal(out, raw)


@pytest.mark.parametrize(
    "symbols",
    [
        np.zeros(5000, np.uint8),                                    # one symbol: constant plane
        np.tile(np.array([3, 200], np.uint8), 2500),                 # two symbols
        np.arange(256, dtype=np.uint8).repeat(20),                   # uniform: stored raw
        np.where(np.arange(100000) % 9973 == 0, 7, 1).astype(np.uint8),  # extremely skewed
    ],
)
def test_distribution_edges(symbols: np.ndarray) -> None:
    _, out = roundtrip("U8", symbols)
    assert np.array_equal(out, symbols)


def test_exponent_plane_compresses_and_mantissa_does_not_grow() -> None:
    raw = weights_like("BF16", 131072, np.random.default_rng(0))
    enc, _ = roundtrip("BF16", raw)
    # The exponent of N(0, 0.02) weights carries ~2.7 of its 8 bits and the sign+mantissa byte
    # is incompressible, so about (2.7 + 8) / 16.
    assert 0.62 < len(enc) / raw.size < 0.70


def plane_modes(payload: bytes) -> list[int]:
    """The mode byte of each plane section of a ``rans`` container (docs/FORMAT.md)."""
    buf = np.frombuffer(payload, np.uint8)
    offsets = buf[8:8 + 4 * int(buf[6])].view(np.uint32)
    return [int(buf[o]) for o in offsets]


@pytest.mark.parametrize("entropy_bits, mode", [(8.0, 0), (7.75, 2), (7.5, 2)])
def test_a_long_plane_is_judged_raw_only_when_a_percent_is_out_of_reach(entropy_bits: float, mode: int) -> None:
    """Long planes are first judged on a sample; bytes that would shrink by over 1% must still
    be coded (mode 2; 7.75 bits shrink by 2.4% after the table), uniform bytes stored raw (mode 0)."""
    rng = np.random.default_rng(3)
    k = int(round(2 ** entropy_bits))  # k equally likely byte values: log2(k) bits each
    symbols = rng.integers(0, k, 1 << 17).astype(np.uint8)
    enc, out = roundtrip("U8", symbols)
    assert np.array_equal(out, symbols)
    assert plane_modes(enc) == [mode]


def test_corrupt_payload_raises_instead_of_crashing() -> None:
    raw = weights_like("F32", 20000, np.random.default_rng(1))
    p = Pipeline([Planes("F32"), Rans()])
    enc = bytearray(p.encode(raw))
    rng = np.random.default_rng(2)
    raised = 0
    for _ in range(300):
        bad = bytearray(enc)
        for pos in rng.integers(0, len(bad), size=rng.integers(1, 4)):
            bad[pos] ^= 1 << int(rng.integers(0, 8))
        cut = bytes(bad[: rng.integers(1, len(bad) + 1)]) if rng.random() < 0.3 else bytes(bad)
        out = np.empty(raw.size, np.uint8)
        try:
            p.decode(cut, out)
        except CorruptArchiveError:
            raised += 1
    # Flips that land in a raw mantissa plane decode to other bytes: the archive's chunk checksum
    # catches those. Everything that breaks the container structure must raise.
    assert raised > 100


def test_encoder_reciprocals_give_exact_quotients() -> None:
    """The rANS encoder divides the state by a frequency with one multiply by a rounded-up
    reciprocal. Check it against integer division for every frequency a table can hold, at the
    states where truncation is tightest: the last 4096 multiples of f below 2**32 (a plain
    1/f truncates some of them one too low) and the states just below them."""
    from elves.kernels import planes_rans as k

    for first in range(1, 4096, 256):
        freq = np.arange(first, first + 256, dtype=np.int64)
        _, rcp = k._encode_tables(freq, np.zeros(256, np.int64))
        f = freq[:, None].astype(np.uint64)
        q = (np.uint64((1 << 32) - 1) // f) - np.arange(4096, dtype=np.uint64)
        x = np.concatenate([q * f, q * f - np.uint64(1)], axis=1)
        got = (x.astype(np.float64) * rcp[:, None]).astype(np.uint64)
        assert np.array_equal(got, x // f)


def test_corrupt_lane_streams_at_the_end_of_the_payload_raise() -> None:
    """A U8 chunk is a single rANS plane whose last lanes end where the payload ends: the
    decoder runs those with clamped reads and the others without. A flipped bit in any lane
    stream, on either path, must fail the final-state check."""
    rng = np.random.default_rng(4)
    sym = np.minimum(rng.geometric(0.3, 50001), 255).astype(np.uint8)
    p = Pipeline([Planes("U8"), Rans()])
    enc = np.frombuffer(p.encode(sym), dtype=np.uint8)
    lanes_start = len(enc) // 10  # past the header and the frequency table (~300 bytes)
    for _ in range(200):
        bad = enc.copy()
        bad[rng.integers(lanes_start, len(bad))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        with pytest.raises(CorruptArchiveError):
            p.decode(bad, np.empty(sym.size, np.uint8))


def test_unknown_codec_and_dtype_are_clear_errors() -> None:
    with pytest.raises(CodecError, match="unknown codec 'lz77'"):
        codec_from_config({"id": "lz77"})
    with pytest.raises(CodecError, match="unknown dtype 'F12'"):
        Planes("F12")


def test_zstd_contexts_kept_between_chunks_write_and_read_as_new_ones():
    """Each thread reuses its zstd contexts; a reused one must write the frame a new one writes,
    and a frame that failed to decode must leave nothing behind for the next."""
    import threading

    import zstandard

    from elves.codecs.base import Expected
    from elves.codecs.zstd import Zstd

    rng = np.random.default_rng(7)
    pieces = [rng.integers(0, 4, n, dtype=np.uint8) for n in (1, 300, 70_000, 2_000_000)]
    frames: dict[tuple[int, int, int], bytes] = {}

    def work(tid: int) -> None:
        for level in (3, 9, 3):
            for k, raw in enumerate(pieces if tid % 2 else pieces[::-1]):
                frames[(tid, level, k if tid % 2 else len(pieces) - 1 - k)] = Zstd(level).encode(raw)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (tid, level, k), frame in frames.items():
        assert frame == zstandard.ZstdCompressor(level=level).compress(pieces[k].tobytes())

    codec = Zstd(3)
    frame = codec.encode(pieces[2])
    want = Expected(pieces[2].shape[0], pieces[2].shape[0])
    with pytest.raises(CorruptArchiveError):
        codec.decode(frame[: len(frame) // 2], expected=want)
    with pytest.raises(CorruptArchiveError):
        codec.decode(b"\x28\xb5\x2f\xfd" + frame[4:40], expected=want)
    assert np.array_equal(codec.decode(frame, expected=want), pieces[2])
