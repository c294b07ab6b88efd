"""A/B: restore (and compress) speed of this working tree against an earlier revision of elves, side
by side, in one run, on the same archives (a benchmark, not a test).

    python bench/ab.py --rev 56081ff                   # every prepared dataset
    python bench/ab.py --rev 56081ff minilm openff --threads 1,2 --repeat 5 --write

The revision is checked out into a temporary git worktree, and each timed run is a fresh worker
process that imports elves from either that worktree or this tree (PYTHONPATH first). Each
dataset is compressed once by the old revision, so both versions restore the very same archive;
worker processes alternate old, new, old, new, ... so that a noisy machine slows both alike; the
best run of each version is kept. MB/s is 1e6 bytes of original data per second, file to file; timings exclude
interpreter start and imports, and a warm-up run in each worker pays numba's cache load first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import load_datasets_module  # bench/compare.py, beside this script
from results import write_section

HERE = Path(__file__).resolve().parent
NO_VERIFY = {"verify": False}
ROOT = HERE.parent

WORKER = r"""
import json, shutil, sys, time
import elves
op, src, dst, threads, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
kw = json.loads(sys.argv[6])
best = float("inf")
for k in range(repeat + 1):  # run 0 pays numba's cache load and the page cache: not kept
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    if op == "compress":
        elves.compress(src, dst, threads=threads, force=True)
    else:
        elves.restore(src, dst, threads=threads, force=True, **kw)
    best = min(best, time.perf_counter() - t0) if k else best
print(json.dumps({"seconds": best, "elves": elves.__file__}))
"""


def run(tree: Path, op: str, src: Path, dst: Path, threads: int, repeat: int = 0, **kw: object) -> float:
    """The best of ``repeat`` timed runs of ``op`` in one worker process importing elves from
    ``tree``; ``kw`` go to ``elves.restore``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", WORKER, op, str(src), str(dst), str(threads), str(repeat),
                          json.dumps(kw)],
                         env=env, capture_output=True, text=True, check=True, cwd=tree)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["elves"]).resolve().is_relative_to(tree.resolve()), got  # the intended version ran
    return got["seconds"]


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", help="dataset names (bench/datasets.py) or paths")
    p.add_argument("--rev", required=True, help="the git revision to compare against")
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="thread counts, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per worker process, after a warm-up run")
    p.add_argument("--rounds", type=int, default=3, help="worker processes per version, alternating")
    p.add_argument("--no-verify", action="store_true",
                   help="also time this tree's restore without the sha256 check (verify=False, --no-verify)")
    p.add_argument("--write", action="store_true", help="update the ab section of bench/RESULTS.md")
    args = p.parse_args()
    ds = load_datasets_module()
    names = args.datasets or [n for n in ds.DATASETS if ds.model_dir(n).exists()]
    threads = [int(t) for t in args.threads.split(",")]
    work = Path(tempfile.mkdtemp(prefix="elves-ab-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True,
                   capture_output=True)
    rows = []
    try:
        for name in names:
            src = Path(name) if Path(name).exists() else ds.model_dir(name)
            archive = work / f"{src.name}.elves"
            run(old, "compress", src, archive, threads[-1], 0)
            mb = size_of(src) / 1e6
            for t in threads:
                sides = [("old", old, {}), ("new", ROOT, {})] + [("new, no sha256", ROOT, NO_VERIFY)] * args.no_verify
                best = dict.fromkeys((label for label, _, _ in sides), float("inf"))
                for _ in range(args.rounds):  # rounds alternate the versions, so noise hits both
                    for label, tree, kw in sides:
                        best[label] = min(best[label], run(tree, "restore", archive, work / "out", t, args.repeat, **kw))
                rows.append((src.name, mb, t, [mb / best[label] for label, _, _ in sides]))
                print(f"{src.name} {t}T restore MB/s: " + ", ".join(
                    f"{label} {mb / best[label]:.0f}" for label, _, _ in sides), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.write:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        lines = [
            f"Command: `python bench/ab.py --rev {args.rev} {' '.join(args.datasets)} --threads {args.threads} "
            f"--repeat {args.repeat} --rounds {args.rounds}{' --no-verify' if args.no_verify else ''} --write`"
            .replace("  ", " "),
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; new = {head} plus the "
            f"working tree, old = {args.rev}",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
            f"{platform.platform()}; Python {platform.python_version()}",
            "",
            "| dataset | MB | threads | restore MB/s old | new | new / old |"
            + (" new, no sha256 | no sha256 / old |" if args.no_verify else ""),
            "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.no_verify else ""),
        ]
        lines += [f"| {n} | {mb:.1f} | {t} | " + " | ".join(
            f"{v:.0f}" + (f" | {v / speeds[0]:.3f}" if k else "") for k, v in enumerate(speeds)) + " |"
            for n, mb, t, speeds in rows]
        lines += ["", "Both versions restore the same archive (written by the old one), file to file: per version, "
                  f"{args.rounds} worker processes alternating with the other version's, each timing {args.repeat} "
                  "runs after a warm-up run; the best is kept."]
        write_section("ab", "ab.py: this tree against an earlier revision", "\n".join(lines))


if __name__ == "__main__":
    main()
