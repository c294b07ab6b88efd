"""Writes payloads.json, the golden payloads of every codec, WITH THE elves THAT WROTE THEM.

tests/test_codec_conformance.py decodes each payload with the current elves, and encodes its
input again, expecting the same bytes. Run this only to add a case (never to refresh one: that
would hide a codec whose bytes changed), with the elves of the commit that introduced the case:

    mkdir /tmp/elves-old && git -C /work/main archive 3300cc6 | tar -x -C /tmp/elves-old
    cd /tmp && PYTHONPATH=/tmp/elves-old python /work/main/tests/golden/codecs/gen.py

The cases of 3300cc6 (the last commit before the codec layer was split by kind): ``planes`` +
``rans`` for every dtype, ``rans`` with other lanes and precisions, ``zstd`` at three levels,
``xor`` full, masked, sparse, ranked (remap) and grown (a shorter reference), and equal to its
reference (an empty payload), ``elf`` absolute, relative, exact, palette and delta, in each float
dtype. Inputs are synthetic (numpy's PCG64, fixed seeds), salted with NaNs with payloads,
infinities, -0.0, subnormals and the largest finite values; odd element counts. It uses only what
both layouts share: ``Pipeline.from_config``, ``encode`` and ``decode``.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from elves.codecs import Pipeline

OUT = Path(__file__).resolve().parent / "payloads.json"
H = "0" * 32  # the xor codec takes the reference's hash on trust: the caller checks it
NP = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64}
WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
WIDTH = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
         "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
         "C128": 16}
# (exponent bits, mantissa bits) of the floats whose special values are salted in
FLOAT_BITS = {"F16": (5, 10), "BF16": (8, 7), "F32": (8, 23), "F64": (11, 52)}


def specials(dtype: str) -> list[int]:
    """+-0, +-inf, NaNs (quiet, signalling, with payloads), the smallest and largest subnormals,
    the largest finite value, in ``dtype``'s bits."""
    eb, mb = FLOAT_BITS[dtype]
    w = WIDTH[dtype]
    sign = 1 << (8 * w - 1)
    inf = ((1 << eb) - 1) << mb
    mags = [0, inf, inf | (1 << (mb - 1)), inf | 1, inf | ((1 << mb) - 1), 1, (1 << mb) - 1, inf - 1]
    return [m | s for m in mags for s in (0, sign)]


def weights(dtype: str, n: int, seed: int, scale: float = 0.02, salt: int = 16) -> np.ndarray:
    """``n`` elements of ``dtype`` as raw bytes: N(0, scale) weights salted with ``salt`` of the
    specials for floats, uniform random bytes for the rest."""
    rng = np.random.default_rng(seed)
    if dtype not in NP:
        return rng.integers(0, 256, n * WIDTH[dtype], dtype=np.uint8)
    raw = (rng.standard_normal(n) * scale).astype(NP[dtype]).view(np.uint8).copy()
    words = raw.view(WORD[WIDTH[dtype]])
    sp = specials(dtype)
    at = rng.choice(n, size=min(n, salt, len(sp)), replace=False)
    words[at] = np.array(sp[: at.size], dtype=words.dtype)
    return raw


def fine_tune(dtype: str, ref: np.ndarray, seed: int, moved: float = 0.3) -> np.ndarray:
    """``ref`` with a share of its finite elements nudged, as continued training leaves them."""
    rng = np.random.default_rng(seed)
    x = ref.view(NP[dtype]).astype(np.float64)
    move = rng.random(x.size) < moved
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.where(move & np.isfinite(x), x * (1 + rng.standard_normal(x.size) * 1e-2), x)
    return y.astype(NP[dtype]).view(np.uint8).copy()


def palette_input(n: int, seed: int) -> np.ndarray:
    """F32 elements drawn from 6 distinct values: what elf codes through a palette."""
    values = np.array([-0.75, -0.125, 0.0, 0.3125, 0.5, 0.875], dtype=np.float32)
    return values[np.random.default_rng(seed).integers(0, values.size, n)].view(np.uint8).copy()


def planes(dtype: str, **kw: Any) -> list[dict[str, Any]]:
    return [{"id": "planes", "dtype": dtype, **kw}, {"id": "rans"}]


def elf(dtype: str, mode: str, bound: float, delta: bool = False) -> list[dict[str, Any]]:
    code = {2: "U16", 4: "U32", 8: "U64"}[WIDTH[dtype]]
    cfg: dict[str, Any] = {"id": "elf", "dtype": dtype, "mode": mode, "bound": bound}
    if delta:
        cfg["delta"] = True
    return [cfg, {"id": "planes", "dtype": code, "rotate": False}, {"id": "rans"}]


def xor(dtype: str, ref: np.ndarray, **kw: Any) -> list[dict[str, Any]]:
    return [{"id": "xor", "dtype": dtype, "ref_hash": H, "ref_nbytes": ref.size, **kw}, *planes(dtype)]


def cases() -> list[tuple[str, list[dict[str, Any]], np.ndarray, np.ndarray | None]]:
    """(name, pipeline config, input, reference)."""
    out: list[tuple[str, list[dict[str, Any]], np.ndarray, np.ndarray | None]] = []
    for seed, dtype in enumerate(WIDTH):
        out.append((f"planes-{dtype}", planes(dtype), weights(dtype, 21, seed), None))
    out.append(("planes-F32-unrotated", planes("F32", rotate=False), weights("F32", 21, 40), None))
    out.append(("planes-BF16-one", planes("BF16"), weights("BF16", 1, 41), None))
    out.append(("rans-lanes5-prob9", [{"id": "planes", "dtype": "BF16"}, {"id": "rans", "lanes": 5, "prob_bits": 9}],
                weights("BF16", 301, 42), None))
    out.append(("rans-lanes1-prob1", [{"id": "planes", "dtype": "U8"}, {"id": "rans", "lanes": 1, "prob_bits": 1}],
                np.tile(np.array([7, 7, 7, 9], np.uint8), 25), None))
    text = np.frombuffer(json.dumps({"architectures": ["Demo"], "hidden_size": 768, "layers": 12}).encode() * 3,
                         dtype=np.uint8)
    for level in (3, 9, -5):
        out.append((f"zstd-{level}", [{"id": "zstd", "level": level}], text, None))
    out.append(("zstd-one-byte", [{"id": "zstd", "level": 3}], np.array([42], np.uint8), None))
    for dtype, seed in (("F32", 50), ("BF16", 51), ("F16", 52), ("F64", 53)):
        ref = weights(dtype, 41, seed)
        out.append((f"xor-full-{dtype}", xor(dtype, ref), fine_tune(dtype, ref, seed), ref))
    ref = weights("BF16", 41, 54)
    out.append(("xor-masked-BF16", xor("BF16", ref, mask=0xFF00), fine_tune("BF16", ref, 54), ref))
    ref = weights("F32", 41, 55)
    out.append(("xor-sparse-F32", xor("F32", ref, sparse=True), fine_tune("F32", ref, 55, moved=0.1), ref))
    out.append(("xor-masked-sparse-F32", xor("F32", ref, mask=0xFFFF0000, sparse=True),
                fine_tune("F32", ref, 56, moved=0.1), ref))
    ref = weights("BF16", 41, 57)
    out.append(("xor-remap-BF16", xor("BF16", ref, remap=[[0x79, [0x79, 0x78, 0x7A]], [0x7A, [0x79]]]),
                fine_tune("BF16", ref, 57, moved=0.6), ref))
    ref = weights("F32", 6, 58)
    grown = np.concatenate([ref, weights("F32", 3, 59)])  # a 2x3 base at the origin of a 3x3 tensor
    out.append(("xor-grown-F32", xor("F32", ref, ref_shape=[2, 3], shape=[3, 3]), grown, ref))
    ref = weights("U8", 33, 60)
    out.append(("xor-U8", xor("U8", ref), weights("U8", 33, 61), ref))
    out.append(("xor-equal-to-ref", xor("F32", weights("F32", 9, 62)), weights("F32", 9, 62), weights("F32", 9, 62)))
    # Sizes and bounds at which the encoder picks a grid (a uniform one for absolute bounds, a
    # binade one for relative bounds) over the exact codes, so the fixture holds both.
    for dtype, seed in (("F32", 70), ("F64", 73)):
        out.append((f"elf-abs-{dtype}", elf(dtype, "abs", 1e-3), weights(dtype, 65, seed), None))
        out.append((f"elf-rel-{dtype}", elf(dtype, "rel", 2.0 ** -6), weights(dtype, 65, seed + 10), None))
    for dtype, seed in (("BF16", 71), ("F16", 72)):
        # an infinity makes a 2-byte uniform grid lose to the exact codes: salted with +-0 only
        out.append((f"elf-abs-{dtype}", elf(dtype, "abs", 0.05), weights(dtype, 129, seed, 0.5, 2), None))
        out.append((f"elf-rel-{dtype}", elf(dtype, "rel", 2.0 ** -3), weights(dtype, 129, seed + 10, 0.5, 4), None))
    out.append(("elf-abs-F32-exact", elf("F32", "abs", 2.0 ** -60), weights("F32", 41, 74), None))
    out.append(("elf-abs-F32-one", elf("F32", "abs", 1e-3), weights("F32", 1, 75), None))
    out.append(("elf-palette-abs-F32", elf("F32", "abs", 1e-3), palette_input(301, 76), None))
    out.append(("elf-palette-rel-F32", elf("F32", "rel", 2.0 ** -10), palette_input(301, 79), None))
    ref = weights("F32", 129, 77)
    out.append(("elf-delta-F32", elf("F32", "abs", 1e-3, delta=True), fine_tune("F32", ref, 77), ref))
    ref = weights("BF16", 129, 78, 0.5, 2)
    out.append(("elf-delta-BF16", elf("BF16", "abs", 0.05, delta=True), fine_tune("BF16", ref, 78), ref))
    return out


def b64(a: np.ndarray | bytes) -> str:
    return base64.b64encode(bytes(a)).decode()


def main() -> None:
    records = []
    for name, config, raw, ref in cases():
        pipeline = Pipeline.from_config(config)
        payload = pipeline.encode(raw, ref=ref)
        out = np.empty(raw.size, np.uint8)
        Pipeline.from_config(pipeline.get_config()).decode(payload, out, ref=ref)
        rec: dict[str, Any] = {"name": name, "pipeline": pipeline.get_config(), "input": b64(raw)}
        if ref is not None:
            rec["ref"] = b64(ref)
        rec["payload"] = b64(payload)
        if not np.array_equal(out, raw):  # lossy: what this elves decoded
            rec["decoded"] = b64(out)
        records.append(rec)
    OUT.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    print(f"{OUT}: {len(records)} cases, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
