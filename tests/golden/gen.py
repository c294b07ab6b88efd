"""Writes the golden fixtures of one format version WITH THE elves OF THAT VERSION.

The fixtures are archives that old elves releases wrote; tests/test_golden.py restores them with
the current elves and compares every restored file with the sha256 recorded here. Run this only to
add a version (never to refresh an existing one: that would hide a reader that broke), from a
worktree of the commit that wrote the version, so that ``import elves`` is the old code:

    git -C /work/main worktree add /tmp/elves-v10 dd496bb    # last commit writing format 1.0
    cd /tmp/elves-v10 && PYTHONPATH=/tmp/elves-v10 python /work/main/tests/golden/gen.py 1.0 /work/main/tests/golden
    git -C /work/main worktree remove /tmp/elves-v10

Versions and their commits (``elves/archive.py``'s FORMAT_VERSION):

- ``1.0``  dd496bb, the last commit writing format 1.0 (17973bb and its parent 1ab9f19 already
  write 1.1 headers): planes/rANS tensors of F32, BF16, F16, I32, a zstd config.json, a folder
  whose two shards share tensors and a file (dedup).
- ``1.1a`` 605c6ef, the first 1.1 writer with a working ELF (65ef98c, which brought BitX, does
  not import: its encoder names an ELF function that was committed later), and
- ``1.1``  3d4f1b4, the last 1.1 writer (ELF palettes, ranked BitX): each a fine-tune coded
  against its base (the base committed as an archive of the same version) and an ELF lossy file.
- ``1.2``  1df4728, the first 1.2 writer: a lossy folder of two releases of one model, whose
  second release's tensors are coded against the first's (in-archive ``ref``).
- ``1.3``  the first 1.3 writer (issue 10): a folder holding symbolic links to a file and to a
  folder inside it, stored as links (format ``symlink``), and a PyTorch checkpoint whose tensors
  are strided views of one storage.
- ``1.4``  the first 1.4 writer (issue 11): a lossless folder of an F32 model, its BF16 copy (a few
  elements changed after the cast) and a fine-tuned second version (``ref_cast``, ``xor`` with
  ``ref``); and a BF16 release coded against the cast of its F32 base (``ref_cast`` by content).
- ``1.5``  the first 1.5 writer (issue 14): small tensors packed into bytes streams with the
  structure between them (a safetensors file of small tensors between large
  ones, a checkpoint with small storages and a strided view of one).

Every model is synthetic (numpy's PCG64 with fixed seeds) and small: all fixtures together stay
under 150 KB. The manifest (manifest.json, one entry per archive) records, per restored file, the
sha256 of the source file (lossless) or of what this elves decoded (lossy), the sha256 of every
tensor ``get_tensor`` returns, and the codec ids and index features the archive must hold (so a
fixture that silently stopped exercising, say, ``xor`` is noticed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import zstandard

import elves
from elves.archive import FORMAT_VERSION

NP = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "I32": np.int32, "I64": np.int64}


def weights(dtype: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Weight-like values: normal * scale for floats, small token ids for integers."""
    n = int(np.prod(shape))
    if dtype.startswith("I"):
        return rng.integers(0, 30522, n).astype(NP[dtype]).reshape(shape)
    return (rng.standard_normal(n) * scale).astype(NP[dtype]).reshape(shape)


def fine_tune(a: np.ndarray, rng: np.random.Generator, frac: float = 0.3, step: float = 1e-3) -> np.ndarray:
    """``a`` with a fraction of its elements moved a little (relative ``step``), as a short fine-tune leaves it."""
    x = a.astype(np.float64).ravel()
    hit = rng.random(x.size) < frac
    x[hit] += rng.standard_normal(int(hit.sum())) * step * np.abs(x[hit])
    return x.astype(a.dtype).reshape(a.shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, pos = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        dt = {np.dtype(v): k for k, v in NP.items()}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(blobs))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def links(root: Path) -> dict[str, str]:
    """Every symbolic link under ``root`` and its text."""
    return {p.relative_to(root).as_posix(): os.readlink(p) for p in sorted(root.rglob("*")) if p.is_symlink()}


def tree(root: Path) -> dict[str, str]:
    if root.is_file():
        return {".": sha(root.read_bytes())}
    return {p.relative_to(root).as_posix(): sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def index_features(archive: Path) -> dict[str, object]:
    """What the archive's index holds, read by hand: header version, codec ids, refs."""
    data = archive.read_bytes()
    major, minor = struct.unpack_from("<HH", data, 8)
    off, length = struct.unpack_from("<QQ", data, 16)
    index = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[off:off + length]), raw=False)
    codecs = sorted({c["id"] for s in index["streams"] for c in s["pipeline"]})
    return {"header_version": [major, minor], "codecs": codecs,
            "refs": sum(1 for s in index["streams"] if s.get("ref") is not None),
            "deduped": sum(len(f["segments"]) for f in index["files"]) - len(index["streams"]),
            "packed": packed_tensors(index)}


def packed_tensors(index: dict) -> int:
    """Tensor entries that point into a bytes stream (1.5: packed with other small segments)."""
    return sum(1 for f in index["files"] for t in f["tensors"]
               if t[3] >= 0 and index["streams"][f["segments"][t[3]]]["kind"] == "bytes")


class Writer:
    def __init__(self, version: str, out: Path, work: Path):
        self.version, self.out, self.work = version, out, work
        self.entries: dict[str, dict] = {}

    def model(self, name: str, files: dict[str, dict[str, np.ndarray] | bytes]) -> Path:
        """A folder of safetensors files (dicts) and opaque files (bytes); a single file when
        ``files`` has one entry called ``.``."""
        root = self.work / name
        if list(files) == ["."]:
            write_safetensors(root, files["."])
            return root
        root.mkdir()
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (root / rel).write_bytes(content)
            else:
                write_safetensors(root / rel, content)
        return root

    def archive(self, name: str, src: Path, *, lossless: bool = True, base: str | None = None, **kw) -> Path:
        dst = self.out / f"v{self.version}-{name}.elves"
        base_path = self.out / self.entries[base]["archive"] if base else None
        elves.compress(src, dst, base=base_path, **kw) if base else elves.compress(src, dst, **kw)
        restored = self.work / f"restored-{name}"
        elves.restore(dst, restored, base=base_path) if base else elves.restore(dst, restored)
        files = tree(restored)
        if lossless:
            assert files == tree(src), f"{name}: this elves does not restore its own archive bit-exactly"
        opened = elves.open(dst, base=base_path) if base else elves.open(dst)
        with opened as a:
            tensors = {k: sha(np.ascontiguousarray(a.get_tensor(k)).tobytes()) for k in a.keys()}
        self.entries[name] = {"archive": dst.name, "version": self.version, "writer": elves.__version__,
                              "lossless": lossless, "base": self.entries[base]["archive"] if base else None,
                              "files": files, "tensors": tensors, **index_features(dst)}
        if links(src) if src.is_dir() else {}:
            assert links(restored) == links(src), f"{name}: links did not come back as links"
            self.entries[name]["links"] = links(src)
        return dst


def v1_0(w: Writer, rng: np.random.Generator) -> None:
    w.archive("tensors", w.model("tensors.safetensors", {".": {
        "embed.weight": weights("F32", (32, 32), rng),
        "attn.q.weight": weights("BF16", (32, 48), rng),
        "mlp.up.weight": weights("F16", (32, 32), rng),
        "position_ids": weights("I32", (1, 128), rng),
    }}))
    shared = weights("BF16", (32, 32), rng)
    tied = weights("F32", (16, 32), rng)
    config = json.dumps({"architectures": ["Synthetic"], "hidden_size": 32, "vocab_size": 64}, indent=2).encode()
    shard = {"layer.0.weight": shared, "lm_head.weight": tied, "embed.weight": tied}
    w.archive("folder", w.model("folder", {
        "config.json": config,
        "model-00001-of-00002.safetensors": shard,
        "model-00002-of-00002.safetensors": {"layer.1.weight": shared, "norm.weight": weights("F16", (32,), rng)},
        "copy/model-00001-of-00002.safetensors": shard,
    }))


def v1_1(w: Writer, rng: np.random.Generator) -> None:
    base = {"embed.weight": weights("BF16", (32, 32), rng), "layer.0.weight": weights("F32", (32, 16), rng),
            "norm.weight": weights("F32", (32,), rng, scale=1.0)}
    tuned = {k: fine_tune(a, rng) for k, a in base.items()}
    tuned["norm.weight"] = base["norm.weight"]  # an unchanged tensor: empty delta payloads
    w.archive("base", w.model("base", {"model.safetensors": base}))
    w.archive("delta", w.model("tuned", {"model.safetensors": tuned}), base="base")
    w.archive("lossy", w.model("lossy.safetensors", {".": {
        "w.f32": weights("F32", (32, 32), rng), "w.bf16": weights("BF16", (32, 16), rng),
        "w.f16": weights("F16", (16, 32), rng), "ids": weights("I64", (32,), rng),
    }}), lossless=False, lossy="elf", error_bound="2^-12")


def v1_2(w: Writer, rng: np.random.Generator) -> None:
    v1 = {"embed.weight": weights("F32", (32, 32), rng), "layer.0.weight": weights("F32", (32, 24), rng)}
    v2 = {k: fine_tune(a, rng, frac=1.0) for k, a in v1.items()}
    w.archive("versions", w.model("versions", {"model-v1.safetensors": v1, "model-v2.safetensors": v2}),
              lossless=False, lossy="elf", error_bound="2^-16")


def v1_3(w: Writer, rng: np.random.Generator) -> None:
    import torch

    src = w.model("links", {"model.safetensors": {"embed.weight": weights("F32", (32, 32), rng)},
                            "sub/config.json": json.dumps({"hidden_size": 32}).encode()})
    (src / "weights.safetensors").symlink_to("model.safetensors")
    (src / "config").symlink_to("sub")
    w.archive("links", src)
    ck = w.work / "checkpoint"
    ck.mkdir()
    g = torch.Generator().manual_seed(13)
    m = torch.randn(24, 16, generator=g) * 0.02
    torch.save({"w": m, "w_t": m.T, "col": m[:, 3], "b": torch.zeros(16)}, ck / "pytorch_model.bin")
    w.archive("checkpoint", ck)


def v1_4(w: Writer, rng: np.random.Generator) -> None:
    f32 = {"embed.weight": weights("F32", (16, 16), rng), "layer.0.weight": weights("F32", (16, 12), rng)}
    bf16 = {k: a.astype(ml_dtypes.bfloat16) for k, a in f32.items()}
    bf16["embed.weight"].reshape(-1)[:5] = bf16["embed.weight"].reshape(-1)[:5] * 2  # exceptions
    w.archive("precisions", w.model("precisions", {
        "model.safetensors": f32, "model.bf16.safetensors": bf16,
        "model-v2.safetensors": {k: fine_tune(a, rng, frac=0.2) for k, a in f32.items()}}))
    w.archive("base", w.model("base", {"model.safetensors": f32}))
    w.archive("cast-delta", w.model("release", {"model.safetensors": {k: a.astype(ml_dtypes.bfloat16)
                                                                      for k, a in f32.items()}}), base="base")


def v1_5(w: Writer, rng: np.random.Generator) -> None:
    import torch

    # Small tensors between large ones: the header and each run of small ones packed into one
    # bytes stream, their entries pointing into it; a checkpoint's small storages with the
    # zip records between them likewise, one of them a strided view.
    w.archive("packed", w.model("packed.safetensors", {".": {
        "embed.weight": weights("F32", (32, 64), rng),
        "layer.0.bias": weights("F32", (64,), rng),
        "layer.0.norm": weights("BF16", (64,), rng, scale=1.0),
        "layer.0.weight": weights("F16", (64, 32), rng),
        "position_ids": weights("I64", (1, 7), rng),
        "scale": weights("F32", (), rng),
        "layer.1.weight": weights("BF16", (32, 64), rng),
    }}))
    ck = w.work / "small-checkpoint"
    ck.mkdir()
    g = torch.Generator().manual_seed(15)
    m = torch.randn(12, 8, generator=g) * 0.02
    torch.save({"w": torch.randn(64, 32, generator=g), "small": m, "small_t": m.T, "b": torch.ones(8),
                "ids": torch.arange(5)}, ck / "pytorch_model.bin")
    w.archive("packed-checkpoint", ck)


def main() -> None:
    version, out = sys.argv[1], Path(sys.argv[2]).resolve()
    want = {"1.0": (1, 0), "1.1a": (1, 1), "1.1": (1, 1), "1.2": (1, 2), "1.3": (1, 3), "1.4": (1, 4), "1.5": (1, 5)}[version]
    assert tuple(FORMAT_VERSION) == want, f"this elves ({elves.__file__}) writes {FORMAT_VERSION}, not {want}"
    rng = np.random.default_rng(10 + list(want)[1] * 100 + len(version))
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        w = Writer(version, out, Path(tmp))
        {"1.0": v1_0, "1.1a": v1_1, "1.1": v1_1, "1.2": v1_2, "1.3": v1_3, "1.4": v1_4, "1.5": v1_5}[version](w, rng)
    for name, entry in w.entries.items():
        manifest[f"v{version}-{name}"] = entry
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    shutil.rmtree(out / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
