"""Issue 12's benchmark: what a Hub mirror costs to keep a family of models, to pull it and to serve it.

    python bench/mirror_bench.py selfcheck                    # the chunker's own checks (asserts)
    python bench/mirror_bench.py storage                      # every family, a table on stdout
    python bench/mirror_bench.py storage --json out.json      # and the numbers as JSON
    python bench/mirror_bench.py storage --family openff      # one family
    python bench/mirror_bench.py pull [--json out.json]       # pull against snapshot_download; a 3 GB file
    python bench/mirror_bench.py serve [--json out.json]      # the server: 1 and 8 clients, against restore

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

Each method runs in a fresh process (spawned), so that its peak RSS (VmHWM) is its own; the
interpreter with numpy, numba and elves imported is counted in it (``start_rss`` in the JSON).
Wall time excludes that start and the chunker's compilation (cached by numba).

``pull`` puts the families on the tests' Hub stand-in (``tests/hub_standin.py``, uvicorn on
127.0.0.1 in this process): a repo per minilm model, and one openff repo with a commit and a tag
per version. It times ``elves.mirror.pull`` of them all into a fresh store against plain
``huggingface_hub.snapshot_download`` into a fresh cache, each in its own process, rounds
alternating which goes first. Then it writes a safetensors file of BF16 weights drawn from seeded
normal distributions (7 layers of an 8B-class decoder, 3.05 GB), commits it, and pulls it with
elves in a process of its own: its peak RSS, and the peak size of the store's ``tmp/``, where the
pull stages its downloads. Then the same again with the layers in a file each, as the Hub's
sharded checkpoints come, where ``jobs`` downloads run ahead of the file being stored.

``serve`` pulls the minilm family and astra-st (a 235 MB file) into a store, times
``Store.restore`` of each model, then runs ``elves.mirror.server.serve`` in a process of its own
and fetches each repo's weight file with one client and then eight at once (threads), by a plain
streaming GET and by ``hf_hub_download`` into a fresh cache each, every copy checked by sha256. The
server's peak RSS is its VmHWM. Clients, server and (for ``pull``) the stand-in share the cores.

Families: ``minilm`` (the base, then every variant folder ``bench/make_family.py`` has made under
``minilm-family/``; the ones not made are named in the output) and ``openff`` (five released
versions of one checkpoint, each a model, oldest first).
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash
import zstandard
from datasets import DATA_ROOT, sha256_file  # bench/datasets.py, beside this script
from make_family import RECIPES
from numba import njit

from elves.mirror.pull import pull
from elves.store import Store

if TYPE_CHECKING:
    from tests.hub_standin import HubStandin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # for the tests' Hub stand-in
# Read by huggingface_hub when imported, here and in the processes spawned: no progress bars on
# stdout, no telemetry requests to the stand-in. It, the stand-in and its server are imported
# where they are used: every spawned process imports this script, and its peak RSS counts them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

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
    peak_rss: int            # bytes: the process's peak resident set (VmHWM)
    start_rss: int           # bytes: its peak before the method ran (interpreter and imports)


def _peak_rss() -> int:
    """This process's peak resident set, in bytes. Not ``ru_maxrss``: a spawned child's starts at
    its parent's peak, which exec folds into it."""
    return vm(os.getpid())["VmHWM"]


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
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()}


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


# ============================================================================ pull and serve

@dataclass(frozen=True)
class Target:
    """One repo at one revision on the stand-in, and the files it holds there."""
    repo_id: str
    revision: str | None           # None: main
    files: dict[str, Path]         # by repo path

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())

    def largest(self) -> str:
        return max(self.files, key=lambda path: self.files[path].stat().st_size)


def publish(hub: HubStandin, *, openff: bool, astra: bool) -> list[Target]:
    """Commit the minilm family to the stand-in, a repo per model; with ``openff``, its five
    versions as one repo, a commit and a tag each, oldest first; with ``astra``, astra-st."""
    from tests.hub_standin import folder_files
    fams = families()
    if "minilm" not in fams or (openff and "openff" not in fams):
        sys.exit("no dataset: run `python bench/datasets.py minilm openff`")
    targets = []
    for name, src in fams["minilm"].models:
        repo = "org/" + (name if name == "minilm" else f"minilm-{name}")
        files = folder_files(src)
        hub.commit(repo, {**files})
        targets.append(Target(repo, None, files))
    if openff:
        for version, src in fams["openff"].models:
            files = {"model.pt": src}
            hub.tag("openff/nagl-am1bcc", version,
                    hub.commit("openff/nagl-am1bcc", {**files}, parent_files=False, message=version))
            targets.append(Target("openff/nagl-am1bcc", version, files))
    if astra:
        if not (MODELS / "astra-st").is_dir():
            sys.exit("no astra-st: run `python bench/datasets.py astra-st`, or pass --no-astra")
        files = folder_files(MODELS / "astra-st")
        hub.commit("org/astra-st", {**files})
        targets.append(Target("org/astra-st", None, files))
    return targets


class FolderPeak:
    """The largest total size the files under ``folder`` reach while the block runs, sampled
    every 20 ms by a thread: the pull's staging, which lives under the store's ``tmp/``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def size(self) -> int:
        total = 0
        for dirpath, _, names in os.walk(self.folder):
            for name in names:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:   # moved into the store meanwhile
                    pass
        return total

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.size())

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def elves_pull(endpoint: str, targets: list[Target], tmp_root: str | None, jobs: int) -> dict[str, Any]:
    """``elves.mirror.pull`` of every target into a fresh store. The pull checks each file's
    sha256 (or git blob id) before storing it."""
    tmp = Path(tempfile.mkdtemp(prefix="mirror_bench-", dir=tmp_root))
    try:
        store = Store.init(tmp / "store")
        staging = FolderPeak(tmp / "store" / "tmp")
        with staging:
            t0 = time.perf_counter()
            done = [pull(store, t.repo_id, t.revision, endpoint=endpoint, jobs=jobs) for t in targets]
            seconds = time.perf_counter() - t0
        return {"seconds": seconds, "bytes": sum(r.bytes for r in done), "files": sum(r.files for r in done),
                "downloaded_bytes": sum(r.downloaded_bytes for r in done),
                "stored_bytes": store.stats().stored_bytes, "staging_peak": staging.peak,
                "bases": [r.base for r in done]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_snapshot(endpoint: str, targets: list[Target], tmp_root: str | None) -> dict[str, Any]:
    """Plain ``snapshot_download`` of every target into a fresh cache (its defaults: 8 workers),
    then, untimed, every file compared with its source."""
    from huggingface_hub import snapshot_download
    tmp = Path(tempfile.mkdtemp(prefix="mirror_bench-", dir=tmp_root))
    try:
        t0 = time.perf_counter()
        folders = [Path(snapshot_download(t.repo_id, revision=t.revision, cache_dir=tmp / "hf",
                                          endpoint=endpoint, token=False)) for t in targets]
        seconds = time.perf_counter() - t0
        for folder, t in zip(folders, targets):
            got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            assert got == set(t.files), (t.repo_id, got ^ set(t.files))
            for path, src in t.files.items():
                assert filecmp.cmp(folder / path, src, shallow=False), (t.repo_id, path)
        return {"seconds": seconds, "bytes": sum(t.bytes for t in targets), "downloaded_bytes": sum(t.bytes for t in targets),
                "files": sum(len(t.files) for t in targets)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A few layers of an 8B-class decoder (hidden 4096, MLP 14336, 8 KV heads of 128): name, shape,
# mean and standard deviation of its values.
def big_tensors(layers: range) -> list[tuple[str, tuple[int, ...], float, float]]:
    out = []
    for i in layers:
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (4096,), 1.0, 0.05),
                (f"{p}.self_attn.q_proj.weight", (4096, 4096), 0.0, 0.020),
                (f"{p}.self_attn.k_proj.weight", (1024, 4096), 0.0, 0.025),
                (f"{p}.self_attn.v_proj.weight", (1024, 4096), 0.0, 0.010),
                (f"{p}.self_attn.o_proj.weight", (4096, 4096), 0.0, 0.012),
                (f"{p}.post_attention_layernorm.weight", (4096,), 1.0, 0.05),
                (f"{p}.mlp.gate_proj.weight", (14336, 4096), 0.0, 0.016),
                (f"{p}.mlp.up_proj.weight", (14336, 4096), 0.0, 0.014),
                (f"{p}.mlp.down_proj.weight", (4096, 14336), 0.0, 0.010)]
    return out


def write_big_safetensors(path: Path, layers: range, seed: int) -> int:
    """A safetensors file of BF16 tensors drawn from seeded normal distributions, written 16 Mi
    values at a time (memory stays at a few hundred MB); its size."""
    import ml_dtypes
    specs = big_tensors(layers)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, _, _ in specs:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape, mean, std in specs:
            left = int(np.prod(shape))
            while left:
                n = min(left, 1 << 24)
                values = rng.standard_normal(n, dtype=np.float32) * np.float32(std) + np.float32(mean)
                f.write(values.astype(ml_dtypes.bfloat16).view(np.uint16).data)
                left -= n
    size = path.stat().st_size
    assert size == 8 + len(raw) + offset, size
    return size


def big_pull(args: argparse.Namespace, hub: HubStandin, files: int) -> dict[str, Any] | None:
    """Generate ``args.big_layers`` decoder layers of BF16 as a repo of ``files`` safetensors
    files, commit it and pull it with elves in a process of its own: its peak RSS and the peak
    size of its staging. The files are deleted after."""
    tmp_dir = Path(args.tmp or tempfile.gettempdir())
    total = sum(2 * int(np.prod(s)) for _, s, _, _ in big_tensors(range(args.big_layers)))
    # the files, their staged downloads and the store's objects (compressed: less than the files)
    need = 3 * total + (1 << 30)
    free = shutil.disk_usage(tmp_dir).free
    if free < need:
        print(f"large-file check skipped: {free / 1e9:.1f} GB free under {tmp_dir}, {need / 1e9:.1f} GB needed")
        return None
    per = -(-args.big_layers // files)
    groups = [range(i, min(i + per, args.big_layers)) for i in range(0, args.big_layers, per)]
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    folder = Path(tempfile.mkdtemp(prefix="mirror_bench-big-", dir=tmp_dir))
    try:
        t0 = time.perf_counter()
        sources = {name: folder / name for name in names}
        sizes = [write_big_safetensors(sources[name], layers, seed=12 + k)
                 for k, (name, layers) in enumerate(zip(names, groups))]
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        config = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                             "num_hidden_layers": args.big_layers, "torch_dtype": "bfloat16"}).encode()
        repo = f"big/bf16-{len(names)}-files"
        hub.commit(repo, {"config.json": config, **sources})
        hashed = time.perf_counter() - t0
        print(f"{repo}: {sum(sizes):,} bytes of BF16 in {len(names)} file(s) written in {made:.0f} s, hashed by "
              f"the stand-in in {hashed:.0f} s; pulling", flush=True)
        m = isolated(elves_pull, hub.url, [Target(repo, None, sources)], str(folder), args.jobs)
        return {"repo": repo, "files_made": len(names), "largest": max(sizes), "size": sum(sizes),
                "seconds": m.seconds, "peak_rss": m.peak_rss, "start_rss": m.start_rss, **m.result}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pull_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | files | MB | MB downloaded | wall s, each round | best MB/s | peak RSS MB (at start) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        best = min(r["seconds"])
        lines.append(f"| {r['method']} | {r['files']} | {r['bytes'] / 1e6:.1f} | {r['downloaded_bytes'] / 1e6:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['seconds'])} | {r['bytes'] / best / 1e6:.0f} | "
                     f"{max(r['peak_rss']) / 1e6:.0f} ({max(r['start_rss']) / 1e6:.0f}) |")
    return "\n".join(lines)


def big_table(bigs: list[dict[str, Any]]) -> str:
    lines = ["| repo | wall s | MB/s | peak RSS MB (at start) | peak staging MB (store tmp/) | stored MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for b in bigs:
        what = (f"{b['files_made']} file" if b["files_made"] == 1 else
                f"{b['files_made']} files of {b['largest'] / 1e9:.2f} GB")
        lines.append(f"| {what}, {b['size'] / 1e9:.2f} GB of BF16 | {b['seconds']:.0f} | "
                     f"{b['size'] / b['seconds'] / 1e6:.0f} | {b['peak_rss'] / 1e6:.0f} ({b['start_rss'] / 1e6:.0f}) | "
                     f"{b['staging_peak'] / 1e6:,.0f} | {b['stored_bytes'] / 1e6:,.0f} |")
    return "\n".join(lines)


def cmd_pull(args: argparse.Namespace) -> None:
    from tests.hub_standin import HubStandin
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "jobs": args.jobs}
    with HubStandin() as hub:
        targets = publish(hub, openff=True, astra=False)
        print("repos:", ", ".join(t.repo_id + (f"@{t.revision}" if t.revision else "") for t in targets),
              flush=True)
        methods: dict[str, dict[str, Any]] = {}
        for i in range(args.rounds):
            order = ["elves", "hf"] if i % 2 == 0 else ["hf", "elves"]
            for method in order:
                if method == "elves":
                    label = f"elves.mirror.pull, jobs={args.jobs}, into a fresh store"
                    m = isolated(elves_pull, hub.url, targets, args.tmp, args.jobs)
                else:
                    label = "huggingface_hub.snapshot_download, fresh cache_dir"
                    m = isolated(hf_snapshot, hub.url, targets, args.tmp)
                row = methods.setdefault(method, {"method": label, "seconds": [], "peak_rss": [],
                                                  "start_rss": [], **m.result})
                row["seconds"].append(m.seconds)
                row["peak_rss"].append(m.peak_rss)
                row["start_rss"].append(m.start_rss)
                print(f"round {i + 1}: {method} {m.seconds:.1f} s, peak RSS {m.peak_rss / 1e6:.0f} MB", flush=True)
        if methods:
            report["rows"] = [methods["elves"], methods["hf"]]
            print(pull_table(report["rows"]), end="\n\n", flush=True)
        if not args.no_big:
            bigs = [b for b in (big_pull(args, hub, n) for n in (1, args.big_layers)) if b is not None]
            print(big_table(bigs), flush=True)
            report["big"] = bigs
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


@contextmanager
def running_server(store_path: Path, probe: str) -> Iterator[tuple[str, int]]:
    """``elves.mirror.server.serve`` over the store in a process of its own: its URL and pid."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("from elves.store import Store; from elves.mirror.server import serve; "
            f"serve(Store({str(store_path)!r}), port={port})")
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with _OPENER.open(f"{url}/api/models/{probe}"):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the mirror's server did not start") from None
                time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process ``pid``, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def get_sha256(url: str) -> str:
    """A plain streaming GET, hashed as it arrives."""
    h = hashlib.sha256()
    with _OPENER.open(url) as resp:
        while piece := resp.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def at_once(n: int, fn: Callable[[int], Any]) -> tuple[float, list[Any]]:
    """``fn(0..n-1)``, each in its own thread, all started together: the wall time and results."""
    with ThreadPoolExecutor(n) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(fn, range(n)))
        return time.perf_counter() - t0, results


def serve_row(url: str, pid: int, t: Target, model: str, store: Store, tmp: Path, rounds: int) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    path = t.largest()
    size = t.files[path].stat().st_size
    want = sha256_file(t.files[path])
    restore = []
    for i in range(rounds):
        dst = tmp / f"restore-{i}"
        t0 = time.perf_counter()
        store.restore(model, dst)
        restore.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
    file_url = f"{url}/{t.repo_id}/resolve/main/{path}"

    def hf(cache: Path) -> str:
        return hf_hub_download(t.repo_id, path, cache_dir=cache, endpoint=url, token=False)

    get1, hf1 = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        assert get_sha256(file_url) == want
        get1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = hf(tmp / f"hf-{i}")
        hf1.append(time.perf_counter() - t0)
        assert sha256_file(Path(got)) == want
        shutil.rmtree(tmp / f"hf-{i}")
    get8, shas = at_once(8, lambda i: get_sha256(file_url))
    assert shas == [want] * 8, shas
    hf8, files = at_once(8, lambda i: hf(tmp / f"hf8-{i}"))
    assert [sha256_file(Path(f)) for f in files] == [want] * 8
    for i in range(8):
        shutil.rmtree(tmp / f"hf8-{i}")
    return {"repo": t.repo_id, "path": path, "size": size, "model_bytes": t.bytes, "restore": restore,
            "get1": get1, "hf1": hf1, "get8": get8, "hf8": hf8, "server": vm(pid)}


def serve_table(rows: list[dict[str, Any]]) -> str:
    lines = [("| repo: file | MB | restore MB/s | 1 client GET MB/s (of restore) | 1 client hf_hub_download MB/s | "
              "8 clients GET, MB/s in all | 8 clients hf_hub_download, MB/s in all | server peak RSS MB, so far |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        restore = r["model_bytes"] / min(r["restore"]) / 1e6
        get1 = r["size"] / min(r["get1"]) / 1e6
        lines.append(f"| {r['repo']}: {r['path']} | {r['size'] / 1e6:.1f} | {restore:.0f} | "
                     f"{get1:.0f} ({get1 / restore:.0%}) | {r['size'] / min(r['hf1']) / 1e6:.0f} | "
                     f"{8 * r['size'] / r['get8'] / 1e6:.0f} | {8 * r['size'] / r['hf8'] / 1e6:.0f} | "
                     f"{r['server']['VmHWM'] / 1e6:.0f} |")
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> None:
    from tests.hub_standin import HubStandin
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    tmp = Path(tempfile.mkdtemp(prefix="mirror_bench-", dir=args.tmp))
    try:
        store = Store.init(tmp / "store")
        with HubStandin() as hub:
            targets = publish(hub, openff=False, astra=not args.no_astra)
            models = [pull(store, t.repo_id, endpoint=hub.url).model for t in targets]
        print(f"store: {', '.join(t.repo_id for t in targets)}, {store.stats().stored_bytes:,} bytes", flush=True)
        rows = []
        with running_server(tmp / "store", targets[0].repo_id) as (url, pid):
            report["server_idle"] = vm(pid)
            # one request first, untimed: the server's first answer loads its decoders
            first = targets[0]
            get_sha256(f"{url}/{first.repo_id}/resolve/main/{first.largest()}")
            for t, model in zip(targets, models):
                rows.append(serve_row(url, pid, t, model, store, tmp, args.rounds))
                print(f"{t.repo_id}: done, server {rows[-1]['server']['VmHWM'] / 1e6:.0f} MB peak", flush=True)
        print(f"server at rest: {report['server_idle']['VmRSS'] / 1e6:.0f} MB; load {os.getloadavg()}",
              serve_table(rows), sep="\n\n")
        report["rows"] = rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    pl = sub.add_parser("pull", help="elves.mirror.pull against snapshot_download, and a large file's memory")
    pl.add_argument("--rounds", type=int, default=2, help="runs of each method, alternating which goes first (0: the large file only)")
    pl.add_argument("--jobs", type=int, default=4, help="elves' parallel downloads")
    pl.add_argument("--big-layers", type=int, default=7, help="decoder layers of the large repo (436 MB each), in one file and then one file each")
    pl.add_argument("--no-big", action="store_true", help="skip the large-file check")
    pl.add_argument("--json", metavar="PATH", help="also write the numbers here")
    pl.add_argument("--tmp", metavar="DIR", help="where stores, caches and the large file go")
    pl.set_defaults(run=cmd_pull)
    sv = sub.add_parser("serve", help="the mirror's server: MB/s for 1 and 8 clients, peak RSS, against restore")
    sv.add_argument("--rounds", type=int, default=3, help="runs of each single-client measurement (the best counts)")
    sv.add_argument("--no-astra", action="store_true", help="the minilm family only")
    sv.add_argument("--json", metavar="PATH", help="also write the numbers here")
    sv.add_argument("--tmp", metavar="DIR", help="where the store and the clients' caches go")
    sv.set_defaults(run=cmd_serve)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
