"""A new user's first run: ``elves --help``, then the first compress and restore of a 4 MB model,
with numba's cache empty (cold), filled (warm), and filled at install time (installed: a new empty
cache, ``elves kernels compile``, then the same commands), each command a new process.

    python bench/startup.py            # print the table
    python bench/startup.py --write    # also replace the startup section of bench/RESULTS.md

The model is real: the first tensors of minilm (bench/datasets.py), F32, written with
safetensors up to 4 MB. Cold runs point ``NUMBA_CACHE_DIR`` at a new empty folder, so numba
finds no machine code and compiles; the background compile that the CLI starts then (elves/
kernels/warm.py) inherits the folder, and is waited for before the warm runs. Seconds are wall
clock of the command, start-up included, and CPU seconds of the command itself (the background
compile is a process of its own and not counted); the load average says whether other work
shared the cores. The installed runs point ``NUMBA_CACHE_DIR`` at a second new folder.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datasets import prepare  # bench/datasets.py, beside this script
from results import write_section  # bench/results.py, beside this script

MODEL_BYTES = 4 << 20
ELVES = [sys.executable, "-c", "from elves.cli.main import main; main()"]


def write_model(path: Path) -> int:
    """minilm's tensors in name order, past the word embeddings, while they fit in 4 MB."""
    from safetensors.numpy import load_file, save_file

    folder = prepare("minilm")
    if folder is None:
        sys.exit("minilm is not prepared: python bench/datasets.py minilm")
    tensors = load_file(str(folder / "model.safetensors"))
    out, total = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if name.startswith("embeddings.word") or total + t.nbytes > MODEL_BYTES:
            continue
        out[name] = t
        total += t.nbytes
    save_file(out, str(path))
    return path.stat().st_size


def run(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command in a new process; it must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([*ELVES, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"elves {' '.join(args)} failed:\n{proc.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def background_compiles() -> list[int]:
    """Process ids of running ``python -m elves.kernels.warm``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"elves.kernels.warm" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


Row = tuple[str, float | None, float | None, float | None, float | None, float, float]


def measure(work: Path) -> tuple[list[Row], dict[str, object]]:
    model, archive, restored = work / "model.safetensors", work / "model.elves", work / "restored"
    size = write_model(model)
    steps = [("`elves --help`", ["--help"]),
             (f"`elves compress` ({size / 1e6:.1f} MB, F32)", ["compress", str(model), "-o", str(archive), "-f"]),
             ("`elves restore`", ["restore", str(archive), "-o", str(restored), "-f"])]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in steps}
    extra: dict[str, object] = {"size": size}
    cache = work / "numba-cache"
    cache.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    for mode in ("cold", "warm"):
        for name, args in steps:
            times[name].append(run(args, env))
        if restored.read_bytes() != model.read_bytes():
            sys.exit("the restored model differs")
        if mode == "cold":
            extra["cache_files_after_cold"] = sum(1 for p in cache.rglob("*.nbc"))
            t0 = time.perf_counter()
            while background_compiles() and time.perf_counter() - t0 < 300:
                time.sleep(0.5)
            extra["background_left_s"] = round(time.perf_counter() - t0, 1)
            extra["cache_files"] = sum(1 for p in cache.rglob("*.nbc"))
    installed = work / "numba-cache-installed"
    installed.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(installed)}
    install = run(["kernels", "compile", "-q"], env)
    extra["installed_cache_files"] = sum(1 for p in installed.rglob("*.nbc"))
    for name, args in steps:
        times[name].append(run(args, env))
    if restored.read_bytes() != model.read_bytes():
        sys.exit("the restored model differs")
    rows: list[Row] = [("`elves kernels compile` (install step)", None, None, None, None, *install)]
    rows += [(name, *times[name][0], *times[name][1], *times[name][2]) for name, _ in steps]
    both = [sum(times[name][k][i] for name, _ in steps[1:]) for k in (0, 1, 2) for i in (0, 1)]
    rows.append(("compress + restore", *both))
    return rows, extra


def report(rows: list[Row], extra: dict[str, object], argv: list[str]) -> str:
    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"Command: `python bench/startup.py{' ' + ' '.join(argv) if argv else ''}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} after.",
        "",
        "Each command is a new process. Cold: numba's cache empty (a new `NUMBA_CACHE_DIR`); warm: the "
        "same commands again; installed: another new cache, filled by `elves kernels compile` (the install "
        "step), then the same commands. Targets (issue 14): cold compress + restore <= 5 s, `elves --help` <= 1 s.",
        "",
        "| command | cold wall s | cold CPU s | warm wall s | warm CPU s | installed wall s | installed CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | " + " | ".join(map(cell, values)) + " |" for name, *values in rows]
    lines += [
        "",
        f"The cold compress started the background compile of the decoder's kernels; it had written "
        f"{extra['cache_files_after_cold']} of the cache's {extra['cache_files']} kernel files by the end of the "
        f"cold restore, and needed {extra['background_left_s']} s more. Its CPU time is not in the table. "
        f"The install step compiled every lossless kernel ({extra['installed_cache_files']} kernel files, the "
        f"torch checkpoint scanner's and BitX's among them) in two processes (the second walks the list from its other end; its CPU time is in the row).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the startup section of bench/RESULTS.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="elves-startup-"))
    try:
        rows, extra = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, extra, sys.argv[1:])
    print(text)
    if args.write:
        write_section("startup", "Issue 14: cold start", text)


if __name__ == "__main__":
    main()
