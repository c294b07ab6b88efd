"""Model files that are neither safetensors, torch nor ONNX (issue 14): elves against zstd-3 and
ZipNN on CTranslate2 model.bin files, GGUF files, and opaque files that hold float arrays.

    python bench/opaque_bench.py          # prints the markdown table (datasets.md: whisper-ct2,
                                          # minilm-ct2, minilm-gguf, minilm)

Per file, one thread each, every restore checked against the file's sha256:

- elves: ``elves.compress`` (the GGUF and CTranslate2 readers; float runs in an opaque file);
  compress CPU seconds (process time).
- zstd-3: the file as one zstd frame, level 3.
- ZipNN: byte mode on a copy of the same bytes, in pieces of 64 MiB of whole elements, the tail
  bytes kept raw; as float32, float16 and bfloat16, the best of the three reported.

"opaque" files: ``whisper.dat`` is the Whisper model.bin under a name no reader claims, so its
floats are found by the float-run search alone; ``container.dat`` is minilm's weights in a
made-up container (a JSON header, 3 MiB of float32, the vocabulary, float16 and bfloat16 casts),
as tests/test_float_runs.py builds it. Ratio = file bytes / compressed bytes; "bar" says whether
elves is at least the best of zstd-3 and ZipNN.
"""
from __future__ import annotations

import datetime
import hashlib
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
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import elves
from bench.datasets import DATA_ROOT

PIECE = 64 << 20
ZIPNN = {"float32": 4, "float16": 2, "bfloat16": 2}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zipnn_ratio(data: bytes) -> tuple[float, str]:
    import zipnn

    best = (0.0, "")
    for dtype, width in ZIPNN.items():
        total, out = 0, []
        for off in range(0, len(data), PIECE):
            piece = data[off:off + PIECE]
            n = len(piece) // width * width
            blob = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1).compress(bytearray(piece[:n]))
            total += len(blob) + len(piece) - n
            out.append(bytes(zipnn.ZipNN(input_format="byte", threads=1).decompress(bytearray(blob))) + piece[n:])
        assert sha(b"".join(out)) == sha(data), f"zipnn {dtype} restore differs"
        best = max(best, (len(data) / total, dtype))
    return best


def elves_ratio(path: Path, work: Path) -> tuple[float, float]:
    archive = work / "x.elves"
    t = time.process_time()
    summary = elves.compress(path, archive, threads=1, force=True)
    cpu = time.process_time() - t
    elves.restore(archive, work / "out", threads=1, force=True)
    assert sha((work / "out").read_bytes()) == sha(path.read_bytes()), f"elves restore differs: {path}"
    return summary.ratio, cpu


def container(minilm: Path, dst: Path) -> Path:
    import ml_dtypes

    raw = (minilm / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    weights = np.frombuffer(raw[8 + n:], np.float32)
    header = b"MYFMT\x01" + json.dumps({"layers": 6, "names": sorted(json.loads(raw[8:8 + n]))}).encode()
    parts = [header, weights[: 3 << 18].tobytes(), (minilm / "vocab.txt").read_bytes(), b"\x07",
             weights[3 << 18: 4 << 18].astype(np.float16).tobytes(),
             weights[4 << 18: 5 << 18].astype(ml_dtypes.bfloat16).tobytes(), b"end"]
    dst.write_bytes(b"".join(parts))
    return dst


def files(work: Path) -> list[tuple[str, Path]]:
    models = DATA_ROOT / "models"
    out = [("whisper-ct2/model.bin (FP16)", models / "whisper-ct2" / "model.bin")]
    out += [(f"minilm-ct2/{q}/model.bin", models / "minilm-ct2" / q / "model.bin")
            for q in ("float32", "float16", "int8_float16")]
    out += [(f"minilm-gguf/minilm-{k}.gguf", models / "minilm-gguf" / f"minilm-{k}.gguf")
            for k in ("f32", "f16", "bf16", "q8_0", "q4_0")]
    whisper = work / "whisper.dat"
    shutil.copyfile(models / "whisper-ct2" / "model.bin", whisper)
    out += [("whisper.dat (model.bin renamed)", whisper),
            ("container.dat (minilm in a made-up format)", container(models / "minilm", work / "container.dat"))]
    return out


def main() -> int:
    rows = ["| file | read as | MB | elves | zstd-3 | ZipNN (as) | bar | elves compress CPU s |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, path in files(work):
            data = path.read_bytes()
            e, cpu = elves_ratio(path, work)
            fmt = elves.info(work / "x.elves").files[0]["format"]
            z = len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))
            zn, as_ = zipnn_ratio(data)
            bar = "yes" if e >= max(z, zn) else f"no ({e / max(z, zn) - 1:+.2%})"
            rows.append(f"| {label} | {fmt} | {len(data) / 1e6:.1f} | {e:.4f} | {z:.4f} | {zn:.4f} ({as_}) | {bar} | "
                        f"{cpu:.2f} |")
            print(rows[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\nCommand: `python bench/opaque_bench.py`. Date: {datetime.date.today()}. Machine: {cpu}, "
          f"{os.cpu_count()} logical cores; Python {platform.python_version()}.\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
