"""compress -> restore is byte-exact: synthetic models in every dtype and layout, and real ones."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import elves
from elves import dtypes
from tests.conftest import sha256, tree_hashes, write_safetensors

from .test_codecs import ALL, weights_like


def roundtrip(src: Path, tmp: Path) -> tuple[elves.CompressSummary, Path]:
    archive = tmp / "model.elves"
    summary = elves.compress(src, archive)
    out = tmp / ("restored" + (src.suffix if src.is_file() else ""))
    elves.restore(archive, out)
    assert tree_hashes(out) == tree_hashes(src)
    rep = elves.verify(archive, against=src)
    assert rep.ok, rep.problems
    return summary, archive


def every_dtype(rng: np.random.Generator) -> dict:
    tensors = {}
    for dt in ALL:
        shape = (3, 37)
        n = int(np.prod(shape))
        tensors[f"t.{dt.lower()}"] = (dt, shape, weights_like(dt, n, rng).tobytes())
    tensors["packed.f4"] = ("F4", (8, 2), rng.integers(0, 256, 8, dtype=np.uint8).tobytes())
    tensors["empty"] = ("F32", (0, 4), b"")
    tensors["empty.f4"] = ("F4", (0,), b"")
    tensors["scalar"] = ("BF16", (), b"\x80\x3f")
    return tensors


@pytest.mark.parametrize("layout", [{}, {"pad": 13}, {"reverse": True}, {"gap": 5}])
def test_every_dtype_and_layout_single_file(tmp_path: Path, layout: dict) -> None:
    src = write_safetensors(tmp_path / "m.safetensors", every_dtype(np.random.default_rng(0)),
                            {"format": "pt"}, **layout)
    roundtrip(src, tmp_path)


def test_tensor_access_matches_the_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tensors = every_dtype(rng)
    tensors["big.bf16"] = ("BF16", (700, 1000), weights_like("BF16", 700_000, rng).tobytes())
    src = write_safetensors(tmp_path / "m.safetensors", tensors)
    archive = tmp_path / "m.elves"
    elves.compress(src, archive)
    with elves.open(archive) as a:
        assert set(a.keys()) == set(tensors)
        for name, (dt, shape, raw) in tensors.items():
            got = a.get_tensor(name)
            assert got.shape == (tuple(shape) if dt in dtypes.DTYPES else (len(raw),))
            if dt in dtypes.DTYPES:
                assert got.dtype == dtypes.numpy_dtype(dt)
            assert got.tobytes() == raw, name
    loaded = elves.load_file(archive)
    assert loaded["big.bf16"].tobytes() == tensors["big.bf16"][2]


def test_torch_framework(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    tensors = {dt: (dt, (5, 9), weights_like(dt, 45, rng).tobytes()) for dt in ["BF16", "F16", "F32", "I64", "F8_E4M3"]}
    archive = tmp_path / "m.elves"
    elves.compress(write_safetensors(tmp_path / "m.safetensors", tensors), archive)
    got = elves.load_file(archive, framework="pt")
    for name, (dt, _, raw) in tensors.items():
        t = got[name]
        assert isinstance(t, torch.Tensor) and t.dtype == getattr(torch, dtypes.get(dt).torch)
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == raw


def test_folder_with_dedup(tmp_path: Path) -> None:
    """A snapshot folder: shards, index json, tokenizer, nested files, a duplicate shard, tied weights."""
    rng = np.random.default_rng(1)
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    emb = weights_like("BF16", 64 * 512, rng).tobytes()
    write_safetensors(src / "model-00001-of-00002.safetensors", {
        "embed.weight": ("BF16", (64, 512), emb),
        "lm_head.weight": ("BF16", (64, 512), emb),  # tied: same bytes, stored once
        "ln.weight": ("F32", (512,), np.ones(512, np.float32).tobytes()),
    })
    write_safetensors(src / "model-00002-of-00002.safetensors", {
        "layer.weight": ("BF16", (512, 512), weights_like("BF16", 512 * 512, rng).tobytes()),
    })
    shutil.copy(src / "model-00002-of-00002.safetensors", src / "sub" / "copy.safetensors")
    (src / "config.json").write_text(json.dumps({"_name_or_path": "demo", "hidden_size": 512}))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"embed.weight": "model-00001-of-00002.safetensors"}}))
    (src / "tokenizer.json").write_text(json.dumps({"vocab": {f"tok{i}": i for i in range(3000)}}))
    (src / "empty.txt").write_bytes(b"")
    summary, archive = roundtrip(src, tmp_path)
    size = lambda p: (src / p).stat().st_size  # noqa: E731
    # The duplicate shard and the tied embedding cost (almost) nothing.
    assert summary.archive_bytes < summary.original_bytes - size("sub/copy.safetensors") - len(emb)
    info = elves.info(archive)
    assert info.by_dtype["BF16"].original_bytes == len(emb) + 512 * 512 * 2


def test_restore_into_existing_empty_folder_and_force(tmp_path: Path) -> None:
    src = write_safetensors(tmp_path / "a.safetensors", {"w": ("F32", (10,), np.arange(10, dtype=np.float32).tobytes())})
    archive = tmp_path / "a.elves"
    elves.compress(src, archive)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(elves.OutputExistsError):
        elves.restore(archive, out)
    assert out.read_bytes() == b"old"
    elves.restore(archive, out, force=True)
    assert sha256(out) == sha256(src)
    folder = tmp_path / "dir"
    folder.mkdir()
    elves.restore(archive, folder)
    assert sha256(folder / "a.safetensors") == sha256(src)


# Real weights (datasets.md). Each is the whole published model, restored byte for byte.
REAL = [
    ("minilm", 1.215),  # F32 safetensors; ZipNN gets 1.221 on its tensors
    ("astra", 1.48),    # BF16 torch checkpoint; ZipNN gets 1.486 on its tensors
    ("fall", 1.05),     # F16 ultralytics checkpoint (pickled classes: never executed) and an ONNX file
    ("openff", 1.05),   # five versions of one F32 model, torch checkpoints
    ("silero", 1.05),   # the same weights as safetensors, ONNX and TorchScript
]


@pytest.mark.realdata
@pytest.mark.parametrize("name,min_ratio", REAL)
def test_real_models_roundtrip(dataset, tmp_path: Path, name: str, min_ratio: float) -> None:
    src = dataset(name)
    summary, archive = roundtrip(src, tmp_path)
    assert summary.ratio >= min_ratio, summary.ratio
    info = elves.info(archive)
    # The float tensors went through the float codec, not the opaque-file path.
    assert any(k in info.by_dtype for k in ("F32", "BF16", "F16")), info.by_dtype


def test_outputs_get_the_permissions_a_plain_open_gives(tmp_path: Path) -> None:
    """Temporary names are private (0600); what is renamed into place follows the umask."""
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    old = os.umask(0o027)
    try:
        elves.compress(src, tmp_path / "a.elves")
        elves.restore(tmp_path / "a.elves", tmp_path / "out")
        elves.compress(src / "config.json", tmp_path / "one.elves")
        elves.restore(tmp_path / "one.elves", tmp_path / "one.json")
    finally:
        os.umask(old)
    mode = {p: (tmp_path / p).stat().st_mode & 0o777 for p in ("a.elves", "out", "out/config.json", "one.json")}
    assert mode == {"a.elves": 0o640, "out": 0o750, "out/config.json": 0o640, "one.json": 0o640}
