"""Work on a thread pool, in order and with bounded memory; hashing and syncing beside it.

The kernels release the GIL, so chunks are encoded and decoded on threads. Results must come out
in the order the chunks go into a file, and only a bounded number may be in flight, so that
memory is set by the chunk size and the thread count, never by the model's size.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, TypeVar, Union

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")
R = TypeVar("R")
Piece = Union[bytes, "np.ndarray"]  # a run of bytes to hash: a read, or a decoded chunk (uint8)

INLINE_BYTES = 64 << 10
"""Work smaller than this (a batch of :func:`batched_map`) runs in the calling thread: a hand-off costs
more than the work."""


def default_threads(threads: int | None) -> int:
    """``threads`` if it is a positive count, else one per CPU."""
    return threads if threads and threads > 0 else (os.cpu_count() or 1)


def ordered_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int,
                inline: Callable[[T], bool] | None = None,
                size: Callable[[T], int] | None = None, max_size: int = 0) -> Iterator[R]:
    """``map(fn, items)`` on ``pool``, in order, with at most ``window`` items in flight; with
    ``size``, also at most ``max_size`` of their sizes (but always one, whatever its size).

    Items for which ``inline(item)`` holds run in the calling thread: for a few kilobytes of
    work, handing it to another thread costs more than doing it.
    """
    pending: deque[tuple[Future[R], int]] = deque()
    held = 0
    try:
        for item in items:
            weight = size(item) if size is not None else 0
            while pending and held + weight > max_size:  # room for it first (never with no size)
                future, w = pending.popleft()
                held -= w
                yield future.result()
            if inline is not None and inline(item):
                done: Future[R] = Future()
                done.set_result(fn(item))
                pending.append((done, weight))
            else:
                pending.append((pool.submit(fn, item), weight))
            held += weight
            if len(pending) >= window:
                future, w = pending.popleft()
                held -= w
                yield future.result()
        while pending:
            yield pending.popleft()[0].result()
    finally:
        # Left early (an error, or the consumer stopped): what is in flight ends before the
        # caller closes what it reads from (an archive, store objects).
        for future, _ in pending:
            future.cancel()
        for future, _ in pending:
            if not future.cancelled():
                future.exception()


BATCH_BYTES = 1 << 20
"""Work that :func:`batched_map` hands a thread at a time: a hand-off per 256 KiB chunk (a future,
two thread wake-ups) cost about a fifth of the chunk's decode."""


def runs(items: Iterable[T], size: Callable[[T], int], limit: int) -> Iterator[tuple[list[T], int]]:
    """Consecutive ``items`` grouped into runs whose ``size`` reaches ``limit`` (the last may fall
    short), each with its total."""
    run: list[T] = []
    total = 0
    for item in items:
        run.append(item)
        total += size(item)
        if total >= limit:
            yield run, total
            run, total = [], 0
    if run:
        yield run, total


def batched_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int,
                nbytes: Callable[[T], int]) -> Iterator[R]:
    """:func:`ordered_map` with consecutive items handed to a thread together, until their
    ``nbytes`` reach :data:`BATCH_BYTES`. ``window`` counts batches; a batch of less than
    :data:`INLINE_BYTES` runs in the calling thread."""
    for results in ordered_map(pool, lambda b: [fn(item) for item in b[0]], runs(items, nbytes, BATCH_BYTES),
                               window, inline=lambda b: b[1] < INLINE_BYTES):
        yield from results


class Sha256Beside:
    """The sha256 of a file, computed on a thread of its own: of the pieces handed to
    :meth:`update` (bytes or uint8 arrays: a restore's decoded chunks), or of the file read by
    that thread (:meth:`read`: a compress, whose content hashes, planning and coding then all
    run beside it). hashlib releases the GIL on large buffers, so the hash (about 1.8 GB/s)
    does not wait for the rest, nor the rest for it. Pieces
    go to the thread in batches of at least ``HANDOFF`` bytes (a hand-off per small piece costs
    more than hashing it), and at most ``window`` batches wait for it. As a context manager it
    closes (waits for its thread) on the way out; :meth:`hexdigest` still answers after that."""

    HANDOFF = 1 << 20

    def __init__(self, window: int = 4):
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque[Future[None]] = deque()
        self._window = window
        self._batch: list[Piece] = []
        self._batched = 0
        self._stopped = False

    def __enter__(self) -> Sha256Beside:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.close()
        else:
            self.cancel()

    def cancel(self) -> None:
        """Stop a read under way and wait for the thread, raising nothing (leaving on an error:
        what the read would raise must not hide it). :meth:`hexdigest` then has no answer."""
        self._stopped = True
        for future in self._pending:
            future.exception()
        self._pending.clear()
        self._pool.shutdown()

    def update(self, piece: Piece) -> None:
        self._batch.append(piece)
        self._batched += len(piece)
        if self._batched >= self.HANDOFF:
            self._hand_off()

    def _hand_off(self) -> None:
        self._pending.append(self._pool.submit(self._hash, self._batch))
        self._batch, self._batched = [], 0
        if len(self._pending) > self._window:
            self._pending.popleft().result()

    def read(self, read: Callable[[int, int], bytes], size: int, piece: int) -> None:
        """Hash the first ``size`` bytes of a file, fetched ``piece`` bytes at a time with
        ``read(offset, length)`` by the thread itself: the hash then runs beside all the caller
        does, not only beside its reads. What ``read`` raises (a file cut short) comes out of
        :meth:`close`."""
        self._pending.append(self._pool.submit(self._read, read, size, piece))

    def _read(self, read: Callable[[int, int], bytes], size: int, piece: int) -> None:
        for off in range(0, size, piece):
            if self._stopped:
                return
            self._sha.update(read(off, min(piece, size - off)))

    def _hash(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            self._sha.update(piece if isinstance(piece, bytes) else piece.data)

    def hexdigest(self) -> str:
        if self._stopped:
            raise RuntimeError("the hash was cancelled")
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        self._hash(self._batch)  # the small rest: nothing is left to overlap with
        self._batch, self._batched = [], 0


class SyncBehind:
    """Makes a file being written durable as it grows: every ``EVERY`` bytes written, the data so
    far goes to disk on a thread of its own (``fdatasync``), while the writer goes on. An archive
    or a store object is synced before it is renamed into place, and without this the whole file
    would wait for the disk at the end (gigabytes, for a large model), with nothing else to do.
    Call :meth:`wrote` after each write, :meth:`finish` for the final sync, and :meth:`close`
    before the file is closed another way (a sync must not outlive its descriptor)."""

    EVERY = 16 << 20

    def __init__(self, f: BinaryIO):
        self._f = f
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._since = 0

    def wrote(self, n: int) -> None:
        self._since += n
        if self._since < self.EVERY or (self._pending is not None and not self._pending.done()):
            return
        if self._pending is not None:
            self._pending.result()  # a failed sync (the disk) is the writer's error
        self._f.flush()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1)
        self._pending = self._pool.submit(os.fdatasync, self._f.fileno())
        self._since = 0

    def finish(self) -> None:
        """Flush and fsync the file (OSError if the disk refuses); what is left is at most
        what was written since the last sync began."""
        try:
            if self._pending is not None:
                self._pending.result()
        finally:
            self.close()
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Wait for the sync under way, if any, ignoring its outcome."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._pending = None
