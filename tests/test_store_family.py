"""The store follows a family's direction whatever the order of arrival: a base added after its
fine-tune is stored on its own and the fine-tune is re-coded as its delta, also when no name in
the metadata links them (the base added under its folder's name), on the real all-MiniLM-L6-v2."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from elves.store import Store
from elves.store.manifests import manifest
from elves.store.objects import StoredObject
from tests.conftest import tree_hashes

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def minilm(dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The real model in a folder named as a download tool may name it, and a fine-tune of it:
    every matrix times (1 + N(0, 0.01)), biases and norms kept, its card naming the base by its
    hub id as bench/make_family.py's do."""
    root = tmp_path_factory.mktemp("minilm")
    base = shutil.copytree(dataset("minilm"), root / "minilm")
    ft = root / "minilm-ft"
    ft.mkdir()
    rng = np.random.default_rng(11)
    tensors = {k: (v * (1 + rng.normal(0, 0.01, v.shape))).astype(v.dtype) if v.ndim == 2 else v
               for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, ft / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "_name_or_path": BASE_ID}))
    (ft / "README.md").write_text(f"---\nbase_model: {BASE_ID}\n---\n# a fine-tune\n")
    return base, ft


def refs_of(s: Store, name: str) -> dict[str, list[str]]:
    """Each tensor object of model ``name`` and the objects it is coded against."""
    out = {}
    for f in manifest(s.storage, name)["files"]:
        for key, *_ in f["segments"]:
            if not key.endswith(".bytes"):
                with StoredObject(s.storage, key) as obj:
                    out[key] = obj.meta.refs
    return out


def size_of(s: Store, keys: Iterable[str]) -> int:
    total = 0
    for key in keys:
        with StoredObject(s.storage, key) as obj:
            total += obj.meta.size
    return total


@pytest.mark.realdata
def test_a_base_added_after_its_finetune_is_stored_whole_and_the_finetune_recoded(
        minilm: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = minilm
    s = Store.init(tmp_path / "s")
    assert s.add(ft, threads=2).base is None  # its base is not there yet
    alone = size_of(s, refs_of(s, "minilm-ft"))
    r = s.add(base, threads=2)
    assert r.base is None and r.repacked == ["minilm-ft"]
    assert not any(refs_of(s, "minilm").values())  # standalone: no xor object
    base_objects = set(refs_of(s, "minilm"))
    ft_refs = refs_of(s, "minilm-ft")
    deltas = {k: v for k, v in ft_refs.items() if v}
    assert len(deltas) >= 36 and all(set(v) <= base_objects for v in deltas.values())
    assert size_of(s, ft_refs) < 0.8 * alone
    assert {m.name: m.base for m in s.models()} == {"minilm-ft": "minilm", "minilm": None}
    assert s.repack(threads=2).objects_rewritten == 0  # nothing is turned back the other way
    assert [(f.root, [m for m, _ in f.members]) for f in s.families()] == [("minilm", ["minilm-ft"])]
    for name, src in (("minilm", base), ("minilm-ft", ft)):
        assert tree_hashes(s.restore(name, tmp_path / name, threads=2).output) == tree_hashes(src)
    assert s.verify(threads=2).ok

    # what the store held before this was fixed: the base coded against its own fine-tune
    old = Store.init(tmp_path / "old")
    old.add(ft, threads=2)
    assert old.add(base, base="minilm-ft", threads=2).repacked == []
    assert any(refs_of(old, "minilm").values()) and not any(refs_of(old, "minilm-ft").values())
    assert s.stats().stored_bytes < old.stats().stored_bytes


@pytest.mark.realdata
def test_a_bf16_copy_costs_only_what_differs_from_the_cast(minilm: tuple[Path, Path], tmp_path: Path) -> None:
    """The real model, then its BF16 release (cast by torch, as `model.to(torch.bfloat16)` saves
    it): every tensor object of the copy is coded against the cast of the F32 object of the same
    tensor (``ref_cast``), and the copy costs a sliver of its size, where it cost about 1.3x less
    than its size before."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    base, _ = minilm
    bf16 = shutil.copytree(base, tmp_path / "minilm-bf16", ignore=shutil.ignore_patterns("model.safetensors"))
    save_torch({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in load_torch(str(base / "model.safetensors")).items()}, str(bf16 / "model.safetensors"))
    s = Store.init(tmp_path / "s")
    s.add(base, threads=2)
    r = s.add(bf16, threads=2)
    assert r.base == "minilm"
    refs = refs_of(s, "minilm-bf16")
    casts = 0
    for key, reads in refs.items():
        with StoredObject(s.storage, key) as obj:
            if obj.meta.dtype == "BF16":
                assert obj.meta.ref_cast == ("F32", "rne") and len(reads) == 1 and reads[0].endswith(".f32"), key
                casts += 1
    assert casts >= 30
    logical = (bf16 / "model.safetensors").stat().st_size
    assert size_of(s, refs) < 0.01 * logical, (size_of(s, refs), logical)
    assert tree_hashes(s.restore("minilm-bf16", tmp_path / "out").output) == tree_hashes(bf16)
    assert s.verify(full=True).ok
