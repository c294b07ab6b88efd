"""Single-thread speed of the lossless float codec's kernels against ZipNN, on the same bytes
(a benchmark, not a test).

    python bench/kernel_speed.py                    # every prepared dataset
    python bench/kernel_speed.py astra-st minilm    # some datasets
    python bench/kernel_speed.py --repeat 5 --json speed.json
    git worktree add --detach /tmp/before REV
    python bench/kernel_speed.py --no-zipnn --baseline /tmp/before   # A/B against revision REV
    python bench/kernel_speed.py silero --parts     # microseconds per chunk of each stage

For each dataset and float dtype (F32, BF16, F16) it gathers the tensor bytes the readers find,
cuts each tensor into chunks as the encoder does (256 KiB), and times one thread running
``planes`` + ``rans`` over them (encode, then decode into a preallocated buffer: the kernels and
the per-chunk Python calls, no file I/O, no hashing), and ZipNN (``threads=1``, byte mode, on
the same bytes joined into one buffer; it mutates its input, so each run gets a fresh copy,
made untimed; glibc keeps freed memory, so that neither side pays page faults for its output:
``--page-faults`` leaves the defaults). Times are the process's CPU time, the fastest of ``--repeat`` runs, with elves
and ZipNN taking turns: on a shared machine, wall time also counts the time other processes
held the core. MB/s is 1e6 decoded
bytes per second. Every decode is checked byte for byte. Ratios are tensor bytes over coded
bytes (elves: chunk payloads, no index; ZipNN: its stream).

With ``--baseline DIR`` (a checkout of an earlier revision), that revision's codecs and kernels
also code the same chunks in the same process, taking turns with the current ones chunk by chunk
(:func:`measure_ab`), and a second table gives the change: the cost of what changed, on the
same bytes in the same run. Both must write byte-identical payloads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from compare import (  # bench/compare.py, beside this script
    load_datasets_module,
    proc_field,
)
from results import write_section  # bench/results.py, beside this script

HERE = Path(__file__).resolve().parent
ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def load_package(name: str, root: Path):
    """The ``elves`` package of the checkout at ``root``, imported as ``name`` beside the current
    one (its modules import each other relatively; numba caches its kernels under ``root``)."""
    init = root / "elves" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tensor_bytes(folder: Path) -> dict[str, list[np.ndarray]]:
    """The tensor segments of every file under ``folder``, by dtype (those ZipNN codes)."""
    from elves.readers import read_model

    files, _ = read_model(folder)
    out: dict[str, list[np.ndarray]] = {}
    for f in files:
        fd = os.open(f.path, os.O_RDONLY)
        try:
            for seg in f.segments:
                if seg.dtype in ZIPNN_DTYPES and seg.length:
                    data = np.frombuffer(os.pread(fd, seg.length, seg.offset), dtype=np.uint8)
                    out.setdefault(seg.dtype, []).append(data)
        finally:
            os.close(fd)
    return out


def cpu_seconds(fn, *args) -> tuple[float, object]:
    """CPU seconds of this process that ``fn(*args)`` took, and its result."""
    t = time.process_time()
    result = fn(*args)
    return time.process_time() - t, result


class Elves:
    """``planes`` + ``rans`` over the encoder's 256 KiB chunks of the tensors, through the codecs
    of ``package`` (an earlier checkout's, for an A/B)."""

    def __init__(self, dtype: str, segments: list[np.ndarray], package: str = "elves", name: str = "elves"):
        from elves.encoder import TENSOR_CHUNK_BYTES

        codecs = importlib.import_module(f"{package}.codecs")
        planes = importlib.import_module(f"{package}.codecs.planes")
        rans = importlib.import_module(f"{package}.codecs.rans")
        self.name = name
        self.pipeline = codecs.Pipeline([planes.Planes(dtype), rans.Rans()])
        step = TENSOR_CHUNK_BYTES // self.pipeline.codecs[0].width * self.pipeline.codecs[0].width
        self.chunks = [s[o:o + step] for s in segments for o in range(0, len(s), step)]
        self.outs = [np.empty(len(c), np.uint8) for c in self.chunks]
        self.pipeline.decode(self.pipeline.encode(self.chunks[0]), self.outs[0])  # JIT, untimed
        self.payloads: list[bytes] = [b""] * len(self.chunks)

    def encode_chunk(self, i: int) -> None:
        self.payloads[i] = self.pipeline.encode(self.chunks[i])

    def decode_chunk(self, i: int) -> None:
        self.pipeline.decode(self.payloads[i], self.outs[i])

    def encode(self) -> float:
        seconds, self.payloads = cpu_seconds(lambda: [self.pipeline.encode(c) for c in self.chunks])
        return seconds

    def decode(self) -> float:
        seconds, _ = cpu_seconds(lambda: [self.pipeline.decode(p, o) for p, o in zip(self.payloads, self.outs)])
        self.check()
        return seconds

    def check(self) -> None:
        if any(not np.array_equal(c, o) for c, o in zip(self.chunks, self.outs)):
            raise SystemExit(f"{self.name}: a chunk of {len(self.chunks)} did not decode to its original bytes")

    def coded_bytes(self) -> int:
        return sum(len(p) for p in self.payloads)


class ZipNN:
    """ZipNN, one thread, byte mode, on the tensors joined into one buffer."""

    name = "ZipNN"

    def __init__(self, dtype: str, segments: list[np.ndarray]):
        import zipnn

        self.raw = np.concatenate(segments).tobytes()
        self.znn = zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype], threads=1)
        self.packed = b""

    def encode(self) -> float:
        seconds, self.packed = cpu_seconds(self.znn.compress, bytearray(self.raw))  # a fresh copy
        return seconds

    def decode(self) -> float:
        seconds, restored = cpu_seconds(self.znn.decompress, bytearray(self.packed))
        if bytes(restored) != self.raw:
            raise SystemExit("ZipNN: the restore differs from the original")
        return seconds

    def coded_bytes(self) -> int:
        return len(self.packed)


def measure(coders: list, nbytes: int, repeat: int) -> dict[str, dict[str, float]]:
    """Ratio and best encode/decode MB/s of each coder. The coders take turns within each
    repetition, so a busy spell on a shared machine hits them alike."""
    best = {c.name: {"encode": float("inf"), "decode": float("inf")} for c in coders}
    for _ in range(repeat):
        for phase in ("encode", "decode"):
            for c in coders:
                best[c.name][phase] = min(best[c.name][phase], getattr(c, phase)())
    return {c.name: {"ratio": nbytes / c.coded_bytes(), "enc": nbytes / best[c.name]["encode"] / 1e6,
                     "dec": nbytes / best[c.name]["decode"] / 1e6} for c in coders}


def measure_ab(before: Elves, after: Elves, nbytes: int, repeat: int) -> dict[str, dict[str, float]]:
    """Encode and decode MB/s of two pipelines from the sums of their per-chunk best times.

    The two take turns chunk by chunk (which goes first alternates), and each chunk's time is
    the fastest of ``repeat``: on a shared machine a busy spell costs one chunk's run on one side,
    which another repetition replaces, where a whole pass's best would keep whatever share of
    the spells fell on it. Each is the thread's CPU time."""
    pair = (before, after)
    n = len(before.chunks)
    best = {c.name: {"encode": np.full(n, np.inf), "decode": np.full(n, np.inf)} for c in pair}
    for r in range(repeat):
        for phase in ("encode", "decode"):
            for i in range(n):
                for c in pair if (r + i) % 2 else pair[::-1]:
                    step = getattr(c, f"{phase}_chunk")
                    t = time.thread_time()
                    step(i)
                    best[c.name][phase][i] = min(best[c.name][phase][i], time.thread_time() - t)
    for c in pair:
        c.check()
    if before.payloads != after.payloads:
        raise SystemExit("the baseline writes other payloads")
    return {c.name: {k: nbytes / v.sum() / 1e6 for k, v in best[c.name].items()} for c in pair}


def parts(e: Elves, repeat: int) -> dict[str, float]:
    """Mean microseconds per chunk of each stage of a chunk's decode and encode (per-chunk best of
    ``repeat``, thread CPU time): the pipeline's call against the kernel calls inside it, which
    tells the Python per chunk from the kernels' time."""
    from elves.kernels import planes_rans as k

    w, rotate = e.pipeline.codecs[0].width, e.pipeline.codecs[0].rotate
    e.encode()
    bufs = [np.frombuffer(p, np.uint8) for p in e.payloads]
    planes = [np.empty((w, len(c) // w), np.uint8) for c in e.chunks]
    out = np.empty(k.max_encoded_size(max(p.shape[1] for p in planes), w), np.uint8)
    stages = {
        "pipeline.decode": lambda i: e.decode_chunk(i),
        "kernel decode_words": lambda i: k.decode_words(bufs[i], w, planes[i].shape[1], rotate, e.outs[i]),
        "kernel decode_planes": lambda i: k.decode_planes(bufs[i], planes[i]),
        "kernel merge": lambda i: k.merge(planes[i], planes[i].shape[1], w, rotate, e.outs[i]),
        "pipeline.encode": lambda i: e.encode_chunk(i),
        "kernel split": lambda i: k.split(e.chunks[i], planes[i].shape[1], w, rotate, planes[i]),
        "kernel encode_planes": lambda i: k.encode_planes(planes[i], 32, 12, out),
    }
    got = {}
    for name, step in stages.items():
        best = np.full(len(e.chunks), np.inf)
        for _ in range(repeat):
            for i in range(len(e.chunks)):
                t = time.thread_time()
                step(i)
                best[i] = min(best[i], time.thread_time() - t)
        got[name] = best.mean() * 1e6
    e.check()
    return got


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the kernel (mallopt:
    no mmap for large blocks, no trimming). ZipNN allocates its output on every call: with the
    defaults, a large output is fresh mmap'd memory whose page faults count in the CPU time, so
    ZipNN's decode ran at 1.6 GB/s on openff and 3.7 GB/s on openff-st, the same tensors,
    depending on whether glibc happened to reuse a block. elves decodes into preallocated
    buffers. With this both sides run without page faults: the codecs are compared, not the
    allocator. Returns whether it took effect (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # mallopt takes a C int: a larger value wraps (1 << 62 became 0, "trim on every free",
        # which faulted every large block in again: before 2026-12-07 03:00 both sides of the
        # table paid that on each allocation of 128 KiB or more).
        most = ctypes.c_int(2**31 - 1)
        return bool(libc.mallopt(m_mmap_threshold, most) and libc.mallopt(m_trim_threshold, most))
    except (OSError, AttributeError):
        return False


def main() -> None:
    ds = load_datasets_module()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", help="dataset names (default: every prepared one)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-zipnn", action="store_true", help="time elves only")
    parser.add_argument("--baseline", type=Path, help="an earlier checkout to time against (A/B)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--write", action="store_true", help="replace the kernel section of bench/RESULTS.md")
    parser.add_argument("--parts", action="store_true", help="time each stage of a chunk instead (us per chunk)")
    parser.add_argument("--page-faults", action="store_true",
                        help="leave glibc's defaults: ZipNN's decode then pays page faults for its output")
    args = parser.parse_args()
    kept = not args.page_faults and keep_freed_memory()
    names = args.datasets or [d for d in ds.DATASETS if ds.is_prepared(d)]
    if args.parts:
        for name in names:
            for dtype, segments in sorted(tensor_bytes(ds.model_dir(name)).items()):
                e = Elves(dtype, segments)
                size = max(len(c) for c in e.chunks)
                full = sum(len(c) == size for c in e.chunks)
                print(f"{name} {dtype}: {len(e.chunks)} chunks ({full} of {size} bytes), us per chunk: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in parts(e, args.repeat).items()), flush=True)
        return
    rows = []
    baseline = load_package("elves_before", args.baseline) if args.baseline else None
    ab = [("| dataset | dtype | MB | before enc MB/s | after enc MB/s | enc change | before dec MB/s "
           "| after dec MB/s | dec change |"), "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines = [("| dataset | dtype | MB | elves ratio | ZipNN ratio | elves enc MB/s | ZipNN enc MB/s "
              "| elves dec MB/s | ZipNN dec MB/s | enc speed-up | dec speed-up |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines))
    for name in names:
        for dtype, segments in sorted(tensor_bytes(ds.model_dir(name)).items()):
            mb = sum(len(s) for s in segments) / 1e6
            nbytes = sum(len(s) for s in segments)
            coders = [Elves(dtype, segments)] + ([] if args.no_zipnn else [ZipNN(dtype, segments)])
            got = measure(coders, nbytes, args.repeat)
            e, z, b = got["elves"], got.get("ZipNN"), None
            if baseline is not None:
                pair = measure_ab(Elves(dtype, segments, "elves_before", "before"), coders[0], nbytes, args.repeat)
                b, a = pair["before"], pair["elves"]
                ab.append(f"| {name} | {dtype} | {mb:.1f} | {b['encode']:.0f} | {a['encode']:.0f} | "
                          f"{a['encode'] / b['encode'] - 1:+.1%} | {b['decode']:.0f} | {a['decode']:.0f} | "
                          f"{a['decode'] / b['decode'] - 1:+.1%} |")
                print(ab[-1], flush=True)
            rows.append({"dataset": name, "dtype": dtype, "mb": mb, "elves": e, "zipnn": z, "before": b})
            zr = ("n/a",) * 3 if z is None else (f"{z['ratio']:.4f}", f"{z['enc']:.0f}", f"{z['dec']:.0f}")
            up = ("n/a",) * 2 if z is None else (f"{e['enc'] / z['enc']:.2f}x", f"{e['dec'] / z['dec']:.2f}x")
            lines.append(f"| {name} | {dtype} | {mb:.1f} | {e['ratio']:.4f} | {zr[0]} | {e['enc']:.0f} | {zr[1]} "
                         f"| {e['dec']:.0f} | {zr[2]} | {up[0]} | {up[1]} |")
            print(lines[-1], flush=True)
    if baseline is not None:
        print("\n" + "\n".join(ab))
        lines += ["", (f"A/B against `{args.baseline}` (before): the sums of per-chunk best CPU times, the two "
                       "taking turns chunk by chunk:"), ""] + ab
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write:
        cmd = "python bench/kernel_speed.py " + " ".join(sys.argv[1:])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        cpu = proc_field("/proc/cpuinfo", "model name") or platform.machine()
        machine = f"{cpu}, {os.cpu_count()} logical cores, {platform.platform()}"
        memory = ("freed memory kept for reuse (no page faults on either side)" if kept
                  else "glibc's defaults (ZipNN's decode pays page faults for its output)")
        write_section("kernel", "kernel_speed.py: the float codec's kernels alone, one thread, against ZipNN",
                      f"Command: `{cmd}`\nDate: {when}\nMachine: {machine}\nMemory: {memory}\n\n"
                      + "\n".join(lines))


if __name__ == "__main__":
    main()
