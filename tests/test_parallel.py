"""An output file made durable as it grows (SyncBehind), and what compress does when a file
changes under its reads, which run on the pool."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import elves
from elves.errors import InputError, OutputError
from elves.parallel import Sha256Beside, SyncBehind
from tests.conftest import toy_model


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
    """A file shrinks while the model is compressed: its reads (the hashes, the chunks' reads on
    the pool) fail cleanly, naming it, and no archive appears."""
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



def test_sha256_beside_reads_the_file_itself(tmp_path: Path) -> None:
    """The thread reads and hashes the file beside the caller; a short file is an InputError
    when the digest is asked for; leaving on another error stops the read and keeps that error."""
    import functools
    import hashlib

    from elves.model import read_exact

    path = tmp_path / "f.bin"
    data = os.urandom(3 * 4096 + 17)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    read = functools.partial(read_exact, fd, path=path)
    try:
        with Sha256Beside() as sha:
            sha.read(read, len(data), 4096)
        assert sha.hexdigest() == hashlib.sha256(data).hexdigest()

        short = Sha256Beside()
        short.read(read, len(data) + 1, 4096)
        with pytest.raises(InputError) as got:
            short.hexdigest()
        assert got.value.path == str(path)

        with pytest.raises(KeyError):  # not the read's InputError
            with Sha256Beside() as sha:
                sha.read(read, len(data) + 1, 4096)
                raise KeyError("the caller's own error")
    finally:
        os.close(fd)


def test_batched_map_keeps_order_and_hands_threads_batches_of_about_batch_bytes() -> None:
    """Results come out in the order of the items, each item run once; consecutive items share a
    thread until their bytes reach BATCH_BYTES, so a batch holds them up to one item past it; a
    batch too small to be worth a hand-off runs in the calling thread; at most ``window``
    batches are in flight."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from elves.parallel import BATCH_BYTES, INLINE_BYTES, batched_map

    sizes = [300_000, 5_000, 900_000, 4 << 20, 10_000, 20_000, 700_000, 600_000, 1_000]
    ran: list[tuple[int, int]] = []
    calling = threading.get_ident()
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            ran.append((i, threading.get_ident()))
        return i * i

    with ThreadPoolExecutor(2) as pool:
        submit = pool.submit

        def counting(fn, *args):  # batches handed to the pool at once
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            future = submit(fn, *args)

            def done(_):
                nonlocal in_flight
                with lock:
                    in_flight -= 1
            future.add_done_callback(done)
            return future

        pool.submit = counting  # type: ignore[method-assign]
        out = list(batched_map(pool, work, range(len(sizes)), 2, nbytes=lambda i: sizes[i]))
    assert out == [i * i for i in range(len(sizes))]
    assert sorted(i for i, _ in ran) == list(range(len(sizes)))
    # the batches: [0, 1, 2] (past 1 MiB at item 2), [3], [4, 5, 6, 7], [8] (the rest: inline)
    thread_of = dict(ran)
    assert thread_of[0] == thread_of[1] == thread_of[2] != calling
    assert thread_of[4] == thread_of[5] == thread_of[6] == thread_of[7]
    assert thread_of[8] == calling and sizes[8] < INLINE_BYTES <= BATCH_BYTES
    assert most <= 2


def test_a_map_left_early_ends_its_work_in_flight_first() -> None:
    """A consumer that stops (an error, a corrupt chunk) closes the map: work not started is
    cancelled and work under way ends before close returns, so the caller may then close what
    that work reads (an archive, store objects)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from elves.parallel import ordered_map

    running, started = set(), []

    def work(i: int) -> int:
        started.append(i)
        running.add(i)
        time.sleep(0.05)
        running.discard(i)
        return i

    with ThreadPoolExecutor(2) as pool:
        results = ordered_map(pool, work, range(20), window=6)
        assert next(results) == 0
        results.close()
        assert not running and len(started) < 20
