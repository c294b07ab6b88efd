"""Fine-tune vs base: zstd-3, ZipNN, a reference BitX written as published, and elves --base,
side by side in one run on real base/fine-tune pairs (a benchmark, not a test).

    python bench/bitx_bench.py                 # every pair whose datasets are prepared
    python bench/bitx_bench.py --write         # also replace the bitx section of bench/RESULTS.md
    python bench/bitx_bench.py --pairs astra   # pairs whose label contains "astra"

Pairs (datasets from bench/datasets.py, see datasets.md):

- openff rc.1 -> rc.2: continued training of the OpenFF NAGL GNN (F32, torch zip)
- openff rc.3 -> 1.0.0: two layers widened (F32, torch zip)
- merlin-p1 -> astra: Astra, a heavy BF16 fine-tune of Merlin, against the first shard of Merlin's
  checkpoint (a truncated torch zip holding 443 of its 930 tensors, names prefixed state_dict.)

Methods:

- zstd-3: the fine-tune file as one zstd frame, level 3.
- zipnn: ZipNN (byte mode, the file's dominant float dtype) on the fine-tune file, standalone.
- bitx-ref: BitX as published (ZipLLM): tensors matched to the base by name (prefixes stripped),
  same dtype and byte length; XOR of the words; the exponent plane and the sign+mantissa plane
  (BF16: ``(x>>7)&0xFF`` and ``(x>>8)&0x80 | x&0x7F``; F16/F32 by their own fields) each zstd-3;
  unmatched tensors zstd-3 each, every other byte of the file in one zstd-3 frame. Its size is
  the sum of the frames (no container, which favours it). Written here with numpy, one thread.
- elves: ``elves.compress`` standalone, and ``elves.compress(..., base=BASE)``.

Ratio = fine-tune bytes / compressed bytes. "paired" = the same over the tensors that have a
base tensor of the same name, dtype and length (each unique stream once for elves). MB/s = 1e6
fine-tune bytes per second (compress; restore), file to file, page cache warm, best of a few runs.
Every method's restore is checked against the fine-tune's sha256.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bitx:begin -->", "<!-- bitx:end -->"
DATA = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets")) / "models"
THREADS = os.cpu_count() or 1

PAIRS = [
    ("openff rc.1 -> rc.2", "openff/openff-gnn-am1bcc-0.1.0-rc.1.pt", "openff/openff-gnn-am1bcc-0.1.0-rc.2.pt"),
    ("openff rc.3 -> 1.0.0", "openff/openff-gnn-am1bcc-0.1.0-rc.3.pt", "openff/openff-gnn-am1bcc-1.0.0.pt"),
    ("merlin-p1 -> astra", "merlin-p1/part.bin", "astra/astra_encoder.pt"),
]
ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        data = data.read_bytes()
    return hashlib.sha256(data).hexdigest()


# ============================================================================ tensor layout

@dataclass
class Layout:
    """A model file cut into segments (elves' readers), with each tensor segment's base match."""

    data: bytes
    segments: list  # elves.model.Segment
    match: dict[int, bytes] = field(default_factory=dict)  # segment number -> base bytes (same dtype, length)
    dominant: str | None = None


def normalize(name: str) -> str:
    from bitx.base import normalize as n
    return n(name)


def layout(ft: Path, base: Path | None) -> Layout:
    from elves.readers import read_model

    (sf,), _ = read_model(ft)
    data = ft.read_bytes()
    out = Layout(data, sf.segments)
    by_dtype: dict[str, int] = {}
    for s in sf.segments:
        if s.dtype:
            by_dtype[s.dtype] = by_dtype.get(s.dtype, 0) + s.length
    out.dominant = max(by_dtype, key=by_dtype.get) if by_dtype else None
    if base is None:
        return out
    (bf,), _ = read_model(base)
    braw = base.read_bytes()
    bmap = {}
    for t in bf.tensors:
        s = bf.segments[t.segment]
        if t.offset == 0 and s.dtype:
            bmap.setdefault(normalize(t.name), (s.dtype, braw[s.offset:s.offset + s.length]))
    for t in sf.tensors:
        s = sf.segments[t.segment]
        hit = bmap.get(normalize(t.name))
        if t.offset == 0 and s.dtype and hit and hit[0] == s.dtype and len(hit[1]) == s.length:
            out.match.setdefault(t.segment, hit[1])
    return out


# ============================================================================ reference BitX

FIELDS = {  # dtype -> (word, exponent shift, exponent mask, sign bit, mantissa mask, bytes of the sign+mantissa plane)
    "BF16": (np.uint16, 7, 0xFF, 15, 0x7F, 1),
    "F16": (np.uint16, 10, 0x1F, 15, 0x3FF, 2),
    "F32": (np.uint32, 23, 0xFF, 31, 0x7FFFFF, 3),
    "F64": (np.uint64, 52, 0x7FF, 63, 0xFFFFFFFFFFFFF, 7),
}


def bitx_split(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    word, es, em, sb, mm, nb = FIELDS[dtype]
    exp = ((x >> word(es)) & word(em)).astype(np.uint16 if em > 0xFF else np.uint8)
    mbits = int(np.log2(mm + 1))
    sm = (((x >> word(sb)) & word(1)) << word(mbits)) | (x & word(mm))
    sm = np.ascontiguousarray(sm.astype(np.uint64).view(np.uint8).reshape(-1, 8)[:, :nb])
    return exp, sm


def bitx_merge(exp: np.ndarray, sm: np.ndarray, dtype: str) -> np.ndarray:
    word, es, _, sb, mm, nb = FIELDS[dtype]
    wide = np.zeros((sm.shape[0], 8), dtype=np.uint8)
    wide[:, :nb] = sm
    smw = wide.view(np.uint64).ravel()
    mbits = int(np.log2(mm + 1))
    sign = (smw >> np.uint64(mbits)) & np.uint64(1)
    x = (sign << np.uint64(sb)) | (exp.astype(np.uint64) << np.uint64(es)) | (smw & np.uint64(mm))
    return x.astype(word)


def bitx_ref_compress(lay: Layout) -> tuple[list, int, int, int]:
    """Parts per segment, total compressed bytes, paired raw bytes, paired compressed bytes."""
    z = zstandard.ZstdCompressor(level=3)
    parts, opaque = [], bytearray()
    total = paired_raw = paired_comp = 0
    for i, s in enumerate(lay.segments):
        raw = lay.data[s.offset:s.offset + s.length]
        if s.dtype is None:
            opaque += raw
            parts.append(("opaque", s.length))
            continue
        ref = lay.match.get(i)
        if ref is None:
            blob = z.compress(raw)
            parts.append(("raw", blob))
            total += len(blob)
            continue
        if s.dtype in FIELDS and s.length % np.dtype(FIELDS[s.dtype][0]).itemsize == 0:
            word = FIELDS[s.dtype][0]
            x = np.frombuffer(raw, word) ^ np.frombuffer(ref, word)
            exp, sm = bitx_split(x, s.dtype)
            blobs = (z.compress(exp.tobytes()), z.compress(sm.tobytes()))
            parts.append(("bitx", blobs))
        else:  # other dtypes: the XORed bytes, one plane
            x = np.frombuffer(raw, np.uint8) ^ np.frombuffer(ref, np.uint8)
            blobs = (z.compress(x.tobytes()),)
            parts.append(("xor", blobs))
        n = sum(len(b) for b in blobs)
        total += n
        paired_raw += s.length
        paired_comp += n
    blob = z.compress(bytes(opaque))
    total += len(blob)
    return [parts, blob], total, paired_raw, paired_comp


def bitx_ref_restore(packed: list, lay: Layout) -> bytes:
    parts, blob = packed
    d = zstandard.ZstdDecompressor()
    opaque = d.decompress(blob)
    out, pos = [], 0
    for i, (s, (kind, p)) in enumerate(zip(lay.segments, parts)):
        if kind == "opaque":
            out.append(opaque[pos:pos + p])
            pos += p
        elif kind == "raw":
            out.append(d.decompress(p))
        elif kind == "bitx":
            word, *_, nb = FIELDS[s.dtype]
            exp = np.frombuffer(d.decompress(p[0]), np.uint16 if FIELDS[s.dtype][2] > 0xFF else np.uint8)
            sm = np.frombuffer(d.decompress(p[1]), np.uint8).reshape(-1, nb)
            x = bitx_merge(exp, sm, s.dtype) ^ np.frombuffer(lay.match[i], word)
            out.append(x.tobytes())
        else:
            out.append((np.frombuffer(d.decompress(p[0]), np.uint8) ^ np.frombuffer(lay.match[i], np.uint8)).tobytes())
    return b"".join(out)


# ============================================================================ methods

@dataclass
class Row:
    pair: str
    method: str
    ft_bytes: int
    comp_bytes: int = 0
    paired: tuple[int, int] | None = None  # raw, compressed
    comp_s: float | None = None
    restore_s: float | None = None
    note: str = ""


def best(fn: Callable[[], object], min_time: float = 1.5, repeat: int = 3) -> tuple[float, object]:
    times, result, spent = [], None, 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > min_time:
            break
    return min(times), result


def run_zstd(ft: Path, row: Row, work: Path) -> None:
    def comp():
        (work / "z.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(ft.read_bytes()))
    row.comp_s, _ = best(comp)
    row.comp_bytes = (work / "z.zst").stat().st_size

    def rest():
        (work / "z.out").write_bytes(zstandard.ZstdDecompressor().decompress((work / "z.zst").read_bytes()))
    row.restore_s, _ = best(rest)
    assert sha256(work / "z.out") == sha256(ft), "zstd restore differs"


def run_zipnn(ft: Path, dtype: str | None, row: Row, work: Path) -> None:
    try:
        import zipnn
    except ImportError:
        row.note = "zipnn not installed"
        return
    if dtype not in ZIPNN_DTYPES:
        row.note = f"no float dtype for ZipNN ({dtype})"
        return

    def comp():
        buf = bytearray(ft.read_bytes())  # a private copy: ZipNN mutates its input
        cut = len(buf) - len(buf) % ITEMSIZE[dtype]
        tail = bytes(buf[cut:])
        del buf[cut:]
        z = zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype], threads=1)
        (work / "f.znn").write_bytes(bytes([len(tail)]) + tail + z.compress(buf))
    row.comp_s, _ = best(comp)
    row.comp_bytes = (work / "f.znn").stat().st_size

    def rest():
        data = bytearray((work / "f.znn").read_bytes())
        n = data[0]
        tail = bytes(data[1:1 + n])
        del data[:1 + n]
        (work / "f.out").write_bytes(zipnn.ZipNN(input_format="byte", threads=1).decompress(data) + tail)
    row.restore_s, _ = best(rest)
    assert sha256(work / "f.out") == sha256(ft), "zipnn restore differs"


def run_bitx_ref(ft: Path, base: Path, row: Row, work: Path) -> None:
    state = {}

    def comp():
        lay = layout(ft, base)
        packed, total, praw, pcomp = bitx_ref_compress(lay)
        state.update(lay=lay, packed=packed, total=total, paired=(praw, pcomp))
    row.comp_s, _ = best(comp)
    row.comp_bytes, row.paired = state["total"], state["paired"]

    def rest():
        (work / "b.out").write_bytes(bitx_ref_restore(state["packed"], state["lay"]))
    row.restore_s, _ = best(rest)  # base bytes already in memory: favours it slightly
    assert sha256(work / "b.out") == sha256(ft), "reference BitX restore differs"


def elves_paired(archive: Path, lay: Layout) -> tuple[int, int]:
    from elves.archive import ArchiveReader

    with ArchiveReader(archive) as r:
        entry = r.files[0]
        by_seg = {}
        for t in entry["tensors"]:
            if t[3] in lay.match:
                by_seg[t[3]] = entry["segments"][t[3]]
        streams = {by_seg[k] for k in by_seg}
        return sum(r.streams[i].nbytes for i in streams), sum(r.streams[i].stored_bytes for i in streams)


def run_elves(ft: Path, base: Path | None, threads: int, row: Row, work: Path, lay: Layout) -> None:
    import elves

    arc = work / "e.elves"
    out = work / "e.out"

    def comp():
        elves.compress(ft, arc, threads=threads, force=True, base=base)
    row.comp_s, _ = best(comp)
    row.comp_bytes = arc.stat().st_size
    row.paired = elves_paired(arc, lay)

    def rest():
        elves.restore(arc, out, threads=threads, force=True, base=base)
    row.restore_s, _ = best(rest)
    assert sha256(out) == sha256(ft), "elves restore differs"


# ============================================================================ report

def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib import metadata
    pk = []
    for p in ("elves", "numpy", "numba", "zstandard", "zipnn"):
        try:
            pk.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu}, {THREADS} logical cores; {platform.platform()}; Python {platform.python_version()}; {', '.join(pk)}"


def table(rows: list[Row]) -> str:
    lines = [("| pair (base -> fine-tune) | fine-tune MB | method | ratio | paired tensors: MB, ratio | "
              "compress MB/s | restore MB/s |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.note:
            lines.append(f"| {r.pair} | {r.ft_bytes / 1e6:.1f} | {r.method} | n/a ({r.note}) | | | |")
            continue
        paired = ""
        if r.paired:
            pr = r.paired[0] / max(r.paired[1], 1)
            paired = f"{r.paired[0] / 1e6:.1f}, " + (f"{pr:.3f}" if pr < 1000 else "> 1000")
        lines.append(f"| {r.pair} | {r.ft_bytes / 1e6:.1f} | {r.method} | {r.ft_bytes / r.comp_bytes:.3f} | "
                     f"{paired} | {r.ft_bytes / r.comp_s / 1e6:.0f} | {r.ft_bytes / r.restore_s / 1e6:.0f} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    out = []
    for pair in dict.fromkeys(r.pair for r in rows):
        by = {r.method: r for r in rows if r.pair == pair and not r.note}
        ref, el = by.get("bitx-ref"), by.get(f"elves --base ({THREADS}T)") or by.get("elves --base (1T)")
        if ref and el:
            paired = ref.paired[1] / el.paired[1] if ref.paired and el.paired and el.paired[1] else None
            out.append(f"- {pair}: elves --base is {ref.comp_bytes / el.comp_bytes:.3f}x smaller than the "
                       f"reference BitX" + (f" (paired tensors: {paired:.3f}x)" if paired and paired < 1000 else ""))
    return "\n".join(out)


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else \
        "# Benchmark results\n\nWritten by the scripts in bench/; edit outside the markers.\n"
    section = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n## bitx_bench.py: fine-tunes against their base\n\n" + section + "\n"
    RESULTS.write_text(new)


def methods(ft: Path, base: Path, lay: Layout, work: Path) -> list[tuple[str, Callable[[Row], None]]]:
    """The methods, in table order, each a function filling in its row."""
    return [
        ("zstd-3", lambda r: run_zstd(ft, r, work)),
        ("zipnn", lambda r: run_zipnn(ft, lay.dominant, r, work)),
        ("bitx-ref", lambda r: run_bitx_ref(ft, base, r, work)),
        ("elves (1T)", lambda r: run_elves(ft, None, 1, r, work, lay)),
        ("elves --base (1T)", lambda r: run_elves(ft, base, 1, r, work, lay)),
        (f"elves --base ({THREADS}T)", lambda r: run_elves(ft, base, THREADS, r, work, lay)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="", help="only pairs whose label contains this")
    ap.add_argument("--write", action="store_true", help="replace the bitx section of bench/RESULTS.md")
    args = ap.parse_args()

    import elves  # warm the JIT on a tiny model, untimed
    with tempfile.TemporaryDirectory() as tmp:
        from tests.conftest import write_safetensors
        w = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
        write_safetensors(Path(tmp) / "b.safetensors", {"w": ("F32", (5000,), w.tobytes())})
        write_safetensors(Path(tmp) / "f.safetensors", {"w": ("F32", (5000,), (w * 1.001).tobytes())})
        elves.compress(Path(tmp) / "f.safetensors", Path(tmp) / "f.elves", base=Path(tmp) / "b.safetensors")
        elves.restore(Path(tmp) / "f.elves", Path(tmp) / "o", base=Path(tmp) / "b.safetensors")

    rows: list[Row] = []
    for label, base_rel, ft_rel in PAIRS:
        if args.pairs not in label:
            continue
        base, ft = DATA / base_rel, DATA / ft_rel
        if not base.exists() or not ft.exists():
            print(f"skip {label}: run `python bench/datasets.py {base_rel.split('/')[0]} {ft_rel.split('/')[0]}`")
            continue
        n = ft.stat().st_size
        lay = layout(ft, base)
        work = Path(tempfile.mkdtemp(prefix="bitx-bench-"))
        try:
            for method, run in methods(ft, base, lay, work):
                row = Row(label, method, n)
                run(row)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    report = (f"Command: `python bench/bitx_bench.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`\n"
              f"Date: {when}\nMachine: {machine()}\n\n{text}\n\n{summary(rows)}\n\n"
              + __doc__.split("Methods:", 1)[1].strip().replace("\n\n", "\n\n", 1) + "\n")
    print()
    print(report)
    if args.write:
        write_results(report)


if __name__ == "__main__":
    main()
