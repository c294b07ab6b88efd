"""Golden fixtures: archives that earlier elves releases wrote (tests/golden, made by
tests/golden/gen.py with the code of each format version) restore bit-exactly with this elves,
forever. A failure here means a reader change broke archives already out in the world: fix the
reader, never the fixture."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

import elves
from tests.conftest import tree_hashes
from tests.golden.gen import packed_tensors

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


def index_of(path: Path) -> tuple[list[int], dict]:
    """The header version and the index, read by hand: what the old writer put there, not what a
    reader makes of it."""
    data = path.read_bytes()
    major, minor = struct.unpack_from("<HH", data, 8)
    off, length = struct.unpack_from("<QQ", data, 16)
    return [major, minor], msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[off:off + length]))


def test_every_format_version_has_fixtures() -> None:
    versions = {tuple(e["header_version"]) for e in MANIFEST.values()}
    assert versions == {(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)}
    assert sum(p.stat().st_size for p in GOLDEN.glob("*.elves")) < 150_000
    assert sorted(p.name for p in GOLDEN.glob("*.elves")) == sorted(e["archive"] for e in MANIFEST.values())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture_still_holds_what_it_was_made_to_cover(name: str) -> None:
    entry = MANIFEST[name]
    version, index = index_of(GOLDEN / entry["archive"])
    assert version == entry["header_version"]
    assert sorted({c["id"] for s in index["streams"] for c in s["pipeline"]}) == entry["codecs"]
    assert sum(1 for s in index["streams"] if s.get("ref") is not None) == entry["refs"]
    assert sum(len(f["segments"]) for f in index["files"]) - len(index["streams"]) == entry["deduped"]
    assert packed_tensors(index) == entry.get("packed", 0)  # 1.5: tensors packed into bytes streams


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture_restores_bit_exactly(name: str, tmp_path: Path) -> None:
    entry = MANIFEST[name]
    archive = GOLDEN / entry["archive"]
    base = {"base": GOLDEN / entry["base"]} if entry["base"] else {}
    out = tmp_path / "out"
    elves.restore(archive, out, **base)
    assert tree_hashes(out) == entry["files"]
    for link, target in entry.get("links", {}).items():  # 1.3: links come back as links
        assert (out / link).is_symlink() and os.readlink(out / link) == target
    report = elves.verify(archive, **base)
    assert report.ok, report.problems
    with elves.open(archive, **base) as a:
        assert sorted(a.keys()) == sorted(entry["tensors"])
        for key, digest in entry["tensors"].items():
            got = hashlib.sha256(np.ascontiguousarray(a.get_tensor(key)).tobytes()).hexdigest()
            assert got == digest, key
