"""Issue 13's benchmark: a family of models added to a store at once, on 1 and 2 workers, by the
local process pool and by Ray, against adding them one by one; into a local store, and into an
s3:// store on moto's server (the real S3 protocol over HTTP on 127.0.0.1).

    python bench/scale_bench.py                       # local store (and s3:// if moto and s3fs are here)
    python bench/scale_bench.py --rounds 3 --json out.json
    python bench/scale_bench.py --stores local        # or s3, or local,s3
    python bench/scale_bench.py --stores s3 --executors local --workers 1 --rounds 1   # S3 requests of a batch

The models: minilm, every variant folder ``bench/make_family.py`` made under ``minilm-family/``,
and the five openff versions (each file a model), listed bases first, oldest first, so that the
order :func:`elves.store.add_many` commits them in is the order given, and the one-by-one run
(``Store.add`` of each, ``threads`` left to its default: every core) adds them in the same order.

Each configuration adds them all to a fresh store ``--rounds`` times; the table gives the best
wall time. The local pool's time includes starting its processes (spawned, each importing numpy,
numba and elves), which is also timed apart; Ray's does not include starting the local cluster
(``ray.init(num_cpus=workers)``), timed apart once per worker count. Each task codes with the cores shared among the workers
(``threads`` = cores / workers), so that every configuration uses every core. After each run the
store is checked against the one-by-one store: the same objects, byte for byte, and the same
manifests but for their time.

On s3://, moto runs in this process (werkzeug's request log quietened); the workers reach it
through AWS_ENDPOINT_URL and the test credentials, set in the environment before anything starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elves.store import Store, add_many
from elves.store.batch import runner

DATA = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets")) / "models"
OPENFF = [f"openff-gnn-am1bcc-{v}" for v in ("0.0.1-alpha.1", "0.1.0-rc.1", "0.1.0-rc.2", "0.1.0-rc.3", "1.0.0")]
BUCKET = "elves-bench"


def sources() -> list[tuple[Path, str]]:
    out = [(DATA / "minilm", "minilm")]
    family = DATA / "minilm-family"
    out += [(p, f"minilm-{p.name}") for p in sorted(family.iterdir()) if p.is_dir()] if family.is_dir() else []
    out += [(DATA / "openff" / f"{n}.pt", n) for n in OPENFF]
    missing = [str(p) for p, _ in out if not p.exists()]
    if missing:
        sys.exit(f"datasets missing ({', '.join(missing)}): run `python bench/datasets.py minilm openff` "
                 "and `python bench/make_family.py`")
    return out


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- stores ----------------------------------------------------------------------------------

class LocalStores:
    name = "local"

    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def fresh(self) -> Store:
        self.n += 1
        return Store.init(self.root / f"s{self.n}")

    def files(self, s: Store) -> dict[str, bytes]:
        root = Path(s.path)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.relative_to(root).parts[0] in ("objects", "models", "profiles")}


class Requests(logging.Handler):
    """Counts the S3 requests moto's server answers, by kind, from werkzeug's request log."""

    LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/')
    COLOUR = re.compile(r"\x1b\[[0-9;]*m")      # werkzeug colours a line by its status

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = self.LINE.search(self.COLOUR.sub("", record.getMessage()))
        if m:
            method, target = m.groups()
            path, _, query = target.partition("?")
            kind = "LIST" if method == "GET" and path.strip("/").count("/") == 0 else method
            self.counts["PUT part" if method == "PUT" and "partNumber=" in query else kind] += 1


class S3Stores:
    """Stores under s3://elves-bench/ on a moto server in this process."""

    name = "s3 (moto)"

    def __init__(self, staging: Path):
        from moto.server import ThreadedMotoServer

        log = logging.getLogger("werkzeug")  # its request log: counted, not printed
        log.setLevel(logging.INFO)
        log.propagate = False
        self.requests = Requests()
        log.addHandler(self.requests)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "ELVES_STAGING": str(staging)})
        import boto3

        self.s3 = boto3.client("s3")
        self.s3.create_bucket(Bucket=BUCKET)
        self.n = 0

    def fresh(self) -> Store:
        self.n += 1
        return Store.init(f"s3://{BUCKET}/s{self.n}")

    def files(self, s: Store) -> dict[str, bytes]:
        prefix = str(s.path).split(f"s3://{BUCKET}/", 1)[1] + "/"
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for o in page.get("Contents", []):
                key = o["Key"][len(prefix):]
                if key.split("/", 1)[0] in ("objects", "models", "profiles"):
                    out[key] = self.s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        return out

    def close(self) -> None:
        self.server.stop()


def same_store(got: dict[str, bytes], want: dict[str, bytes]) -> bool:
    if sorted(got) != sorted(want):
        return False
    for key, data in want.items():
        if key.startswith("models/"):
            a, b = json.loads(got[key]), json.loads(data)
            a.pop("added")
            b.pop("added")
            if a != b:
                return False
        elif got[key] != data:
            return False
    return True


# -- runs ------------------------------------------------------------------------------------

def pool_start(workers: int) -> float:
    """The seconds a local pool of ``workers`` processes takes to answer a task on each."""
    t0 = time.perf_counter()
    with runner("local", workers) as run:
        for h in [run.submit(os.getpid) for _ in range(workers)]:
            run.result(h)
    return time.perf_counter() - t0


@contextmanager
def ray_cluster(workers: int) -> Iterator[float]:
    """A local Ray cluster of ``workers`` CPUs for the block; the seconds it took to start."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield time.perf_counter() - t0
    finally:
        ray.shutdown()


def best_of(rounds: int, stores: Any, run: Callable[[Store], object]) -> tuple[float, Store]:
    """The best wall time of ``rounds`` runs, each into a fresh store; the last store (and on
    s3://, its requests)."""
    best = float("inf")
    for _ in range(rounds):
        s = stores.fresh()
        if isinstance(stores, S3Stores):
            stores.requests.counts.clear()
        t0 = time.perf_counter()
        run(s)
        best = min(best, time.perf_counter() - t0)
    return best, s


def bench(stores: Any, srcs: list[tuple[Path, str]], rounds: int, workers: list[int],
          executors: list[str]) -> list[dict[str, Any]]:
    sec, s = best_of(rounds, stores, lambda s: [s.add(p, n) for p, n in srcs])
    want = stores.files(s)
    rows: list[dict[str, Any]] = []

    def row(executor: str, w: int, sec: float, s: Store, start: float = 0.0) -> None:
        requests = dict(stores.requests.counts) if isinstance(stores, S3Stores) else {}
        rows.append({"store": stores.name, "executor": executor, "workers": w, "seconds": sec,
                     "same": same_store(stores.files(s), want), "start": start, "requests": requests})
        print(rows[-1], flush=True)

    row("one by one (Store.add)", 1, sec, s)

    for w in workers if "local" in executors else []:
        row("local", w, *best_of(rounds, stores, lambda s: add_many(s, srcs, executor="local", workers=w)),
            pool_start(w))
    for w in workers if "ray" in executors else []:
        with ray_cluster(w) as start:
            row("ray", w, *best_of(rounds, stores, lambda s: add_many(s, srcs, executor="ray")), start)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--stores", default="local,s3")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--json")
    args = ap.parse_args()
    srcs = sources()
    total = sum(size_of(p) for p, _ in srcs)
    workers = [int(w) for w in args.workers.split(",")]
    executors = args.executors.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scale-bench.") as tmp:
        if "local" in args.stores:
            rows += bench(LocalStores(Path(tmp) / "local"), srcs, args.rounds, workers, executors)
        if "s3" in args.stores:
            try:
                import moto.server  # noqa: F401
                import s3fs  # noqa: F401
            except ImportError as e:
                print(f"s3 skipped: {e} (pip install 'elves[test]')", file=sys.stderr)
            else:
                s3 = S3Stores(Path(tmp) / "staging")
                try:
                    rows += bench(s3, srcs, args.rounds, workers, executors)
                finally:
                    s3.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{len(srcs)} models, {total / 1e6:.1f} MB; {os.cpu_count()} cores, {platform.machine()}, tree at {rev}, "
          f"load average {os.getloadavg()[0]:.1f}; best of {args.rounds}\n")
    print("| store | executor | workers | wall s | MB/s | executor start s | same store | S3 requests (last run) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        req = ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items())) or "-"
        print(f"| {r['store']} | {r['executor']} | {r['workers']} | {r['seconds']:.2f} | {total / 1e6 / r['seconds']:.0f} | "
              f"{r['start']:.1f} | {'yes' if r['same'] else 'NO'} | {req} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"models": len(srcs), "bytes": total, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
