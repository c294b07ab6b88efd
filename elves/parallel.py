"""Work on a thread pool, in order and with bounded memory.

The kernels release the GIL, so chunks are encoded and decoded on threads. Results must come out
in the order the chunks go into a file, and only a bounded number may be in flight, so that
memory is set by the chunk size and the thread count, never by the model's size.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor, Future
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

INLINE_BYTES = 64 << 10
"""Chunks smaller than this are coded in the calling thread: a hand-off costs more than the work."""


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
