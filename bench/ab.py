"""A/B: restore (and compress) speed of this working tree against an earlier revision of elves, side
by side, in one run, on the same archives (a benchmark, not a test); with ``--identity``, whether
both write the very same bytes.

    python bench/ab.py --rev 56081ff                   # every prepared dataset
    python bench/ab.py --rev 56081ff minilm openff --threads 1,2 --repeat 5 --write
    python bench/ab.py --rev bb7694d --identity        # archives and store objects byte-identical?

``--identity`` compresses the same inputs with the same options through each version's CLI and
compares the archives' sha256: every dataset folder under ``$ELVES_DATA/models`` up to
``--max-mb`` (the variants of ``minilm-family`` each count as one), lossless and ``--lossy elf
--error-bound 2^-20``, plus ``--base minilm`` for the fine-tune ``minilm-family/last-layers``
(``bench/make_family.py``), each at every ``--threads`` count (default 1,2). Then it adds the same
models, in the same order, to a fresh store with ``elves store add`` in each version and compares
every object's sha256, and the manifests and profiles as JSON less the time of adding. It prints
a table and exits 1 on any difference or failure: a refactor must not change a byte.

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
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


CLI = r"""
import sys
import elves, elves.cli.main as cli
print("elves-from", elves.__file__, cli.__file__, file=sys.stderr, flush=True)
sys.argv[0] = "elves"
cli.main()
"""
BOUND = "2^-20"
FINE_TUNE = ("minilm-family/last-layers", "minilm")  # a real fine-tune and its base (make_family.py)


def elves_cli(tree: Path, *args: str | Path) -> None:
    """``elves ARGS`` run by the version in ``tree`` (its elves and its CLI, checked)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], env=env, capture_output=True, text=True,
                         cwd=tree)
    first = out.stderr.splitlines()[0].split() if out.stderr else []
    if first[:1] == ["elves-from"]:
        assert all(Path(f).resolve().is_relative_to(tree.resolve()) for f in first[1:]), first
    if out.returncode:
        raise RuntimeError((out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:160])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def store_digest(store: Path) -> dict[str, str]:
    """Every file of a store by relative path: objects by sha256, JSON files (manifests, profiles,
    the store's own) as canonical JSON without ``added`` (the manifest's time of adding)."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = str(p.relative_to(store))
        if not p.is_file() or rel == "lock" or rel.startswith("tmp/"):
            continue
        if p.suffix == ".json":
            doc = json.loads(p.read_text())
            if isinstance(doc, dict):
                doc.pop("added", None)
            out[rel] = json.dumps(doc, sort_keys=True)
        else:
            out[rel] = sha256(p)
    return out


def identity(old: Path, work: Path, ds, names: list[str], threads: list[int], max_mb: float) -> int:
    """Compress and store the same inputs with both versions; print a table; the differences' count."""
    models = ds.DATA_ROOT / "models"
    family = models / "minilm-family"
    if names:
        inputs = [Path(n) if Path(n).exists() else ds.model_dir(n) for n in names]
    else:
        inputs = [p for p in sorted(models.iterdir()) if p.is_dir() and p != family]
        inputs += [p for p in sorted(family.iterdir()) if p.is_dir() and not p.name.startswith(".")] if family.is_dir() else []
    skipped = [p for p in inputs if size_of(p) > max_mb * 1e6]
    inputs = [p for p in inputs if p not in skipped]
    fine, base = (models / FINE_TUNE[0], models / FINE_TUNE[1])
    cases: list[tuple[str, Path, list[str | Path]]] = []
    for src in inputs:
        cases += [(src.name, src, []), (src.name, src, ["--lossy", "elf", "--error-bound", BOUND])]
    if fine.is_dir() and base.is_dir():
        cases.append((FINE_TUNE[0], fine, ["--base", base]))
    else:
        print(f"no fine-tune pair: {fine} missing (python bench/make_family.py {fine.name})")
    rows: list[tuple[str, str, int, str, str, bool]] = []

    def both(make: Callable[[Path, Path], None], key: str) -> tuple[str, str]:
        got = []
        for label, tree in (("old", old), ("new", ROOT)):
            out = work / f"{label}-{key}"
            try:
                make(tree, out)
                got.append(sha256(out) if out.is_file() else "?")
            except (RuntimeError, subprocess.SubprocessError) as e:
                got.append(f"error: {e}")
            finally:
                out.unlink(missing_ok=True)
        return got[0], got[1]

    for name, src, opts in cases:
        for t in threads:
            label = " ".join(str(o) if not isinstance(o, Path) else o.name for o in opts) or "lossless"
            a, b = both(lambda tree, out: elves_cli(tree, "compress", src, "-o", out, "--threads", t, *opts),
                        f"{len(rows)}.elves")
            rows.append((name, label, t, a, b, a == b and not a.startswith("error")))
            print(f"{name:28} {label:32} {t}T  {'same' if a == b else 'DIFFERENT'}  old {a[:16]}  new {b[:16]}",
                  flush=True)
    store_inputs = [p for p in inputs if p != fine] + [fine] * fine.is_dir()  # the fine-tune after its base
    for t in threads:
        digests = []
        for label, tree in (("old", old), ("new", ROOT)):
            store = work / f"{label}.store"
            shutil.rmtree(store, ignore_errors=True)
            try:
                elves_cli(tree, "store", "init", store)
                for src in store_inputs:
                    elves_cli(tree, "store", "add", store, src, "--threads", t)
                digests.append(store_digest(store))
            except RuntimeError as e:
                digests.append({"error": str(e)})
            finally:
                shutil.rmtree(store, ignore_errors=True)
        a, b = digests
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        objects = sum(k.startswith("objects/") for k in a)
        rows.append((f"store add ({len(store_inputs)} models)", f"{objects} objects, {len(a) - objects} other files",
                     t, a.get("error", "-"), b.get("error", f"{len(differ)} files differ: " + ", ".join(differ[:3])),
                     not differ))
        print(f"{'store add':28} {len(store_inputs)} models {t}T  "
              + ("same" if not differ else f"DIFFERENT: {len(differ)} files, e.g. {', '.join(differ[:4])}"
                 + (f"; old: {a['error']}" if "error" in a else "") + (f"; new: {b['error']}" if "error" in b else "")),
              flush=True)
    print()
    print("| input | options | threads | old | new | |")
    print("| --- | --- | ---: | --- | --- | --- |")
    bad = 0
    for name, label, t, a, b, same in rows:
        bad += not same
        print(f"| {name} | {label} | {t} | {a[:60]} | {b[:60]} | {'same' if same else '**DIFFERENT**'} |")
    if skipped:
        print(f"\nskipped (over {max_mb:.0f} MB): {', '.join(p.name for p in skipped)}")
    print(f"\n{len(rows) - bad} of {len(rows)} identical")
    return bad


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", help="dataset names (bench/datasets.py) or paths")
    p.add_argument("--rev", required=True, help="the git revision to compare against")
    p.add_argument("--threads", default=None,
                   help=f"thread counts, comma-separated (default 1,{os.cpu_count() or 1}; with --identity 1,2)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per worker process, after a warm-up run")
    p.add_argument("--rounds", type=int, default=3, help="worker processes per version, alternating")
    p.add_argument("--no-verify", action="store_true",
                   help="also time this tree's restore without the sha256 check (verify=False, --no-verify)")
    p.add_argument("--write", action="store_true", help="update the ab section of bench/RESULTS.md")
    p.add_argument("--identity", action="store_true",
                   help="compare the bytes both versions write (archives, store objects), not speeds")
    p.add_argument("--max-mb", type=float, default=120, help="with --identity: skip inputs larger than this")
    args = p.parse_args()
    ds = load_datasets_module()
    threads = [int(t) for t in (args.threads or ("1,2" if args.identity else f"1,{os.cpu_count() or 1}")).split(",")]
    work = Path(tempfile.mkdtemp(prefix="elves-ab-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True,
                   capture_output=True)
    # The CLI folder is installed as elves.cli (package-dir): in the worktree, a link puts it there.
    (old / "elves" / "cli").symlink_to("../cli")
    if args.identity:
        try:
            bad = identity(old, work, ds, args.datasets, threads, args.max_mb)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
        sys.exit(1 if bad else 0)
    names = args.datasets or [n for n in ds.DATASETS if ds.model_dir(n).exists()]
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
