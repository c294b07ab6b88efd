"""Small segments packed into one bytes stream (format 1.5): the archive's tensors stay readable
by name, files restore bit-exactly, and a forged entry pointing past its segment is refused."""
from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import elves
from elves.archive import ArchiveReader
from elves.index import tensor_names
from elves.model import Segment, SourceFile, TensorView
from elves.readers import read_file
from elves.readers.packing import SMALL_BYTES, SMALL_ELEMENTS, pack_small
from tests.conftest import tree_hashes, write_safetensors

from .test_bad_input import rewrite_index


def test_runs_of_small_segments_become_one_and_their_tensors_point_into_it() -> None:
    big = 4 * SMALL_ELEMENTS
    segments = [Segment(0, 100),                        # a header: small
                Segment(100, 40, "F32", "a"),           # small tensors and the bytes between them
                Segment(140, 8),
                Segment(148, 6, "BF16", "b"),
                Segment(154, big, "F32", "big"),        # large: its own segment
                Segment(154 + big, 3000),               # a lone small segment between large ones
                Segment(3154 + big, 2 * big, "F16", "big16"),
                Segment(3154 + 3 * big, 16, "U8", "fp4"),   # a sub-byte tensor's whole segment
                Segment(3170 + 3 * big, 2 * SMALL_BYTES)]   # large opaque bytes
    size = 3170 + 3 * big + 2 * SMALL_BYTES
    tensors = [TensorView("a", "F32", (2, 5), 1), TensorView("a.col", "F32", (2,), 1, 4, (5,)),
               TensorView("b", "BF16", (3,), 3), TensorView("big", "F32", (SMALL_ELEMENTS,), 4),
               TensorView("big16", "F16", (4 * SMALL_ELEMENTS,), 6), TensorView("fp4", "F4", (32,), 7),
               TensorView("none", "F32", (0,), -1)]
    sf = SourceFile(Path("m"), "m", "safetensors", size, segments, tensors)
    sf.check()
    packed = pack_small(sf)
    packed.check()
    assert [(s.offset, s.length, s.dtype) for s in packed.segments] == [
        (0, 154, None), (154, big, "F32"), (154 + big, 3000, None), (3154 + big, 2 * big, "F16"),
        (3154 + 3 * big, 16, "U8"), (3170 + 3 * big, 2 * SMALL_BYTES, None)]
    placed = {t.name: (t.segment, t.offset) for t in packed.tensors}
    assert placed == {"a": (0, 100), "a.col": (0, 104), "b": (0, 148), "big": (1, 0), "big16": (3, 0),
                      "fp4": (4, 0), "none": (-1, 0)}
    assert sf.segments == segments and sf.tensors == tensors  # the reader's model is left alone
    assert pack_small(packed) is packed


def small_and_large(rng: np.random.Generator) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {
        "embed.weight": ("F32", (64, 64), rng.standard_normal(4096).astype(np.float32).tobytes()),
        "layer.0.bias": ("F32", (64,), rng.standard_normal(64).astype(np.float32).tobytes()),
        "layer.0.norm": ("BF16", (64,), rng.standard_normal(64).astype(ml_dtypes.bfloat16).tobytes()),
        "layer.0.ids": ("I64", (1, 7), np.arange(7, dtype=np.int64).tobytes()),
        "layer.0.scale": ("F16", (), np.float16(0.125).tobytes()),
        "layer.0.weight": ("F16", (64, 64), rng.standard_normal(4096).astype(np.float16).tobytes()),
        "layer.1.bias": ("F32", (3,), rng.standard_normal(3).astype(np.float32).tobytes()),
    }


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_tensors_are_read_by_name_and_files_restore_bit_exactly(tmp_path: Path, threads: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    tensors = small_and_large(rng)
    write_safetensors(src / "model.safetensors", tensors)
    write_safetensors(src / "copy.safetensors", {**tensors, "layer.1.bias": ("F32", (3,), bytes(12))})
    s = elves.compress(src, tmp_path / "m.elves", threads=threads)
    with ArchiveReader(s.archive) as r:
        assert r.version == (1, 5)
        entry = next(e for e in r.files if e.path == "model.safetensors")
        kinds = {t.name: r.streams[entry.segments[t.segment]].kind for t in entry.tensors}
    # a lone small tensor between large ones (or at the end) keeps its own tensor stream
    assert kinds == {"embed.weight": "tensor", "layer.0.weight": "tensor", "layer.0.bias": "bytes",
                     "layer.0.norm": "bytes", "layer.0.ids": "bytes", "layer.0.scale": "bytes",
                     "layer.1.bias": "tensor"}
    with elves.open(s.archive) as a:
        for name, (dtype, shape, raw) in tensors.items():
            got = a.get_tensor(f"model.safetensors:{name}")
            assert got.shape == shape and got.tobytes() == raw, name
        # listed with the packed stream's codec, and a share of its stored bytes
        info = {t.name: t for t in a.tensors("model.safetensors:*")}
        assert info["layer.0.ids"].codec == "zstd" and info["layer.0.ids"].nbytes == 56
        assert 0 < info["layer.0.ids"].stored_bytes < info["layer.0.bias"].stored_bytes
    elves.restore(s.archive, tmp_path / "out", threads=threads)
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)
    assert elves.verify(s.archive).ok


def test_without_small_tensors_the_writer_keeps_format_1_4(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    write_safetensors(tmp_path / "m.safetensors", {
        "w": ("F32", (64, 64), rng.standard_normal(4096).astype(np.float32).tobytes())})
    s = elves.compress(tmp_path / "m.safetensors", tmp_path / "m.elves")
    with ArchiveReader(s.archive) as r:
        assert r.version < (1, 5)


@pytest.mark.parametrize("edit, message", [
    (lambda t, nbytes: t.__setitem__(4, nbytes - 8 + 1), "lies outside its segment"),
    (lambda t, nbytes: t.__setitem__(2, [nbytes]), "lies outside its segment"),
    (lambda t, nbytes: (t.__setitem__(2, [2]), t.__setitem__(5, [nbytes // 8])), "lies outside its segment"),
])
def test_a_packed_tensor_forged_past_its_segment_is_refused(tmp_path: Path, edit, message: str) -> None:
    rng = np.random.default_rng(5)
    write_safetensors(tmp_path / "m.safetensors", small_and_large(rng))
    s = elves.compress(tmp_path / "m.safetensors", tmp_path / "m.elves")

    def forge(index: dict) -> None:
        f = index["files"][0]
        t = next(t for t in f["tensors"] if t[0] == "layer.0.ids")
        stream = index["streams"][f["segments"][t[3]]]
        assert stream["kind"] == "bytes"
        t[2] = [1] if len(t[2]) != 2 else t[2][:1]
        t[5] = None
        edit(t, stream["nbytes"])

    rewrite_index(s.archive, forge)
    with pytest.raises(elves.CorruptArchiveError, match=message):
        elves.open(s.archive)


@pytest.mark.realdata
def test_an_onnx_file_of_small_tensors_packs_and_reads_back(dataset, tmp_path: Path) -> None:
    """silero's ONNX export: hundreds of shape constants between runs of protobuf. Packed, the
    file has a few dozen streams, and every tensor still reads back as the file holds it."""
    path = dataset("silero") / "silero_vad.onnx"
    sf = read_file(path, path.name)
    s = elves.compress(path, tmp_path / "m.elves")
    with ArchiveReader(s.archive) as r:
        assert r.version == (1, 5) and len(r.streams) < len(sf.segments) // 5
    data = path.read_bytes()
    with ArchiveReader(s.archive) as r:
        entry = r.files[0]
        starts = np.cumsum([0] + [r.streams[i].nbytes for i in entry.segments])
        named = tensor_names(r.files)
    assert len(named) > 100
    with elves.open(s.archive) as a:
        for key, (_, t) in named.items():
            got = a.get_tensor(key)
            at = int(starts[t.segment]) + t.offset
            assert got.shape == t.shape and got.tobytes() == data[at:at + got.nbytes], key
    elves.restore(s.archive, tmp_path / "out.onnx")
    assert hashlib.sha256((tmp_path / "out.onnx").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_lossy_file_keeps_its_tensors_in_streams_of_their_dtype(tmp_path: Path) -> None:
    """A lossy file's bytes are not the original's, so no sha256 shows two of its streams swapped
    in a forged index: its tensors are not packed, and one said to lie in a bytes stream (the
    header's, swapped with a small tensor's of another size) is refused."""
    rng = np.random.default_rng(6)
    write_safetensors(tmp_path / "m.safetensors", small_and_large(rng))
    s = elves.compress(tmp_path / "m.safetensors", tmp_path / "m.elves", lossy="elf", error_bound="2^-12")
    with ArchiveReader(s.archive) as r:
        entry = r.files[0]
        assert entry.lossy and all(r.streams[entry.segments[t.segment]].kind == "tensor" for t in entry.tensors)
        ids = next(t for t in entry.tensors if t.name == "layer.0.ids")
        swap = (entry.segments[0], entry.segments[ids.segment])

    def forge(index: dict) -> None:
        streams = index["streams"]
        streams[swap[0]], streams[swap[1]] = streams[swap[1]], streams[swap[0]]

    rewrite_index(s.archive, forge)
    with pytest.raises(elves.CorruptArchiveError, match="in a stream of bytes"):
        elves.restore(s.archive, tmp_path / "out")


def test_the_tensors_of_a_packed_stream_decode_it_once(tmp_path: Path, monkeypatch) -> None:
    import elves.decoder

    rng = np.random.default_rng(7)
    tensors = small_and_large(rng)
    write_safetensors(tmp_path / "m.safetensors", tensors)
    s = elves.compress(tmp_path / "m.safetensors", tmp_path / "m.elves")
    with ArchiveReader(s.archive) as r:
        entry = r.files[0]
        # the streams holding tensors, and the header's, which the structure check reads
        held = {entry.segments[t.segment] for t in entry.tensors} | {entry.segments[0]}
        chunks = sum(len(r.streams[i].chunks) for i in held)
        assert any(r.streams[i].kind == "bytes" for i in held)
    decoded = []
    real = elves.decoder.decode_chunk
    monkeypatch.setattr(elves.decoder, "decode_chunk", lambda *a: decoded.append(a[3]) or real(*a))
    with elves.open(s.archive) as a:
        got = {name: a.get_tensor(name).tobytes() for name in tensors}
    assert got == {name: raw for name, (_, _, raw) in tensors.items()}
    assert len(decoded) == chunks
