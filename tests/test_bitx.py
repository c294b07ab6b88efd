"""BitX: a fine-tune compressed against its base model (``--base``) restores bit-exactly, costs
its delta, and refuses a missing or wrong base with a clear error and nothing written."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import elves
from bitx.codec import Xor
from bitx.delta import plane_mask
from elves.archive import ArchiveReader
from elves.codecs import Pipeline, codec_from_config
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.codecs.zstd import Zstd
from elves.errors import BaseMismatchError, BaseRequiredError, CodecError, CorruptArchiveError
from tests.conftest import tree_hashes, write_safetensors

NP = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
H = "0" * 32


# ---------------------------------------------------------------------------- the codec

def test_xor_is_registered_and_configurable() -> None:
    c = codec_from_config({"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 10, "mask": 0x7F80})
    assert isinstance(c, Xor) and c.needs_ref
    assert Pipeline.from_config(Pipeline([c, Planes("BF16"), Rans()]).get_config()).get_config()[0] == c.get_config()
    with pytest.raises(CodecError):
        codec_from_config({"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 10, "mask": 1 << 16})
    with pytest.raises(CodecError):
        Pipeline([c, Planes("BF16"), Rans()]).encode(np.zeros(4, np.uint8))  # no reference given


@settings(max_examples=120, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64", "I8", "F8_E4M3"]), n=st.integers(0, 3000),
       ref_frac=st.floats(0, 1.2), flips=st.floats(0, 1), mask=st.integers(0, 2**64 - 1), seed=st.integers(0, 99),
       form=st.sampled_from(["plain", "sparse", "ranked"]), inner=st.sampled_from(["planes", "zstd"]))
def test_xor_pipeline_roundtrips(dtype: str, n: int, ref_frac: float, flips: float, mask: int, seed: int,
                                 form: str, inner: str) -> None:
    """Whatever decodes before xor (into the chunk's buffer, which dense xor then decodes in
    place: planes + rans write the buffer itself, zstd a view of it)."""
    from elves import dtypes

    w = dtypes.get(dtype).itemsize
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, n * w, dtype=np.uint8)
    m = min(n, int(n * ref_frac)) * w
    ref = data[:m].copy()
    ref[rng.random(m) < flips] ^= rng.integers(1, 256, dtype=np.uint8)
    remap = None
    if form == "ranked" and dtype in ("BF16", "F16", "F32", "F64"):
        remap = [[int(e), [int(v) for v in rng.permutation(256)[:rng.integers(1, 9)]]]
                 for e in rng.choice(256, 20, replace=False)]
    after = [Planes(dtype), Rans()] if inner == "planes" else [Zstd()]
    p = Pipeline([Xor(dtype, H, m, mask % (1 << 8 * w), form == "sparse", remap), *after])
    payload = p.encode(data, ref=ref)
    out = np.full(n * w, 0xA5, dtype=np.uint8)
    Pipeline.from_config(p.get_config()).decode(payload, out, ref=ref)
    assert np.array_equal(out, data)


MASK_ORDER = """
import numpy as np
from bitx.codec import Xor
rng = np.random.default_rng(0)
data, ref = rng.integers(0, 256, (2, 800), dtype=np.uint8)
for sparse, remap in ((False, [[1, [2, 3]]]), (True, None)):
    for mask in (1, None):  # a small mask first, then one with the top bit set
        x = Xor("F64", "0" * 32, 800, mask=mask, sparse=sparse, remap=remap)
        out = np.empty_like(data)
        x.decode(x.encode(data, ref=ref), out, ref=ref)
        assert np.array_equal(out, data), (sparse, mask)
"""


def test_xor_masks_of_any_size_in_any_order() -> None:
    """The kernels once specialised on the first mask's Python int type (int64 for a small mask);
    a later F64 mask with the top bit set could not convert. A fresh process fixes the order."""
    proc = subprocess.run([sys.executable, "-c", MASK_ORDER], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_chunk_equal_to_its_reference_is_an_empty_payload() -> None:
    ref = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)
    p = Pipeline([Xor("F32", H, 4000), Planes("F32"), Rans()])
    assert p.encode(ref.copy(), ref=ref) == b""
    out = np.empty(4000, np.uint8)
    assert np.array_equal(p.decode(b"", out, ref=ref), ref)
    p = Pipeline([Xor("F32", H, 4000, sparse=True), Planes("F32"), Rans()])
    assert p.encode(ref.copy(), ref=ref) == b""
    assert np.array_equal(p.decode(b"", out, ref=ref), ref)
    # with a mask, "nothing left" means the masked bits equal the reference's: the rest must be zero
    p = Pipeline([Xor("F32", H, 4000, plane_mask([True, False, False, False], 4, True)), Planes("F32"), Rans()])
    assert p.encode(ref.copy(), ref=ref) != b""


def test_sparse_xor_drops_unchanged_elements() -> None:
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 2**16, 10000, dtype=np.uint16)
    data = ref.copy()
    data[::10] ^= rng.integers(1, 2**16, 1000, dtype=np.uint16)  # 10% changed
    x = Xor("BF16", H, ref.nbytes, sparse=True).encode(data.view(np.uint8), ref=ref.view(np.uint8))
    assert x.shape[0] == 1250 + 1000 * 2  # bitmap, then the changed elements only
    out = np.empty(data.nbytes, np.uint8)
    Xor("BF16", H, ref.nbytes, sparse=True).decode(x, out, ref=ref.view(np.uint8))
    assert np.array_equal(out, data.view(np.uint8))
    with pytest.raises(elves.CorruptArchiveError):
        Xor("BF16", H, ref.nbytes, sparse=True).decode(x[:-2], out, ref=ref.view(np.uint8))


def test_ranked_exponent_codes_the_exponent_given_the_base() -> None:
    from bitx.delta import Sample, ranking

    rng = np.random.default_rng(2)
    base = (rng.standard_normal(50000) * 0.02).astype(ml_dtypes.bfloat16)
    ft = (rng.standard_normal(50000) * 0.02).astype(ml_dtypes.bfloat16)  # retrained: mantissa unrelated
    ft = np.where(np.abs(base.astype(np.float32)) > 0.03, ft * 4, ft).astype(ml_dtypes.bfloat16)
    raw, ref = ft.view(np.uint8), base.view(np.uint8)
    sample = Sample(2, True)
    sample.add(raw, ref)
    table = ranking(sample.joint)
    x = Xor("BF16", H, ref.shape[0], remap=table)
    assert x.mask == 0x807F  # the exponent byte is ranked, never XORed
    enc = x.encode(raw, ref=ref)
    top = lambda b: Planes("BF16").encode(b)[:1]
    sizes = [len(Rans().encode(top(b))) for b in (raw, enc)]
    assert sizes[1] < 0.95 * sizes[0] and top(enc).max() < top(raw).max()
    out = np.empty_like(raw)
    x.decode(enc, out, ref=ref)
    assert np.array_equal(out, raw)
    with pytest.raises(CodecError):
        Xor("BF16", H, 4, sparse=True, remap=table)
    with pytest.raises(CodecError):
        Xor("I32", H, 4, remap=table)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_ranked_kernel_vector_loop_matches_the_scalar_loop(dtype: str) -> None:
    """The kernel runs 16 words a step when the table has its spare row (the codec's always
    has), one at a time otherwise: both give the same words, at every length's tail, with base
    bytes all over the table (its last entry, next to the spare row, included)."""
    from bitx.codec import rank_tables
    from bitx.kernels import TABLE_ROWS, xor_ranked

    rng = np.random.default_rng(17)
    x = Xor(dtype, H, 1, remap=[[int(e), [int(v) for v in rng.permutation(256)[:5]]] for e in range(0, 256, 3)])
    word = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.width]
    rank, inv = rank_tables(x.remap)
    assert rank.shape == inv.shape == (TABLE_ROWS, 256)
    for n in (0, 5, 16, 31, 4096 + 13):
        r = rng.integers(0, np.iinfo(word).max, n, dtype=word, endpoint=True)
        r[:2] |= word(0xFF) << word(x.shift)  # base byte 255
        a = r ^ rng.integers(0, 1 << 12, n).astype(word) << word(x.shift - 3)
        for table in (rank, inv):
            fast, slow = np.empty(n, word), np.empty(n, word)
            assert xor_ranked(a, r, word(x.mask), word(x.shift), table, fast)
            assert xor_ranked(a, r, word(x.mask), word(x.shift), np.ascontiguousarray(table[:256]), slow)
            assert np.array_equal(fast, slow)
        back = np.empty(n, word)  # fast went through inv, the last table: rank takes it back
        assert xor_ranked(fast, r, word(x.mask), word(x.shift), rank, back)
        assert np.array_equal(back, a)


def test_plane_mask_selects_rotated_planes() -> None:
    assert plane_mask([True, False], 2, True) == 0x7F80            # the BF16 exponent
    assert plane_mask([False, True], 2, True) == 0x807F            # sign + 7 mantissa bits
    assert plane_mask([True, False, False, False], 4, True) == 0x7F800000
    assert plane_mask([True, True], 2, False) == 0xFFFF


@pytest.mark.parametrize("dtype", ["BF16", "F32", "I8"])
def test_planner_histograms_are_those_of_the_coded_planes(dtype: str) -> None:
    """The planner's one-pass counts equal the byte planes that coding would see: standalone,
    XORed, and the sparse form (its bitmap words included), over a reference shorter than the data."""
    from bitx.delta import Sample
    from elves import dtypes

    w = dtypes.get(dtype).itemsize
    rng = np.random.default_rng(3)
    n = 5000
    base = rng.integers(0, 256, n * w, dtype=np.uint8)
    data = base.copy()
    changed = rng.random(n) < 0.3
    data.reshape(n, w)[changed] ^= rng.integers(1, 256, (int(changed.sum()), w), dtype=np.uint8)
    ref = base[:4000 * w]  # the last 1000 elements have no reference
    sample = Sample(w, Planes(dtype).rotate)
    sample.add(data, ref)
    hist = lambda b: np.stack([np.bincount(p, minlength=256) for p in Planes(dtype).encode(b)])
    assert np.array_equal(sample.std, hist(data))
    assert np.array_equal(sample.xor, hist(Xor(dtype, H, ref.shape[0]).encode(data, ref=ref)))
    assert np.array_equal(sample.sparse, hist(Xor(dtype, H, ref.shape[0], sparse=True).encode(data, ref=ref)))
    if w >= 2:
        word = {2: np.uint16, 4: np.uint32}[w]
        top = lambda b: (b.view(word) >> (8 * w - 9)) & 0xFF
        joint = np.zeros((256, 256), np.int64)
        np.add.at(joint, (top(ref), top(data[:ref.shape[0]])), 1)
        assert np.array_equal(sample.joint, joint)
        assert np.array_equal(sample.tail, np.bincount(top(data[ref.shape[0]:]), minlength=256))


def test_planner_estimates_track_the_coded_size() -> None:
    """Order-0 estimates from the histograms stay close to what ``rans`` really writes, for the
    planes of a weight-like BF16 tensor and of its XOR with a lightly changed base."""
    from bitx.delta import Sample, estimate

    rng = np.random.default_rng(4)
    x = (rng.standard_normal(65536) * 0.02).astype(np.float32)
    base = x.astype(ml_dtypes.bfloat16)
    ft = (x + rng.standard_normal(x.shape).astype(np.float32) * 2e-4).astype(ml_dtypes.bfloat16)
    raw, ref = ft.view(np.uint8), base.view(np.uint8)
    sample = Sample(2, True)
    sample.add(raw, ref)
    for hist, data in ((sample.std, raw), (sample.xor, Xor("BF16", H, ref.shape[0]).encode(raw, ref=ref))):
        planes = Planes("BF16").encode(data)
        real = np.array([len(Rans().encode(planes[p:p + 1])) for p in range(2)])
        assert np.allclose(estimate(hist, 1.0, Rans().lanes), real, rtol=0.03, atol=64)  # one chunk


# ---------------------------------------------------------------------------- synthetic models

def _tensor(dt: str, x: np.ndarray) -> tuple[str, tuple, bytes]:
    return dt, x.shape, x.astype(NP[dt]).tobytes()


def make_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A base folder and a fine-tune folder: per dtype, tensors = base + small noise, one
    unchanged, one fully retrained, one only in the fine-tune; names prefixed in the base only."""
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for dt in NP:
        for i in range(2):
            x = rng.standard_normal((384, 256)).astype(np.float32) * 0.02
            base[f"model.layers.{i}.{dt}.weight"] = _tensor(dt, x)
            y = x + rng.standard_normal(x.shape).astype(np.float32) * 2e-4
            ft[f"layers.{i}.{dt}.weight"] = _tensor(dt, y)
        same = rng.standard_normal((300, 200)).astype(np.float32) * 0.05
        base[f"model.frozen.{dt}"] = ft[f"frozen.{dt}"] = _tensor(dt, same)
        base[f"model.head.{dt}"] = _tensor(dt, rng.standard_normal((128, 64)).astype(np.float32))
        ft[f"head.{dt}"] = _tensor(dt, rng.standard_normal((128, 64)).astype(np.float32))
        ft[f"extra.{dt}"] = _tensor(dt, rng.standard_normal((96, 64)).astype(np.float32) * 0.02)
    b, f = root / "base", root / "ft"
    for d, tensors in [(b, base), (f, ft)]:
        d.mkdir(parents=True)
        write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
        (d / "config.json").write_text('{"hidden_size": 256}')
    return b, f


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    base, ft = make_pair(root)
    archive = root / "ft.elves"
    elves.compress(ft, archive, base=base)
    return base, ft, archive


def test_finetune_roundtrips_and_is_much_smaller(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, ft, archive = pair
    alone = elves.compress(ft, tmp_path / "alone.elves")
    assert archive.stat().st_size < 0.7 * alone.archive_bytes
    elves.restore(archive, tmp_path / "out", base=base)
    assert tree_hashes(tmp_path / "out") == tree_hashes(ft)
    rep = elves.verify(archive, against=ft, base=base)
    assert rep.ok, rep.problems


def test_what_is_coded_against_the_base(pair: tuple[Path, Path, Path]) -> None:
    base, _, archive = pair
    with ArchiveReader(archive) as r:
        assert r.version >= (1, 1) and r.base_needed is not None
        names = {t.name: e.segments[t.segment] for e in r.files for t in e.tensors}
        model = r.base_needed["model"]
        assert model["source"] == "folder"
        assert {f["path"] for f in model["files"]} == {"model.safetensors", "config.json"}
        for f in model["files"]:  # hashed on a thread beside the planning
            assert f["sha256"] == hashlib.sha256((base / f["path"]).read_bytes()).hexdigest()
            assert f["size"] == (base / f["path"]).stat().st_size
        refs = {x["name"] for x in r.base_needed["tensors"]}
        for dt in NP:
            s = r.streams[names[f"frozen.{dt}"]]  # unchanged: empty payloads, ~nothing
            assert s.pipeline[0]["id"] == "xor" and s.stored_bytes == 0
            assert f"model.frozen.{dt}" in refs
            for i in range(2):
                assert r.streams[names[f"layers.{i}.{dt}.weight"]].pipeline[0]["id"] == "xor"
                assert f"model.layers.{i}.{dt}.weight" in refs
            assert all(c["id"] != "xor" for c in r.streams[names[f"head.{dt}"]].pipeline)  # retrained: standalone
            assert all(c["id"] != "xor" for c in r.streams[names[f"extra.{dt}"]].pipeline)
    i = elves.info(archive)
    assert i.base is not None and len(i.base["tensors"]) == len(refs)


def test_base_as_archive_file_or_other_form(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, ft, archive = pair
    base_archive = tmp_path / "base.elves"
    elves.compress(base, base_archive)
    elves.restore(archive, tmp_path / "a", base=base_archive)
    assert tree_hashes(tmp_path / "a") == tree_hashes(ft)
    # compressed against the archive, restored against the folder (references are by content)
    a2 = tmp_path / "ft2.elves"
    elves.compress(ft, a2, base=base_archive)
    assert a2.stat().st_size == pytest.approx(archive.stat().st_size, rel=0.02)
    elves.restore(a2, tmp_path / "b", base=base)
    assert tree_hashes(tmp_path / "b") == tree_hashes(ft)
    # a single safetensors file as the base
    a3 = tmp_path / "ft3.elves"
    elves.compress(ft, a3, base=base / "model.safetensors")
    elves.restore(a3, tmp_path / "c", base=base / "model.safetensors")
    assert tree_hashes(tmp_path / "c") == tree_hashes(ft)


def test_restore_reads_the_base_where_the_index_says_without_parsing_it(
        pair: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, ft, archive = pair
    with ArchiveReader(archive) as r:
        refs = r.base_needed["tensors"]
    raw = (base / "model.safetensors").read_bytes()
    import xxhash
    for t in refs:  # each reference records where its bytes start in its file
        assert t["file"] == "model.safetensors"
        assert xxhash.xxh3_128_hexdigest(raw[t["offset"]:t["offset"] + t["nbytes"]]) == t["hash"]

    import elves.readers

    def no_parse(*a: object) -> None:
        raise AssertionError("the base was parsed")

    monkeypatch.setattr(elves.readers, "read_model", no_parse)
    elves.restore(archive, tmp_path / "out", base=base)
    elves.restore(archive, tmp_path / "one", base=base / "model.safetensors")  # the file alone
    monkeypatch.undo()
    assert tree_hashes(tmp_path / "out") == tree_hashes(ft)
    assert tree_hashes(tmp_path / "one") == tree_hashes(ft)


def test_a_base_laid_out_anew_is_found_by_content(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The same base tensors at other offsets (written in another order, another header): the
    recorded offsets miss, and the base is parsed and its tensors found by their hashes."""
    base, ft, archive = pair
    raw = (base / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    tensors = {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
               for k, v in header.items()}
    moved = tmp_path / "moved"
    moved.mkdir()
    write_safetensors(moved / "model.safetensors", tensors, {"note": "rewritten"}, reverse=True, pad=40)
    with ArchiveReader(archive) as r:
        t = r.base_needed["tensors"][0]
    assert (moved / "model.safetensors").read_bytes()[t["offset"]:t["offset"] + t["nbytes"]] != \
        raw[t["offset"]:t["offset"] + t["nbytes"]]
    elves.restore(archive, tmp_path / "out", base=moved)
    assert tree_hashes(tmp_path / "out") == tree_hashes(ft)


def test_tensor_access_with_a_base(pair: tuple[Path, Path, Path]) -> None:
    base, ft, archive = pair
    from safetensors.numpy import load_file as st_load

    want = st_load(str(ft / "model.safetensors"))
    got = elves.load_file(archive, base=base)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].tobytes() == v.tobytes(), k
    with elves.open(archive) as a:  # no base: tensors that need it say so
        with pytest.raises(BaseRequiredError, match="pass --base"):
            a.get_tensor("layers.0.F32.weight")
        assert a.get_tensor("extra.F32").tobytes() == want["extra.F32"].tobytes()


def _nothing_written(folder: Path, before: set[str]) -> bool:
    return {p.name for p in folder.iterdir()} == before


def test_missing_base_is_a_clear_error(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, archive = pair
    with pytest.raises(BaseRequiredError, match="compressed against a base model.*pass --base"):
        elves.restore(archive, tmp_path / "out")
    assert _nothing_written(tmp_path, set())
    with pytest.raises(BaseRequiredError):
        elves.verify(archive)


@pytest.mark.parametrize("threaded", [False, True])
def test_wrong_base_is_a_clear_error_and_writes_nothing(pair: tuple[Path, Path, Path], tmp_path: Path, monkeypatch,
                                                        threaded: bool) -> None:
    """Also with the base's content hashes on a thread per CPU (past PARALLEL_HASH_BYTES): the
    same archive from compress, the same references found, the same errors."""
    base, ft, archive = pair
    if threaded:
        import bitx.base

        monkeypatch.setattr(bitx.base, "PARALLEL_HASH_BYTES", 0)
        elves.compress(ft, tmp_path / "again.elves", base=base)
        assert (tmp_path / "again.elves").read_bytes() == archive.read_bytes()
        elves.restore(archive, tmp_path / "ok", base=base)
        assert tree_hashes(tmp_path / "ok") == tree_hashes(ft)
    other, _ = make_pair(tmp_path / "other", seed=1)
    out = tmp_path / "out"
    with pytest.raises(BaseMismatchError, match="wrong base model: base tensor 'model\\."):
        elves.restore(archive, out, base=other)
    # the right base but one tensor modified: named, with its file
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    lo, _ = hdr["model.layers.1.F16.weight"]["data_offsets"]
    raw[8 + n + lo + 100] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BaseMismatchError, match="'model.layers.1.F16.weight' \\(in model.safetensors\\) differs"):
        elves.restore(archive, out, base=bad)
    with pytest.raises(BaseMismatchError):
        elves.verify(archive, base=bad)
    with pytest.raises(BaseMismatchError):
        elves.open(archive, base=bad)
    # the fine-tune itself is not its base either
    with pytest.raises(BaseMismatchError):
        elves.restore(archive, out, base=ft)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "elves-tmp" in p.name]


def test_identical_model_costs_almost_nothing(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, _ = pair
    s = elves.compress(base, tmp_path / "same.elves", base=base)
    weights = (base / "model.safetensors").stat().st_size
    with ArchiveReader(tmp_path / "same.elves") as r:
        tensor_bytes = sum(st.stored_bytes for st in r.streams if st.kind == "tensor")
    assert tensor_bytes == 0 and s.archive_bytes < 0.01 * weights
    elves.restore(tmp_path / "same.elves", tmp_path / "out", base=base)
    assert tree_hashes(tmp_path / "out") == tree_hashes(base)


@pytest.mark.parametrize("grow", ["rows", "columns", "both"])
def test_a_grown_tensor_codes_the_overlap_against_the_base(tmp_path: Path, grow: str) -> None:
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((3000, 128)).astype(np.float32) * 0.02
    rows, cols = {"rows": (40, 0), "columns": (0, 3), "both": (5, 2)}[grow]
    grown = rng.standard_normal((3000 + rows, 128 + cols)).astype(np.float32) * 0.02
    grown[:3000, :128] = emb + rng.standard_normal(emb.shape).astype(np.float32) * 1e-4
    write_safetensors(tmp_path / "base.safetensors", {"embed.weight": _tensor("BF16", emb)})
    write_safetensors(tmp_path / "ft.safetensors", {"embed.weight": _tensor("BF16", grown)})
    alone = elves.compress(tmp_path / "ft.safetensors", tmp_path / "alone.elves")
    delta = elves.compress(tmp_path / "ft.safetensors", tmp_path / "d.elves", base=tmp_path / "base.safetensors")
    with ArchiveReader(tmp_path / "d.elves") as r:
        (s,) = [s for s in r.streams if s.kind == "tensor"]
        xor = s.pipeline[0]
        assert xor["id"] == "xor" and xor["ref_nbytes"] == emb.size * 2
        assert ("shape" in xor) == (grow != "rows")  # rows appended: the base is simply the prefix
    assert delta.archive_bytes < 0.8 * alone.archive_bytes
    elves.restore(tmp_path / "d.elves", tmp_path / "out.safetensors", base=tmp_path / "base.safetensors")
    assert tree_hashes(tmp_path / "out.safetensors") == tree_hashes(tmp_path / "ft.safetensors")
    base_archive = tmp_path / "base.elves"  # the same through a base archive
    elves.compress(tmp_path / "base.safetensors", base_archive)
    got = elves.load_file(tmp_path / "d.elves", base=base_archive)["embed.weight"]
    assert got.tobytes() == grown.astype(ml_dtypes.bfloat16).tobytes()


def test_a_base_archive_that_needs_a_base_is_refused(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, ft, archive = pair
    # ft.elves (which needs `base`) used as the base of the fine-tune itself
    with pytest.raises(elves.BaseModelError, match="itself compressed against a base"):
        elves.compress(ft, tmp_path / "x.elves", base=archive)
    assert not (tmp_path / "x.elves").exists()


# ---------------------------------------------------------------------------- CLI

def cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from elves.cli.main import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_cli_base_options_and_exit_codes(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, ft, _ = pair
    out = tmp_path / "ft.elves"
    r = cli("compress", ft, "-o", out, "--base", base, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["base_streams"] >= 9
    r = cli("info", out)
    assert r.returncode == 0 and "needs a base model (--base)" in r.stdout
    assert json.loads(cli("info", out, "--json").stdout)["base"]["model"]["source"] == "folder"
    r = cli("restore", out, "-o", tmp_path / "r")
    assert r.returncode == 7 and "pass --base" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()
    other, _ = make_pair(tmp_path / "other", seed=2)
    r = cli("restore", out, "-o", tmp_path / "r", "--base", other)
    assert r.returncode == 7 and "wrong base model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()
    r = cli("verify", out, "--base", base, "--against", ft)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("restore", out, "-o", tmp_path / "r", "--base", base)
    assert r.returncode == 0 and tree_hashes(tmp_path / "r") == tree_hashes(ft)


# ---------------------------------------------------------------------------- real fine-tunes

def _real_pair(ft: Path, base: Path, tmp_path: Path) -> tuple[int, int]:
    alone = elves.compress(ft, tmp_path / "alone.elves")
    delta = elves.compress(ft, tmp_path / "delta.elves", base=base)
    out = tmp_path / ("out" + ft.suffix)
    elves.restore(tmp_path / "delta.elves", out, base=base)
    assert tree_hashes(out) == tree_hashes(ft)
    return delta.archive_bytes, alone.archive_bytes


@pytest.mark.realdata
def test_openff_rc2_against_rc1(dataset, tmp_path: Path) -> None:
    root = dataset("openff")
    delta, alone = _real_pair(root / "openff-gnn-am1bcc-0.1.0-rc.2.pt", root / "openff-gnn-am1bcc-0.1.0-rc.1.pt",
                              tmp_path)
    assert delta < 0.7 * alone  # continued training: BitX roughly doubles the ratio


@pytest.mark.realdata
def test_openff_1_0_0_against_rc3_with_widened_layers(dataset, tmp_path: Path) -> None:
    root = dataset("openff")
    delta, alone = _real_pair(root / "openff-gnn-am1bcc-1.0.0.pt", root / "openff-gnn-am1bcc-0.1.0-rc.3.pt",
                              tmp_path)
    assert delta < 0.2 * alone  # most tensors unchanged; the two widened ones coded against the base
    with ArchiveReader(tmp_path / "delta.elves") as r:
        assert sum(1 for s in r.streams if s.pipeline and "shape" in s.pipeline[0]) == 2


@pytest.mark.realdata
def test_astra_against_merlin_first_shard(dataset, tmp_path: Path) -> None:
    # a heavy BF16 fine-tune against a truncated torch zip holding 443 of 930 base tensors
    delta, alone = _real_pair(dataset("astra") / "astra_encoder.pt", dataset("merlin-p1") / "part.bin", tmp_path)
    assert delta < alone


def test_a_damaged_base_archive_names_the_tensor_and_chunk(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A base given as an .elves archive whose referenced payload was damaged: the error names
    the base tensor, the chunk and the stream, and nothing is restored."""
    from elves.archive import ArchiveReader

    base, ft, _ = pair
    base_archive = tmp_path / "base.elves"
    elves.compress(base, base_archive)
    archive = elves.compress(ft, tmp_path / "ft.elves", base=base_archive).archive
    with ArchiveReader(base_archive) as r:
        stream = max((s for s in r.streams if s.kind == "tensor"), key=lambda s: s.nbytes)
        offset = stream.chunks[0].offset
    data = bytearray(base_archive.read_bytes())
    data[offset] ^= 0xFF
    base_archive.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError, match=r"base tensor '.*': chunk 0 of stream \d+: .*checksum mismatch"):
        elves.restore(archive, tmp_path / "out", base=base_archive)
    assert not (tmp_path / "out").exists()
