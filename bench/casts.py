"""A model beside its copy at lower precision: what the copy costs in an archive and in a store.

    python bench/casts.py                      # minilm (F32) and its BF16 cast, as torch makes it
    PYTHONPATH=/tmp/old python bench/casts.py  # the same with an older elves (a git worktree)

The copy is what `model.to(torch.bfloat16)` saves; Hub repos ship such copies beside the F32
weights (`model.safetensors` and `model.bf16.safetensors`), or as a release of their own. Prints
what the copy adds to an archive that holds both, and to a store that holds the F32 model first.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import elves
from elves.store import Store
from compare import load_datasets_module  # bench/compare.py, beside this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", nargs="?", default="minilm", help="a prepared dataset with model.safetensors")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    src = load_datasets_module().DATA_ROOT / "models" / args.dataset
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = load_file(str(src / "model.safetensors"))
        folder = work / "folder"
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
                  str(folder / "model.bf16.safetensors"))
        copy = (folder / "model.bf16.safetensors").stat().st_size
        t = time.perf_counter()
        both = elves.compress(folder, work / "both.elves", threads=args.threads)
        seconds = time.perf_counter() - t
        alone = elves.compress(folder / "model.safetensors", work / "f32.elves", threads=args.threads)
        print(f"elves {elves.__file__}")
        print(f"archive: F32 {alone.archive_bytes} bytes alone; with its BF16 copy ({copy} bytes) "
              f"{both.archive_bytes}: the copy costs {both.archive_bytes - alone.archive_bytes} bytes "
              f"({copy / max(both.archive_bytes - alone.archive_bytes, 1):.1f}x); compress {seconds:.1f} s")
        f32 = shutil.copytree(src, work / args.dataset)
        bf16 = shutil.copytree(src, work / f"{args.dataset}-bf16", ignore=shutil.ignore_patterns("model.safetensors"))
        shutil.copy(folder / "model.bf16.safetensors", bf16 / "model.safetensors")
        store = Store.init(work / "store")
        store.add(f32, threads=args.threads)
        before = store.stats().stored_bytes
        r = store.add(bf16, threads=args.threads)
        added = store.stats().stored_bytes - before
        print(f"store: {args.dataset}, then its BF16 copy (base {r.base}): the copy adds {added} bytes "
              f"for {copy} ({copy / max(added, 1):.1f}x)")


if __name__ == "__main__":
    main()
