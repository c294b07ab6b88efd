"""Where a file-to-file run's CPU goes (a benchmark, not a test): elves' compress and restore of
each dataset, best of ``--repeat`` runs in this process, page cache warm, to ``--tmp``: the wall
time, the CPU time of the whole process and of the calling thread, and the CPU that one sha256
pass over the same files costs (hashlib), which every compress and every verified restore pays
and no codec change removes. CPU over wall says how many of the machine's cores a run keeps busy:
near the core count, only less work makes it faster.

    python bench/cpu_split.py minilm openff-st silero --threads 1,2 --repeat 10 --write
    perf record -F 2000 -g -- python bench/cpu_split.py minilm --threads 2 --repeat 30 --only compress
    perf report --no-children --sort dso --stdio       # the same CPU by library
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from compare import ALL_THREADS, load_datasets_module, machine, sha256_tree, tree_size  # bench/compare.py
from results import write_section

import elves


def _timed(run) -> tuple[float, float, float]:
    """(wall, process CPU, calling thread's CPU) of ``run()``, in seconds."""
    t, c, m = time.perf_counter(), time.process_time(), time.thread_time()
    run()
    return time.perf_counter() - t, time.process_time() - c, time.thread_time() - m


def measure(src: Path, work: Path, op: str, threads: int, repeat: int) -> tuple[float, float, float]:
    archive, out = work / "a.elves", work / "out"

    def compress() -> None:
        elves.compress(src, archive, threads=threads, force=True)

    def restore() -> None:
        shutil.rmtree(out, ignore_errors=True)
        elves.restore(archive, out, threads=threads)

    run = compress if op == "compress" else restore
    if run is restore and not archive.exists():
        compress()
    run()  # numba's cache load, the page cache
    return min((_timed(run) for _ in range(repeat)), key=lambda r: r[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="*", default=["minilm", "openff", "openff-st", "silero", "minilm-gguf"])
    ap.add_argument("--threads", default=f"1,{ALL_THREADS}")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--only", choices=["compress", "restore"])
    ap.add_argument("--tmp", default=None, help="where archives and restored copies go (default: the system's)")
    ap.add_argument("--write", action="store_true", help="replace this script's section of bench/RESULTS.md")
    args = ap.parse_args()
    ds = load_datasets_module()
    threads = sorted({int(t) for t in args.threads.split(",")})
    ops = [args.only] if args.only else ["compress", "restore"]
    rows = ["| dataset | MB | run | threads | wall ms | MB/s | CPU ms | cores busy | calling thread ms "
            "| sha256 alone, CPU ms | sha256 share of CPU |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.datasets:
        src = ds.model_dir(name)
        nbytes = tree_size(src)
        sha = min(_timed(lambda: sha256_tree(src))[1] for _ in range(3))  # CPU, reads included
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            for op in ops:
                for n in threads:
                    wall, cpu, main_cpu = measure(src, Path(tmp), op, n, args.repeat)
                    row = (f"| {name} | {nbytes / 1e6:.1f} | {op} | {n} | {wall * 1e3:.1f} | {nbytes / wall / 1e6:.0f} "
                           f"| {cpu * 1e3:.1f} | {cpu / wall:.2f} | {main_cpu * 1e3:.1f} | {sha * 1e3:.1f} "
                           f"| {sha / cpu:.0%} |")
                    rows.append(row)
                    print(row, flush=True)
    m = machine()
    text = "\n".join([
        f"Command: `python bench/cpu_split.py {' '.join(args.datasets)} --threads {args.threads} "
        f"--repeat {args.repeat}{' --tmp ' + args.tmp if args.tmp else ''} --write`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"Machine: {m['cpu']}, {m['cores']} logical cores, {m['ram_gb']} GiB RAM; {m['os']}",
        "", *rows, "",
        "Best of the runs by wall time; CPU is the process's (every thread), the calling thread's "
        "apart. sha256 alone: one hashlib pass over the files, reads included.",
    ])
    if args.write:
        write_section("cpu_split", "cpu_split.py: where the CPU of a file-to-file run goes", text)


if __name__ == "__main__":
    main()
