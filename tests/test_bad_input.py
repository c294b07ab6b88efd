"""Bad input: a clear error naming the file and the problem, nothing half-written, never a crash."""
from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import xxhash
import zstandard

import elves
from elves import archive as ar
from tests.conftest import write_safetensors

from .test_codecs import weights_like


@pytest.fixture
def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "a.safetensors", {
        "big": ("BF16", (300, 1000), weights_like("BF16", 300_000, rng).tobytes()),
        "small": ("F32", (16,), weights_like("F32", 16, rng).tobytes()),
    })
    write_safetensors(src / "b.safetensors", {"other": ("F16", (1000,), weights_like("F16", 1000, rng).tobytes())})
    (src / "config.json").write_text('{"a": 1}')
    return src


@pytest.fixture
def archive(model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "m.elves"
    elves.compress(model, out)
    return out


def rewrite_index(path: Path, edit) -> None:
    """Apply ``edit`` to an archive's index and write it back with valid checksums (a forged archive)."""
    data = bytearray(path.read_bytes())
    magic, major, minor, flags, off, length, _ = ar.HEADER.unpack_from(data)
    index = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(bytes(data[off:off + length])))
    edit(index)
    blob = zstandard.ZstdCompressor().compress(msgpack.packb(index))
    data = data[:off] + blob
    head = ar.HEADER.pack(magic, major, minor, flags, off, len(blob), xxhash.xxh3_64_intdigest(blob))
    data[:ar.HEADER.size + 8] = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    path.write_bytes(bytes(data))


def test_truncated_archive(archive: Path, tmp_path: Path) -> None:
    full = archive.read_bytes()
    for cut in [0, 5, 40, 5000, len(full) // 2, len(full) - 1]:
        bad = tmp_path / f"cut{cut}.elves"
        bad.write_bytes(full[:cut])
        with pytest.raises(elves.ArchiveError) as e:
            elves.restore(bad, tmp_path / f"out{cut}")
        assert str(bad) in str(e.value)
        assert "truncated" in str(e.value) or "not an elves archive" in str(e.value)
        assert not (tmp_path / f"out{cut}").exists()


def test_flipped_byte_in_a_chunk_names_the_tensor(archive: Path, tmp_path: Path) -> None:
    with elves.open(archive) as a:
        reader = a._reader
        stream = next(s for s in reader.streams if s.dtype == "BF16")
        offset = stream.chunks[1][0] + 100
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x10
    archive.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(elves.CorruptArchiveError, match=r"tensor 'big' in a.safetensors: chunk 1: .*checksum"):
        elves.restore(archive, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    rep = elves.verify(archive)
    assert not rep.ok and "tensor 'big'" in rep.problems[0]
    with elves.open(archive) as a:
        assert a.get_tensor("small").shape == (16,)  # the other tensors still read
        with pytest.raises(elves.CorruptArchiveError, match="'big'"):
            a.get_tensor("big")


def test_flipped_byte_in_index_and_header(archive: Path) -> None:
    data = bytearray(archive.read_bytes())
    _, _, _, _, off, length, _ = ar.HEADER.unpack_from(data)
    bad = bytearray(data)
    bad[off + length // 2] ^= 1
    archive.write_bytes(bytes(bad))
    with pytest.raises(elves.CorruptArchiveError, match="index is corrupted"):
        elves.info(archive)
    bad = bytearray(data)
    bad[20] ^= 1
    archive.write_bytes(bytes(bad))
    with pytest.raises(elves.CorruptArchiveError, match="header is corrupted"):
        elves.info(archive)


def test_newer_format_version(archive: Path) -> None:
    data = bytearray(archive.read_bytes())
    fields = list(ar.HEADER.unpack_from(data))
    fields[1] = ar.FORMAT_VERSION[0] + 1
    head = ar.HEADER.pack(*fields)
    data[:ar.HEADER.size + 8] = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    archive.write_bytes(bytes(data))
    with pytest.raises(elves.UnsupportedFormatError, match=r"format 2\.\d+, newer than this elves reads"):
        elves.open(archive)


def test_not_an_archive(tmp_path: Path) -> None:
    p = tmp_path / "x.elves"
    p.write_bytes(b"PK\x03\x04 definitely a zip" * 10)
    with pytest.raises(elves.CorruptArchiveError, match="not an elves archive"):
        elves.info(p)


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "a/../../evil", "C:evil", "a\\..\\evil", ""])
def test_path_traversal_is_refused(archive: Path, tmp_path: Path, name: str) -> None:
    def edit(index):
        index["files"][0]["path"] = name

    rewrite_index(archive, edit)
    out = tmp_path / "deep" / "out"
    out.parent.mkdir()
    with pytest.raises(elves.UnsafePathError):
        elves.restore(archive, out)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert list((tmp_path / "deep").iterdir()) == []


def test_output_exists(archive: Path, model: Path, tmp_path: Path) -> None:
    with pytest.raises(elves.OutputExistsError, match="already exists"):
        elves.compress(model, archive)
    before = archive.read_bytes()
    elves.compress(model, archive, force=True)
    assert archive.read_bytes() == before  # deterministic
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(elves.OutputExistsError):
        elves.restore(archive, out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "header",
    [
        b"\xff" * 8,                                           # absurd header length
        struct.pack("<Q", 20) + b"{not json at all....",        # not JSON
        struct.pack("<Q", 2) + b"[]",                           # not an object
        None,                                                  # offsets past the end
        "dtype",                                               # unknown dtype
    ],
)
def test_corrupted_safetensors_header(tmp_path: Path, header) -> None:
    src = tmp_path / "bad.safetensors"
    if header is None:
        h = json.dumps({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
        src.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 10)
    elif header == "dtype":
        h = json.dumps({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}).encode()
        src.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    else:
        src.write_bytes(header)
    with pytest.raises(elves.InputError) as e:
        elves.compress(src, tmp_path / "x.elves")
    assert str(src) in str(e.value)
    assert not (tmp_path / "x.elves").exists() and not list(tmp_path.glob(".x.elves*"))


class FillingFile:
    """A file that runs out of space after ``room`` bytes, as a full disk does."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_disk_full_while_compressing_leaves_nothing(model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ar, "open", lambda *a, **k: FillingFile(open(*a, **k), 100_000), raising=False)
    out = tmp_path / "full.elves"
    with pytest.raises(elves.OutputError, match="No space left on device"):
        elves.compress(model, out)
    assert not out.exists() and not list(tmp_path.glob(".full.elves*"))


def test_restore_failure_leaves_no_partial_file(archive: Path, tmp_path: Path) -> None:
    """A damaged second file: the first is not left behind under its final name either."""
    with elves.open(archive) as a:
        stream = a._reader.streams[a._reader.files[1].segments[-1]]
    data = bytearray(archive.read_bytes())
    data[stream.chunks[0][0] + 10] ^= 0xFF
    archive.write_bytes(bytes(data))
    out = tmp_path / "restored"
    with pytest.raises(elves.CorruptArchiveError):
        elves.restore(archive, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".restored")] == []
