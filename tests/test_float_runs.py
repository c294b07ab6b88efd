"""Float runs in opaque files: a container elves does not parse, holding real weights (minilm's)
as float32, float16 and bfloat16 between a binary header and text, has those stretches found
and coded as floats, smaller than zstd-3 codes the file, and restores byte for byte. Files
without floats stay one opaque segment."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zstandard

import elves
from elves.readers import float_runs, read_file


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def container(dataset, tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """An unknown format: a header, minilm's first 3 MiB of float32 weights, its vocabulary, then
    weights cast to float16 at an odd offset and to bfloat16; where each float part lies."""
    minilm = dataset("minilm")
    raw = (minilm / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    weights = np.frombuffer(raw[8 + n:], np.float32)
    f32 = weights[: 3 << 18].tobytes()
    f16 = weights[3 << 18: 4 << 18].astype(np.float16).tobytes()
    bf16 = weights[4 << 18: 5 << 18].astype(ml_dtypes.bfloat16).tobytes()
    header = b"MYFMT\x01" + json.dumps({"layers": 6, "names": sorted(json.loads(raw[8:8 + n]))}).encode()
    parts = [header, f32, (minilm / "vocab.txt").read_bytes(), b"\x07", f16, bf16, b"end"]
    places, pos = {}, 0
    for label, part in zip(["header", "f32", "vocab", "pad", "f16", "bf16", "tail"], parts):
        places[label] = (pos, pos + len(part))
        pos += len(part)
    path = tmp_path / "weights.dat"
    path.write_bytes(b"".join(parts))
    return path, places


def covered(segments: list, lo: int, hi: int, dtypes: set[str]) -> float:
    """The fraction of [lo, hi) that lies in segments of the given dtypes."""
    got = sum(max(0, min(s.offset + s.length, hi) - max(s.offset, lo)) for s in segments if s.dtype in dtypes)
    return got / (hi - lo)


def test_runs_are_found_where_the_floats_are(container) -> None:
    path, places = container
    sf = read_file(path, path.name)
    assert sf.format == "opaque" and not sf.tensors
    assert covered(sf.segments, *places["f32"], {"F32"}) > 0.8
    assert covered(sf.segments, *places["f16"], {"F16"}) > 0.6
    assert covered(sf.segments, *places["bf16"], {"BF16"}) > 0.6
    assert covered(sf.segments, *places["vocab"], {"F32", "F16", "BF16"}) < 0.2
    # each run starts on an element of its array
    for s in sf.segments:
        if s.dtype == "F16":
            assert (s.offset - places["f16"][0]) % 2 == 0
        elif s.dtype == "F32":
            assert (s.offset - places["f32"][0]) % 4 == 0


def test_float_runs_beat_zstd_and_restore_exactly(container, tmp_path: Path) -> None:
    path, _ = container
    archive = tmp_path / "w.elves"
    summary = elves.compress(path, archive)
    zstd = len(zstandard.ZstdCompressor(level=3).compress(path.read_bytes()))
    assert summary.archive_bytes < 0.95 * zstd
    elves.restore(archive, tmp_path / "out")
    assert sha(tmp_path / "out") == sha(path)


def test_files_without_floats_stay_whole(dataset, tmp_path: Path) -> None:
    text = tmp_path / "vocab.big"
    text.write_bytes((dataset("minilm") / "vocab.txt").read_bytes() * 8)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(14).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    for path in (text, noise):
        sf = read_file(path, path.name)
        assert [(s.offset, s.length, s.dtype) for s in sf.segments] == [(0, path.stat().st_size, None)]


def test_small_files_are_not_searched(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(np.linspace(-1, 1, (float_runs.MIN_FILE - 1) // 4, dtype=np.float32).tobytes())
    assert len(read_file(path, path.name).segments) == 1
