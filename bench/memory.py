"""Peak memory of compress and restore on a model far larger than a chunk: it must stay flat.

Writes a synthetic BF16 model of SIZE gigabytes (Gaussian weights, std 0.02, in safetensors
shards of at most 4 GB, as Hugging Face does), then runs ``elves compress`` and ``elves restore``
in child processes and reports their peak RSS and speed. With --write, records the table in
bench/RESULTS.md between <!-- memory:begin --> and <!-- memory:end -->.

    python bench/memory.py --size 20 --write
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import write_section  # bench/results.py, beside this script

SHARD = 4 << 30
PIECE = 64 << 20


def write_model(folder: Path, total: int) -> None:
    """Shards of 4096 x 4096 BF16 tensors, generated piecewise so this script stays small too."""
    rng = np.random.default_rng(0)
    tensor_bytes = 4096 * 4096 * 2
    n_tensors = max(1, total // tensor_bytes)
    per_shard = max(1, SHARD // tensor_bytes)
    shards = [range(i, min(i + per_shard, n_tensors)) for i in range(0, n_tensors, per_shard)]
    for s, idx in enumerate(shards):
        header = {f"layers.{i}.weight": {"dtype": "BF16", "shape": [4096, 4096],
                                         "data_offsets": [k * tensor_bytes, (k + 1) * tensor_bytes]}
                  for k, i in enumerate(idx)}
        blob = json.dumps(header).encode()
        with open(folder / f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for _ in idx:
                for start in range(0, tensor_bytes, PIECE):
                    n = min(PIECE, tensor_bytes - start) // 2
                    w = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32)
                    # float32 -> bfloat16 with round-to-nearest-even, as torch does
                    f.write(((w + 0x7FFF + ((w >> 16) & 1)) >> 16).astype(np.uint16).tobytes())


def measure(size_gb: float, workdir: Path) -> list[dict]:
    model, archive, out = workdir / "model", workdir / "model.elves", workdir / "restored"
    model.mkdir()
    write_model(model, int(size_gb * 1e9))
    size = sum(p.stat().st_size for p in model.iterdir())
    rows = []
    for step, cmd in [("compress", ["compress", str(model), "-o", str(archive)]),
                      ("restore", ["restore", str(archive), "-o", str(out)])]:
        # One child per measurement, so each peak RSS is its own.
        dt, peak = run_fresh([sys.executable, "-m", "elves.cli.main", *cmd])
        rows.append({"step": step, "bytes": size, "seconds": dt, "peak_rss": peak, "load": os.getloadavg()[0]})
    rows.append({"step": "ratio", "value": size / archive.stat().st_size})
    return rows


def run_fresh(args: list[str]) -> tuple[float, int]:
    probe = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
             f"subprocess.run({args!r}, check=True, stdout=subprocess.DEVNULL); "
             "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr}")
    dt, peak = json.loads(r.stdout)
    return dt, peak


def table(rows: list[dict], size_gb: float) -> str:
    ratio = next(r["value"] for r in rows if r["step"] == "ratio")
    lines = [f"Synthetic BF16 model, {size_gb:g} GB in 4 GB safetensors shards (ratio {ratio:.3f}x), "
             f"all cores ({os.cpu_count()}):", "",
             "| step | MB/s | peak RSS | load average after |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r["step"] != "ratio":
            lines.append(f"| {r['step']} | {r['bytes'] / r['seconds'] / 1e6:.0f} | {r['peak_rss'] / 2**20:.0f} MiB "
                         f"| {r['load']:.1f} |")
    lines += ["", "MB/s is wall clock of the whole command, start-up included; a load average above the core "
              "count means other work shared the CPU and the speed is a lower bound. The peak RSS does "
              "not depend on that."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=4.0, help="model size in GB (default 4)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (needs ~2.5x SIZE free)")
    ap.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="elves-memory-"))
    try:
        rows = measure(args.size, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(rows, args.size)
    print(text)
    if args.write:
        cmd = "python bench/memory.py " + " ".join(sys.argv[1:])
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        write_section("memory", "Memory: bounded by chunk size, not model size",
                      f"Command: `{cmd}` on {time.strftime('%Y-%m-%d')}, {machine}.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
