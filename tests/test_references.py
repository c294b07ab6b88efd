"""In-archive references: a lossy tensor coded against another tensor of the same archive (``ref``,
``elf`` with ``delta``) stays within the bound, costs less, decodes alone by random access, and a
forged reference is a clean error."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xxhash

import elves
from elves.archive import ArchiveReader
from elves.codecs import Pipeline
from elves.bounds import parse_error_bound
from elves.codecs.elf import ELF_DTYPES
from elves.lossy import elf_pipeline, encode_checked
from elves.errors import CodecError, CorruptArchiveError
from tests.conftest import tree_hashes, write_safetensors

from .test_bad_input import rewrite_index
from .test_elf import BOUNDS, NP, WORD, assert_within, check_restored, reference_elf_size, weights


def fine_tune(dtype: str, raw: np.ndarray, rng: np.random.Generator, step: float = 1e-3) -> np.ndarray:
    """``raw`` (bytes of ``dtype`` weights) after a small update, its special values left as they are."""
    w = ELF_DTYPES[dtype][0]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN payloads, values near the top
        x = raw.view(WORD[w]).view(NP[dtype]).astype(np.float64)
        moved = (x + rng.standard_normal(x.size) * step * np.abs(x)).astype(NP[dtype])
    keep = ~np.isfinite(x) | (x == 0)
    out = moved.view(WORD[w]).copy()
    out[keep] = raw.view(WORD[w])[keep]
    return out.view(np.uint8)


@pytest.mark.parametrize("dtype", list(ELF_DTYPES))
@pytest.mark.parametrize("spec", BOUNDS)
def test_delta_chunks_hold_the_bound_and_shrink(dtype: str, spec: str) -> None:
    bound = parse_error_bound(spec)
    rng = np.random.default_rng(len(spec) * 7 + ELF_DTYPES[dtype][0])
    n = 20000
    base = weights(dtype, n, rng)
    tuned = fine_tune(dtype, base, rng)
    _, ref = encode_checked(elf_pipeline(dtype, bound), base)  # the reference is what restore gives
    alone, _ = encode_checked(elf_pipeline(dtype, bound), tuned)
    delta = elf_pipeline(dtype, bound, delta=True)
    payload, decoded = encode_checked(delta, tuned, ref)
    out = np.full(tuned.shape[0], 0x5A, dtype=np.uint8)
    Pipeline.from_config(delta.get_config()).decode(np.frombuffer(payload, np.uint8), out, ref=ref)
    assert out.tobytes() == decoded.tobytes()
    assert_within(dtype, bound, tuned, out)
    assert len(payload) <= len(alone) * 1.02 + 64


def test_delta_chunks_need_their_reference() -> None:
    bound = parse_error_bound("2^-24")
    raw = weights("F32", 1000, np.random.default_rng(1))
    delta = elf_pipeline("F32", bound, delta=True)
    with pytest.raises(CodecError, match="reference"):
        delta.encode(raw)
    payload = delta.encode(raw, ref=raw)
    out = np.empty(raw.shape[0], np.uint8)
    with pytest.raises(CodecError, match="reference"):
        delta.decode(np.frombuffer(payload, np.uint8), out, ref=raw[:-4])
    assert delta.get_config()[0]["delta"] is True
    assert "delta" not in elf_pipeline("F32", bound).get_config()[0]


def versions(folder: Path, rng: np.random.Generator) -> Path:
    """Three releases of one small model: v2 fine-tuned from v1, v3 from v2 with its tensor names
    prefixed (as Lightning writes them) and one tensor replaced; a config file beside them."""
    folder.mkdir()
    shapes = {"embed": (300, 64), "layer.0.weight": (64, 256), "layer.1.weight": (256, 64), "head": (64, 9)}
    v = {k: weights("F32", int(np.prod(s)), rng) for k, s in shapes.items()}
    for i in (1, 2, 3):
        if i > 1:
            v = {k: fine_tune("F32", raw, rng) for k, raw in v.items()}
        if i == 3:
            v["head"] = weights("F32", 64 * 9, rng)
        prefix = "state_dict." if i == 3 else ""
        write_safetensors(folder / f"model-v{i}.safetensors",
                          {prefix + k: ("F32", shapes[k], raw.tobytes()) for k, raw in v.items()})
    (folder / "config.json").write_text('{"hidden": 64}')
    return folder


@pytest.mark.parametrize("spec", ["2^-24", "1e-5", "rel:1e-3"])
def test_versions_in_a_folder_code_against_each_other(tmp_path: Path, spec: str) -> None:
    src = versions(tmp_path / "src", np.random.default_rng(5))
    bound = parse_error_bound(spec)
    s = elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound=spec, threads=2)
    assert s.ref_streams >= 6  # the larger tensors of v2 and v3
    alone = sum(elves.compress(f, tmp_path / f"{f.stem}.elves", lossy="elf", error_bound=spec).archive_bytes
                for f in sorted(src.glob("*.safetensors")))
    assert s.archive_bytes < 0.8 * alone, (s.archive_bytes, alone)
    with ArchiveReader(s.archive) as r:
        assert r.version >= (1, 2)
        for st in r.streams:
            if st.ref is not None:
                assert r.streams[st.ref].ref is None and st.pipeline[0].get("delta") is True
    out = elves.restore(s.archive, tmp_path / "out").output
    for f in sorted(src.glob("*.safetensors")):
        check_restored(f, out / f.name, bound)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    v = elves.verify(s.archive, against=src)
    assert v.ok and v.over_bound == 0, v.problems
    from safetensors import safe_open

    with elves.open(s.archive) as a, safe_open(out / "model-v3.safetensors", "np") as restored:
        for name in restored.keys():  # noqa: SIM118 (random access, one tensor at a time)
            got = a.get_tensor(f"model-v3.safetensors:{name}")
            assert got.tobytes() == restored.get_tensor(name).tobytes(), name


def test_reordered_blocks_code_against_their_source(tmp_path: Path) -> None:
    """An LSTM's gates reordered on export (PyTorch i, f, g, o -> ONNX i, o, f, g), under another
    name, in another file: the stream references the source through a block map and costs
    almost nothing; a gate block that was also retrained is coded against its old self."""
    rng = np.random.default_rng(8)
    hidden, inputs = 64, 128
    gates = [weights("F32", hidden * inputs, rng) for _ in range(4)]
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "a_torch.safetensors", {"rnn.weight_ih": ("F32", (4 * hidden, inputs), b"".join(
        g.tobytes() for g in gates))})
    exported = [gates[0], gates[3], gates[1], fine_tune("F32", gates[2], rng)]
    write_safetensors(src / "b_onnx.safetensors", {"onnx::LSTM_209": ("F32", (1, 4 * hidden, inputs), b"".join(
        g.tobytes() for g in exported))})
    s = elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound="2^-24")
    with ArchiveReader(s.archive) as r:
        mapped = [st for st in r.streams if st.ref_map is not None]
        assert len(mapped) == 1
        block = hidden * inputs * 4
        assert mapped[0].ref_map == [[0, 0, block], [block, 3 * block, block], [2 * block, block, block]]
        alone = r.streams[mapped[0].ref].stored_bytes
        assert mapped[0].stored_bytes < 0.45 * alone  # three blocks free, the retrained one cheaper
    out = elves.restore(s.archive, tmp_path / "out").output
    for f in src.iterdir():
        check_restored(f, out / f.name, parse_error_bound("2^-24"))
    assert elves.verify(s.archive, against=src).ok


def test_lossless_versions_code_against_each_other_with_xor(tmp_path: Path) -> None:
    """Lossless too, a later version is coded against the same tensor of an earlier one (``xor``
    with ``ref``, format 1.4), only where that is clearly smaller, and restores bit-exact."""
    src = versions(tmp_path / "src", np.random.default_rng(6))
    s = elves.compress(src, tmp_path / "m.elves")
    assert s.ref_streams >= 4  # the fine-tuned tensors of v2 and v3; v3's new head stays alone
    alone = sum(elves.compress(f, tmp_path / f"{f.stem}.elves").archive_bytes for f in sorted(src.glob("*.safetensors")))
    assert s.archive_bytes < 0.9 * alone, (s.archive_bytes, alone)
    with ArchiveReader(s.archive) as r:
        assert r.version == (1, 4)
        for st in r.streams:
            if st.ref is not None:
                src_stream = r.streams[st.ref]
                assert st.pipeline[0]["id"] == "xor" and st.pipeline[0]["ref_hash"] == src_stream.hash
                assert src_stream.ref is None and not src_stream.pipeline[0]["id"] == "xor"
    out = elves.restore(s.archive, tmp_path / "out").output
    assert tree_hashes(out) == tree_hashes(src)
    assert elves.verify(s.archive, against=src).ok


def test_a_closed_archive_frees_the_chunks_its_references_kept(tmp_path: Path) -> None:
    """The chunks kept for later streams' references sit in a cycle (the archive's sources, their
    readers, the archive): closing the archive breaks it, so a process that reads archive after
    archive (a server) does not hold a cache of each until the cyclic collector runs."""
    import gc
    import weakref

    from elves.decoder import file_chunks

    src = versions(tmp_path / "src", np.random.default_rng(6))
    s = elves.compress(src, tmp_path / "m.elves")
    assert s.ref_streams >= 4
    enabled = gc.isenabled()
    gc.disable()
    try:
        with ArchiveReader(s.archive) as r, ThreadPoolExecutor(2) as pool:
            for entry in r.files:
                for _ in file_chunks(r, entry, pool, 4):
                    pass
            kept = [weakref.ref(c) for c in r.references.cache._chunks.values()]
            assert kept and r.references._readers  # the later versions read the earlier ones
        assert all(k() is None for k in kept)  # freed by reference counting alone
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_tensor_several_files_hold_is_decoded_once(tmp_path: Path, monkeypatch, threads: int) -> None:
    """Files that share a stream (the same tensor in two checkpoints, a copied file) restore it
    from the chunks its first use decoded and checked: each chunk is decoded once, and every
    file comes back byte-exact."""
    import elves.decoder

    rng = np.random.default_rng(8)
    shared = rng.standard_normal(300_000).astype(np.float32).tobytes()
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        write_safetensors(src / f"m{k}.safetensors", {
            "shared": ("F32", (300_000,), shared),
            "own": ("F32", (70_000,), rng.standard_normal(70_000).astype(np.float32).tobytes())})
    s = elves.compress(src, tmp_path / "m.elves")
    with ArchiveReader(s.archive) as r:
        chunks = sum(len(st.chunks) for st in r.streams)
        uses = sum(len(r.streams[i].chunks) for e in r.files for i in e.segments)
    assert uses > chunks + 4  # the shared tensor's chunks are used three times
    decoded = []
    real = elves.decoder.decode_chunk

    def counting(reader, stream, pipeline, i, ref):
        decoded.append((id(stream), i))
        return real(reader, stream, pipeline, i, ref)

    monkeypatch.setattr(elves.decoder, "decode_chunk", counting)
    elves.restore(s.archive, tmp_path / "out", threads=threads)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == chunks
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_tensor_one_file_holds_twice_is_decoded_once(tmp_path: Path, monkeypatch, threads: int) -> None:
    """A file's decode window spans its streams, so both copies of a tensor the file holds twice
    (one stream, listed twice) can be in flight at once: the second waits for the chunks the first
    is decoding instead of decoding them again, and the file comes back byte-exact."""
    import elves.decoder

    rng = np.random.default_rng(9)
    tied = rng.standard_normal(300_000).astype(np.float32).tobytes()  # more chunks than a batch
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "m.safetensors", {
        "embed": ("F32", (300_000,), tied),
        "head": ("F32", (300_000,), tied),
        "small": ("F32", (3_000,), rng.standard_normal(3_000).astype(np.float32).tobytes())})
    s = elves.compress(src, tmp_path / "m.elves")
    with ArchiveReader(s.archive) as r:
        (entry,) = r.files
        chunks = sum(len(r.streams[i].chunks) for i in set(entry.segments))
        assert len(entry.segments) > len(set(entry.segments))
        assert sum(len(r.streams[i].chunks) for i in entry.segments) >= chunks + 3
    decoded = []
    real = elves.decoder.decode_chunk

    def slow(reader, stream, pipeline, i, ref):  # a first chunk slow enough for the second copy to catch up
        decoded.append((id(stream), i))
        time.sleep(0.1 if i == 0 else 0.005)
        return real(reader, stream, pipeline, i, ref)

    monkeypatch.setattr(elves.decoder, "decode_chunk", slow)
    elves.restore(s.archive, tmp_path / "out", threads=threads)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == chunks
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)


def test_the_chunk_cache_makes_a_chunk_once_for_all_who_ask() -> None:
    """Threads asking for a chunk that one of them is making wait for it; a maker that fails, or a
    chunk too large to keep, leaves the next one to make it itself."""
    from elves.references import ChunkCache

    cache = ChunkCache(10_000)
    made = []
    started = threading.Event()

    def make() -> np.ndarray:
        made.append(1)
        started.set()
        time.sleep(0.05)
        return np.arange(100, dtype=np.uint8)

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.obtain, (0, 0), make, True)
        started.wait()
        others = [pool.submit(cache.obtain, (0, 0), make) for _ in range(3)]
        got = [first.result(), *(f.result() for f in others)]
    assert len(made) == 1 and all(np.array_equal(g, np.arange(100, dtype=np.uint8)) for g in got)
    assert got[0].flags.writeable and not got[1].flags.writeable  # the maker's own array; the rest, the kept copy

    def fail() -> np.ndarray:
        started.set()
        time.sleep(0.05)
        raise ValueError("damaged")

    started.clear()
    with ThreadPoolExecutor(2) as pool:
        failing = pool.submit(cache.obtain, (0, 1), fail)
        started.wait()
        waiting = pool.submit(cache.obtain, (0, 1), lambda: np.ones(10, np.uint8))
        with pytest.raises(ValueError):
            failing.result()
        assert waiting.result().tolist() == [1] * 10
    huge = [0]

    def too_large() -> np.ndarray:
        huge[0] += 1
        return np.zeros(20_000, np.uint8)

    assert cache.obtain((1, 0), too_large).shape == (20_000,) and cache.obtain((1, 0), too_large).shape == (20_000,)
    assert huge[0] == 2 and cache.get((1, 0)) is None


@pytest.mark.parametrize("forge, message", [
    (lambda streams, i: i, "references stream .*, which does not come before it"),
    (lambda streams, i: len(streams), "which does not come before it"),
    (lambda streams, i: True, "no valid 'ref'"),
    (lambda streams, i: next(j for j, s in enumerate(streams) if s["nbytes"] != streams[i]["nbytes"]),
     "cannot be its reference|does not come before it"),
    (lambda streams, i: next(j for j, s in enumerate(streams) if j != i and "ref" in s and j != streams[i]["ref"]),
     "cannot be its reference|does not come before it"),
])
def test_forged_references_are_clean_errors(tmp_path: Path, forge, message: str) -> None:
    src = versions(tmp_path / "src", np.random.default_rng(7))
    s = elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound="1e-5")

    def edit(index: dict) -> None:
        streams = index["streams"]
        i = next(j for j, st in enumerate(streams) if "ref" in st)
        streams[i]["ref"] = forge(streams, i)

    rewrite_index(s.archive, edit)
    with pytest.raises(CorruptArchiveError, match=message) as e:
        elves.restore(s.archive, tmp_path / "out")
    assert str(s.archive) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_empty_payload_of_a_delta_chunk_is_a_clean_error(tmp_path: Path) -> None:
    """Only ``xor`` stores a chunk equal to its reference as an empty payload; an ``elf`` delta
    chunk forged empty is refused, not handed to the filter as nothing."""
    src = versions(tmp_path / "src", np.random.default_rng(8))
    s = elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound="1e-5")

    def edit(index: dict) -> None:
        chunk = next(st for st in index["streams"] if "ref" in st)["chunks"][0]
        chunk[1], chunk[3] = 0, xxhash.xxh3_64_intdigest(b"")

    rewrite_index(s.archive, edit)
    with pytest.raises(CorruptArchiveError, match=str(s.archive)):
        elves.restore(s.archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref_map", [
    "not a list", [[0, 0]], [[0, 0, 0]], [[0, -4, 4096]], [[0, 0, 1 << 40]], [[4096, 0, 4096], [0, 0, 4096]],
    [[0, 0, 8192], [4096, 0, 4096]], [[0, True, 4096]],
])
def test_forged_reference_maps_are_clean_errors(tmp_path: Path, ref_map) -> None:
    src = versions(tmp_path / "src", np.random.default_rng(9))
    s = elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound="1e-5")

    def edit(index: dict) -> None:
        next(st for st in index["streams"] if "ref" in st)["ref_map"] = ref_map

    rewrite_index(s.archive, edit)
    with pytest.raises(CorruptArchiveError, match="reference map"):
        elves.open(s.archive)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["openff-st", "silero"])
def test_folders_of_versions_beat_the_published_elf(dataset, tmp_path: Path, name: str) -> None:
    """The five OpenFF NAGL releases (rc.2 and later are fine-tunes of rc.1), and Silero VAD in
    several formats (one ONNX export with the LSTM gates reordered) against the published ELF
    with tensor dedup across files."""
    src = dataset(name)
    s = elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound="2^-24")
    reference = sum(f.stat().st_size for f in src.iterdir()) / reference_elf_size(src)
    assert s.ref_streams > 0
    assert s.ratio >= reference * 1.07, (s.ratio, reference)  # issue 4's goal
    v = elves.verify(s.archive, against=src)
    assert v.ok and v.over_bound == 0 and v.max_abs_error <= 2.0 ** -24
