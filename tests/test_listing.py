"""Listing what an archive or a stored model holds (``Archive.files``, ``.tensors``,
``Store.model``), and reading parts of an archive (``read_file``, ``extract``): every codec is
named, references say what they point at, stored bytes add up to the payload, and only the
streams of the files asked for are decoded."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import elves
from elves.archive import ArchiveReader
from elves.errors import OutputExistsError, StoreError, UsageError
from elves.index import FileEntry, Stream, TensorEntry
from elves.listing import SegmentFacts, codec_name, describe_reference, list_files, list_tensors, share
from elves.references import Reference
from elves.store import Store
from elves.store.manifests import manifest
from elves.store.objects import StoredObject
from tests.conftest import sha256

from .test_store import make_model

OPENFF = ["0.0.1-alpha.1", "0.1.0-rc.1", "0.1.0-rc.2", "0.1.0-rc.3", "1.0.0"]


@pytest.fixture(scope="module")
def openff(tmp_path_factory, dataset) -> tuple[Path, Path]:
    """Five versions of one model in a folder, and its archive: later versions reference earlier ones."""
    src = dataset("openff-st")
    return src, elves.compress(src, tmp_path_factory.mktemp("openff") / "m.elves").archive


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, dataset) -> tuple[Path, Path]:
    src = dataset("minilm")
    return src, elves.compress(src, tmp_path_factory.mktemp("minilm") / "m.elves").archive


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every chunk decoded from now on, as (the stream's nbytes, chunk index)."""
    from elves import chunks, decoder, references

    calls: list[tuple[int, int]] = []
    real = chunks.decode_chunk

    def counted(source: Any, stream: Stream, pipeline: Any, i: int, ref: Any) -> Any:
        calls.append((stream.nbytes, i))
        return real(source, stream, pipeline, i, ref)

    monkeypatch.setattr(decoder, "decode_chunk", counted)
    monkeypatch.setattr(references, "decode_chunk", counted)
    return calls


# ---------------------------------------------------------------------------- listing an archive

def test_versions_list_their_codecs_references_and_stored_bytes(openff: tuple[Path, Path]) -> None:
    src, archive = openff
    with elves.open(archive) as a, ArchiveReader(archive) as r:
        files = a.files()
        assert [f.path for f in files] == [f"openff-gnn-am1bcc-{v}.safetensors" for v in OPENFF]
        for f in files:
            assert (f.size, f.sha256, f.format, f.link) == ((src / f.path).stat().st_size, sha256(src / f.path),
                                                           "safetensors", None)
            assert f.tensors == 22 and f.ratio == f.size / f.stored_bytes
        # each unique stream counted once, for the first file that uses it
        assert sum(f.stored_bytes for f in files) == sum(s.stored_bytes for s in r.streams)
        assert files[3].stored_bytes < 1000 < files[0].stored_bytes  # rc.3 repeats rc.2's streams

        tensors = a.tensors()
        assert len(tensors) == 110 and [t.name for t in tensors[:22]] == [t.name for t in tensors[22:44]]
        assert {t.codec for t in tensors} == {"planes+rans", "xor+planes+rans", "raw"}
        for t in tensors:
            assert t.nbytes == int(np.prod(t.shape)) * 4 and t.dtype == "F32"
            if t.codec.startswith("xor"):
                # coded against the same tensor of an earlier version, named
                assert t.reference is not None and t.reference.startswith("stream ")
                number, held = t.reference.split(" ", 2)[1:]
                assert number.isdigit()
                assert held.startswith(f"({t.name} in openff-gnn-am1bcc-") and held != f"({t.name} in {t.file})"
            else:
                assert t.reference is None
        assert all(t.reference is None for t in tensors[:22])  # the first version stands alone
        # per file, the tensors' stored bytes are their streams' (a safetensors tensor is its stream)
        first = {t.name: t.stored_bytes for t in tensors[:22]}
        entry = r.files[0]
        assert sum(first.values()) == sum(r.streams[i].stored_bytes for i in entry.segments[1:])
        assert a.tensor_info(a.keys()[0]) == tensors[0]

        assert [f.path for f in a.files("*rc.*")] == [f"openff-gnn-am1bcc-0.1.0-rc.{i}.safetensors" for i in (1, 2, 3)]
        biases = a.tensors("*1.0.0*:*.bias")
        assert biases and all(t.file.endswith("1.0.0.safetensors") and t.name.endswith(".bias") for t in biases)
        assert len(a.tensors("*.readout_layers.0.weight")) == 5 and a.tensors("nothing*") == []
    assert "raw" in elves.info(archive).codecs and "" not in elves.info(archive).codecs


def test_read_file_is_the_source_and_decodes_only_that_file(openff: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src, archive = openff
    name = "openff-gnn-am1bcc-0.0.1-alpha.1.safetensors"
    with ArchiveReader(archive) as r:
        entry = next(e for e in r.files if e.path == name)
        chunks = sorted((r.streams[i].nbytes, k) for i in entry.segments for k in range(len(r.streams[i].chunks)))
    calls = count_decodes(monkeypatch)
    with elves.open(archive) as a:
        got = a.read_file(name)
        assert hashlib.sha256(got).hexdigest() == sha256(src / name) and got == (src / name).read_bytes()
        assert sorted(calls) == chunks
        with pytest.raises(UsageError, match="no file 'model.safetensors'"):
            a.read_file("model.safetensors")


def test_extract_writes_those_files_and_decodes_only_theirs(minilm: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src, archive = minilm
    wanted = ["config.json", "1_Pooling/config.json"]
    with ArchiveReader(archive) as r:
        by_path = {e.path: e for e in r.files}
        needed = sorted((r.streams[i].nbytes, k) for p in wanted for i in by_path[p].segments
                        for k in range(len(r.streams[i].chunks)))
    calls = count_decodes(monkeypatch)
    with elves.open(archive) as a:
        out = a.extract(wanted, tmp_path / "out")
        assert out == [tmp_path / "out" / p for p in wanted]
        assert sorted(calls) == needed
        written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
        assert written == sorted(wanted)
        for p in wanted:
            assert sha256(tmp_path / "out" / p) == sha256(src / p)
        umask = os.umask(0)
        os.umask(umask)
        assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
        with pytest.raises(OutputExistsError, match="use --force"):
            a.extract(["config.json"], tmp_path / "out")
        (tmp_path / "out" / "config.json").write_text("old")
        a.extract(["config.json", "vocab.txt"], tmp_path / "out", force=True)  # beside what is there
        assert sha256(tmp_path / "out" / "config.json") == sha256(src / "config.json")
        assert (tmp_path / "out" / "1_Pooling" / "config.json").exists()
        with pytest.raises(UsageError, match="no file 'nope.bin'"):
            a.extract(["config.json", "nope.bin"], tmp_path / "other")
        assert not (tmp_path / "other").exists()
        assert a.files("model.*")[0].format == "safetensors"
        tensors = a.tensors()
        assert {t.codec for t in tensors} >= {"planes+rans"} and all(t.reference is None for t in tensors)


def test_links_list_as_links_and_read_through(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    save_file({"w": np.arange(64, dtype=np.float32)}, str(src / "sub" / "model.safetensors"))
    os.symlink("sub/model.safetensors", src / "model.safetensors")
    os.symlink("sub", src / "folder")
    archive = elves.compress(src, tmp_path / "m.elves").archive
    with elves.open(archive) as a:
        files = {f.path: f for f in a.files()}
        assert files["model.safetensors"].link == "sub/model.safetensors" and files["model.safetensors"].stored_bytes == 0
        assert a.read_file("model.safetensors") == (src / "sub" / "model.safetensors").read_bytes()
        with pytest.raises(UsageError, match="leads to no file"):
            a.read_file("folder")
        a.extract(["model.safetensors"], tmp_path / "out")
        assert os.readlink(tmp_path / "out" / "model.safetensors") == "sub/model.safetensors"


def test_a_file_too_large_for_memory_points_to_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from elves import api

    save_file({"w": np.zeros(4096, np.float32)}, str(tmp_path / "m.safetensors"))
    archive = elves.compress(tmp_path / "m.safetensors", tmp_path / "m.elves").archive
    monkeypatch.setattr(api, "MAX_READ_BYTES", 4096)
    with elves.open(archive) as a, pytest.raises(UsageError, match="extract it"):
        a.read_file("m.safetensors")


def test_a_reference_to_a_base_model_and_a_cast_are_described(tmp_path: Path) -> None:
    """A BF16 release compressed against its F32 base: each tensor codes against the cast of the
    base tensor of its name, by content."""
    base = tmp_path / "base"
    base.mkdir()
    rng = np.random.default_rng(1)
    w = {f"layer.{i}.weight": (rng.standard_normal((128, 64)) * 0.02).astype(np.float32) for i in range(2)}
    save_file(w, str(base / "model.safetensors"))
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in w.items()}, str(src / "model.safetensors"))
    archive = elves.compress(src, tmp_path / "m.elves", base=base).archive
    with elves.open(archive) as a, ArchiveReader(archive) as r:
        hashes = [s.pipeline[0]["ref_hash"] for s in r.streams if s.pipeline and s.pipeline[0]["id"] == "xor"]
        tensors = a.tensors()  # listing needs no base: nothing is decoded
        assert [t.reference for t in tensors] == [f"base tensor {h[:12]} (cast from F32, rne)" for h in hashes]
        assert all(t.codec.startswith("xor+") and t.dtype == "BF16" for t in tensors)


def test_layouts_and_shares_are_described() -> None:
    """What a real archive rarely shows: block maps and grown shapes, a raw pipeline, tensors
    that view parts of one stream, and an empty tensor."""
    named = lambda ref: "stream 3"  # noqa: E731
    assert describe_reference(None, named) is None
    assert describe_reference(Reference(stream=3, map=[[0, 0, 4096]]), named) == "stream 3 (block map)"
    assert describe_reference(Reference(content=("ab" * 16, 8), grown=((2,), (4,))),
                              lambda r: "base tensor") == "base tensor (grown)"
    assert codec_name([]) == "raw" and codec_name([{"id": "xor"}, {"id": "planes"}]) == "xor+planes"
    # three views that tile a 1000-byte stream stored in 301 bytes (their shares add up to it), and
    # a stream two files share
    facts = [SegmentFacts(1000, 301, "planes+rans", None), SegmentFacts(10, 10, "raw", None)]
    views = [TensorEntry("a", "F32", (100,), 0, 0, None), TensorEntry("b", "F32", (100,), 0, 400, None),
             TensorEntry("c", "F32", (50,), 0, 800, None), TensorEntry("e", "F32", (0,), -1, 0, None)]
    files = [FileEntry("x.pt", 1010, "0" * 64, "torch-zip", [0, 1], views),
             FileEntry("y.bin", 10, "1" * 64, "opaque", [1])]
    tensors = list_tensors(facts, files)
    assert [(t.nbytes, t.stored_bytes) for t in tensors] == [(400, 120), (400, 120), (200, 61), (0, 0)]
    assert tensors[3].codec == "raw" and tensors[3].reference is None
    assert [f.stored_bytes for f in list_files(facts, files)] == [311, 0]
    assert share(301, 1000, 0, 1000) == 301 and share(0, 0, 0, 0) == 0


# ---------------------------------------------------------------------------- a stored model

def test_a_stored_finetune_lists_its_deltas(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (4, 256, 384)).astype(np.float32)
    s = Store.init(tmp_path / "s")
    s.add(make_model(tmp_path / "tiny-base", 1, base=w))
    s.add(make_model(tmp_path / "tiny-ft", 2, base=w, noise=0.01, declares="acme/tiny-base"))
    assert s.models()[1].base == "tiny-base"
    base, ft = s.model("tiny-base"), s.model("tiny-ft")
    assert all(t.reference is None for t in base.tensors())
    deltas = ft.tensors("layer.*.weight")
    assert len(deltas) == 4
    base_keys = {t.name: seg[0] for f in manifest(s.storage, "tiny-base")["files"] for t in _tensors(f)
                 for seg in [f["segments"][t.segment]]}
    for t in deltas:
        assert t.codec.startswith("xor+") and t.reference == f"object {base_keys[t.name]}"
        assert t.dtype == "BF16" and t.shape == (256, 384) and t.stored_bytes < t.nbytes
    assert ft.tensors("layer.0.bias")[0].reference is None
    files = ft.files()
    assert {f.path for f in files} == {"model.safetensors", "config.json", "README.md"}
    assert [f.path for f in ft.files("*.json")] == ["config.json"]
    # the model's objects' payloads, each once (the same for both models' shared bytes)
    keys = {seg[0] for f in manifest(s.storage, "tiny-ft")["files"] for seg in f["segments"]}
    payload = 0
    for key in keys:
        with StoredObject(s.storage, key) as obj:
            payload += obj.meta.stored_bytes
    assert sum(f.stored_bytes for f in files) == payload
    with pytest.raises(StoreError, match="no model named 'nope'"):
        s.model("nope")


def _tensors(entry: dict[str, Any]) -> list[TensorEntry]:
    return [TensorEntry(n, dt, tuple(shape), seg, off, strides) for n, dt, shape, seg, off, strides in entry["tensors"]]
