"""Side-by-side benchmark: zstd, ZipNN and elves on the same model bytes (a benchmark, not a test).

    python bench/compare.py                      # every prepared dataset, every method
    python bench/compare.py minilm astra         # some datasets (names from bench/datasets.py, or paths)
    python bench/compare.py --methods zstd-3,zipnn --write   # also update bench/RESULTS.md

Each (method, dataset, thread count) is compressed and then restored by two fresh worker
processes (``compare.py --worker ...``), so every peak RSS is that of one process (its VmHWM). Timings cover reading the model's files, coding, and writing the output files, not
interpreter start or imports; a phase is repeated (up to ``--repeat`` times while the runs so far
took under ``--min-time`` seconds) and the fastest run is kept. MB/s is 1e6 bytes of ORIGINAL data
per second. Every restore is checked byte for byte (sha256 of every file) against the original.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import io
import json
import os
import pickletools
import platform
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from results import RESULTS, write_section  # bench/results.py, beside this script

HERE = Path(__file__).resolve().parent
ALL_THREADS = os.cpu_count() or 1


def load_datasets_module():
    """bench/datasets.py, imported by path (``import datasets`` could be Hugging Face's)."""
    spec = importlib.util.spec_from_file_location("elves_bench_datasets", HERE / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ============================================================================ the methods
#
# A method compresses a model (a folder, every file in it) into a work folder and restores the
# work folder into a fresh folder. Per-file codecs (zstd, ZipNN) write one output file per input.

def model_files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def relname(root: Path, path: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def read_private(path: Path) -> bytearray:
    """The file's bytes in a fresh buffer that nobody else holds (ZipNN mutates its input)."""
    buf = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        f.readinto(buf)
    return buf


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def per_file(encode: Callable[[str, bytearray, int, dict], tuple[str, bytes]]):
    """A compress function running ``encode(relname, data, threads, spec) -> (suffix, payload)``
    on each file of the model."""
    def compress(src: Path, work: Path, threads: int, spec: dict) -> None:
        for path in model_files(src):
            rel = relname(src, path)
            suffix, payload = encode(rel, read_private(path), threads, spec)
            write(work / (rel + suffix), payload)
    return compress


def per_file_restore(decoders: dict[str, Callable]):
    """A restore function that undoes ``per_file``: the output suffix picks the decoder."""
    def restore(work: Path, dst: Path, threads: int, spec: dict) -> None:
        for path in model_files(work):
            rel = relname(work, path)
            suffix = next(s for s in decoders if rel.endswith(s))
            write(dst / rel[: -len(suffix)], decoders[suffix](read_private(path), threads))
    return restore


def zstd_threads(threads: int) -> int:
    # python-zstandard: 0 = compress on the calling thread, -1 = one worker per logical CPU.
    return 0 if threads == 1 else -1 if threads >= ALL_THREADS else threads


def zstd_encoder(level: int):
    def encode(rel, data, threads, spec):
        import zstandard
        return ".zst", zstandard.ZstdCompressor(level=level, threads=zstd_threads(threads)).compress(data)
    return encode


def zstd_decode(data, threads):
    import zstandard  # zstd decodes a frame on one thread, whatever ``threads`` says
    return zstandard.ZstdDecompressor().decompress(data)


ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def zipnn_encode(rel, data, threads, spec):
    """ZipNN on weight files, with the dtype that dominates the file; zstd-3 on the rest.

    ZipNN 0.5.4 corrupts the heap (glibc aborts) when the buffer is not a whole number of
    elements, so it gets the longest whole prefix and the 0..3 tail bytes are stored raw:
    ``.znn`` = u8 tail length, tail bytes, ZipNN stream.
    """
    dtype = spec["dtypes"].get(rel)
    if dtype not in ZIPNN_DTYPES:
        return zstd_encoder(3)(rel, data, threads, spec)
    import zipnn
    znn = zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype], threads=threads)
    cut = len(data) - len(data) % ITEMSIZE[dtype]
    tail = bytes(data[cut:])
    del data[cut:]
    return ".znn", bytes([len(tail)]) + tail + znn.compress(data)  # ``data``: a private copy


def zipnn_decode(data, threads):
    import zipnn
    n = data[0]
    tail = bytes(data[1:1 + n])
    del data[:1 + n]
    return zipnn.ZipNN(input_format="byte", threads=threads).decompress(data) + tail


def elves_compress(src: Path, work: Path, threads: int, spec: dict) -> None:
    import elves
    elves.compress(src, work / "model.elves", threads=threads)


def elves_restore(work: Path, dst: Path, threads: int, spec: dict) -> None:
    import elves
    elves.restore(work / "model.elves", dst, threads=threads)


def elves_warmup() -> None:
    """Compress and restore a tiny safetensors model once, so JIT compiling is not timed."""
    import elves
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m"
        src.mkdir()
        write(src / "w.safetensors", tiny_safetensors())
        elves.compress(src, Path(tmp) / "w.elves", threads=1)
        elves.restore(Path(tmp) / "w.elves", Path(tmp) / "out", threads=1)


def tiny_safetensors() -> bytes:
    import numpy as np
    rng = np.random.default_rng(0)
    f32 = rng.normal(0, 0.02, 4096).astype("<f4")
    f16 = f32.astype("<f2")
    bf16 = (f32.view("<u4") >> 16).astype("<u2")
    blobs = [("a", "F32", f32), ("b", "F16", f16), ("c", "BF16", bf16)]
    header, pos = {}, 0
    for name, dtype, arr in blobs:
        header[name] = {"dtype": dtype, "shape": [arr.size], "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(a.tobytes() for _, _, a in blobs)


@dataclass(frozen=True)
class Method:
    name: str
    compress: Callable[[Path, Path, int, dict], None]
    restore: Callable[[Path, Path, int, dict], None]
    modules: tuple[str, ...]            # imported before timing; missing ones make it unavailable
    note: str = ""
    probe: Callable[[], str | None] | None = None   # returns why it is unavailable, or None
    warmup: Callable[[], None] | None = None


def probe_elves() -> str | None:
    import elves
    missing = [f for f in ("compress", "restore") if not callable(getattr(elves, f, None))]
    return f"elves.{' and elves.'.join(missing)} not there yet" if missing else None


# The one place that lists the methods, in table order.
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("zstd-3", per_file(zstd_encoder(3)), per_file_restore({".zst": zstd_decode}),
           ("zstandard",), "python-zstandard level 3, one frame per file (zstd restores a frame "
           "on one thread, so its all-threads restore column is single-threaded too)"),
    Method("zstd-19", per_file(zstd_encoder(19)), per_file_restore({".zst": zstd_decode}),
           ("zstandard",), "python-zstandard level 19, one frame per file"),
    Method("zipnn", per_file(zipnn_encode),
           per_file_restore({".znn": zipnn_decode, ".zst": zstd_decode}),
           ("zipnn", "zstandard"), "ZipNN byte mode, the file's dominant float dtype; "
           "zstd-3 for files with no float tensors (config, tokenizer)"),
    Method("elves", elves_compress, elves_restore, ("elves",),
           "elves.compress / elves.restore on the whole folder", probe_elves, elves_warmup),
]}


# ============================================================================ dtype sniffing (for ZipNN)

ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
STORAGE_DTYPES = {"DoubleStorage": "F64", "FloatStorage": "F32", "BFloat16Storage": "BF16",
                  "HalfStorage": "F16", "LongStorage": "I64", "IntStorage": "I32",
                  "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
                  "BoolStorage": "BOOL", "Float8_e4m3fnStorage": "F8_E4M3",
                  "Float8_e5m2Storage": "F8_E5M2"}
WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".jit", ".npy", ".gguf"}


def dtype_bytes(path: Path) -> Counter:
    """Tensor bytes per dtype in a safetensors file or a torch zip (even a truncated one)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors" and len(head) == 8:
            header = json.loads(f.read(struct.unpack("<Q", head)[0]))
            return _sum_by((v["dtype"], v["data_offsets"][1] - v["data_offsets"][0])
                           for k, v in header.items() if k != "__metadata__")
    if head[:4] != b"PK\x03\x04":
        return Counter()
    return _sum_by(pair for pkl in torch_zip_pickles(path) for pair in storages_in_pickle(pkl))


def _sum_by(pairs) -> Counter:
    out: Counter = Counter()
    for key, n in pairs:
        out[key] += n
    return out


def torch_zip_pickles(path: Path) -> list:
    """The ``*.pkl`` records of a torch zip as streams; for a zip cut short (no central
    directory), the first record's pickle, read in place (genops stops at its STOP)."""
    try:
        with zipfile.ZipFile(path) as z:
            return [io.BytesIO(z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
    except zipfile.BadZipFile:
        f = open(path, "rb")  # noqa: SIM115 (storages_in_pickle closes it)
        name_len, extra_len = struct.unpack_from("<HH", f.read(30), 26)
        f.seek(30 + name_len + extra_len)
        return [f]


def storages_in_pickle(stream):
    """Yield (dtype, nbytes) for each storage persistent id ('storage', type, key, where, numel)."""
    memo: dict = {}
    values: list = []
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = values[-1] if values else None
                continue
            if op.name == "MEMOIZE":
                memo[len(memo)] = values[-1] if values else None
                continue
            if op.name == "BINPERSID" and len(values) >= 6:
                tag, kind, _key, _where, numel = values[-6:-1]
                dtype = STORAGE_DTYPES.get(str(kind).rpartition(".")[2])
                if tag == "storage" and dtype and isinstance(numel, int):
                    yield dtype, numel * ITEMSIZE[dtype]
            if op.name == "GLOBAL":
                value = arg.replace(" ", ".")
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                value = memo.get(arg)
            elif isinstance(arg, (str, int)) and op.name not in ("PROTO", "FRAME"):
                value = arg
            else:
                value = None
            values.append(value)
    except ValueError:  # a pickle cut short
        return
    finally:
        stream.close()


def zipnn_dtype(path: Path, hint: str | None) -> str | None:
    """The float dtype with the most bytes in the file, or the dataset's hint for other weight
    files (ONNX); None for files that hold no weights."""
    if path.suffix not in WEIGHT_SUFFIXES:
        return None
    counts = Counter({d: n for d, n in dtype_bytes(path).items() if d in ZIPNN_DTYPES})
    if counts:
        return counts.most_common(1)[0][0]
    if re.search(r"(half|fp16|f16)", path.name):
        return "F16"
    return hint


# ============================================================================ the worker process

def worker(spec: dict) -> None:
    """One phase of one method, in this fresh process; writes its timings to spec['result']."""
    method = METHODS[spec["method"]]
    for module in method.modules:
        __import__(module)
    if method.warmup:
        method.warmup()
    base_rss = peak_rss()
    phase = method.compress if spec["phase"] == "compress" else method.restore
    src, dst = (Path(spec["src"]), Path(spec["work"])) if spec["phase"] == "compress" else \
        (Path(spec["work"]), Path(spec["restored"]))
    times: list[float] = []
    while not times or (len(times) < spec["repeat"] and sum(times) < spec["min_time"]):
        shutil.rmtree(dst, ignore_errors=True)
        if spec["phase"] == "compress":  # restore makes its own folder
            dst.mkdir(parents=True)
        t0 = time.perf_counter()
        phase(src, dst, spec["threads"], spec)
        times.append(time.perf_counter() - t0)
    Path(spec["result"]).write_text(json.dumps({"times": times, "base_rss": base_rss,
                                                "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which exec resets. (ru_maxrss is not
    reset by exec: a child starts with its parent's RSS as its floor, hence not used on Linux.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(spec: dict) -> dict:
    """Run ``worker(spec)`` in a fresh process; its timings and its own peak RSS (bytes)."""
    env = dict(os.environ)
    if spec["threads"] == 1:  # keep libraries that spawn their own pools honest
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           json.dumps(spec)], env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['method']} {spec['phase']} (threads={spec['threads']}) "
                           f"failed with exit code {proc.returncode}")
    return json.loads(Path(spec["result"]).read_text())


def probe(method: Method) -> str | None:
    """Why ``method`` cannot run here, or None (checked in a subprocess, like the runs)."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import compare; "
            f"m = compare.METHODS[{method.name!r}]; [__import__(x) for x in m.modules]; "
            f"why = m.probe() if m.probe else None; print(why or '')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"not importable ({last[:120]})"
    return proc.stdout.strip() or None


# ============================================================================ one dataset

def sha256_tree(root: Path) -> dict[str, str]:
    out = {}
    for path in model_files(root):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out[relname(root, path)] = h.hexdigest()
    return out


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in model_files(root))


def bench_one(method: Method, name: str, src: Path, digests: dict, dtypes: dict, args) -> dict:
    """Compress and restore with 1 and with all threads; check every restore bit for bit."""
    original = tree_size(src)
    row = {"dataset": name, "method": method.name, "bytes": original, "runs": {}}
    for threads in sorted({1, args.threads}):
        work = Path(tempfile.mkdtemp(prefix=f"{name}-{method.name}-", dir=args.tmp))
        try:
            spec = {"method": method.name, "src": str(src), "work": str(work / "out"),
                    "restored": str(work / "restored"), "threads": threads, "dtypes": dtypes,
                    "repeat": args.repeat, "min_time": args.min_time}
            comp = run_worker({**spec, "phase": "compress", "result": str(work / "c.json")})
            packed = tree_size(work / "out")
            dec = run_worker({**spec, "phase": "restore", "result": str(work / "d.json")})
            restored = work / "restored" if src.is_dir() else work / "restored" / src.name
            check_restore(method.name, name, digests, sha256_tree(restored))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        run = {"compressed": packed, "ratio": original / packed,
               "compress_s": min(comp["times"]), "restore_s": min(dec["times"]),
               "compress_times": comp["times"], "restore_times": dec["times"],
               "compress_rss": comp["peak_rss"], "restore_rss": dec["peak_rss"],
               "base_rss": max(comp["base_rss"], dec["base_rss"])}
        row["runs"][threads] = run
        print(f"  {method.name:8} {name:10} t={threads}: ratio {run['ratio']:.4f}  "
              f"compress {original / run['compress_s'] / 1e6:8.1f} MB/s  "
              f"restore {original / run['restore_s'] / 1e6:8.1f} MB/s  "
              f"rss {run['compress_rss'] / 1e6:.0f}/{run['restore_rss'] / 1e6:.0f} MB",
              file=sys.stderr, flush=True)
    return row


def check_restore(method: str, name: str, want: dict, got: dict) -> None:
    if want == got:
        return
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise SystemExit(f"\n*** {method} did NOT restore {name} bit-exactly: {len(bad)} file(s) differ "
                     f"or are missing/extra: {bad[:10]}")


# ============================================================================ report

def proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file, or None."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def machine() -> dict:
    cpu = proc_field("/proc/cpuinfo", "model name") or platform.processor()
    mem = proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    ram = int(mem.split()[0]) * 1024 if mem else 0
    return {"cpu": cpu, "cores": ALL_THREADS, "ram_gb": round(ram / 2**30, 1),
            "python": platform.python_version(), "os": platform.platform(),
            "packages": package_versions()}


def package_versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("zstandard", "zipnn", "torch", "numpy", "numba", "safetensors", "elves"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def mbps(nbytes: int, seconds: float | None) -> str:
    return f"{nbytes / seconds / 1e6:.0f}" if seconds else "–"


def table(rows: list[dict], all_threads: int) -> str:
    n = all_threads
    lines = [(f"| dataset | MB | method | ratio | comp MB/s 1T | comp MB/s {n}T | "
              f"restore MB/s 1T | restore MB/s {n}T | peak RSS MB comp / restore |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        head = f"| {row['dataset']} | {row['bytes'] / 1e6:.1f} | {row['method']} |"
        if "skipped" in row:
            lines.append(f"{head} n/a | | | | | |")
            continue
        one, many = row["runs"].get(1, {}), row["runs"].get(n, row["runs"].get(1, {}))
        ratio = f"{one['ratio']:.3f}"
        if abs(many["ratio"] - one["ratio"]) > 5e-4 * one["ratio"]:
            ratio += f" ({many['ratio']:.3f} at {n}T)"
        rss = max(r["compress_rss"] for r in row["runs"].values()) / 1e6, \
            max(r["restore_rss"] for r in row["runs"].values()) / 1e6
        lines.append(f"{head} {ratio} | {mbps(row['bytes'], one.get('compress_s'))} | "
                     f"{mbps(row['bytes'], many.get('compress_s'))} | "
                     f"{mbps(row['bytes'], one.get('restore_s'))} | "
                     f"{mbps(row['bytes'], many.get('restore_s'))} | {rss[0]:.0f} / {rss[1]:.0f} |")
    return "\n".join(lines)


def base_rss_notes(rows: list[dict]) -> str:
    by_method: dict[str, float] = {}
    for row in rows:
        for run in row.get("runs", {}).values():
            by_method[row["method"]] = max(by_method.get(row["method"], 0), run["base_rss"] / 1e6)
    return ", ".join(f"{m} {v:.0f} MB" for m, v in by_method.items())


def report(rows: list[dict], info: dict, command: str, when: str, methods: list[Method],
           why_not: dict[str, str | None]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    notes = "\n".join(f"- **{m.name}**: {m.note}" + (f" (n/a here: {why_not[m.name]})"
                                                      if why_not.get(m.name) else "")
                      for m in methods)
    return f"""Command: `{command}`
Date: {when}
Machine: {info['cpu']}, {info['cores']} logical cores, {info['ram_gb']} GiB RAM; {info['os']};
Python {info['python']}; {pkgs}

{table(rows, info['cores'])}

Ratio = original bytes / compressed bytes. MB/s = 1e6 bytes of original data per second, file to
file (read, code, write; page cache warm), best of up to {ARGS.repeat} runs in one process. 1T = one
thread, {info['cores']}T = all threads. Peak RSS is each worker process's own high-water mark, imports
included (RSS right after imports: {base_rss_notes(rows)}). Every restore was checked with sha256
against the original files.

{notes}
"""


# ============================================================================ main

def pick_datasets(names: list[str], ds_module) -> list[tuple[str, Path, str | None]]:
    """(name, path, dtype hint) for the named datasets or paths; default: every prepared one."""
    if not names:
        return [(n, ds_module.model_dir(n), d.dtype) for n, d in ds_module.DATASETS.items()
                if ds_module.is_prepared(n)]
    out = []
    for name in names:
        if name in ds_module.DATASETS:
            if not ds_module.is_prepared(name):
                raise SystemExit(f"dataset {name!r} is not prepared: run "
                                 f"`python bench/datasets.py {name}`")
            out.append((name, ds_module.model_dir(name), ds_module.DATASETS[name].dtype))
        elif Path(name).exists():
            out.append((Path(name).name, Path(name).resolve(), None))
        else:
            raise SystemExit(f"unknown dataset {name!r}; have {list(ds_module.DATASETS)}")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", help="dataset names (bench/datasets.py) or paths")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=ALL_THREADS, help="the 'all threads' count")
    p.add_argument("--repeat", type=int, default=3, help="runs per phase at most (best kept)")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="stop repeating a phase once its runs took this many seconds")
    p.add_argument("--tmp", default=None, help="where to write compressed/restored copies")
    p.add_argument("--write", action="store_true", help=f"update the section in {RESULTS}")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file for --write")
    p.add_argument("--json", type=Path, help="also save the raw measurements here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS: argparse.Namespace


def main(argv=None) -> int:
    global ARGS
    ARGS = args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; have {list(METHODS)}")
    methods = [METHODS[m] for m in args.methods.split(",")]
    datasets = pick_datasets(args.datasets, load_datasets_module())
    if not datasets:
        raise SystemExit("no dataset prepared: run `python bench/datasets.py` first")
    why_not = {m.name: probe(m) for m in methods}
    for m, why in why_not.items():
        if why:
            print(f"{m}: skipped, {why}", file=sys.stderr)
    rows = []
    for name, path, hint in datasets:
        digests = sha256_tree(path)  # also warms the page cache for every method alike
        dtypes = {relname(path, f): zipnn_dtype(f, hint) for f in model_files(path)}
        print(f"{name}: {tree_size(path) / 1e6:.1f} MB, {len(digests)} file(s)", file=sys.stderr)
        for m in methods:
            if why_not[m.name]:
                rows.append({"dataset": name, "method": m.name, "bytes": tree_size(path),
                             "skipped": why_not[m.name]})
            else:
                rows.append(bench_one(m, name, path, digests, dtypes, args))
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    text = report(rows, info, command.strip(), when, methods, why_not)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": when, "machine": info,
                                         "rows": rows}, indent=1))
    if args.write:
        write_section("compare", "compare.py: zstd, ZipNN and elves side by side", text, args.results)
        print(f"updated {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
