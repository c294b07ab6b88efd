"""Issue 12's benchmark: what a Hub mirror costs to keep a family of models (a benchmark, not a test).

    python bench/mirror_bench.py selfcheck                    # the chunker's own checks (asserts)
    python bench/mirror_bench.py storage                      # every family, a table on stdout
    python bench/mirror_bench.py storage --json out.json      # and the numbers as JSON
    python bench/mirror_bench.py storage --family openff      # one family

``storage`` compares, per family of real repos (datasets.md), the bytes kept by:

- full copies: what a plain mirror keeps, the sum of every file's size;
- file dedup: each distinct file (sha256) once;
- CDC 64 KiB: a Xet-style estimate. Every file is cut by a gear-hash content-defined chunker
  (FastCDC with normalized chunking: minimum 16 KiB, normal 64 KiB, maximum 128 KiB, a harder
  mask of 18 bits before the normal size and an easier one of 14 bits after it); each distinct
  chunk (xxh3-128) across all the family's files counts once, raw and as one zstd-3 frame per
  chunk. The normal size is where the masks switch, not the mean: on random bytes the chunks
  average 73 KiB (``selfcheck``). Xet itself cuts with a single 16-bit mask (8 KiB to 128 KiB,
  no normalization; about 62 KiB on average) and compresses each chunk with LZ4, or byte
  grouping by 4 then LZ4 (BG4-LZ4) where that is smaller; zstd-3 here stands in for that;
- the elves store: ``Store.init`` then ``Store.add`` of each model in order, base first; and again
  with the fine-tunes added before the base (the store re-codes them as deltas when the base
  arrives). Its size is ``Store.stats().stored_bytes``.

Each method runs in a fresh process (spawned), so that its peak RSS (``ru_maxrss``) is its own; the
interpreter with numpy, numba and elves imported is counted in it (``start_rss`` in the JSON).
Wall time excludes that start and the chunker's compilation (cached by numba).

Families: ``minilm`` (the base, then every variant folder ``bench/make_family.py`` has made under
``minilm-family/``; the ones not made are named in the output) and ``openff`` (five released
versions of one checkpoint, each a model, oldest first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard
from datasets import DATA_ROOT, sha256_file  # bench/datasets.py, beside this script
from make_family import RECIPES
from numba import njit

from elves.store import Store

MODELS = DATA_ROOT / "models"

# ============================================================================ the chunker

MIN_CHUNK = 16 * 1024
NORMAL_CHUNK = 64 * 1024
MAX_CHUNK = 128 * 1024
NORMALIZATION = 2          # FastCDC's NC level: the masks have log2(normal) +- 2 bits
GEAR_SEED = 20251206


def _spread_mask(bits: int) -> int:
    """A mask of ``bits`` one-bits spread evenly over the top 48 bits of the hash. With the gear
    hash's shift left, bit k depends on the last k+1 bytes, so high bits see a longer window
    (FastCDC's padded masks, which spread their ones for the same reason)."""
    positions = {round(16 + i * 47 / (bits - 1)) for i in range(bits)}
    assert len(positions) == bits
    return sum(1 << p for p in positions)


GEAR = np.frombuffer(np.random.default_rng(GEAR_SEED).bytes(256 * 8), dtype=np.uint64).copy()
_AVG_BITS = NORMAL_CHUNK.bit_length() - 1
MASK_HARD = np.uint64(_spread_mask(_AVG_BITS + NORMALIZATION))  # before the normal size: cuts are rarer
MASK_EASY = np.uint64(_spread_mask(_AVG_BITS - NORMALIZATION))  # after it: cuts are likelier


@njit(cache=True, nogil=True)
def _cut_ends(data: np.ndarray, gear: np.ndarray, mask_hard: np.uint64, mask_easy: np.uint64,
              min_size: int, normal: int, max_size: int) -> np.ndarray:
    n = data.shape[0]
    ends = np.empty(n // min_size + 2, dtype=np.int64)
    k = 0
    start = 0
    one = np.uint64(1)
    zero = np.uint64(0)
    while start < n:
        left = n - start
        end = start + min(left, max_size)
        if left > min_size:
            # sub-minimum cut-point skipping: the hash starts afresh at the minimum size
            fp = zero
            i = start + min_size
            norm_end = start + min(left, normal)
            cut = -1
            while i < norm_end:
                fp = (fp << one) + gear[data[i]]
                i += 1
                if fp & mask_hard == zero:
                    cut = i
                    break
            if cut < 0:
                while i < end:
                    fp = (fp << one) + gear[data[i]]
                    i += 1
                    if fp & mask_easy == zero:
                        cut = i
                        break
            if cut >= 0:
                end = cut
        ends[k] = end
        k += 1
        start = end
    return ends[:k]


def chunk_ends(data: np.ndarray) -> np.ndarray:
    """Where each chunk of ``data`` (uint8) ends; the last end is ``len(data)``."""
    return _cut_ends(data, GEAR, MASK_HARD, MASK_EASY, MIN_CHUNK, NORMAL_CHUNK, MAX_CHUNK)


def chunk_digests(data: np.ndarray) -> list[tuple[bytes, int, int]]:
    """(xxh3-128 digest, start, end) of each chunk of ``data``."""
    view = data.data
    out = []
    start = 0
    for end in chunk_ends(data).tolist():
        out.append((xxhash.xxh3_128_digest(view[start:end]), start, end))
        start = end
    return out


def selfcheck() -> None:
    """The chunker keeps its bounds, averages near its normal size on random bytes, and a few
    bytes inserted near the start leave the later chunks as they were."""
    rng = np.random.default_rng(1)
    data = np.frombuffer(rng.bytes(64 << 20), dtype=np.uint8)
    ends = chunk_ends(data)
    sizes = np.diff(ends, prepend=0)
    assert ends[-1] == len(data) and (sizes > 0).all()
    assert sizes.max() <= MAX_CHUNK and sizes[:-1].min() >= MIN_CHUNK, (sizes.min(), sizes.max())
    mean = float(sizes[:-1].mean())
    assert 0.8 * NORMAL_CHUNK <= mean <= 1.25 * NORMAL_CHUNK, mean
    forced = int((sizes[:-1] == MAX_CHUNK).sum())
    print(f"random 64 MiB: {len(sizes)} chunks, mean {mean / 1024:.1f} KiB, "
          f"min {sizes[:-1].min() / 1024:.1f} KiB, max {sizes.max() / 1024:.1f} KiB, "
          f"{forced} cut at the maximum")

    # a run of equal bytes never matches a mask: every cut there is forced at the maximum
    flat = chunk_ends(np.zeros(1 << 20, dtype=np.uint8))
    assert (np.diff(flat, prepend=0) == MAX_CHUNK).all(), flat

    before = {d for d, _, _ in chunk_digests(data)}
    for at, extra in ((1000, b"\x01\x02\x03"), (200_000, b"hello"), (5, bytes(range(37)))):
        edited = np.concatenate([data[:at], np.frombuffer(extra, dtype=np.uint8), data[at:]])
        after = chunk_digests(edited)
        changed = [(s, e) for d, s, e in after if d not in before]
        # only the chunk holding the insertion (and at most the next, if its cut moved) differ
        assert len(changed) <= 2 and all(s <= at + len(extra) + MAX_CHUNK for s, _ in changed), changed
        print(f"{len(extra)} bytes inserted at {at:,}: {len(changed)} of {len(after)} chunks changed")
    print("selfcheck passed")


# ============================================================================ families

@dataclass
class Family:
    name: str
    models: list[tuple[str, Path]]       # (name, file or folder), base first
    note: str = ""

    def files(self) -> list[Path]:
        return [f for _, src in self.models for f in model_files(src)]


def model_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())


def families() -> dict[str, Family]:
    """The families whose datasets are there (``python bench/datasets.py minilm openff``)."""
    out: dict[str, Family] = {}
    base = MODELS / "minilm"
    if base.is_dir():
        made = [v for v in RECIPES if (MODELS / "minilm-family" / v).is_dir()]
        missing = [v for v in RECIPES if v not in made]
        note = f"variants made: {', '.join(made) or 'none'}"
        if missing:
            note += f"; not made (bench/make_family.py): {', '.join(missing)}"
        out["minilm"] = Family("minilm", [("minilm", base)] +
                               [(v, MODELS / "minilm-family" / v) for v in made], note)
    openff = sorted((MODELS / "openff").glob("*.pt")) if (MODELS / "openff").is_dir() else []
    if openff:
        out["openff"] = Family("openff", [(p.stem.removeprefix("openff-gnn-am1bcc-"), p) for p in openff],
                               "five released versions, oldest first")
    return out


# ============================================================================ measuring

@dataclass
class Measured:
    result: dict[str, Any]
    seconds: float
    peak_rss: int            # bytes: the process's peak resident set (ru_maxrss)
    start_rss: int           # bytes: its peak before the method ran (interpreter and imports)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def _run_measured(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> Measured:
    start_rss = _peak_rss()
    t0 = time.perf_counter()
    result = fn(*args)
    seconds = result.pop("seconds", time.perf_counter() - t0)
    return Measured(result, seconds, _peak_rss(), start_rss)


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> Measured:
    """Run ``fn(*args)`` in a fresh process; its wall time and peak RSS. ``fn`` may report its own
    ``seconds`` (to leave out a warm-up) in the dict it returns."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run_measured, fn, args).result()


# ============================================================================ storage methods

def full_copies(files: list[Path]) -> dict[str, Any]:
    return {"stored_bytes": sum(f.stat().st_size for f in files), "files": len(files)}


def file_dedup(files: list[Path]) -> dict[str, Any]:
    unique: dict[str, int] = {}
    for f in files:
        unique.setdefault(sha256_file(f), f.stat().st_size)
    return {"stored_bytes": sum(unique.values()), "unique_files": len(unique)}


def cdc_dedup(models: list[tuple[str, Path]]) -> dict[str, Any]:
    chunk_ends(np.zeros(MAX_CHUNK * 2, dtype=np.uint8))    # load (or compile) the chunker first
    t0 = time.perf_counter()
    unique: dict[bytes, int] = {}          # digest -> zstd-3 size
    cctx = zstandard.ZstdCompressor(level=3)
    chunks = raw = zstd3 = 0
    zstd_seconds = 0.0
    after = []
    for name, src in models:
        for f in model_files(src):
            data = np.fromfile(f, dtype=np.uint8)
            view = data.data
            for digest, start, end in chunk_digests(data):
                chunks += 1
                if digest not in unique:
                    t1 = time.perf_counter()
                    unique[digest] = len(cctx.compress(view[start:end]))
                    zstd_seconds += time.perf_counter() - t1
                    raw += end - start
                    zstd3 += unique[digest]
            del view, data
        after.append({"model": name, "raw_bytes": raw, "zstd3_bytes": zstd3})
    seconds = time.perf_counter() - t0
    return {"stored_bytes": raw, "zstd3_bytes": zstd3, "chunks": chunks, "unique_chunks": len(unique),
            "seconds": seconds, "zstd_seconds": zstd_seconds, "after_each_model": after}


def elves_store(models: list[tuple[str, Path]], tmp_root: str | None) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="mirror_bench-", dir=tmp_root)
    try:
        store = Store.init(Path(tmp) / "store")
        adds = []
        for name, src in models:
            r = store.add(src, name)
            adds.append({"model": name, "seconds": round(r.seconds, 2),
                         "stored_bytes": store.stats().stored_bytes})
        s = store.stats()
        return {"stored_bytes": s.stored_bytes, "logical_bytes": s.logical_bytes, "objects": s.objects,
                "delta_objects": s.delta_objects, "garbage_bytes": s.garbage_bytes, "after_each_model": adds}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Row:
    method: str
    stored_bytes: int
    seconds: float
    peak_rss: int
    start_rss: int
    detail: dict[str, Any] = field(default_factory=dict)


def storage_rows(fam: Family, tmp_root: str | None, reverse: bool) -> list[Row]:
    files = fam.files()

    def row(method: str, m: Measured, stored: int | None = None, seconds: float | None = None) -> Row:
        return Row(method, m.result["stored_bytes"] if stored is None else stored,
                   m.seconds if seconds is None else seconds, m.peak_rss, m.start_rss, m.result)

    full = isolated(full_copies, files)
    rows = [row("full copies", full)]
    rows.append(row("file dedup (sha256)", isolated(file_dedup, files)))
    cdc = isolated(cdc_dedup, fam.models)
    rows.append(row("CDC 64 KiB, raw", cdc, seconds=cdc.seconds - cdc.result["zstd_seconds"]))
    rows.append(row("CDC 64 KiB, zstd-3 per chunk", cdc, stored=cdc.result["zstd3_bytes"]))
    orders = [("elves store, base first", fam.models)]
    if reverse:
        orders.append(("elves store, fine-tunes first", fam.models[::-1]))
    for label, models in orders:
        m = isolated(elves_store, models, tmp_root)
        # the store's logical size is every model's files once each: the full copies
        assert m.result["logical_bytes"] == full.result["stored_bytes"], (m.result, full.result)
        rows.append(row(label, m))
    return rows


def storage_table(fam: Family, rows: list[Row]) -> str:
    full = rows[0].stored_bytes
    lines = [f"{fam.name}: {', '.join(n for n, _ in fam.models)} ({fam.note})",
             "",
             "| method | stored bytes | saved vs full copies | wall s | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.method} | {r.stored_bytes:,} | {1 - r.stored_bytes / full:.1%} | "
                     f"{r.seconds:.1f} | {r.peak_rss / 1e6:.0f} |")
    return "\n".join(lines)


def marginal_table(fam: Family, rows: list[Row]) -> str:
    """What each model adds, in the order added (base first): its files, and the growth of the
    CDC estimate and of the store when it arrives."""
    cdc = next(r for r in rows if r.method.startswith("CDC")).detail["after_each_model"]
    store = next(r for r in rows if r.method == "elves store, base first").detail["after_each_model"]
    lines = ["| model | its files | + CDC raw | + CDC zstd-3 | + elves store |",
             "| --- | ---: | ---: | ---: | ---: |"]
    prev = {"raw_bytes": 0, "zstd3_bytes": 0, "stored_bytes": 0}
    for (name, src), c, e in zip(fam.models, cdc, store):
        size = sum(f.stat().st_size for f in model_files(src))
        lines.append(f"| {name} | {size:,} | {c['raw_bytes'] - prev['raw_bytes']:,} | "
                     f"{c['zstd3_bytes'] - prev['zstd3_bytes']:,} | {e['stored_bytes'] - prev['stored_bytes']:,} |")
        prev = {**c, "stored_bytes": e["stored_bytes"]}
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def cmd_storage(args: argparse.Namespace) -> None:
    fams = families()
    chosen = args.family or list(fams)
    missing = [f for f in chosen if f not in fams]
    if missing:
        sys.exit(f"no dataset for {', '.join(missing)}: run `python bench/datasets.py minilm openff`")
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv),
                              "cdc": {"min": MIN_CHUNK, "normal": NORMAL_CHUNK, "max": MAX_CHUNK,
                                      "mask_hard": hex(int(MASK_HARD)), "mask_easy": hex(int(MASK_EASY)),
                                      "gear_seed": GEAR_SEED},
                              "families": []}
    for name in chosen:
        fam = fams[name]
        rows = storage_rows(fam, args.tmp, not args.no_reverse)
        print(storage_table(fam, rows), marginal_table(fam, rows), sep="\n\n", end="\n\n", flush=True)
        report["families"].append({"family": name, "note": fam.note,
                                   "models": [[n, str(p)] for n, p in fam.models],
                                   "rows": [asdict(r) for r in rows]})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("selfcheck", help="check the chunker (asserts)").set_defaults(run=lambda a: selfcheck())
    st = sub.add_parser("storage", help="stored bytes of each family under each method")
    st.add_argument("--family", action="append", help="minilm or openff (repeatable; default: both)")
    st.add_argument("--json", metavar="PATH", help="also write the numbers here")
    st.add_argument("--tmp", metavar="DIR", help="where the stores are made (default: the system's temp folder)")
    st.add_argument("--no-reverse", action="store_true", help="skip the store with the fine-tunes first")
    st.set_defaults(run=cmd_storage)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
