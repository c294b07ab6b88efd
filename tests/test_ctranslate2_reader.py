"""The CTranslate2 reader: a real faster-whisper model.bin (Whisper base, FP16) and minilm converted
here (float32, float16, int8_float16) list their variables with the right dtypes and shapes and
restore byte for byte; identical variables share a stream. A model.bin has no magic number, so
whatever does not parse whole (truncated, forged counts and lengths, another version) is kept
opaque and still restores exactly, never a traceback."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

import elves
from elves.readers import ctranslate2 as ct2_reader
from elves.readers import read_file
from elves.readers.packing import pack_small


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def roundtrip(src: Path, tmp_path: Path) -> elves.CompressSummary:
    tmp_path.mkdir(exist_ok=True)
    archive = tmp_path / "m.elves"
    summary = elves.compress(src, archive, force=True)
    out = tmp_path / "restored"
    elves.restore(archive, out, force=True)
    if src.is_file():
        assert sha(out) == sha(src)
    else:
        for f in src.rglob("*"):
            if f.is_file():
                assert sha(out / f.relative_to(src)) == sha(f), f
    return summary


# -- a model.bin writer after ctranslate2.specs.ModelSpec._serialize, with fields to forge

TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def cstr(s: str, length: int | None = None) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw) if length is None else length) + raw


def model_bin(path: Path, variables: list[tuple[str, np.ndarray]], aliases: list[tuple[str, str]] = (),
              *, version: int = 6, n_vars: int | None = None, nbytes: dict[str, int] | None = None) -> Path:
    out = struct.pack("<I", version)
    if version >= 2:
        out += cstr("TransformerEncoderSpec") + struct.pack("<I", 1)
    out += struct.pack("<I", len(variables) if n_vars is None else n_vars)
    for name, value in variables:
        out += cstr(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        n = (nbytes or {}).get(name, value.nbytes)
        if version >= 4:
            out += struct.pack("<BI", TYPE_IDS[value.dtype.name], n)
        else:
            out += struct.pack("<BI", value.itemsize, n // value.itemsize)
        out += value.tobytes()
    if version >= 3:
        out += struct.pack("<I", len(aliases)) + b"".join(cstr(a) + cstr(b) for a, b in aliases)
    path.write_bytes(out)
    return path


@pytest.fixture
def variables() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(14)
    w = (rng.standard_normal((96, 64)) * 0.02).astype(np.float32)
    return [("encoder/layer_0/linear/weight", w),
            ("encoder/layer_0/linear/bias", (rng.standard_normal(96) * 0.1).astype(np.float16)),
            ("encoder/layer_1/linear/weight", w.copy()),             # identical to layer 0's
            ("encoder/layer_2/linear/weight", rng.integers(-127, 128, (96, 64)).astype(np.int8)),
            ("encoder/layer_2/linear/weight_scale", np.abs(rng.standard_normal(96)).astype(np.float32)),
            ("encoder/activation", np.array(1, dtype=np.int8))]


# -- real files

def test_whisper_variables(dataset) -> None:
    sf = read_file(dataset("whisper-ct2") / "model.bin", "model.bin")
    assert sf.format == "ctranslate2" and len(sf.tensors) == 212
    got = {t.name: (t.dtype, t.shape) for t in sf.tensors}
    assert got["decoder/embeddings/weight"] == ("F16", (51865, 512))
    assert got["encoder/conv1/weight"] == ("F16", (512, 80, 3))
    assert got["decoder/scale_embeddings"] == ("I8", ())
    assert sum(s.length for s in sf.segments if s.dtype == "F16") > 0.99 * sf.size


def test_whisper_roundtrips_smaller_than_zstd(dataset, tmp_path: Path) -> None:
    import zstandard

    src = dataset("whisper-ct2") / "model.bin"
    summary = roundtrip(src, tmp_path)
    assert summary.archive_bytes < len(zstandard.ZstdCompressor(level=3).compress(src.read_bytes()))
    assert elves.info(tmp_path / "m.elves").files[0]["format"] == "ctranslate2"


def test_minilm_conversions(dataset, tmp_path: Path) -> None:
    folder = dataset("minilm-ct2")
    dtypes = {}
    for q in ("float32", "float16", "int8_float16"):
        sf = read_file(folder / q / "model.bin", "model.bin")
        assert sf.format == "ctranslate2"
        dtypes[q] = {t.name: (t.dtype, t.shape) for t in sf.tensors}
    assert dtypes["float32"]["encoder/embeddings_0/weight"] == ("F32", (30522, 384))
    assert dtypes["float16"]["encoder/embeddings_0/weight"] == ("F16", (30522, 384))
    assert dtypes["int8_float16"]["encoder/embeddings_0/weight"] == ("I8", (30522, 384))
    assert dtypes["int8_float16"]["encoder/embeddings_0/weight_scale"] == ("F32", (30522,))
    assert dtypes["int8_float16"]["encoder/layer_0/ffn/linear_0/bias"] == ("F16", (1536,))
    # The int8_float16 model's float16 biases and norms are the float16 model's: stored once.
    summary = roundtrip(folder, tmp_path)
    segments = sum(len(read_file(f, f.name).segments) for f in folder.rglob("*") if f.is_file())
    assert summary.unique_streams < segments - 40


def test_identical_variables_share_a_stream(variables, tmp_path: Path) -> None:
    src = model_bin(tmp_path / "model.bin", variables, [("decoder/embeddings/weight", "encoder/layer_0/linear/weight")])
    sf = read_file(src, src.name)
    assert [(t.dtype, t.shape) for t in sf.tensors] == [
        ("F32", (96, 64)), ("F16", (96,)), ("F32", (96, 64)), ("I8", (96, 64)), ("F32", (96,)), ("I8", ())]
    summary = roundtrip(src, tmp_path / "x")
    assert summary.unique_streams == len(pack_small(sf).segments) - 1  # the archive packs small segments


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_older_binary_versions(variables, tmp_path: Path, version: int) -> None:
    # before version 4 the dtype came from the item size: 4 is float32, 2 int16, 1 int8
    kept = [(n, v) for n, v in variables if v.dtype.name in ("float32", "int8")]
    src = model_bin(tmp_path / "model.bin", kept, version=version)
    sf = read_file(src, src.name)
    assert sf.format == "ctranslate2" and [t.dtype for t in sf.tensors] == ["F32", "F32", "I8", "F32", "I8"]
    roundtrip(src, tmp_path / "x")


# -- what is not a model.bin this reader parses whole stays opaque

def hostile(variables: list[tuple[str, np.ndarray]], tmp_path: Path) -> dict[str, Path]:
    good = model_bin(tmp_path / "good.bin", variables).read_bytes()
    name = variables[0][0]
    cases = {
        "truncated in a header": good[:40],
        "truncated in the data": good[:len(good) // 2],
        "trailing bytes": good + b"\0",
        "version 0": struct.pack("<I", 0) + good[4:],
        "version 7": struct.pack("<I", 7) + good[4:],
        # the spec name's length, then the first variable's name's length, far past the end
        "string past the end": good[:4] + struct.pack("<H", 0xFFFF) + good[6:],
    }
    for label, blob in cases.items():
        (tmp_path / label.replace(" ", "_")).mkdir()
        (tmp_path / label.replace(" ", "_") / "model.bin").write_bytes(blob)
    out = {label: tmp_path / label.replace(" ", "_") / "model.bin" for label in cases}
    for label, kw in {"huge variable count": dict(n_vars=(1 << 32) - 1),
                      "bytes not matching the shape": dict(nbytes={name: 8}),
                      "bytes past the end": dict(nbytes={name: (1 << 32) - 4})}.items():
        (tmp_path / label.replace(" ", "_")).mkdir()
        out[label] = model_bin(tmp_path / label.replace(" ", "_") / "model.bin", variables, **kw)
    return out


def test_malformed_files_stay_opaque_and_restore(variables, tmp_path: Path) -> None:
    for label, src in hostile(variables, tmp_path).items():
        assert ct2_reader.parse(src, src.name) is None, label
        assert read_file(src, src.name).format == "opaque", label
        roundtrip(src, src.parent)


def test_unknown_dtype_and_deep_rank_stay_opaque(variables, tmp_path: Path) -> None:
    src = model_bin(tmp_path / "model.bin", variables[:1])
    raw = bytearray(src.read_bytes())
    at = raw.index(b"weight\0") + len(b"weight\0")          # the rank byte
    src.write_bytes(bytes(raw[:at + 9]) + bytes([9]) + bytes(raw[at + 10:]))   # dtype id 9
    assert ct2_reader.parse(src, src.name) is None
    raw[at] = 200                                              # rank 200
    src.write_bytes(bytes(raw))
    assert ct2_reader.parse(src, src.name) is None
