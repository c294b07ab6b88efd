"""Fine-tune vs base: zstd-3, ZipNN, a reference BitX written as published, and elves --base,
side by side in one run on real base/fine-tune pairs; then the whole corpus stored together under
zstd-3, ZipNN, the ZipLLM pipeline and the elves store (a benchmark, not a test).

    python bench/bitx_bench.py                 # every pair whose datasets are prepared, then the corpus
    python bench/bitx_bench.py --write         # also replace the bitx section of bench/RESULTS.md
    python bench/bitx_bench.py --pairs astra   # pairs whose label contains "astra"
    python bench/bitx_bench.py --no-pairs      # the corpus table only (--no-corpus: the pairs only)

Pairs (datasets from bench/datasets.py and bench/make_family.py, see datasets.md):

- openff rc.1 -> rc.2: continued training of the OpenFF NAGL GNN (F32, torch zip)
- openff rc.3 -> 1.0.0: two layers widened (F32, torch zip)
- merlin-p1 -> astra: Astra, a heavy BF16 fine-tune of Merlin, against the first shard of Merlin's
  checkpoint (a truncated torch zip holding 443 of its 930 tensors, names prefixed state_dict.)
- minilm -> ft-f32, lora, added-tokens, last-layers, and base-bf16 -> ft-bf16: all-MiniLM-L6-v2
  and the variants bench/make_family.py trains from it on CPU (``model.safetensors`` of each)

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

Whole corpus (``CORPUS``: the five openff versions, merlin-p1 and astra, minilm and its family),
each model a folder (a single-file model is a folder of that file), all methods on one thread,
one timed pass each, every restored file checked with sha256:

- zstd-3, zipnn: each file alone, as above (files without float tensors: zstd-3).
- ZipLLM pipeline, in ZipLLM's order: file dedup (sha256), tensor dedup (xxh3-64 of the raw
  bytes) across the corpus, BitX as above against the base ZipLLM is given by hand (``CORPUS``),
  zstd-3 on every other tensor and on each file's other bytes. Its size is the sum of the frames.
- elves store: ``Store.add(folder, name=..., base="auto")`` for each model in order (the store
  finds each base itself), ``Store.restore``; its size is every byte under the store's folder.
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
import xxhash
import zstandard
from results import RESULTS, write_section  # bench/results.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets")) / "models"
THREADS = os.cpu_count() or 1
GOAL = 1.25  # issue 3: elves --base at least this many times smaller than the reference BitX

PAIRS = [
    ("openff rc.1 -> rc.2", "openff/openff-gnn-am1bcc-0.1.0-rc.1.pt", "openff/openff-gnn-am1bcc-0.1.0-rc.2.pt"),
    ("openff rc.3 -> 1.0.0", "openff/openff-gnn-am1bcc-0.1.0-rc.3.pt", "openff/openff-gnn-am1bcc-1.0.0.pt"),
    ("merlin-p1 -> astra", "merlin-p1/part.bin", "astra/astra_encoder.pt"),
    *((f"minilm -> {v}", "minilm/model.safetensors", f"minilm-family/{v}/model.safetensors")
      for v in ("ft-f32", "lora", "added-tokens", "last-layers")),
    ("minilm base-bf16 -> ft-bf16", "minilm-family/base-bf16/model.safetensors",
     "minilm-family/ft-bf16/model.safetensors"),
]
# The whole corpus: (model name, file or folder under DATA, the base ZipLLM is given by hand). A
# model given as a file is a folder holding just that file, for every method alike.
CORPUS = [
    ("openff-0.0.1-alpha.1", "openff/openff-gnn-am1bcc-0.0.1-alpha.1.pt", None),
    ("openff-0.1.0-rc.1", "openff/openff-gnn-am1bcc-0.1.0-rc.1.pt", "openff-0.0.1-alpha.1"),
    ("openff-0.1.0-rc.2", "openff/openff-gnn-am1bcc-0.1.0-rc.2.pt", "openff-0.1.0-rc.1"),
    ("openff-0.1.0-rc.3", "openff/openff-gnn-am1bcc-0.1.0-rc.3.pt", "openff-0.1.0-rc.2"),
    ("openff-1.0.0", "openff/openff-gnn-am1bcc-1.0.0.pt", "openff-0.1.0-rc.3"),
    ("merlin-p1", "merlin-p1", None),
    ("astra", "astra", "merlin-p1"),
    ("all-MiniLM-L6-v2", "minilm", None),
    ("minilm-base-bf16", "minilm-family/base-bf16", None),
    ("minilm-ft-f32", "minilm-family/ft-f32", "all-MiniLM-L6-v2"),
    ("minilm-ft-bf16", "minilm-family/ft-bf16", "minilm-base-bf16"),
    ("minilm-lora", "minilm-family/lora", "all-MiniLM-L6-v2"),
    ("minilm-added-tokens", "minilm-family/added-tokens", "all-MiniLM-L6-v2"),
    ("minilm-last-layers", "minilm-family/last-layers", "all-MiniLM-L6-v2"),
]
ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def how_to_get(rel: str) -> str:
    name = rel.split("/")[0]
    return "python bench/make_family.py" if name == "minilm-family" else f"python bench/datasets.py {name}"


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
    matched_names: set[str] = field(default_factory=set)  # the tensors of those segments
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
            out.matched_names.add(t.name)
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


def bitx_encode(raw: bytes | memoryview, ref: bytes | memoryview, dtype: str) -> tuple[bytes, ...]:
    """BitX as published: XOR with the base tensor, then each plane zstd-3 (one plane of XORed bytes
    for dtypes without float fields, e.g. the I64 buffers)."""
    z = zstandard.ZstdCompressor(level=3)
    if dtype in FIELDS and len(raw) % np.dtype(FIELDS[dtype][0]).itemsize == 0:
        word = FIELDS[dtype][0]
        exp, sm = bitx_split(np.frombuffer(raw, word) ^ np.frombuffer(ref, word), dtype)
        return z.compress(exp.tobytes()), z.compress(sm.tobytes())
    return (z.compress((np.frombuffer(raw, np.uint8) ^ np.frombuffer(ref, np.uint8)).tobytes()),)


def bitx_decode(blobs: tuple[bytes, ...], ref: bytes | memoryview, dtype: str) -> bytes:
    d = zstandard.ZstdDecompressor()
    if len(blobs) == 1:
        return (np.frombuffer(d.decompress(blobs[0]), np.uint8) ^ np.frombuffer(ref, np.uint8)).tobytes()
    word, *_, nb = FIELDS[dtype]
    exp = np.frombuffer(d.decompress(blobs[0]), np.uint16 if FIELDS[dtype][2] > 0xFF else np.uint8)
    sm = np.frombuffer(d.decompress(blobs[1]), np.uint8).reshape(-1, nb)
    return (bitx_merge(exp, sm, dtype) ^ np.frombuffer(ref, word)).tobytes()


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
        blobs = bitx_encode(raw, ref, s.dtype)
        parts.append(("bitx", blobs))
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
        else:
            out.append(bitx_decode(p, lay.match[i], s.dtype))
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


def zipnn_pack(data: bytes, dtype: str) -> bytes:
    """ZipNN in byte mode on a private copy (it mutates its input) of the whole-element prefix; the
    0-3 tail bytes are kept raw (ZipNN 0.5.4 corrupts the heap on a partial element)."""
    import zipnn

    cut = len(data) - len(data) % ITEMSIZE[dtype]
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype], threads=1)
    return bytes([len(data) - cut]) + data[cut:] + z.compress(bytearray(data[:cut]))


def zipnn_unpack(blob: bytes) -> bytes:
    import zipnn

    n = blob[0]
    return zipnn.ZipNN(input_format="byte", threads=1).decompress(bytearray(blob[1 + n:])) + blob[1:1 + n]


def run_zipnn(ft: Path, dtype: str | None, row: Row, work: Path) -> None:
    try:
        import zipnn  # noqa: F401
    except ImportError:
        row.note = "zipnn not installed"
        return
    if dtype not in ZIPNN_DTYPES:
        row.note = f"no float dtype for ZipNN ({dtype})"
        return

    def comp():
        (work / "f.znn").write_bytes(zipnn_pack(ft.read_bytes(), dtype))
    row.comp_s, _ = best(comp)
    row.comp_bytes = (work / "f.znn").stat().st_size

    def rest():
        (work / "f.out").write_bytes(zipnn_unpack((work / "f.znn").read_bytes()))
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
        # By name: the archive numbers its segments its own way (small tensors packed together).
        entry = r.files[0]
        streams = {entry.segments[t.segment] for t in entry.tensors if t.name in lay.matched_names and t.segment >= 0}
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


# ============================================================================ whole corpus

@dataclass
class Model:
    name: str
    folder: Path
    base: str | None           # given by hand, for the ZipLLM pipeline only
    files: dict[str, str]      # relative path -> sha256


def stage_corpus(work: Path) -> tuple[list[Model], list[str]]:
    """The corpus models that are prepared, each as a folder (a model given as a file is hardlinked
    into a folder of its own), and a line for each one that is missing."""
    models, missing = [], []
    for name, rel, base in CORPUS:
        src = DATA / rel
        if not src.exists():
            missing.append(f"{name} (`{how_to_get(rel)}`)")
            continue
        folder = src
        if src.is_file():
            folder = work / "staged" / name
            folder.mkdir(parents=True)
            try:
                os.link(src, folder / src.name)
            except OSError:
                shutil.copyfile(src, folder / src.name)
        files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        models.append(Model(name, folder, base if base in {m.name for m in models} else None, files))
    return models, missing


def check_restored(model: Model, out: Path, method: str) -> None:
    got = {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    assert got == model.files, f"{method}: restore of {model.name} differs"


@dataclass
class CorpusRow:
    method: str
    stored: int = 0
    comp_s: float = 0.0
    restore_s: float = 0.0
    note: str = ""
    bases: list[str] = field(default_factory=list)  # "model <- base", as the store found them


def corpus_files(models: list[Model]):
    for m in models:
        for rel in m.files:
            yield m, rel


def run_corpus_zstd(models: list[Model], row: CorpusRow, work: Path) -> None:
    z, packed = zstandard.ZstdCompressor(level=3), {}
    t0 = time.perf_counter()
    for m, rel in corpus_files(models):
        packed[m.name, rel] = z.compress((m.folder / rel).read_bytes())
    row.comp_s, row.stored = time.perf_counter() - t0, sum(map(len, packed.values()))
    d = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    for m, rel in corpus_files(models):
        (work / "out" / m.name / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "out" / m.name / rel).write_bytes(d.decompress(packed[m.name, rel]))
    row.restore_s = time.perf_counter() - t0


def run_corpus_zipnn(models: list[Model], row: CorpusRow, work: Path) -> None:
    """ZipNN on each file with its dominant float dtype; files without float tensors zstd-3."""
    try:
        import zipnn  # noqa: F401
    except ImportError:
        row.note = "zipnn not installed"
        return
    from elves.readers import read_model

    z, d, packed = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor(), {}
    t0 = time.perf_counter()
    for m in models:
        for sf in read_model(m.folder)[0]:
            data, by_dtype = sf.path.read_bytes(), {}
            for s in sf.segments:
                if s.dtype in ZIPNN_DTYPES:
                    by_dtype[s.dtype] = by_dtype.get(s.dtype, 0) + s.length
            dtype = max(by_dtype, key=by_dtype.get) if by_dtype else None
            packed[m.name, sf.relpath] = (True, zipnn_pack(data, dtype)) if dtype else (False, z.compress(data))
    row.comp_s, row.stored = time.perf_counter() - t0, sum(len(b) for _, b in packed.values())
    t0 = time.perf_counter()
    for (name, rel), (is_zipnn, blob) in packed.items():
        (work / "out" / name / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "out" / name / rel).write_bytes(zipnn_unpack(blob) if is_zipnn else d.decompress(blob))
    row.restore_s = time.perf_counter() - t0


class ZipLLM:
    """The ZipLLM pipeline, in its order: file dedup (sha256 of the file), tensor dedup (xxh3-64 of
    the raw bytes) across everything stored, BitX of each new tensor against the tensor of the same
    name (wrapper prefixes stripped), dtype and size in the hand-given base, zstd-3 on every other
    tensor and, per file, on the bytes that are not tensors. Tensors are found by elves' readers in
    every format (ZipLLM reads safetensors only, so this favours it); one thread, numpy. Its size is
    the sum of the zstd frames: no manifests or index, which favours it too."""

    def __init__(self) -> None:
        self.z, self.d = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        self.files: dict[str, tuple[bytes, list[tuple[bool, int]]]] = {}  # sha256 -> (frame, [(is tensor, length | xxh3-64)])
        self.file_tensors: dict[str, dict[str, tuple[str, int, int]]] = {}  # sha256 -> name -> (dtype, bytes, xxh3-64)
        self.tensors: dict[int, tuple] = {}   # xxh3-64 -> ("zstd", frame) | ("bitx", frames, dtype, base xxh3-64)
        self.models: dict[str, dict[str, str]] = {}  # model -> relative path -> sha256

    def stored(self) -> int:
        return sum(len(f) for f, _ in self.files.values()) + sum(
            len(t[1]) if t[0] == "zstd" else sum(map(len, t[1])) for t in self.tensors.values())

    def tensor(self, h: int) -> bytes:
        t = self.tensors[h]
        return self.d.decompress(t[1]) if t[0] == "zstd" else bitx_decode(t[1], self.tensor(t[3]), t[2])

    def add(self, model: Model) -> None:
        from elves.readers import read_model

        base = {}
        for digest in (self.models[model.base].values() if model.base else ()):
            base.update(self.file_tensors[digest])
        self.models[model.name] = {}
        for sf in read_model(model.folder)[0]:
            data = sf.path.read_bytes()
            digest = sha256(data)
            self.models[model.name][sf.relpath] = digest
            if digest in self.files:
                continue
            names = {t.segment: normalize(t.name) for t in sf.tensors if t.offset == 0}
            view, opaque, segs, found = memoryview(data), bytearray(), [], {}
            for i, s in enumerate(sf.segments):
                raw = view[s.offset:s.offset + s.length]
                if s.dtype is None:
                    opaque += raw
                    segs.append((False, s.length))
                    continue
                h = xxhash.xxh3_64_intdigest(raw)
                segs.append((True, h))
                if i in names:
                    found[names[i]] = (s.dtype, s.length, h)
                if h in self.tensors:
                    continue
                ref = base.get(names.get(i))
                if ref and ref[:2] == (s.dtype, s.length):
                    self.tensors[h] = ("bitx", bitx_encode(raw, self.tensor(ref[2]), s.dtype), s.dtype, ref[2])
                else:
                    self.tensors[h] = ("zstd", self.z.compress(raw))
            self.files[digest] = (self.z.compress(bytes(opaque)), segs)
            self.file_tensors[digest] = found

    def restore(self, name: str, out: Path) -> None:
        for rel, digest in self.models[name].items():
            frame, segs = self.files[digest]
            opaque, pos, parts = self.d.decompress(frame), 0, []
            for is_tensor, v in segs:
                if is_tensor:
                    parts.append(self.tensor(v))
                else:
                    parts.append(opaque[pos:pos + v])
                    pos += v
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"".join(parts))


def run_corpus_zipllm(models: list[Model], row: CorpusRow, work: Path) -> None:
    z = ZipLLM()
    t0 = time.perf_counter()
    for m in models:
        z.add(m)
    row.comp_s, row.stored = time.perf_counter() - t0, z.stored()
    t0 = time.perf_counter()
    for m in models:
        z.restore(m.name, work / "out" / m.name)
    row.restore_s = time.perf_counter() - t0


def run_corpus_store(models: list[Model], row: CorpusRow, work: Path) -> None:
    """The elves store on one thread, each model added with its base found by the store (``base="auto"``)."""
    from elves.store import Store

    path = work / "store"
    Store.init(path)
    store = Store(path)
    t0 = time.perf_counter()
    for m in models:
        found = store.add(m.folder, name=m.name, base="auto", threads=1).base
        if found:
            row.bases.append(f"{m.name} <- {found}")
    row.comp_s = time.perf_counter() - t0
    row.stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    (work / "out").mkdir()
    t0 = time.perf_counter()
    for m in models:
        store.restore(m.name, work / "out" / m.name, threads=1)
    row.restore_s = time.perf_counter() - t0


CORPUS_METHODS: list[tuple[str, Callable[[list[Model], CorpusRow, Path], None]]] = [
    ("zstd-3", run_corpus_zstd),
    ("zipnn", run_corpus_zipnn),
    ("ZipLLM pipeline", run_corpus_zipllm),
    ("elves store", run_corpus_store),
]


def corpus(work: Path) -> tuple[str, list[CorpusRow]]:
    """Markdown: the whole-corpus table; every restore checked file by file with sha256."""
    models, missing = stage_corpus(work)
    total = sum((m.folder / rel).stat().st_size for m, rel in corpus_files(models))
    rows = []
    for method, run in CORPUS_METHODS:
        row = CorpusRow(method)
        run(models, row, work)
        if not row.note:
            for m in models:
                check_restored(m, work / "out" / m.name, method)
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(work / "store", ignore_errors=True)
        rows.append(row)
        print(f"corpus {method}: {row.note or f'{row.stored / 1e6:.1f} MB'}", flush=True)
    zipllm = next((r.stored for r in rows if r.method == "ZipLLM pipeline" and not r.note), 0)
    nfiles = sum(len(m.files) for m in models)
    lines = [f"{len(models)} models, {nfiles} files, {total / 1e6:.1f} MB: " + ", ".join(m.name for m in models)
             + (f". Missing: {', '.join(missing)}" if missing else ""), "",
             "| method | stored MB | ratio | ZipLLM size / this size | compress MB/s | restore MB/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.note:
            lines.append(f"| {r.method} | n/a ({r.note}) | | | | |")
            continue
        lines.append(f"| {r.method} | {r.stored / 1e6:.1f} | {total / r.stored:.3f} | "
                     f"{zipllm / r.stored:.3f} | {total / r.comp_s / 1e6:.0f} | {total / r.restore_s / 1e6:.0f} |")
    hand = [f"{m.name} <- {m.base}" for m in models if m.base]
    lines += ["", f"ZipLLM's bases, given by hand: {', '.join(hand) or 'none'}."]
    lines += [f"The store's bases, found by itself: {', '.join(r.bases) or 'none'}." for r in rows if r.bases]
    return "\n".join(lines), rows


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
        ref, el = by.get("bitx-ref"), by.get("elves --base (1T)")
        if ref and el:
            gain = ref.comp_bytes / el.comp_bytes
            paired = ref.paired[1] / el.paired[1] if ref.paired and el.paired and el.paired[1] else None
            out.append(f"- {pair}: elves --base is {gain:.3f}x smaller than the reference BitX"
                       + (f" (paired tensors: {paired:.3f}x)" if paired and paired < 1000 else "")
                       + ("" if gain >= GOAL else f", under the {GOAL}x goal")
                       + f"; one thread, compress {ref.comp_s / el.comp_s:.2f}x and restore "
                       f"{ref.restore_s / el.restore_s:.2f}x the reference's MB/s")
    return "\n".join(out)


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
    ap.add_argument("--no-pairs", action="store_true", help="skip the pairs table")
    ap.add_argument("--no-corpus", action="store_true", help="skip the whole-corpus table")
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
    for label, base_rel, ft_rel in [] if args.no_pairs else PAIRS:
        if args.pairs not in label:
            continue
        base, ft = DATA / base_rel, DATA / ft_rel
        todo = dict.fromkeys(how_to_get(rel) for rel in (base_rel, ft_rel) if not (DATA / rel).exists())
        if todo:
            print(f"skip {label}: run {' and '.join(f'`{t}`' for t in todo)}")
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
    parts = []
    if rows:
        parts += [table(rows), summary(rows)]
    if not args.no_corpus:
        work = Path(tempfile.mkdtemp(prefix="bitx-corpus-"))
        try:
            parts.append("Whole corpus, every model stored together:\n\n" + corpus(work)[0])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    report = (f"Command: `python bench/bitx_bench.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`\n"
              f"Date: {when}\nMachine: {machine()}\n\n" + "\n\n".join(parts) + "\n\n"
              + __doc__.split("Methods:", 1)[1].strip() + "\n")
    print()
    print(report)
    if args.write:
        write_section("bitx", "bitx_bench.py: fine-tunes against their base", report, RESULTS)


if __name__ == "__main__":
    main()
