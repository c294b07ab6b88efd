"""The fuzzer's seeds: tiny real inputs of every kind elves reads, made with the current elves
from synthetic weights, and what each must give back.

Kept tiny (a few KB each) so that one case, every operation on one forged input, takes tens of
milliseconds.
"""
from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .worker import file_digests, tensor_digest

NP = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "I64": np.int64, "U8": np.uint8}


@dataclass
class Seed:
    name: str
    kind: str                  # "archive", "store" or "input" (a model file given to compress)
    path: Path
    expect: dict[str, Any] = field(default_factory=dict)
    base: Path | None = None   # the (unforged) base model a --base archive needs


def weights(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape))
    if dtype in ("I64", "U8"):
        return rng.integers(0, 200, n).astype(NP[dtype]).reshape(shape)
    return (rng.standard_normal(n) * 0.02).astype(NP[dtype]).reshape(shape)


def tuned(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = a.astype(np.float64)
    return (x + rng.standard_normal(x.shape) * 1e-3 * np.abs(x)).astype(a.dtype)


def safetensors_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    header, pos = {}, 0
    for name, a in tensors.items():
        dt = {np.dtype(v): k for k, v in NP.items()}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(np.ascontiguousarray(a).tobytes()
                                                                       for a in tensors.values()))
    return path


def folder(path: Path, files: dict[str, dict[str, np.ndarray] | bytes]) -> Path:
    path.mkdir()
    for rel, content in files.items():
        if isinstance(content, bytes):
            (path / rel).write_bytes(content)
        else:
            safetensors_file(path / rel, content)
    return path


def archive_seed(name: str, src: Path, root: Path, base: Path | None = None, **kw: Any) -> Seed:
    """Compress ``src``; the seed expects what restoring the unforged archive gives (the source's
    bytes, or for a lossy archive what decoding yields)."""
    import elves

    dst = root / f"{name}.elves"
    elves.compress(src, dst, base=base, threads=2, **kw)
    out = root / f"{name}.restored"
    elves.restore(dst, out, base=base, threads=2)
    files = file_digests(out)
    if not kw.get("lossy"):
        assert files == file_digests(src), name
    with elves.open(dst, base=base) as a:
        tensors = {k: tensor_digest(a.get_tensor(k)) for k in a.keys()}
    return Seed(name, "archive", dst, {"files": files, "tensors": tensors}, base)


def torch_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    import torch

    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)
    return path


def zip_bomb(path: Path, inflated: int) -> Path:
    """A torch-style zip whose data.pkl inflates to ``inflated`` bytes of zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("archive/data.pkl", "w", force_zip64=True) as f:
        block = b"\0" * (16 << 20)
        for _ in range(inflated // len(block)):
            f.write(block)
    return path


def build(root: Path) -> list[Seed]:
    """Every seed, written under ``root``."""
    import elves  # noqa: F401
    from elves.store import Store

    rng = np.random.default_rng(1234)
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    src.mkdir()
    seeds = []
    plain = {"a.f32": weights("F32", (40, 50), rng), "b.bf16": weights("BF16", (30, 40), rng),
             "c.f16": weights("F16", (20, 30), rng), "ids": weights("I64", (3, 7), rng)}
    one = safetensors_file(src / "one.safetensors", plain)
    seeds.append(archive_seed("planes", one, root))
    shared = weights("BF16", (16, 64), rng)
    config = json.dumps({"architectures": ["Fuzz"], "hidden_size": 16}, indent=1).encode() * 8
    seeds.append(archive_seed("folder", folder(src / "folder", {
        "config.json": config, "x.safetensors": {"w": shared, "n": weights("F32", (16,), rng)},
        "y.safetensors": {"w2": shared, "u": weights("U8", (5, 5), rng)}}), root))
    base_t = {"emb": weights("BF16", (32, 80), rng), "proj": weights("F32", (32, 40), rng),
              "norm": weights("F32", (32,), rng)}
    base = folder(src / "base", {"model.safetensors": base_t})
    ft_t = {"emb": tuned(base_t["emb"], rng), "proj": tuned(base_t["proj"], rng), "norm": base_t["norm"]}
    ft = folder(src / "ft", {"model.safetensors": ft_t})
    seeds.append(archive_seed("xor", ft, root, base=base))
    seeds.append(archive_seed("elf", one, root, lossy="elf", error_bound="2^-12"))
    v1 = {"l0": weights("F32", (32, 32), rng), "l1": weights("F16", (32, 64), rng)}
    seeds.append(archive_seed("refs", folder(src / "versions", {
        "v1.safetensors": v1, "v2.safetensors": {k: tuned(a, rng) for k, a in v1.items()}}), root,
        lossy="elf", error_bound="2^-16"))
    # Gates of a recurrent layer stored in another order (PyTorch i,f,g,o vs ONNX i,o,f,g), 4 KiB
    # each: the second file's stream references the first through a ref_map.
    gates = [weights("F32", (32, 32), rng) for _ in range(4)]
    seeds.append(archive_seed("ref_map", folder(src / "gates", {
        "a.safetensors": {"rnn": np.concatenate(gates)},
        "b.safetensors": {"lstm": np.concatenate([gates[0], gates[3], gates[1], tuned(gates[2], rng)])}}), root,
        lossy="elf", error_bound="2^-24"))
    # A model beside its BF16 copy and a later version (format 1.4: ref_cast, xor with ref), and a
    # BF16 release coded against the cast of its base.
    f32 = {"l0": weights("F32", (64, 48), rng), "l1": weights("F32", (48, 48), rng)}  # BF16 over 4 KiB: objects
    half = {k: a.astype(ml_dtypes.bfloat16) for k, a in f32.items()}
    seeds.append(archive_seed("casts", folder(src / "precisions", {
        "model.safetensors": f32, "model.bf16.safetensors": half,
        "model-v2.safetensors": {k: tuned(a, rng) for k, a in f32.items()}}), root))
    f32_base = folder(src / "f32", {"model.safetensors": f32})
    release = folder(src / "release", {"model.safetensors": half})
    seeds.append(archive_seed("cast_xor", release, root, base=f32_base))
    store = Store.init(root / "hub.store")
    store.add(base, "base", base=None, threads=2)
    store.add(ft, "ft", base="base", threads=2)
    store.add(f32_base, "f32", base=None, threads=2)
    store.add(release, "release", base="f32", threads=2)  # objects coded against casts
    seeds.append(Seed("store", "store", root / "hub.store",
                      {"models": {"base": file_digests(base), "ft": file_digests(ft), "f32": file_digests(f32_base),
                                  "release": file_digests(release)}}))
    seeds.append(Seed("safetensors", "input", one))
    try:
        seeds.append(Seed("torch", "input", torch_checkpoint(src / "model.bin", {k: v for k, v in plain.items()
                                                                             if k != "b.bf16"})))
        # An archive of a checkpoint whose tensors are views of one storage (a transpose, a
        # column): its tensor entries are checked against the pickle restored from the archive.
        import torch

        w = torch.from_numpy(plain["a.f32"].copy())
        (src / "ckpt").mkdir()
        torch.save({"w": w, "wt": w.T, "col": w[:, 3], "ids": torch.from_numpy(plain["ids"].copy())},
                   src / "ckpt" / "pytorch_model.bin")
        seeds.append(archive_seed("torch_archive", src / "ckpt", root))
    except ImportError:  # torch writes the zip checkpoints; elves reads them without it
        pass
    seeds.append(Seed("zip_bomb", "input", zip_bomb(src / "bomb.bin", 1 << 30)))
    return seeds
