"""The work beside the pool: the file's sha256 on its own thread (some of it read there), and an
output file made durable as it grows. What compress does when a file changes under those reads."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import elves
from elves.errors import InputError, OutputError
from elves.model import Segment, read_pieces
from elves.parallel import Sha256Beside, SyncBehind
from tests.conftest import toy_model


def test_sha256_beside_hashes_pieces_and_reads_in_the_order_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Sha256Beside, "HANDOFF", 1000)  # many batches, some of reads only
    data = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with Sha256Beside(window=2) as sha:
            pos = 0
            for i, n in enumerate([10, 3000, 1, 20_000, 0, 7000, 19_989]):
                if i % 2:  # read on the hash's thread
                    sha.update_read(lambda seg=Segment(pos, n): read_pieces(fd, seg, path), n)
                else:
                    sha.update(np.frombuffer(data[pos:pos + n], np.uint8) if i % 4 else data[pos:pos + n])
                pos += n
            assert pos == len(data)
        assert sha.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_a_failed_read_beside_is_raised_never_a_digest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        sha = Sha256Beside()
        sha.update(b"before")
        sha.update_read(lambda: read_pieces(fd, Segment(50, 100), path), 100)  # runs past the end
        for _ in range(2):  # asked again, it still has no digest to give
            with pytest.raises(InputError, match="changed or shrank"):
                sha.hexdigest()
    finally:
        os.close(fd)


def test_sync_behind_syncs_as_the_file_grows_and_at_the_end(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)  # what is on the file when the sync starts
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(SyncBehind, "EVERY", 1 << 16)
    with open(tmp_path / "out", "wb") as f:
        sync = SyncBehind(f)
        for _ in range(40):
            f.write(b"\1" * 10_000)
            sync.wrote(10_000)
        sync.finish()
    assert synced and all(s >= 1 << 16 for s in synced)  # stretches of EVERY bytes or more, flushed first
    assert (tmp_path / "out").read_bytes() == b"\1" * 400_000


def test_a_sync_the_disk_refuses_fails_the_archive(tmp_path: Path, monkeypatch) -> None:
    """A background sync that fails is the write's error: OutputError, and no archive appears."""
    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(SyncBehind, "EVERY", 1 << 12)
    src = toy_model(tmp_path / "m", seed=3, elements=200_000)
    with pytest.raises(OutputError, match="Input/output error"):
        elves.compress(src, tmp_path / "m.elves")
    assert not (tmp_path / "m.elves").exists()
    assert not [p for p in tmp_path.iterdir() if ".elves-tmp" in p.name]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_file_cut_short_during_compress_is_an_input_error(tmp_path: Path, threads: int) -> None:
    """The second file shrinks while the first is compressed: its reads (the content hashes on
    the pool, the sha256 on its thread, the chunks) fail cleanly, naming it."""
    src = toy_model(tmp_path / "m", seed=1, elements=300_000)
    os.replace(toy_model(tmp_path / "b", seed=2, elements=300_000) / "model.safetensors", src / "z.safetensors")
    victim = src / "z.safetensors"
    size = victim.stat().st_size

    def cut(_: int) -> None:
        if victim.stat().st_size == size:
            with open(victim, "r+b") as f:
                f.truncate(size // 2)

    with pytest.raises(InputError) as got:
        elves.compress(src, tmp_path / "m.elves", threads=threads, progress=cut)
    assert (got.value.path, got.value.message) == (str(victim), "the file changed or shrank while it was being read")
    assert not (tmp_path / "m.elves").exists()

