"""One reference abstraction, every source: a copy at another precision codes against the cast of
the tensor it came from (in the archive, in the base model, in the store); the base model and
earlier streams of the archive serve one archive together; forged references are clean errors."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import elves
from elves import casts
from elves.archive import ArchiveReader
from elves.errors import ArchiveError
from tests.conftest import tree_hashes

from .test_bad_input import rewrite_index


def test_casts_are_those_of_ml_dtypes_and_numpy() -> None:
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        wide = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-40, 38, 50_000)).astype(np.float32)
    x = np.concatenate([wide,
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 65504, 65520, 1e-8], np.float32)])
    raw = x.view(np.uint8)
    with np.errstate(over="ignore"):
        assert casts.cast(raw, "F32", "BF16", "rne").tobytes() == x.astype(ml_dtypes.bfloat16).tobytes()
        assert casts.cast(raw, "F32", "F16", "rne").tobytes() == x.astype(np.float16).tobytes()
        bf = x.astype(ml_dtypes.bfloat16)
        assert casts.cast(bf.view(np.uint8), "BF16", "F16", "rne").tobytes() == bf.astype(np.float32).astype(np.float16).tobytes()
        assert casts.cast(bf.view(np.uint8), "BF16", "F32", "rne").tobytes() == bf.astype(np.float32).tobytes()
    assert casts.cast(raw, "F32", "BF16", "trunc").tobytes() == (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    nan = np.array([np.nan, -np.nan], np.float32).view(np.uint32) | np.uint32(1)  # signalling payloads
    out = casts.cast(nan.view(np.uint8), "F32", "BF16", "rne").view(np.uint16)
    assert np.isnan(out.view(ml_dtypes.bfloat16).astype(np.float32)).all()
    assert not casts.supported("F32", "F16", "trunc") and not casts.supported("F32", "F32", "rne")


def test_casts_match_numpy_on_every_f16_and_on_every_exponent_and_rounding_case_of_f32() -> None:
    """The kernels (elves/kernels/casts.py) against numpy's conversions: all 2**16 F16 patterns,
    and F32 words of every exponent with the mantissas where rounding decides (ties, one either
    side of them, sticky bits below a subnormal's last bit) and NaN payloads. (Run once over all
    2**32 F32 words, 2026-12-07: no difference.)"""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = casts.cast(h.view(np.uint8), "F16", "F32", "rne").view(np.uint32)
    assert np.array_equal(widened, h.view(np.float16).astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(7)
    tails = np.array([0, 1, 0x7FF, 0x800, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x3001,
                      0x7FFFFF, 0x7FF000, 0x400000, 0x3FF000, 0x7FE000, 0x7FEFFF], np.uint32)
    mant = np.concatenate([tails, tails | np.uint32(0x2000), rng.integers(0, 1 << 23, 200, dtype=np.uint32)])
    exps = np.arange(256, dtype=np.uint32) << np.uint32(23)
    words = (exps[:, None] | mant[None, :]).ravel()
    words = np.concatenate([words, words | np.uint32(0x80000000)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = words.view(np.float32).astype(np.float16).view(np.uint16)
    assert np.array_equal(casts.cast(words.view(np.uint8), "F32", "F16", "rne").view(np.uint16), want)
    bf = casts.cast(words.view(np.uint8), "F32", "BF16", "rne").view(np.uint16)
    finite = (words & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    assert np.array_equal(bf[finite], words[finite].view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))
    unaligned = np.empty(words.nbytes + 1, np.uint8)[1:]
    unaligned[:] = words.view(np.uint8)
    assert np.array_equal(casts.cast(unaligned, "F32", "F16", "rne").view(np.uint16), want)


def precisions(folder: Path, weights: dict[str, np.ndarray], exceptions: int = 0) -> Path:
    """A model at F32 beside its BF16 and F16 copies (as Hub repos ship them), the BF16 copy with
    ``exceptions`` elements changed after the cast (an exporter that fixed a few values)."""
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    rng = np.random.default_rng(3)
    for k in list(bf16)[:1]:
        flat = bf16[k].reshape(-1).view(np.uint16)
        flat[rng.choice(flat.shape[0], exceptions, replace=False)] ^= np.uint16(0x0101)
    save_file(bf16, str(folder / "model.bf16.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in weights.items()}, str(folder / "model.fp16.safetensors"))
    return folder


def synthetic(n_layers: int = 4, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(1)
    return {f"layer.{i}.weight": (rng.standard_normal((256, 192)) * 0.02).astype(np.float32) for i in range(n_layers)}


def streams_of(archive: Path, file: str) -> list:
    with ArchiveReader(archive) as r:
        entry = next(e for e in r.files if e.path == file)
        return [r.streams[i] for i in entry.segments if r.streams[i].kind == "tensor"]


@pytest.mark.parametrize("exceptions", [0, 500])
def test_a_copy_at_lower_precision_costs_only_its_exceptions(tmp_path: Path, exceptions: int) -> None:
    src = precisions(tmp_path / "src", synthetic(), exceptions)
    s = elves.compress(src, tmp_path / "m.elves")
    bf16 = streams_of(s.archive, "model.bf16.safetensors")
    fp16 = streams_of(s.archive, "model.fp16.safetensors")
    for st in bf16 + fp16:
        assert st.ref_cast == ("F32", "rne") and st.pipeline[0]["id"] == "xor", st
    logical = sum(st.nbytes for st in bf16)
    # unchanged elements cost nothing: the chunks are empty payloads; an exception a few bytes
    assert sum(st.stored_bytes for st in bf16) <= 8 * exceptions + 64, (sum(st.stored_bytes for st in bf16), logical)
    assert sum(st.stored_bytes for st in fp16) <= 64
    with ArchiveReader(s.archive) as r:
        assert r.version == (1, 4)
    assert tree_hashes(elves.restore(s.archive, tmp_path / "out").output) == tree_hashes(src)
    with elves.open(s.archive) as a:  # random access through the cast
        got = a.get_tensor("model.bf16.safetensors:layer.2.weight")
        assert got.tobytes() == load_file(str(src / "model.bf16.safetensors"))["layer.2.weight"].tobytes()


def test_a_truncated_copy_codes_against_the_truncating_cast(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    w = synthetic(2)
    save_file(w, str(src / "model.safetensors"))
    trunc = {k: (v.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16) for k, v in w.items()}
    save_file(trunc, str(src / "model.bf16.safetensors"))
    s = elves.compress(src, tmp_path / "m.elves")
    bf16 = streams_of(s.archive, "model.bf16.safetensors")
    assert [st.ref_cast for st in bf16] == [("F32", "trunc")] * 2
    assert sum(st.stored_bytes for st in bf16) <= 64
    assert tree_hashes(elves.restore(s.archive, tmp_path / "out").output) == tree_hashes(src)


def test_real_weights_and_their_bf16_copy(dataset, tmp_path: Path) -> None:
    """minilm's F32 weights and their BF16 cast, as torch makes it: the copy costs almost nothing,
    where it cost 1.3x less than its size before."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    weights = load_torch(str(dataset("minilm") / "model.safetensors"))
    src = tmp_path / "src"
    src.mkdir()
    save_torch(weights, str(src / "model.safetensors"))
    save_torch({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
               str(src / "model.bf16.safetensors"))
    s = elves.compress(src, tmp_path / "m.elves")
    bf16 = streams_of(s.archive, "model.bf16.safetensors")
    cast = [st for st in bf16 if st.ref_cast is not None]
    assert len(cast) >= 0.9 * len(bf16)
    assert sum(st.stored_bytes for st in bf16) < 0.01 * sum(st.nbytes for st in bf16)
    assert tree_hashes(elves.restore(s.archive, tmp_path / "out").output) == tree_hashes(src)


def test_base_model_and_earlier_streams_serve_one_archive(tmp_path: Path) -> None:
    """A fine-tune folder compressed against its base: its F32 tensors code against the base (by
    content hash); in its BF16 copy, the tensor the base lacks codes against the cast of the F32
    stream of the folder, and the others against the cast of the base tensor (an F32 stream coded
    against the base cannot serve: references stay one level deep)."""
    rng = np.random.default_rng(7)
    base_w = synthetic(3, rng)
    base = tmp_path / "base"
    base.mkdir()
    save_file(base_w, str(base / "model.safetensors"))
    tuned = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 1e-4).astype(np.float32) for k, v in base_w.items()}
    tuned["head.weight"] = (rng.standard_normal((192, 64)) * 0.02).astype(np.float32)  # not in the base
    src = tmp_path / "src"
    src.mkdir()
    save_file(tuned, str(src / "model.safetensors"))
    again = dict(tuned, **{"head.weight": tuned["head.weight"] + np.float32(1e-6)})
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in again.items()}, str(src / "model.bf16.safetensors"))
    s = elves.compress(src, tmp_path / "m.elves", base=base)
    first = streams_of(s.archive, "model.safetensors")
    assert sum(1 for st in first if st.ref is None and st.pipeline[0]["id"] == "xor") == 3  # against the base
    bf16 = streams_of(s.archive, "model.bf16.safetensors")
    head = [st for st in bf16 if st.nbytes == 192 * 64 * 2]
    layers = [st for st in bf16 if st.nbytes != 192 * 64 * 2]
    assert len(head) == 1 and len(layers) == 3
    assert head[0].ref is not None and head[0].ref_cast == ("F32", "rne") and head[0].stored_bytes < 0.1 * head[0].nbytes
    assert all(st.ref is None and st.ref_cast == ("F32", "rne") and st.stored_bytes < 0.5 * st.nbytes
               for st in layers), layers
    assert s.base_streams == 6 and s.ref_streams == 1
    with pytest.raises(elves.errors.BaseRequiredError):
        elves.restore(s.archive, tmp_path / "nobase")
    assert tree_hashes(elves.restore(s.archive, tmp_path / "out", base=base).output) == tree_hashes(src)
    with elves.open(s.archive, base=base) as a:
        got = a.get_tensor("model.bf16.safetensors:layer.1.weight")
        assert got.tobytes() == again["layer.1.weight"].astype(ml_dtypes.bfloat16).tobytes()


def test_a_copy_at_lower_precision_codes_against_the_base(tmp_path: Path) -> None:
    """``--base`` an F32 model, and the fine-tune is its BF16 release: every tensor codes against
    the cast of the base tensor of the same name (a reference by content hash, cast)."""
    base = tmp_path / "base"
    base.mkdir()
    w = synthetic(3)
    save_file(w, str(base / "model.safetensors"))
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in w.items()}, str(src / "model.safetensors"))
    s = elves.compress(src, tmp_path / "m.elves", base=base)
    st = streams_of(s.archive, "model.safetensors")
    assert all(x.ref is None and x.ref_cast == ("F32", "rne") and x.stored_bytes == 0 for x in st)
    assert tree_hashes(elves.restore(s.archive, tmp_path / "out", base=base).output) == tree_hashes(src)


def cast_archive(tmp_path: Path) -> Path:
    src = precisions(tmp_path / "src", synthetic(2))
    return elves.compress(src, tmp_path / "m.elves").archive


def first_cast(index: dict) -> dict:
    return next(s for s in index["streams"] if "ref_cast" in s)


@pytest.mark.parametrize("forge, message", [
    (lambda ix: first_cast(ix).update(ref_cast={"from": "F64", "round": "rne"}), "ref_cast has 'from' = 'F64'"),
    (lambda ix: first_cast(ix).update(ref_cast={"from": "F32", "round": "up"}), "ref_cast has 'round' = 'up'"),
    (lambda ix: first_cast(ix).update(ref_cast={"from": "F16", "round": "trunc"}), "that elves does not make"),
    (lambda ix: first_cast(ix).update(ref_cast={"from": "BF16", "round": "rne"}), "does not make|cannot be its cast"),
    (lambda ix: first_cast(ix).update(ref_cast=[1]), "ref_cast"),
    (lambda ix: first_cast(ix).pop("ref"), "compressed against a base model"),
    (lambda ix: first_cast(ix)["pipeline"][0].update(ref_hash="0" * 32), "names other bytes"),
    (lambda ix: first_cast(ix)["pipeline"][0].update(ref_nbytes=first_cast(ix)["pipeline"][0]["ref_nbytes"] + 4),
     "names other bytes"),
])
def test_forged_cast_references_are_clean_errors(tmp_path: Path, forge, message: str) -> None:
    archive = cast_archive(tmp_path)
    rewrite_index(archive, forge)
    with pytest.raises(ArchiveError, match=message):  # corrupt, or (a ref dropped) wanting a base
        elves.restore(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_records_the_cast_as_documented(tmp_path: Path) -> None:
    archive = cast_archive(tmp_path)
    from .test_golden import index_of

    version, index = index_of(archive)
    assert version == [1, 4]
    st = first_cast(index)
    assert st["ref_cast"] == {"from": "F32", "round": "rne"}
    assert json.dumps(st["pipeline"][0], sort_keys=True)  # plain JSON-able config
    src = index["streams"][st["ref"]]
    assert st["pipeline"][0]["ref_hash"] == src["hash"] and st["pipeline"][0]["ref_nbytes"] == src["nbytes"]


def test_restore_decodes_each_referenced_chunk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later version's chunks take their references from the chunks decoded for the earlier
    file, not from a second decode; and the cache holds copies, so a caller's tensor is its own."""
    from elves import chunks, references

    src = tmp_path / "src"
    src.mkdir()
    v1 = synthetic(3)
    save_file(v1, str(src / "a.safetensors"))
    rng = np.random.default_rng(5)
    save_file({k: v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(1e-5) for k, v in v1.items()},
              str(src / "b.safetensors"))
    s = elves.compress(src, tmp_path / "m.elves")
    assert s.ref_streams == 3
    with ArchiveReader(s.archive) as r:  # each stream decoded once, the header both files share too
        total = sum(len(r.streams[i].chunks) for i in {i for e in r.files for i in e.segments})
    calls = []
    real = chunks.decode_chunk
    monkeypatch.setattr(references, "decode_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    import elves.decoder as decoder

    monkeypatch.setattr(decoder, "decode_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = elves.restore(s.archive, tmp_path / "out").output
    assert len(calls) == total
    assert tree_hashes(out) == tree_hashes(src)
    with elves.open(s.archive) as a:
        t = a.get_tensor("a.safetensors:layer.0.weight")
        t[...] = 0  # the caller's own array
        assert a.get_tensor("b.safetensors:layer.0.weight").tobytes() == load_file(str(src / "b.safetensors"))[
            "layer.0.weight"].tobytes()


def test_the_chunk_cache_stays_within_its_budget() -> None:
    from elves.references import ChunkCache

    cache = ChunkCache(10_000)
    for i in range(10):
        cache.put((0, i), np.zeros(3000, np.uint8))
    assert cache.size <= 10_000 and cache.get((0, 9)) is not None and cache.get((0, 0)) is None
    cache.put((1, 0), np.zeros(20_000, np.uint8))  # larger than the budget: not kept
    assert cache.get((1, 0)) is None and cache.size <= 10_000
    kept = cache.get((0, 9))
    assert kept is not None and not kept.flags.writeable
