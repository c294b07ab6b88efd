"""GPU decode benchmark (a benchmark, not a test): run once on a machine with a CUDA GPU, cupy
and torch.

    python bench/gpu_bench.py                                # everything, markdown on stdout
    python bench/gpu_bench.py --sizes 4,64 --models minilm   # less
    python bench/gpu_bench.py --json gpu.json                # also keep the raw numbers

Part 1, the kernel: decode throughput in GB/s of DECODED bytes, per dtype and tensor size, on
synthetic weights (Gaussian, std 0.02, as trained weights roughly are) and on real tensors. The
payloads are already on the device; each row is one launch over all chunks of the tensor, timed
with CUDA events after warm-up, median of the repeats. "device copy" is the GB/s of a plain
device-to-device memcpy (of the compressed size), for scale: the memory-bandwidth roof. Every
decode is checked bit for bit once.

Part 2, end to end: wall time to get every tensor of a model's safetensors files onto the GPU
(the datasets of bench/datasets.py that are present, and a synthetic BF16 model made here),
with the files in the page cache ("warm") and after dropping them from it with
posix_fadvise(DONTNEED) ("cold"), for
  - elves.gpu.load_file on an archive of those files (compressed here, once),
  - safetensors.torch.load_file(path, device="cuda") on the original files,
  - a raw copy: read the original bytes into pinned memory and copy them to the device in one go
    (what any loader of uncompressed bytes must at least do), and the copy alone.
GB/s there is original (uncompressed) bytes per second. elves' tensors are checked against
safetensors' once per model.

Part 3, per codec: one archive each of a synthetic BF16 model coded standalone (planes + rANS),
a fine-tune of it coded against it (BitX: xor fused into the kernel, the base's tensors on the
device), a fine-tune that changed 2% of the weights (BitX's sparse form: planes + rANS into
scratch, then the sparse kernel), two releases lossy in one archive (the second coded as elf
deltas against the first, gathered on the device), the same model lossy (elf, abs 1e-3: planes + rANS into scratch, then the elf kernel),
and opaque bytes (zstd, decoded on the CPU beside the GPU). Kernel GB/s: every chunk staged on
the device at once, references uploaded or gathered, one launch per kernel and round (as the
loader's batches launch),
CUDA events, median; zstd has no kernel (nvCOMP is not measured: it was not installable where
this was written, and stays the option to measure later), so its row is the CPU decode. Then
elves.gpu.load_file of each archive, warm, in GB/s of decoded bytes; for the deltas also with
``base=`` the base's tensors already on the device (safetensors.torch.load_file(..., device=)).
Last, a store holding the model and the sparse fine-tune as its delta: Store.load(name,
device="cuda:0") (objects decoded on the GPU) against Store.load on the CPU, moved to the GPU. DFloat11 (``--dfloat11
DIR``: a DFloat11-compressed model and its original beside it) is loaded where it installs.

    python bench/gpu_bench.py --host-only    # no GPU: builds the part-3 archives and plans them
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import elves  # noqa: E402
import elves.gpu  # noqa: E402
from elves import dtypes  # noqa: E402
from elves.codecs import Pipeline  # noqa: E402
from elves.codecs.planes import Planes  # noqa: E402
from elves.codecs.rans import Rans  # noqa: E402
from elves.archive import ArchiveReader  # noqa: E402
from elves.decoder import attach_base, read_stream  # noqa: E402
from elves.encoder import TENSOR_CHUNK_BYTES  # noqa: E402
from elves.gpu import plan  # noqa: E402

DATA_ROOT = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets"))
MiB = 1 << 20
DTYPES = ["BF16", "F16", "F32", "F8_E4M3", "I64", "U8"]
SIZES_MIB = [4, 64, 1024]
REAL = {"astra-st": "BF16", "minilm": "F32"}  # datasets whose tensors of that dtype make a row


# ============================================================================ part 1: the kernel

def synthetic(dt: str, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """``nbytes`` of plausible tensor data of dtype ``dt``, as raw bytes."""
    d = dtypes.get(dt)
    n = nbytes // d.itemsize
    if d.is_float:
        return (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(dtypes.numpy_dtype(dt)).view(np.uint8)
    if dt == "U8":  # quantised weights: close to uniform
        return rng.integers(0, 256, n, dtype=np.uint8)
    return rng.integers(0, 50_000, n).astype(dtypes.numpy_dtype(dt)).view(np.uint8)  # ids, counters


def real_tensors(name: str, dt: str, limit: int) -> np.ndarray | None:
    """The bytes of a dataset's ``dt`` tensors (safetensors files), concatenated, up to ``limit``."""
    root = DATA_ROOT / "models" / name
    parts, total = [], 0
    for path in sorted(root.rglob("*.safetensors")) if root.exists() else []:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            for key, info in header.items():
                if key == "__metadata__" or info["dtype"] != dt or total >= limit:
                    continue
                begin, end = info["data_offsets"]
                f.seek(8 + n + begin)
                parts.append(np.frombuffer(f.read(end - begin), dtype=np.uint8))
                total += end - begin
    return np.concatenate(parts)[:limit] if parts else None


def encode(raw: np.ndarray, dt: str, pool: ThreadPoolExecutor) -> tuple[list[bytes], list[int]]:
    """The chunks the writer would make: payloads and decoded lengths."""
    step = TENSOR_CHUNK_BYTES // dtypes.get(dt).itemsize * dtypes.get(dt).itemsize
    pipeline = Pipeline([Planes(dt), Rans()])
    pieces = [raw[i:i + step] for i in range(0, raw.size, step)]
    return list(pool.map(pipeline.encode, pieces)), [p.size for p in pieces]


def gpu_time(cp: Any, fn: Callable[[], None], repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def bench_kernel(cp: Any, label: str, dt: str, raw: np.ndarray, pool: ThreadPoolExecutor, repeat: int) -> dict:
    payloads, sizes = encode(raw, dt, pool)
    offsets, pos = [], 0
    for p in payloads:
        offsets.append(pos)
        pos += -(-len(p) // 16) * 16
    host = np.zeros(pos, dtype=np.uint8)
    for o, p in zip(offsets, payloads):
        host[o:o + len(p)] = np.frombuffer(p, dtype=np.uint8)
    payload = cp.asarray(host)
    out = cp.empty(raw.size, dtype=cp.uint8)
    decoder = elves.gpu.ChunkDecoder(payload, [(o, len(p), n) for o, p, n in zip(offsets, payloads, sizes)], out,
                                     width=dtypes.get(dt).itemsize, rotate=dtypes.get(dt).is_float)
    decoder()
    decoder.check()
    if not bool(cp.array_equal(out, cp.asarray(raw))):
        raise SystemExit(f"*** {label}: the GPU decode is NOT bit-exact")
    seconds = gpu_time(cp, decoder, repeat)
    nbytes = min(payload.nbytes, out.nbytes)
    copy = gpu_time(cp, lambda: out.data.copy_from_device_async(payload.data, nbytes, cp.cuda.get_current_stream()),
                    repeat)
    row = {"what": label, "dtype": dt, "bytes": raw.size, "chunks": len(payloads),
           "ratio": raw.size / sum(len(p) for p in payloads), "decode_s": seconds,
           "decode_gbs": raw.size / seconds / 1e9, "copy_gbs": nbytes / copy / 1e9}
    print(f"  {label:24} {dt:8} {raw.size / MiB:8.0f} MiB  ratio {row['ratio']:.3f}  "
          f"decode {row['decode_gbs']:7.1f} GB/s", file=sys.stderr, flush=True)
    return row


def part1(cp: Any, args: argparse.Namespace) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for dt in args.dtypes:
            for mib in args.sizes:
                rows.append(bench_kernel(cp, "synthetic", dt, synthetic(dt, mib * MiB, rng), pool, args.repeat))
                cp.get_default_memory_pool().free_all_blocks()
        for name, dt in REAL.items():
            raw = real_tensors(name, dt, max(args.sizes) * MiB)
            if raw is None:
                print(f"  (dataset {name} not fetched: skipped)", file=sys.stderr)
                continue
            rows.append(bench_kernel(cp, f"real: {name}", dt, raw, pool, args.repeat))
            cp.get_default_memory_pool().free_all_blocks()
    return rows


# ============================================================================ part 2: end to end

def drop_from_cache(paths: list[Path]) -> bool:
    """Ask the kernel to drop the files from the page cache; False where that is not possible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * MiB):
                pass


def wall(fn: Callable[[], Any], torch: Any) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def h2d(cp: Any, pinned: np.ndarray, dev: Any, nbytes: int) -> None:
    dev.data.copy_from_host_async(ctypes.c_void_p(pinned.ctypes.data), nbytes, cp.cuda.get_current_stream())


def raw_copy(cp: Any, paths: list[Path], pinned: np.ndarray, dev: Any) -> None:
    """Read the files into pinned memory and copy the bytes to the device in one go."""
    pos = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            pos += f.readinto(memoryview(pinned)[pos:])
    h2d(cp, pinned, dev, pos)


def part2(cp: Any, torch: Any, args: argparse.Namespace, work: Path) -> list[dict]:
    models: list[tuple[str, Path]] = []
    if args.synthetic_mib:
        models.append((f"synthetic ({args.synthetic_mib} MiB BF16)", synthetic_model(work, args.synthetic_mib)))
    models += [(name, DATA_ROOT / "models" / name) for name in args.models]
    rows = []
    for name, root in models:
        files = sorted(root.rglob("*.safetensors")) if root.exists() else []
        if not files:
            print(f"  (dataset {name} has no safetensors files here: skipped)", file=sys.stderr)
            continue
        rows.append(bench_model(cp, torch, name, root, files, work, args.e2e_repeat))
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def synthetic_model(work: Path, mib: int) -> Path:
    """A model folder with one safetensors file of ``mib`` MiB: BF16 matrices of Gaussian weights
    (std 0.02) and a few F32 norm vectors, for machines without the datasets."""
    import ml_dtypes

    root = work / "synthetic-model"
    path = root / "model.safetensors"
    if path.exists():
        return root
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = 4096
    header: dict[str, Any] = {}
    blobs: list[np.ndarray] = []
    pos = 0
    for i in range(max(1, mib // 32)):  # 32 MiB per layer: a 4096 x 4096 BF16 matrix and its norm
        w = (rng.standard_normal((rows, rows), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        norm = (1 + 0.1 * rng.standard_normal(rows, dtype=np.float32)).astype("<f4")
        for name, arr, dt in ((f"layers.{i}.weight", w, "BF16"), (f"layers.{i}.norm", norm, "F32")):
            header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
            blobs.append(arr.view(np.uint8).reshape(-1))
            pos += arr.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob.tobytes())
    return root


def bench_model(cp: Any, torch: Any, name: str, root: Path, files: list[Path], work: Path, repeat: int) -> dict:
    from safetensors.torch import load_file as st_load

    src = work / name  # the model's safetensors files alone: that is what safetensors loads
    src.mkdir(exist_ok=True)
    names = {f: f.relative_to(root).as_posix().replace("/", "__") for f in files}
    for f, link in names.items():
        if not (src / link).exists():
            try:
                os.link(f, src / link)
            except OSError:
                (src / link).write_bytes(f.read_bytes())
    archive = work / f"{name}.elves"
    if not archive.exists():
        elves.compress(src, archive)
    size = sum(f.stat().st_size for f in files)

    def elves_load() -> dict:
        return elves.gpu.load_file(archive, device="cuda:0", framework="pt")

    def st_load_all() -> list[dict]:
        return [st_load(f, device="cuda:0") for f in files]

    # One untimed run of each (kernel compile, CUDA context), checked against each other. Tensor
    # names are "file:name" in elves when two files share a name.
    _, got = wall(elves_load, torch)
    for f, want in zip(files, st_load_all()):
        for k, v in want.items():
            mine = got[k] if k in got else got[f"{names[f]}:{k}"]
            if not torch.equal(mine.reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)):
                raise SystemExit(f"*** {name}: tensor {k!r} of {f.name} differs from safetensors' load")
    del got, want
    torch.cuda.empty_cache()

    pinned_mem = cp.cuda.alloc_pinned_memory(size)
    pinned = np.frombuffer(pinned_mem, dtype=np.uint8, count=size)
    dev = cp.empty(size, dtype=cp.uint8)
    methods: dict[str, tuple[Callable[[], Any], list[Path]]] = {
        "elves.gpu.load_file": (elves_load, [archive]),
        "safetensors.torch.load_file": (st_load_all, files),
        "raw: read to pinned + H2D": (lambda: raw_copy(cp, files, pinned, dev), files),
    }
    row: dict[str, Any] = {"model": name, "bytes": size, "archive_bytes": archive.stat().st_size}
    for method, (fn, paths) in methods.items():
        for cache in ("warm", "cold"):
            times = []
            for _ in range(repeat):
                if cache == "cold":
                    row["cold_dropped"] = drop_from_cache(paths)
                else:
                    warm_cache(paths)
                seconds, result = wall(fn, torch)
                del result
                torch.cuda.empty_cache()
                times.append(seconds)
            row[f"{method} {cache}"] = statistics.median(times)
    raw_copy(cp, files, pinned, dev)
    row["H2D only"] = gpu_time(cp, lambda: h2d(cp, pinned, dev, size), 5, 1)
    print(f"  {name}: " + ", ".join(f"{k} {size / v / 1e9:.2f} GB/s" for k, v in row.items()
                                    if isinstance(v, float)), file=sys.stderr, flush=True)
    return row


# ============================================================================ part 3: per codec

def fine_tune(base: Path, folder: Path, seed: int, change: Callable[[np.ndarray, np.random.Generator], None]) -> Path:
    """``folder`` holding the BF16 safetensors file ``base`` with its weights (as uint16) changed
    in place by ``change``, made once."""
    if not folder.exists():
        folder.mkdir()
        with open(base, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            head = f.read(n)
            data = np.frombuffer(f.read(), dtype=np.uint8).copy()
        change(data[: data.size // 2 * 2].view(np.uint16), np.random.default_rng(seed))
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + head + data.tobytes())
    return folder


def light_touch(words: np.ndarray, rng: np.random.Generator) -> None:
    """A light fine-tune: a third of the weights move by an ulp or two (dense xor)."""
    touched = rng.random(words.size) < 0.3
    words[touched] += rng.integers(-2, 3, int(touched.sum())).astype(np.uint16)


def retrain_few(words: np.ndarray, rng: np.random.Generator) -> None:
    """Continued training: 2% of the weights retrained, the rest bit for bit the same (sparse xor)."""
    touched = rng.random(words.size) < 0.02
    words[touched] = rng.integers(0, 1 << 16, int(touched.sum())).astype(np.uint16)


def codec_archives(work: Path, mib: int) -> list[tuple[str, Path, Path | None]]:
    """(codec, archive, base) for part 3, built once under ``work``."""
    base_root = synthetic_model(work, mib)
    base = base_root / "model.safetensors"
    out: list[tuple[str, Path, Path | None]] = []
    tuned = fine_tune(base, work / "codec-finetune", 1, light_touch)
    sparse = fine_tune(base, work / "codec-sparse-finetune", 2, retrain_few)
    versions = work / "codec-versions"  # two releases in one archive: the second's elf deltas against the first
    if not versions.exists():
        versions.mkdir()
        os.link(base, versions / "v1.safetensors")
        os.link(tuned / "model.safetensors", versions / "v2.safetensors")
    opaque = work / "codec-opaque"
    if not opaque.exists():
        opaque.mkdir()
        text = b"".join(b"%d: the quick brown fox %x\n" % (i, i * 7919) for i in range(mib * 24_000))
        (opaque / "data.txt").write_bytes(text)
    for codec, src, kw in [("planes+rans", base_root, {}), ("xor (BitX)", tuned, {"base": base}),
                           ("sparse-xor (BitX)", sparse, {"base": base}),
                           ("elf 1e-3", base_root, {"lossy": "elf", "error_bound": "1e-3"}),
                           ("elf-delta rel:1e-2", versions, {"lossy": "elf", "error_bound": "rel:1e-2"}),
                           ("zstd", opaque, {})]:
        archive = work / f"codec-{codec.split()[0]}.elves"
        if not archive.exists():
            elves.compress(src, archive, **kw)
        out.append((codec, archive, kw.get("base")))
    return out


def host_plan(codec: str, archive: Path, base: Path | None) -> dict:
    """What the loader's host side makes of an archive: streams per path, batches, and the time
    to read and check the staged payloads (no GPU)."""
    with ArchiveReader(archive) as reader:
        attach_base(reader, base)
        streams = list(range(len(reader.streams)))
        on_gpu = [s for s in streams if plan.gpu_width(reader.streams[s]) is not None]
        batches, staging = plan.batches(reader, on_gpu, elves.gpu.STAGING_BYTES)
        host = np.zeros(staging, dtype=np.uint8)
        outputs = dict.fromkeys(streams, 0)
        refs = {s: plan.DeviceRef(0, reader.streams[s].nbytes) for s in on_gpu}
        t0 = time.process_time()
        for b in batches:
            plan.fill(host, reader, b, plan.lay_out(b, 0, outputs, 0, refs))
        seconds = time.process_time() - t0
        decoded = sum(reader.streams[s].nbytes for s in streams)
    row = {"codec": codec, "bytes": decoded, "archive_bytes": archive.stat().st_size, "streams": len(streams),
           "gpu_streams": len(on_gpu), "batches": len(batches), "stage_cpu_s": seconds}
    print(f"  {codec:12} {decoded / MiB:8.1f} MiB -> {row['archive_bytes'] / MiB:7.1f} MiB, {len(on_gpu)}/{len(streams)} "
          f"streams on the GPU path, {len(batches)} batches, staged in {seconds:.2f} s CPU", file=sys.stderr)
    return row


def device_refs(cp: Any, reader: ArchiveReader, streams: list[int], outputs: dict[int, Any], keep: list[Any]
                ) -> dict[int, plan.DeviceRef]:
    """The references of ``streams`` on the device, as the loader puts them there: a base's bytes
    uploaded, or a stream decoded earlier (in ``outputs``) gathered, with ``xor``'s remap table."""
    from bitx.codec import rank_tables

    refs = {}
    for s in streams:
        rp = plan.reference_plan(reader, s)
        if rp is None:
            continue
        if rp.host is not None:
            buf = cp.asarray(rp.host)
        else:
            assert rp.stream is not None
            buf = cp.zeros(rp.nbytes, dtype=cp.uint8)
            for d, r, n in rp.copies:
                buf[d:d + n] = outputs[rp.stream][r:r + n]
        table = 0
        xor = plan.xor_of(reader.streams[s])
        if xor is not None and xor.remap is not None:
            tab = cp.asarray(np.ascontiguousarray(rank_tables(xor.remap)[1]))
            keep.append(tab)
            table = tab.data.ptr
        keep.append(buf)
        refs[s] = plan.DeviceRef(buf.data.ptr, int(buf.shape[0]), table)
    return refs


def kernel_time(cp: Any, archive: Path, base: Path | None, repeat: int) -> float | None:
    """Seconds of the kernels over every GPU chunk of ``archive``, payloads and references on the
    device, in the loader's two rounds (streams whose references are gathered from another
    second); None when no stream has a kernel."""
    from elves.gpu.launcher import kernels

    with ArchiveReader(archive) as reader:
        attach_base(reader, base)
        on_gpu = [s for s, st in enumerate(reader.streams) if plan.gpu_width(st) is not None and st.chunks]
        if not on_gpu:
            return None
        gathered = [s for s in on_gpu if plan.gathered_from(reader.streams[s]) is not None]
        outputs = {s: cp.empty(reader.streams[s].nbytes, dtype=cp.uint8) for s in on_gpu}
        k = kernels(cp.cuda.runtime.getDevice())
        seconds, keep = 0.0, []
        for streams in ([s for s in on_gpu if s not in gathered], gathered):
            if not streams:
                continue
            (batch,), _ = plan.batches(reader, streams, 1 << 40)  # one batch: all of it on the device
            staging = batch.size()
            dev_stage = cp.empty(staging, dtype=cp.uint8)
            refs = device_refs(cp, reader, streams, outputs, keep)
            host = np.zeros(staging, dtype=np.uint8)
            layout = plan.lay_out(batch, dev_stage.data.ptr, {s: b.data.ptr for s, b in outputs.items()}, 0, refs)
            plan.fill(host, reader, batch, layout)
            if layout.links:
                sizes = plan.scratch_sizes(host, batch, layout)
                scratch = cp.empty(plan.scratch_bytes(sizes), dtype=cp.uint8)
                keep.append(scratch)
                plan.link(host, layout, scratch.data.ptr, sizes)
            dev_stage.set(host)
            keep.append(dev_stage)
            status = cp.zeros(len(layout.order), dtype=cp.uint32)
            seconds += gpu_time(cp, lambda stage=dev_stage, st=status, groups=layout.groups:
                                k.launch(stage.data.ptr, st.data.ptr, groups), repeat)
            if int(status.max()):
                raise SystemExit(f"*** {archive.name}: a kernel flagged a chunk")
        for s, buf in outputs.items():
            if not np.array_equal(buf.get(), read_stream(reader, s, ThreadPoolExecutor(2), 4)):
                raise SystemExit(f"*** {archive.name}: stream {s} is NOT bit-exact")
        return seconds


def store_row(torch: Any | None, work: Path) -> dict:
    """A store holding the synthetic model and its sparse fine-tune (a delta against it):
    Store.load of the fine-tune on the GPU (its objects decoded there) against Store.load on the
    CPU then moved to the device, warm, in GB/s of decoded bytes; host only: the store's size."""
    from elves.store import Store

    root = work / "codec.store"
    if not root.exists():
        store = Store.init(root)
        store.add(work / "synthetic-model", "base", base=None)
        store.add(work / "codec-sparse-finetune", "ft", base="base")
    store = Store(root)
    size = sum(f["size"] for f in store.manifest("ft")["files"])
    row: dict = {"codec": "store: sparse fine-tune", "bytes": size}
    if torch is not None:
        store.load("ft", device="cuda:0")  # compile, context
        gpu_s, got = wall(lambda: store.load("ft", device="cuda:0"), torch)
        del got
        cpu_s, got = wall(lambda: {k: v.to("cuda:0") for k, v in store.load("ft", device="cpu").items()}, torch)
        del got
        row.update(gpu_load_gbs=size / gpu_s / 1e9, cpu_load_gbs=size / cpu_s / 1e9)
        print(f"  store load: GPU decode {row['gpu_load_gbs']:.2f} GB/s, CPU decode + copy "
              f"{row['cpu_load_gbs']:.2f} GB/s", file=sys.stderr, flush=True)
    return row


def part3(cp: Any, torch: Any, args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    for codec, archive, base in codec_archives(work, args.codec_mib):
        row = host_plan(codec, archive, base)
        if cp is not None:
            seconds = kernel_time(cp, archive, base, args.repeat)
            if seconds is None:  # zstd: the CPU decodes it, beside the GPU
                with ArchiveReader(archive) as reader, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                    t0 = time.perf_counter()
                    for s in range(len(reader.streams)):
                        read_stream(reader, s, pool, 2 * (os.cpu_count() or 1))
                    seconds = time.perf_counter() - t0
                row["decode"] = "CPU"
            row["decode_gbs"] = row["bytes"] / seconds / 1e9
            warm_cache([archive])
            elves.gpu.load_file(archive, base=base)  # compile, context
            load_s, got = wall(lambda: elves.gpu.load_file(archive, base=base), torch)
            del got
            row["load_gbs"] = row["bytes"] / load_s / 1e9
            if base is not None:  # base= as the base's tensors already on the device, read in place
                import safetensors.torch

                on_device = safetensors.torch.load_file(str(base), device="cuda:0")
                load_s, got = wall(lambda: elves.gpu.load_file(archive, base=on_device), torch)
                del got, on_device
                row["load_device_base_gbs"] = row["bytes"] / load_s / 1e9
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
            print(f"  {codec:12} decode {row['decode_gbs']:7.1f} GB/s, load_file {row['load_gbs']:6.2f} GB/s",
                  file=sys.stderr, flush=True)
        rows.append(row)
    rows.append(store_row(torch if cp is not None else None, work))
    return rows


def dfloat11_row(torch: Any, folder: Path) -> dict:
    """DFloat11's own GPU load of a DFloat11 model, where the package installs."""
    try:
        from dfloat11 import DFloat11Model
    except ImportError as e:
        return {"model": f"DFloat11 {folder.name}", "error": f"dfloat11 does not import: {e}"}
    try:
        seconds, model = wall(lambda: DFloat11Model.from_pretrained(str(folder), device_map="cuda"), torch)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        return {"model": f"DFloat11 {folder.name}", "seconds": seconds, "bytes": size}
    except Exception as e:  # noqa: BLE001 (a peer's loader: report what it says)
        return {"model": f"DFloat11 {folder.name}", "error": f"{type(e).__name__}: {e}"}


# ============================================================================ report

def markdown(device: str, versions: str, kernel_rows: list[dict], e2e_rows: list[dict],
             codec_rows: list[dict] | None = None, extra: list[dict] | None = None) -> str:
    out = [f"### GPU decode on {device}", "", versions, ""]
    if codec_rows:
        out += ["Per codec: kernel GB/s of decoded bytes (payloads and references on the device; zstd: the CPU "
                "decode, no kernel), and elves.gpu.load_file from the page cache (a delta: with base= the "
                "base's file, and the base's tensors already on the device).", "",
                "| codec | decoded | archive | GPU streams | decode GB/s | load_file GB/s | base on device GB/s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in (r for r in codec_rows if "archive_bytes" in r):
            out.append(f"| {r['codec']} | {r['bytes'] / MiB:,.1f} MiB | {r['archive_bytes'] / MiB:,.1f} MiB | "
                       f"{r['gpu_streams']}/{r['streams']} | {r.get('decode_gbs', float('nan')):,.1f}"
                       f"{' (CPU)' if r.get('decode') == 'CPU' else ''} | {r.get('load_gbs', float('nan')):,.2f} | "
                       f"{r.get('load_device_base_gbs', float('nan')):,.2f} |")
        out.append("")
        for r in (r for r in codec_rows if "archive_bytes" not in r):
            out.append(f"{r['codec']} ({r['bytes'] / MiB:,.1f} MiB): Store.load on the GPU "
                       f"{r.get('gpu_load_gbs', float('nan')):,.2f} GB/s, on the CPU then moved there "
                       f"{r.get('cpu_load_gbs', float('nan')):,.2f} GB/s")
            out.append("")
    for r in extra or []:
        out.append(f"- {r['model']}: " + (r["error"] if "error" in r else
                                          f"{r['seconds']:.3f} s ({r['bytes'] / r['seconds'] / 1e9:.1f} GB/s)"))
    if kernel_rows:
        out += ["Kernel: decoded GB/s, payloads on the device, one launch per tensor (median of repeats).", "",
                "| data | dtype | size | chunks | ratio | decode GB/s | device copy GB/s |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in kernel_rows:
            out.append(f"| {r['what']} | {r['dtype']} | {r['bytes'] / MiB:,.0f} MiB | {r['chunks']} | "
                       f"{r['ratio']:.3f} | {r['decode_gbs']:,.1f} | {r['copy_gbs']:,.0f} |")
        out.append("")
    if e2e_rows:
        methods = [k for k in e2e_rows[0] if isinstance(e2e_rows[0][k], float)]
        out += ["End to end: seconds to load every tensor onto the GPU (GB/s of original bytes).", "",
                "| model | size | archive | " + " | ".join(methods) + " |",
                "| --- | ---: | ---: | " + " | ".join("---:" for _ in methods) + " |"]
        for r in e2e_rows:
            cells = [f"{r[m]:.3f} s ({r['bytes'] / r[m] / 1e9:.1f})" for m in methods]
            out.append(f"| {r['model']} | {r['bytes'] / MiB:,.1f} MiB | {r['archive_bytes'] / MiB:,.1f} MiB | "
                       + " | ".join(cells) + " |")
        if any(not r.get("cold_dropped", True) for r in e2e_rows):
            out.append("\nCold rows are NOT cold here: this platform has no posix_fadvise.")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default=",".join(DTYPES), type=lambda s: s.split(","))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MIB)), type=lambda s: [int(x) for x in s.split(",")],
                        help="tensor sizes in MiB (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=20, help="timed kernel launches per row")
    parser.add_argument("--models", default=None, type=lambda s: s.split(","),
                        help="datasets for the end-to-end part (default: every one with safetensors files)")
    parser.add_argument("--synthetic-mib", type=int, default=1024,
                        help="also load a synthetic BF16 model this large (0: none; default %(default)s)")
    parser.add_argument("--e2e-repeat", type=int, default=3)
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="where archives are written (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--codec-mib", type=int, default=256, help="size of the part-3 models (default %(default)s)")
    parser.add_argument("--skip-codecs", action="store_true")
    parser.add_argument("--dfloat11", type=Path, default=None, help="a DFloat11 model folder to load as well")
    parser.add_argument("--host-only", action="store_true", help="no GPU: build and plan the part-3 archives")
    args = parser.parse_args()

    if args.host_only:
        with tempfile.TemporaryDirectory(prefix="elves-gpu-bench-") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            rows = part3(None, None, args, work)
        print(markdown("the host (no GPU)", f"elves {elves.__version__}", [], [], rows))
        return 0

    import cupy as cp
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (torch.cuda.is_available() is False)")
    if args.models is None:
        models = DATA_ROOT / "models"
        found = models.iterdir() if models.exists() else []
        args.models = sorted(p.name for p in found if any(p.rglob("*.safetensors")))
    device = torch.cuda.get_device_name(0)
    versions = (f"cupy {cp.__version__}, torch {torch.__version__}, CUDA runtime "
                f"{cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}, "
                f"elves {elves.__version__}")
    print(f"{device}; {versions}", file=sys.stderr)
    kernel_rows = [] if args.skip_kernel else part1(cp, args)
    with tempfile.TemporaryDirectory(prefix="elves-gpu-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        e2e_rows = [] if args.skip_e2e else part2(cp, torch, args, work)
        codec_rows = [] if args.skip_codecs else part3(cp, torch, args, work)
    extra = [dfloat11_row(torch, args.dfloat11)] if args.dfloat11 else []
    print(markdown(device, versions, kernel_rows, e2e_rows, codec_rows, extra))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "versions": versions, "kernel": kernel_rows,
                                         "end_to_end": e2e_rows, "codecs": codec_rows, "dfloat11": extra}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
