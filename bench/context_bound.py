"""Issue 14 item 4, a bound, not a codec (a benchmark, not a test): how much would coding a BF16
element's low byte (sign and mantissa after ``planes``' rotation) conditioned on its exponent byte
gain over the order-0 coding ``rans`` does, per chunk and per tensor?

    python bench/context_bound.py astra merlin-p1

Ratios are tensor bytes over ideal entropy-coded bytes (Shannon bits, no coder overhead) of the
BF16 tensors, with each frequency table counted at 3 bytes an entry (a symbol byte and a 16-bit
frequency; order-0: an entry per symbol, conditioned: an entry per (exponent, symbol) pair), the
tables per 256 KiB chunk as the format has them, or once per tensor.
"""
from __future__ import annotations

import argparse

import numpy as np
from compare import load_datasets_module  # bench/compare.py, beside this script
from kernel_speed import tensor_bytes  # bench/kernel_speed.py, beside this script


def entropy_bits(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


def coded_bits(planes: np.ndarray) -> tuple[float, float]:
    """(order-0, low byte conditioned on the exponent) bits of these two planes, tables included."""
    exp, low = planes[0].astype(np.int64), planes[1].astype(np.int64)
    e, lo = np.bincount(exp, minlength=256), np.bincount(low, minlength=256)
    joint = np.bincount(exp * 256 + low, minlength=65536).reshape(256, 256)
    table = 24.0
    order0 = entropy_bits(e) + min(entropy_bits(lo) + table * np.count_nonzero(lo), 8.0 * len(low))
    conditioned = entropy_bits(e) + sum(entropy_bits(row) for row in joint if row.any())
    return order0 + table * np.count_nonzero(e), conditioned + table * (np.count_nonzero(e) + np.count_nonzero(joint))


def main() -> None:
    from elves.encoder import TENSOR_CHUNK_BYTES
    from elves.kernels import planes_rans as k

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+")
    args = parser.parse_args()
    ds = load_datasets_module()
    print("| dataset | MB | order-0, tables per chunk (today) | conditioned, per chunk | order-0, per tensor "
          "| conditioned, per tensor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.datasets:
        segments = tensor_bytes(ds.model_dir(name)).get("BF16", [])
        total = 0
        sums = np.zeros(4)
        for s in segments:
            n = len(s) // 2
            planes = np.empty((2, n), np.uint8)
            k.split(s, n, 2, True, planes)
            sums[2:] += coded_bits(planes)
            step = TENSOR_CHUNK_BYTES // 2
            for o in range(0, n, step):
                sums[:2] += coded_bits(planes[:, o:o + step])
            total += len(s)
        ratios = " | ".join(f"{8 * total / b:.4f}" for b in sums)
        print(f"| {name} | {total / 1e6:.1f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
