"""ELF, the opt-in lossy mode: what it costs the model, and what it saves.

1. Quality, on the real all-MiniLM-L6-v2 (dataset ``minilm``): sentence embeddings of a fixed set
   of sentences (BERT forward pass in torch from the safetensors weights, the model's own
   tokenizer via ``tokenizers``; mean pooling over the attention mask, L2-normalised: what
   all-MiniLM-L6-v2 does) with the original weights and with the weights restored from an
   elves archive at each bound: 1 - cosine similarity (mean and worst), whether every sentence
   keeps its nearest neighbour, next to the ratio.
2. Ratio against bound for every prepared model (``$ELVES_DATA/models``), beside the published
   ELF (F32 only: sign + round(|w| * 2^23) as a 24-bit code for |w| < 1, the rest kept with
   positions, identical tensors once, zstd-3 over the whole) and, where they install, zfp
   (fixed-accuracy mode = an absolute bound) and fpzip (kept bits = a relative bound); each
   baseline's achieved max error is checked, and marked when it breaks the bound. At 2^-24,
   both archives split by what they code (F32 tensors by size, other tensors, opaque bytes, the
   index): where elves gains or loses against the published ELF.

    python bench/elf_bench.py                   # everything, markdown on stdout
    python bench/elf_bench.py --models minilm fall
    python bench/elf_bench.py --write           # replace the elf section of bench/RESULTS.md

Needs torch and tokenizers for part 1 (``pip install tokenizers``); fpzip and zfpy are optional
(``pip install fpzip zfpy``). The forward pass runs in float64 so that what is measured is the
weights' perturbation, not float32 rounding noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import RESULTS, write_section  # bench/results.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import elves  # noqa: E402
from elves.bounds import parse_error_bound  # noqa: E402
from elves.codecs.elf import ELF_DTYPES  # noqa: E402

DATA = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets")) / "models"
MODELS = ["minilm", "openff", "openff-st", "astra", "astra-st", "fall", "silero"]
BOUNDS = ["2^-24", "1e-6", "1e-5", "1e-4", "rel:1e-3", "rel:1e-2"]

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "The new movie is so great.",
    "A man is playing guitar.",
    "A woman watches TV.",
    "Do you like pizza?",
    "How do I reset my password?",
    "I forgot the password to my account and cannot log in.",
    "The stock market fell sharply after the announcement.",
    "Shares tumbled when the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Plants use sunlight to turn carbon dioxide and water into sugar.",
    "The train to Berlin leaves at seven in the morning.",
    "Our flight was delayed by three hours because of fog.",
    "She finished the marathon in under four hours.",
    "Compressing model weights saves disk space and download time.",
    "Lossless compression restores every bit of the original file.",
    "The patient was given antibiotics for the infection.",
    "Heavy rain is expected across the region this weekend.",
    "He repaired the bicycle's flat tyre with a patch kit.",
    "The museum exhibits paintings from the seventeenth century.",
    "Quantum computers use qubits that can be in superposition.",
    "Please turn off the lights when you leave the room.",
]


# ============================================================================ part 1: MiniLM quality

def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    blob = path.read_bytes()
    hl = struct.unpack("<Q", blob[:8])[0]
    head = json.loads(blob[8:8 + hl])
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": np.float32, "I64": np.int64}[v["dtype"]]
        out[k] = np.frombuffer(blob[8 + hl + a: 8 + hl + b], dt).reshape(v["shape"])
    return out


class MiniLM:
    """BertModel (6 layers, 12 heads, hidden 384) + mean pooling + L2 normalisation, in float64."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(256)
        self.cfg = json.loads((folder / "config.json").read_text())
        enc = self.tok.encode_batch(SENTENCES)
        n = max(len(e.ids) for e in enc)
        self.ids = np.zeros((len(enc), n), np.int64)
        self.mask = np.zeros((len(enc), n), np.int64)
        for i, e in enumerate(enc):
            self.ids[i, :len(e.ids)] = e.ids
            self.mask[i, :len(e.ids)] = 1

    def embed(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        import torch
        from make_family import bert  # bench/make_family.py: the forward pass that trains the family

        W = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in weights.items()
             if np.asarray(v).dtype.kind == "f"}
        with torch.no_grad():
            return bert(W, torch.from_numpy(self.ids), torch.from_numpy(self.mask), self.cfg, train=False).numpy()


def quality(folder: Path, bounds: list[str], work: Path) -> list[str]:
    """Markdown: the MiniLM quality table."""
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return [f"(skipped: {e.name} is not installed: pip install torch tokenizers)"]
    model = MiniLM(folder)
    src = folder / "model.safetensors"
    orig = load_safetensors(src)
    base = model.embed(orig)
    sims = base @ base.T
    np.fill_diagonal(sims, -2)
    nn0 = sims.argmax(1)
    pair = float(base[0] @ base[1])  # "A man is eating food." vs "... a piece of bread."
    rows = []
    lossless = elves.compress(folder, work / "q-lossless.elves", threads=None)
    rows.append(("lossless", lossless.ratio, 0.0, 0.0, len(SENTENCES), 0.0, 0.0))
    for spec in bounds:
        archive = work / "q.elves"
        s = elves.compress(folder, archive, lossy="elf", error_bound=spec, force=True)
        w = {k: v for k, v in elves.load_file(archive).items()}
        emb = model.embed(w)
        cos = np.sum(base * emb, axis=1)
        sims = emb @ emb.T
        np.fill_diagonal(sims, -2)
        kept = int((sims.argmax(1) == nn0).sum())
        v = elves.verify(archive, against=folder)
        assert v.ok and v.over_bound == 0, v.problems
        rows.append((spec, s.ratio, float(np.mean(1 - cos)), float(np.max(1 - cos)), kept,
                     v.max_abs_error or 0.0, v.max_rel_error or 0.0))
    out = [f"all-MiniLM-L6-v2 (`minilm`, {sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.1f} MB "
           f"folder), {len(SENTENCES)} sentences, forward pass in float64. Sanity: cos(\"{SENTENCES[0]}\", "
           f"\"{SENTENCES[1]}\") = {pair:.3f} with the original weights.", "",
           "| bound | ratio (folder) | 1 - cos, mean | 1 - cos, worst | nearest neighbour kept | max abs error | max rel error |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for spec, ratio, mean, worst, kept, ea, er in rows:
        out.append(f"| {spec} | {ratio:.3f} | {mean:.2e} | {worst:.2e} | {kept}/{len(SENTENCES)} | {ea:.2e} | "
                   f"{er:.2e} |")
    out += ["", "Relative errors of absolute bounds reach 1 on weights smaller than the bound (they "
            "become 0); the max errors are measured by `elves verify --against` on every element."]
    return out


# ============================================================================ part 2: ratios

def model_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else folder.stat().st_size


def segments(folder: Path):
    """(file, segment, bytes, shape or None) for every segment of every file, in order."""
    from elves.readers import read_model

    files, _ = read_model(folder)
    for sf in files:
        shapes = {}
        for t in sf.tensors:
            shapes.setdefault(t.segment, []).append(t)
        with open(sf.path, "rb") as f:
            for i, seg in enumerate(sf.segments):
                data = os.pread(f.fileno(), seg.length, seg.offset)
                views = shapes.get(i, [])
                shape = None
                if seg.dtype and len(views) == 1 and views[0].offset == 0 and views[0].strides is None:
                    sh = tuple(views[0].shape)
                    if int(np.prod(sh, dtype=np.int64)) * ELF_DTYPES.get(seg.dtype, (1,))[0] == seg.length:
                        shape = sh
                yield sf, seg, data, shape


def _size_class(dtype: str | None, nbytes: int) -> str:
    """The row of the breakdown table a segment falls in."""
    if dtype is None:
        return "opaque bytes"
    if dtype != "F32":
        return f"{dtype} tensors"
    return "F32 tensors >= 64 KiB" if nbytes >= 65536 else (
        "F32 tensors 4-64 KiB" if nbytes >= 4096 else "F32 tensors < 4 KiB")


def reference_parts(folder: Path):
    """(size class, dtype, hash, bytes) that the published ELF (the ELVES pipeline: dedup, ELF
    on F32) hands to zstd-3, in order: a deduplicated F32 tensor becomes sign + round(|w| 2^23)
    as 24-bit codes for |w| < 1, then the other elements' positions and values; anything else
    goes as it is. Repeated tensors are left out (hash None marks opaque bytes, never deduped)."""
    import xxhash

    seen: set[tuple] = set()
    for _, seg, data, _ in segments(folder):
        key = (seg.dtype, xxhash.xxh3_128_hexdigest(data))
        if seg.dtype is not None and key in seen:
            continue
        seen.add(key)
        cls = _size_class(seg.dtype, seg.length)
        if seg.dtype != "F32":
            yield cls, seg.dtype, key[1], data
            continue
        x = np.frombuffer(data, np.float32)
        with np.errstate(invalid="ignore"):
            q = np.rint(np.abs(x).astype(np.float64) * 2 ** 23)
        ok = np.isfinite(x) & (q < 2 ** 23)
        code = q[ok].astype(np.uint32) | (np.signbit(x[ok]).astype(np.uint32) << 23)
        yield cls, seg.dtype, key[1], b"".join([
            code.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes(),
            np.flatnonzero(~ok).astype("<u4").tobytes(), x[~ok].tobytes()])


def reference_elf(folder: Path) -> int | None:
    """Bytes of the published ELF: :func:`reference_parts`, zstd-3 over the whole. None when the
    model has no F32 tensors (the published code handles F32 only)."""
    import zstandard

    parts = list(reference_parts(folder))
    if not any(dtype == "F32" for _, dtype, _, _ in parts):
        return None
    return len(zstandard.ZstdCompressor(level=3).compress(b"".join(p for _, _, _, p in parts)))


def breakdown(folder: Path, archive: Path) -> dict[str, tuple[int, int]]:
    """Where the bytes go: size class -> (bytes in the elves archive, bytes of the published ELF).
    The published ELF's zstd-3 stream is flushed after each part to attribute its output, which
    costs it a little (the rows sum to slightly more than its real size)."""
    import zstandard
    from elves.archive import ArchiveReader

    with ArchiveReader(archive) as r:
        stored = {(s.dtype, s.hash): s.stored_bytes for s in r.streams}
        classes = {(s.dtype, s.hash): _size_class(s.dtype, s.nbytes) for s in r.streams}
    out: dict[str, list[int]] = {}
    for key, n in stored.items():
        out.setdefault(classes[key], [0, 0])[0] += n
    z = zstandard.ZstdCompressor(level=3).compressobj()
    for cls, _, _, data in reference_parts(folder):
        out.setdefault(cls, [0, 0])[1] += len(z.compress(data) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    order = ["F32 tensors >= 64 KiB", "F32 tensors 4-64 KiB", "F32 tensors < 4 KiB"]
    rows = {k: (out[k][0], out[k][1]) for k in sorted(out, key=lambda k: (
        k == "opaque bytes", order.index(k) if k in order else len(order), k))}
    # the published ELF is one zstd frame: its only overhead is the frame's end
    rows["index, header, padding"] = (archive.stat().st_size - sum(stored.values()), len(z.flush()))
    return rows


def baseline(folder: Path, kind: str, spec: str) -> tuple[int, bool] | None:
    """(bytes, bound held) of zfp (absolute bounds) or fpzip (relative bounds) on the F32/F64
    tensors, deduplicated, the rest zstd-3; None when it does not apply or is not installed."""
    import xxhash
    import zstandard

    bound = parse_error_bound(spec)
    try:
        if kind == "zfp":
            if bound.mode != "abs":
                return None
            import zfpy
        else:
            if bound.mode != "rel":
                return None
            import fpzip
    except ImportError:
        return None
    total = 0
    rest: list[bytes] = []
    seen: set[tuple] = set()
    held = True
    floats = False
    for sf, seg, data, shape in segments(folder):
        key = (seg.dtype, xxhash.xxh3_128_hexdigest(data))
        if seg.dtype is not None and key in seen:
            continue
        seen.add(key)
        if seg.dtype not in ("F32", "F64") or not data:
            rest.append(data)
            continue
        floats = True
        x = np.frombuffer(data, np.float32 if seg.dtype == "F32" else np.float64)
        arr = x.reshape(shape) if shape and len(shape) >= 1 else x
        if arr.ndim > 4:
            arr = arr.reshape(-1, *arr.shape[-3:])
        if arr.ndim == 0:
            arr = arr.reshape(1)
        arr = np.ascontiguousarray(arr)
        if kind == "zfp":
            blob = zfpy.compress_numpy(arr, tolerance=bound.value)
            y = zfpy.decompress_numpy(blob)
        else:
            # fpzip keeps `precision` leading bits (sign, exponent, then mantissa), truncating:
            # 2^-k <= r needs k mantissa bits.
            k = int(np.ceil(-np.log2(bound.value)))
            prec = (1 + (8 if seg.dtype == "F32" else 11) + k)
            full = 32 if seg.dtype == "F32" else 64
            blob = fpzip.compress(arr.astype(arr.dtype).reshape(arr.shape if arr.ndim <= 4 else (-1,)),
                                  precision=0 if prec >= full else prec, order="C")
            y = fpzip.decompress(blob, order="C")
        total += len(blob)
        xv, yv = arr.astype(np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()[: arr.size]
        fin = np.isfinite(xv)
        err = np.abs(yv[fin] - xv[fin])
        lim = bound.value if bound.mode == "abs" else bound.value * np.abs(xv[fin])
        held &= bool((err <= lim).all())
    if not floats:
        return None
    total += len(zstandard.ZstdCompressor(level=3).compress(b"".join(rest)))
    return total, held


def timed_elves(folder: Path, work: Path, spec: str | None) -> tuple[float, float, float]:
    """(ratio, compress MB/s, restore MB/s) of elves, lossless (spec None) or ELF at spec."""
    archive = work / "m.elves"
    out = work / "restored"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = elves.compress(folder, archive, force=True, lossy="elf" if spec else None, error_bound=spec)
    tc = time.perf_counter() - t
    t = time.perf_counter()
    elves.restore(archive, out, force=True)
    tr = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return s.ratio, s.original_bytes / tc / 1e6, s.original_bytes / tr / 1e6


def ratios(models: list[str], bounds: list[str], work: Path) -> list[str]:
    head = ["| model | dtype | MB | lossless | published ELF (2^-24, F32) | " + " | ".join(bounds)
            + " | elves 2^-24 vs published |",
            "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in bounds) + " | ---: |"]
    base_head = ["| model | " + " | ".join(f"zfp {b}" for b in bounds if not b.startswith("rel"))
                 + " | " + " | ".join(f"fpzip {b}" for b in bounds if b.startswith("rel")) + " |",
                 "| --- | " + " | ".join("---:" for _ in bounds) + " |"]
    speed_head = ["| model | compress MB/s, lossless | compress MB/s, 2^-24 | restore MB/s, lossless | "
                  "restore MB/s, 2^-24 | restore MB/s, rel:1e-2 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
    rows, brows, srows, goals = [], [], [], []
    parts: dict[str, dict[str, tuple[int, int]]] = {}
    for name in models:
        folder = DATA / name
        if not folder.exists():
            rows.append(f"| {name} | (not fetched: python bench/datasets.py {name}) |")
            continue
        size = model_size(folder)
        dts: dict[str, int] = {}
        for _, seg, _, _ in segments(folder):
            if seg.dtype:
                dts[seg.dtype] = dts.get(seg.dtype, 0) + seg.length
        dtype = max(dts, key=dts.get) if dts else "-"
        print(f"[elf_bench] {name}: lossless", file=sys.stderr)
        lossless, lc, lr = timed_elves(folder, work, None)
        ref = reference_elf(folder)
        ref_ratio = size / ref if ref else None
        cells, by = [], {}
        for spec in bounds:
            print(f"[elf_bench] {name}: {spec}", file=sys.stderr)
            r, c, d = timed_elves(folder, work, spec)
            by[spec] = (r, c, d)
            if spec == "2^-24" and ref:
                parts[name] = breakdown(folder, work / "m.elves")
            cells.append(f"{r:.3f}")
        gain = f"{by['2^-24'][0] / ref_ratio:.3f}x" if ref_ratio and "2^-24" in by else "n/a"
        if ref_ratio and "2^-24" in by:
            goals.append(by["2^-24"][0] / ref_ratio)
        rows.append(f"| {name} | {dtype} | {size / 1e6:.1f} | {lossless:.3f} | "
                    f"{f'{ref_ratio:.3f}' if ref_ratio else 'n/a'} | " + " | ".join(cells) + f" | {gain} |")
        bcells = []
        for spec in bounds:
            res = baseline(folder, "fpzip" if spec.startswith("rel") else "zfp", spec)
            bcells.append("n/a" if res is None else f"{size / res[0]:.3f}" + ("" if res[1] else " (bound broken)"))
        abs_cells = [c for c, s in zip(bcells, bounds) if not s.startswith("rel")]
        rel_cells = [c for c, s in zip(bcells, bounds) if s.startswith("rel")]
        brows.append(f"| {name} | " + " | ".join(abs_cells + rel_cells) + " |")
        srows.append(f"| {name} | {lc:.0f} | {by.get('2^-24', (0, 0, 0))[1]:.0f} | {lr:.0f} | "
                     f"{by.get('2^-24', (0, 0, 0))[2]:.0f} | {by.get('rel:1e-2', (0, 0, 0))[2]:.0f} |")
    out = ["Ratio (original bytes / archive bytes, whole model folder) against the bound:", "", *head, *rows, ""]
    if goals:
        out.append(f"At 2^-24 on the F32 models, elves is {min(goals):.3f}x to {max(goals):.3f}x the published "
                   "ELF's ratio (the issue's goal: at least 1.07x on every model).")
        out.append("")
    if parts:
        out += ["Where the bytes go at 2^-24 (kB): elves against the published ELF, by what they code. The "
                "published ELF's zstd-3 stream is flushed after each part to attribute it, so its rows sum to "
                "a little more than its size above. Tensors are counted once (deduplicated).", "",
                "| model | part | elves kB | published ELF kB | elves / published |",
                "| --- | --- | ---: | ---: | ---: |"]
        for name, bd in parts.items():
            for cls, (ours, theirs) in bd.items():
                rel = f"{ours / theirs:.3f}" if theirs >= 1000 else "n/a"
                out.append(f"| {name} | {cls} | {ours / 1e3:.1f} | {theirs / 1e3:.1f} | {rel} |")
        out.append("")
    out += ["Other error-bounded coders on the same models (F32/F64 tensors; the rest zstd-3; identical "
            "tensors once): zfp in fixed-accuracy mode (tolerance = the absolute bound), fpzip keeping "
            "sign, exponent and k mantissa bits (2^-k <= r). n/a: not installed, or no F32/F64 tensors.", "",
            *base_head, *brows, "",
            "Speed (MB of the original model per second, file to file, all threads; a shared machine, "
            "so indicative):", "", *speed_head, *srows]
    return out


# ============================================================================ main

def machine() -> str:
    from importlib import metadata

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pk = []
    for p in ("elves", "numpy", "numba", "torch", "tokenizers", "zfpy", "fpzip", "zstandard"):
        try:
            pk.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu}, {os.cpu_count()} logical cores; {platform.platform()}; Python {platform.python_version()}; " + ", ".join(pk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS, help="datasets for the ratio table")
    ap.add_argument("--bounds", nargs="*", default=BOUNDS)
    ap.add_argument("--no-quality", action="store_true", help="skip the MiniLM embedding table")
    ap.add_argument("--write", action="store_true", help="replace the elf section of bench/RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    for b in args.bounds:
        parse_error_bound(b)
    command = "python bench/elf_bench.py " + " ".join(sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"Command: `{command.strip()}`", f"Date: {when}", f"Machine: {machine()}", ""]
    with tempfile.TemporaryDirectory(prefix="elf-bench-") as tmp:
        work = Path(tmp)
        if not args.no_quality:
            folder = DATA / "minilm"
            lines += ["### Does it hurt the model? Sentence embeddings of all-MiniLM-L6-v2", ""]
            lines += quality(folder, args.bounds, work) if folder.exists() else \
                ["(minilm not fetched: python bench/datasets.py minilm)"]
            lines.append("")
        lines += ["### Ratio against bound", ""]
        lines += ratios(args.models, args.bounds, work)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section("elf", "elf_bench.py: error-bounded lossy (ELF)", text, args.results)
        print(f"[elf_bench] wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
