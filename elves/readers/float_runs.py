"""Float runs: the stretches of an opaque file that code better as float32, float16 or bfloat16.

A file elves does not parse (an unknown container, a format whose header changed) may still be
mostly float arrays. Its bytes are cut into windows of WINDOW bytes and a sample of each is read
as float32 (at each of 4 alignments), float16 and bfloat16 (2 each). The element width is chosen
by the order-0 entropy of the byte planes the ``planes`` codec would make (floats rotated so the
exponent fills one plane); the alignment, and float16 or bfloat16, by how many values have the
magnitudes weights have (planes are coded apart, so a misaligned reading estimates about the
same size, but reads as nonsense). A window whose estimate beats what zstd makes of the same
sample is a candidate; neighbouring windows read alike make a run, kept only when a real chunk
of it, coded with ``planes`` + ``rans``, is smaller than the same chunk through zstd at the level
opaque bytes get. Kept runs become tensor segments (without a named tensor) and get the float
codecs and dedup; the rest stays opaque. Restore writes the segments back one after the other,
so the file comes back byte for byte whatever was found.

The cost is a sample of 1/32 of the file's bytes (read with ``pread``, in batches of bounded
size) and one chunk per run, coded twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from .. import dtypes
from ..codecs import Pipeline
from ..codecs.planes import Planes
from ..codecs.rans import Rans
from ..codecs.zstd import Zstd
from ..model import Segment, fill_gaps, opaque_segments, read_exact

WINDOW = 256 << 10
SAMPLE = 8 << 10
# Files below this are configs, tokenizers, vocabularies: zstd at a strong level suits them.
MIN_FILE = 1 << 20
# Windows scored together: their samples take BATCH * SAMPLE bytes (1 MiB), and what is made of
# them a few times that.
BATCH = 128
# A window is a float candidate when its estimate is under this fraction of zstd's sample: the
# estimate leaves out the coder's tables and a plane's worst case, which the chunk check sees.
MARGIN = 0.97
# Estimates closer than this (a fraction of the size) are a tie.
TIE = 0.005
# The chunk each run is checked with: the encoder's tensor chunk.
CHECK_BYTES = 256 << 10
# Shorter runs (the end of an array that fills a window only in part) stay opaque.
MIN_RUN = 64 << 10
ZSTD_LEVEL = 3   # what the encoder gives opaque bytes past 1 MiB
# How a window may be read: (dtype, offset of its first element in the window).
READINGS = [("F32", p) for p in range(4)] + [(half, p) for half in ("F16", "BF16") for p in range(2)]
# The magnitudes weights have: a float array read at the wrong alignment has few values in it.
PLAUSIBLE = (1e-5, 1e4)
BF16_EDGE = 0.02


def segments(fd: int, size: int, path: Path) -> list[Segment]:
    """The file's segments: its float runs as tensor segments, the rest opaque."""
    if size < MIN_FILE:
        return opaque_segments(size)
    windows = -(-size // WINDOW)
    labels = np.concatenate([_label(fd, path, size, first, min(first + BATCH, windows))
                             for first in range(0, windows, BATCH)])
    runs = []
    end = 0
    for first, last, label in _runs(labels):
        dtype, phase = READINGS[label]
        width = dtypes.get(dtype).itemsize
        start = max(first * WINDOW, end)
        start += (phase - start) % width
        stop = min((last + 1) * WINDOW, size)
        stop -= (stop - start) % width
        if stop - start < MIN_RUN:
            continue
        if _pays(fd, path, start, stop, dtype):
            runs.append(Segment(start, stop - start, dtype))
            end = stop
    return fill_gaps(size, runs) if runs else opaque_segments(size)


def _runs(labels: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
    """(first window, last window, label) of each stretch of windows with one label."""
    edges = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [labels.shape[0]])) - 1
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, stops) if labels[a] >= 0]


def _label(fd: int, path: Path, size: int, first: int, stop: int) -> npt.NDArray[np.int64]:
    """For windows ``first`` to ``stop`` (exclusive): the reading (an index of READINGS) that
    codes best, where its estimate beats zstd; -1 where none does."""
    n = stop - first
    if n <= 0:
        return np.zeros(0, np.int64)
    # Each window's sample is taken from its middle, away from the edges a run may not fill
    # (the last window's, which the file may end inside, as near its middle as fits).
    at = np.minimum(np.arange(first, stop) * WINDOW + (WINDOW - SAMPLE) // 2, size - SAMPLE).tolist()
    samples = np.frombuffer(b"".join(read_exact(fd, a, SAMPLE, path) for a in at), np.uint8).reshape(n, SAMPLE)
    zstd = Zstd(ZSTD_LEVEL)
    by_zstd = np.array([len(zstd.encode(s)) for s in samples], np.float64) / SAMPLE
    # The width by the estimate; ties go to the narrower, since a float16 array also reads as
    # pairs and a float32 one does not. Byte planes are coded apart, so the alignment barely
    # changes the estimate: it is made at one alignment per width.
    estimate = {width: _estimate(samples, width) for width in (2, 4)}
    totals = np.stack([estimate[dtypes.get(dt).itemsize] for dt, _ in READINGS])
    wide = np.array([dtypes.get(dt).itemsize == 4 for dt, _ in READINGS])[:, None]
    use_four = estimate[4] < estimate[2] - TIE
    # Within the width, the alignment (and F16 or BF16) by how many values read plausibly: a
    # misaligned reading is mostly nonsense. BF16 read as F16 still looks plausible (F16 read as
    # BF16 does not): near ties go to BF16.
    plausible = np.stack([_plausible(samples, dt, phase) for dt, phase in READINGS])
    fit = plausible + np.array([BF16_EDGE * (dt == "BF16") for dt, _ in READINGS])[:, None]
    best = np.where(use_four, np.where(wide, fit, -np.inf).argmax(axis=0), np.where(wide, -np.inf, fit).argmax(axis=0))
    beats = totals[best, np.arange(n)] < MARGIN * by_zstd
    return np.where(beats, best, -1).astype(np.int64)


def _plausible(samples: npt.NDArray[np.uint8], dtype: str, phase: int) -> npt.NDArray[np.float64]:
    """Per window, the fraction of its sample's elements that, read as ``dtype`` from ``phase``
    bytes in, are zero or of a size weights have."""
    width = dtypes.get(dtype).itemsize
    k = (SAMPLE - 4) // width
    x = np.abs(np.ascontiguousarray(samples[:, phase:phase + k * width]).view(dtypes.numpy_dtype(dtype))
               .astype(np.float32))
    with np.errstate(invalid="ignore"):
        ok = (x == 0) | ((x > PLAUSIBLE[0]) & (x < PLAUSIBLE[1]))
    fraction: npt.NDArray[np.float64] = ok.mean(axis=1)
    return fraction


def _estimate(samples: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.float64]:
    """Per window, the estimated coded size, as a fraction, of its sample read as elements of
    ``width`` bytes: the order-0 entropy of each rotated byte plane, with the Miller-Madow
    correction for the sample's size."""
    n = samples.shape[0]
    k = SAMPLE // width
    words = samples.view(f"<u{width}")
    rotated = (words << words.dtype.type(1)) | (words >> words.dtype.type(8 * width - 1))
    planes = rotated.view(np.uint8).reshape(n, k, width)
    rows = (np.arange(n, dtype=np.intp) * 256)[:, None]
    total = np.zeros(n, np.float64)
    for j in range(width):
        counts = np.bincount((rows + planes[:, :, j]).ravel(), minlength=256 * n).reshape(n, 256)
        p = counts / k
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(counts > 0, p * np.log2(p), 0.0).sum(axis=1)
        h += ((counts > 0).sum(axis=1) - 1) / (2 * k * np.log(2))
        total += np.minimum(h, 8.0)
    fraction: npt.NDArray[np.float64] = total / (8 * width)
    return fraction


def _pays(fd: int, path: Path, start: int, stop: int, dtype: str) -> bool:
    """Whether a chunk from the run's middle codes smaller as ``dtype`` than through zstd."""
    width = dtypes.get(dtype).itemsize
    length = min(CHECK_BYTES, stop - start) // width * width
    at = start + (stop - start - length) // 2 // width * width
    raw = np.frombuffer(read_exact(fd, at, length, path), np.uint8)
    return len(Pipeline([Planes(dtype), Rans()]).encode(raw)) < len(Zstd(ZSTD_LEVEL).encode(raw))
