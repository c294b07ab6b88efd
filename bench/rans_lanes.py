"""Prototype of a format change, for issue 14 (a benchmark, not a test): would more rANS lanes per
plane decode faster? The lane count is in each container's header (the writer uses 32, the CUDA
kernel reads any); more lanes give the vector decoder more independent chains to overlap.

    python bench/rans_lanes.py fall silero astra

For each dataset and dtype it codes every chunk with 32, 64 and 128 lanes (ratio: tensor bytes
over payload bytes) and times the vector rANS loop alone (the kernel's ``_build_run``, 2, 4 and 8
vectors at a time) on the coded plane 0 of the first full chunks, warm, one thread, best of 15.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from compare import load_datasets_module  # bench/compare.py, beside this script
from kernel_speed import tensor_bytes  # bench/kernel_speed.py, beside this script


def lane_states(buf: np.ndarray, n: int, lanes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Decode table, lane states and word positions of plane 0 of a container (docs/FORMAT.md),
    or None if plane 0 is not rANS-coded."""
    u16 = lambda at: int(buf[at]) | int(buf[at + 1]) << 8
    u32 = lambda at: u16(at) | u16(at + 2) << 16
    start = u32(8)
    if buf[start] != 2:
        return None
    k = u16(start + 2)
    syms = buf[start + 4:start + 4 + k]
    pos = start + 4 + k + (k & 1)
    freqs = [u16(pos + 2 * j) for j in range(k)]
    pos += 2 * k
    pos += -(pos - start) & 3
    dec = np.empty(4096, np.uint32)
    acc = 0
    for s, f in zip(syms, freqs):
        dec[acc:acc + f] = np.uint32(s) | np.uint32(f << 8) | (np.arange(f, dtype=np.uint32) << 20)
        acc += f
    x, ptr = np.empty(lanes, np.uint32), np.empty(lanes, np.uint32)
    p = pos + 4 * lanes
    for j in range(lanes):
        x[j], ptr[j] = u32(p), (p + 4) >> 1
        p += u32(pos + 4 * j)
    return dec, x, ptr


def main() -> None:
    from numba import njit

    from elves.codecs import Pipeline
    from elves.codecs.planes import Planes
    from elves.codecs.rans import Rans
    from elves.encoder import TENSOR_CHUNK_BYTES
    from elves.kernels.planes_rans import _build_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--chunks", type=int, default=8, help="full chunks timed per dataset")
    args = parser.parse_args()
    ds = load_datasets_module()

    def decoder(vectors: int):
        run = _build_run(vectors)

        @njit(nogil=True)
        def decode(x, ptr, dec, words, out, steps, lanes):  # type: ignore[no-untyped-def]
            for g in range(0, lanes, 16 * vectors):
                run(x, ptr, g, dec, words, out, steps, lanes, np.int64(ptr[g:g + 16 * vectors].min()),
                    np.int64(ptr[g:g + 16 * vectors].max()) + steps)
        return decode

    decoders = {lanes: decoder(lanes // 16) for lanes in (32, 64, 128)}
    print("| dataset | dtype | lanes | vectors at a time | ratio | plane-0 rANS Msym/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.datasets:
        for dtype, segments in sorted(tensor_bytes(ds.model_dir(name)).items()):
            width = Planes(dtype).width
            step = TENSOR_CHUNK_BYTES // width * width
            chunks = [s[o:o + step] for s in segments for o in range(0, len(s), step)]
            full = [c for c in chunks if len(c) == step][:args.chunks]
            for lanes, decode in decoders.items():
                pipeline = Pipeline([Planes(dtype), Rans(lanes=lanes)])
                ratio = sum(len(c) for c in chunks) / sum(len(pipeline.encode(c)) for c in chunks)
                seconds = symbols = 0.0
                for c in full:
                    buf = np.frombuffer(pipeline.encode(c), np.uint8)
                    n = len(c) // width
                    got = lane_states(buf, n, lanes)
                    if got is None:
                        continue
                    dec, x0, p0 = got
                    words, steps = buf[:len(buf) & ~1].view(np.uint16), n // lanes
                    out = np.empty(n, np.uint8)
                    best = float("inf")
                    for _ in range(15):
                        x, ptr = x0.copy(), p0.copy()
                        t = time.thread_time()
                        decode(x, ptr, dec, words, out, steps, lanes)
                        best = min(best, time.thread_time() - t)
                    planes = np.empty((width, n), np.uint8)
                    pipeline.codecs[1].decode(buf, planes)
                    if not np.array_equal(out[:steps * lanes], planes[0][:steps * lanes]):
                        sys.exit(f"{name} {dtype}: the {lanes}-lane decode differs")
                    seconds += best
                    symbols += steps * lanes
                speed = f"{symbols / seconds / 1e6:.0f}" if seconds else "n/a"
                print(f"| {name} | {dtype} | {lanes} | {lanes // 16} | {ratio:.4f} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
