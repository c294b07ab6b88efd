"""Forged archives, as a hostile uploader makes them: the index edited and every checksum
recomputed. Each must end in a clean ElvesError naming the archive, before a byte is written, or
restore exactly what was compressed. Also the file system: links in and out of a model folder,
and a destination holding a link."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zstandard

import elves
from elves import archive as ar
from elves.errors import CorruptArchiveError, UnsafePathError
from tests.conftest import tree_hashes, write_safetensors

from .test_bad_input import rewrite_index
from .test_cli import elves as elves_cli
from .test_codecs import weights_like


@pytest.fixture
def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "a.safetensors", {
        "big": ("F32", (300, 1000), weights_like("F32", 300_000, rng).tobytes()),
        "twin": ("F32", (300, 1000), weights_like("F32", 300_000, rng).tobytes()),
        "small": ("F32", (16,), weights_like("F32", 16, rng).tobytes()),
    })
    (src / "config.json").write_text('{"hidden": 1000}')
    return src


@pytest.fixture
def archive(model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "m.elves"
    elves.compress(model, out)
    return out


def _file(index: dict, path: str) -> dict:
    return next(f for f in index["files"] if f["path"] == path)


def _tensor(index: dict, name: str) -> list:
    return next(t for f in index["files"] for t in f["tensors"] if t[0] == name)


def _stream_of(index: dict, name: str) -> dict:
    f = next(f for f in index["files"] if any(t[0] == name for t in f["tensors"]))
    return index["streams"][f["segments"][_tensor(index, name)[3]]]


def _refused(archive: Path, tmp_path: Path, match: str) -> None:
    """Every reader refuses the archive with a CorruptArchiveError naming it, and writes nothing."""
    out = tmp_path / "out"
    for call in (lambda: elves.restore(archive, out), lambda: elves.info(archive),
                 lambda: elves.verify(archive), lambda: elves.load_file(archive)):
        with pytest.raises(CorruptArchiveError, match=match) as e:
            call()
        assert str(archive) in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- silent wrong results

def test_swapped_equal_size_segments_fail_restore(archive: Path, tmp_path: Path) -> None:
    """Every stream still decodes to its own hash: only the file's sha256 tells the files apart."""
    def edit(index):
        segs = _file(index, "a.safetensors")["segments"]
        big, twin = (_tensor(index, n)[3] for n in ("big", "twin"))
        segs[big], segs[twin] = segs[twin], segs[big]

    rewrite_index(archive, edit)
    out = tmp_path / "out"
    with pytest.raises(CorruptArchiveError, match="a.safetensors: restored bytes do not match the stored sha256"):
        elves.restore(archive, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # --no-verify trusts the index for the file as a whole (its streams are still checked)
    elves.restore(archive, out, verify=False)
    assert (out / "a.safetensors").stat().st_size == (tmp_path / "src" / "a.safetensors").stat().st_size


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("forged", ["a.safetensors", "b.bin", "config.json"])
def test_a_wrong_sha256_of_any_file_fails_restore(model: Path, tmp_path: Path, forged: str, threads: int) -> None:
    """A file's sha256 finishes beside the next file's decode: a mismatch in a file that is not
    the last still fails the restore (and an extract) before anything moves into place, and no
    hashing thread outlives it."""
    import threading

    (model / "b.bin").write_bytes((model / "a.safetensors").read_bytes()[::-1])  # opaque bytes
    archive = tmp_path / "three.elves"
    elves.compress(model, archive)
    rewrite_index(archive, lambda index: _file(index, forged).__setitem__("sha256", "0" * 64))
    before = set(threading.enumerate())
    out = tmp_path / "out"
    with pytest.raises(CorruptArchiveError, match=f"{forged}: restored bytes do not match the stored sha256"):
        elves.restore(archive, out, threads=threads)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert not [t for t in threading.enumerate() if t not in before]  # no thread of ours left
    with elves.open(archive) as a, pytest.raises(CorruptArchiveError, match=f"{forged}: restored bytes"):
        a.extract(["a.safetensors", "b.bin", "config.json"], tmp_path / "some")
    assert not any(p.is_file() for p in (tmp_path / "some").rglob("*"))
    rewrite_index(archive, lambda index: None)  # unchanged otherwise: the other files restore
    elves.restore(archive, out, verify=False, threads=threads)
    assert tree_hashes(out).keys() == tree_hashes(model).keys()


def test_index_without_files(archive: Path, tmp_path: Path) -> None:
    rewrite_index(archive, lambda index: index.update(files=[]))
    _refused(archive, tmp_path, "lists no files")


@pytest.mark.parametrize("dtype", ["I32", "U8", "F4", "X9", None, 7])
def test_tensor_dtype_must_be_its_streams(archive: Path, tmp_path: Path, dtype) -> None:
    rewrite_index(archive, lambda index: _tensor(index, "big").__setitem__(1, dtype))
    _refused(archive, tmp_path, "tensor 'big'|malformed tensor")


@pytest.mark.parametrize("edit", [
    lambda t: t.__setitem__(3, -1),                    # no segment, 300k elements
    lambda t: t.__setitem__(3, 9),                     # a segment the file does not have
    lambda t: t.__setitem__(2, [0, 514]),              # safetensors: shape must cover the segment
    lambda t: t.__setitem__(2, [600, 1000]),           # twice the segment
    lambda t: t.__setitem__(2, [2 ** 40, 2 ** 40]),    # element count overflows int64
    lambda t: t.__setitem__(5, [2 ** 40, 1]),          # strides far past the segment
    lambda t: t.__setitem__(5, [1]),                   # strides of the wrong rank
    lambda t: t.__setitem__(4, 3),                     # offset inside an element
    lambda t: t.__setitem__(4, -4),
    lambda t: t.__setitem__(2, [300, -1000]),
    lambda t: t.__setitem__(2, [1] * 100),             # rank past numpy's
    lambda t: t.pop(),                                 # short entry
])
def test_tensor_entry_must_lie_inside_its_segment(archive: Path, tmp_path: Path, edit) -> None:
    rewrite_index(archive, lambda index: edit(_tensor(index, "big")))
    _refused(archive, tmp_path, "tensor|malformed")


def test_a_file_forged_into_a_format_without_structure_keeps_no_tensors(archive: Path, tmp_path: Path) -> None:
    """Tensor entries are checked against the file's own structure; a file relabelled opaque
    (which has none) would let a forged shape through unchecked (fuzz: a dimension removed)."""
    def forge(index: dict) -> None:
        _file(index, "a.safetensors")["format"] = "opaque"
        _tensor(index, "big")[2] = [300]
    rewrite_index(archive, forge)
    _refused(archive, tmp_path, "names tensors, which a file of format")


def _checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    """A real PyTorch checkpoint holding strided views: a transpose and a column slice of one
    storage."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 48, generator=g)
    tensors = {"w": w, "wt": w.T, "col": w[:, 5], "b": torch.randn(48, generator=g)}
    src = tmp_path / "ck"
    src.mkdir()
    torch.save(tensors, src / "model.pt")
    return src, {k: v.contiguous().numpy() for k, v in tensors.items()}


def test_strided_views_of_a_checkpoint_read_and_forged_strides_are_refused(tmp_path: Path) -> None:
    src, want = _checkpoint(tmp_path)
    out = tmp_path / "ck.elves"
    elves.compress(src, out)
    with elves.open(out) as a:
        for name, arr in want.items():
            assert a.get_tensor(name).tobytes() == arr.tobytes()

    def forge(index):  # the transpose declared contiguous: same count, inside the storage
        next(t for f in index["files"] for t in f["tensors"] if t[0] == "wt")[5] = None

    rewrite_index(out, forge)
    with elves.open(out) as a, pytest.raises(CorruptArchiveError, match="tensor 'wt' in the index is not the one "
                                                                          "its torch-zip structure describes"):
        a.get_tensor("b")
    elves.restore(out, tmp_path / "back")  # the file itself is intact
    assert tree_hashes(tmp_path / "back") == tree_hashes(src)


def test_a_tensor_forged_empty_is_refused(tmp_path: Path) -> None:
    """An empty shape needs no bytes, so only the file's own pickle can tell it is forged."""
    src, _ = _checkpoint(tmp_path)
    out = tmp_path / "ck.elves"
    elves.compress(src, out)
    rewrite_index(out, lambda index: next(t for f in index["files"] for t in f["tensors"]
                                          if t[0] == "b").__setitem__(2, [0, 48]))
    with elves.open(out) as a, pytest.raises(CorruptArchiveError, match="tensor 'b' in the index is not the one"):
        a.get_tensor("b")


# ---------------------------------------------------------------- the chunk plan

@pytest.mark.parametrize("field,value,match", [
    ("decoded_length", lambda d: d // 2, "decodes to"),
    ("decoded_length", lambda d: -1, "malformed chunk"),
    ("decoded_length", lambda d: 8 << 30, "decodes to"),
    ("offset", lambda o: -1, "malformed chunk"),
    ("offset", lambda o: 100, "outside the data region"),
    ("offset", lambda o: 2 ** 63, "outside the data region"),
    ("length", lambda n: 2 ** 62, "more than any coding"),
    ("shape", None, "malformed chunk"),
])
def test_forged_chunks(archive: Path, tmp_path: Path, field, value, match) -> None:
    def edit(index):
        chunks = _stream_of(index, "big")["chunks"]
        if field == "shape":
            chunks[0] = chunks[0][:3]
        else:
            k = ["offset", "length", "decoded_length"].index(field)
            chunks[1][k] = value(chunks[1][k])

    rewrite_index(archive, edit)
    _refused(archive, tmp_path, match)


def test_forged_stream_length_is_refused_before_writing(archive: Path, tmp_path: Path) -> None:
    """A stream and its file claiming 8 GB more than the chunks hold fail before a byte is written."""
    def edit(index):
        _stream_of(index, "big")["nbytes"] += 8 << 30
        _file(index, "a.safetensors")["size"] += 8 << 30

    rewrite_index(archive, edit)
    _refused(archive, tmp_path, "chunks cannot hold")


def test_overlapping_chunks(archive: Path, tmp_path: Path) -> None:
    def edit(index):
        a, b = _stream_of(index, "big")["chunks"][:2]
        b[0] = a[0] + 1

    rewrite_index(archive, edit)
    _refused(archive, tmp_path, "overlap")


@pytest.mark.parametrize("edit,match", [
    (lambda i: i.update(files={"a": 1}), "'files'"),
    (lambda i: i.update(streams=None), "'streams'"),
    (lambda i: i["files"][0].update(segments="0"), "'segments'"),
    (lambda i: i["files"][0].update(segments=[-1]), "no stream"),
    (lambda i: i["files"][0].update(size=None), "'size'"),
    (lambda i: i["files"][0].update(size=-5), "'size'"),
    (lambda i: i["files"][0].update(size=i["files"][0]["size"] + 1), "add up"),
    (lambda i: i["files"][0].update(sha256="zz"), "'sha256'"),
    (lambda i: i["files"][0].update(format="exe"), "'format'"),
    (lambda i: i["files"].append(dict(i["files"][0])), "same path"),
    (lambda i: i["files"].pop(), "belongs to no file"),
    (lambda i: i["files"][1].update(path=i["files"][0]["path"] + "/inner"), "folder of"),
    (lambda i: i["streams"][0].update(kind="tensors"), "'kind'"),
    (lambda i: i["streams"][0].update(hash=None), "'hash'"),
    (lambda i: i["streams"][0].update(chunk_elems=0), "'chunk_elems'"),
    (lambda i: i["streams"][0].update(chunk_elems=2 ** 40), "limit"),
    (lambda i: i["streams"][0].update(pipeline=[{"id": None}]), "unknown codec"),
    (lambda i: i["streams"][0].update(pipeline=[{"id": "rans", "lanes": 10 ** 9}]), "rans"),
    (lambda i: i.update(format=[1, 9]), "header says"),
    (lambda i: i.update(source="file"), "single-file"),
])
def test_forged_fields(archive: Path, tmp_path: Path, edit, match) -> None:
    rewrite_index(archive, edit)
    with pytest.raises(elves.ElvesError, match=match) as e:
        elves.info(archive)
    assert str(archive) in str(e.value)
    out = tmp_path / "out"
    with pytest.raises(elves.ElvesError):
        elves.restore(archive, out)
    assert not out.exists()


def test_pipeline_element_width_must_match_the_stream(archive: Path, tmp_path: Path) -> None:
    """F32 chunks declared as I64 or C128 planes: the merge would write past each chunk."""
    for dt in ("I64", "C128", "U8"):
        def edit(index, dt=dt):
            _stream_of(index, "big")["pipeline"][0]["dtype"] = dt
        rewrite_index(archive, edit)
        _refused(archive, tmp_path, "codes .* elements")


def test_index_inflation_is_capped() -> None:
    blob = zstandard.ZstdCompressor().compress(b"\0" * 100_000)
    with pytest.raises(ValueError, match="100000 bytes, over"):
        ar.inflate(blob, 1000)
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100_000)
    with pytest.raises(ValueError, match="inflates past"):
        ar.inflate(streamed, 1000)
    assert ar.inflate(streamed, 100_000) == b"\0" * 100_000


# ---------------------------------------------------------------- links

def test_links_inside_the_model_come_back_as_links(model: Path, tmp_path: Path) -> None:
    (model / "sub").mkdir()
    (model / "sub" / "weights.safetensors").symlink_to("../a.safetensors")
    (model / "cfg").symlink_to("config.json")
    (model / "again").symlink_to("sub")
    out = tmp_path / "l.elves"
    s = elves.compress(model, out)
    assert s.original_bytes == sum(p.stat().st_size for p in model.iterdir() if p.is_file() and not p.is_symlink())
    info = {f["path"]: f for f in elves.info(out).files}
    assert info["sub/weights.safetensors"]["link"] == "../a.safetensors" and info["again"]["link"] == "sub"
    back = tmp_path / "back"
    elves.restore(out, back)
    for name in ("sub/weights.safetensors", "cfg", "again"):
        assert (back / name).is_symlink() and os.readlink(back / name) == os.readlink(model / name)
    assert tree_hashes(back / "a.safetensors") == tree_hashes(model / "a.safetensors")
    assert elves.verify(out, against=model).ok


def test_link_out_of_the_model_is_refused(model: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (model / "leak.txt").symlink_to(secret)
    with pytest.raises(elves.InputError, match="leak.txt.*outside") as e:
        elves.compress(model, tmp_path / "x.elves")
    assert "--follow-symlinks" in str(e.value)
    assert not (tmp_path / "x.elves").exists()
    out = tmp_path / "y.elves"
    elves.compress(model, out, follow_symlinks=True)
    back = tmp_path / "back"
    elves.restore(out, back)
    assert not (back / "leak.txt").is_symlink() and (back / "leak.txt").read_text() == "not part of the model"


@pytest.mark.parametrize("link", ["../../etc/passwd", "/etc/passwd", "sub/../../x", ""])
def test_forged_link_out_of_the_model(archive: Path, tmp_path: Path, link: str) -> None:
    def edit(index):
        index["files"].append({"path": "evil", "size": 0, "sha256": "0" * 64, "format": "symlink",
                               "segments": [], "tensors": [], "link": link})

    rewrite_index(archive, edit)
    _refused(archive, tmp_path, "symbolic link")


def test_restore_never_writes_through_a_link_in_the_destination(archive: Path, tmp_path: Path) -> None:
    """``restore --force`` into a folder whose subfolder is a link to elsewhere: refused, and the
    other folder is untouched."""
    def edit(index):
        _file(index, "config.json")["path"] = "sub/config.json"

    rewrite_index(archive, edit)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="sub: is a link"):
        elves.restore(archive, out, force=True)
    assert list(outside.iterdir()) == []
    (out / "sub").unlink()
    elves.restore(archive, out, force=True)
    assert (out / "sub" / "config.json").read_text() == '{"hidden": 1000}'


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(elves.InputError, match="no files"):
        elves.compress(tmp_path / "empty", tmp_path / "e.elves")


# ---------------------------------------------------------------- API and CLI errors

def test_api_usage_errors(archive: Path) -> None:
    with pytest.raises(elves.UsageError, match="numpy"):
        elves.load_file(archive, framework="numpy", device="cuda:0")
    with pytest.raises(elves.UsageError, match="'jax'"):
        elves.load_file(archive, framework="jax")  # type: ignore[arg-type]
    try:
        import cupy  # noqa: F401
    except ImportError:  # no GPU stack here: a clean error naming what is missing, not an ImportError
        with pytest.raises(elves.ElvesError, match="cupy is not installed"):
            elves.load_file(archive, device="cuda:0")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return elves_cli(*args)


def test_cli_errors_json_and_debug(archive: Path, tmp_path: Path) -> None:
    rewrite_index(archive, lambda index: index.update(files=[]))
    r = _cli("info", str(archive), "--json")
    assert r.returncode == 4 and "Traceback" not in r.stderr
    err = json.loads(r.stderr)  # errors go to stderr, results to stdout
    assert err["ok"] is False and err["kind"] == "CorruptArchiveError" and err["exit_code"] == 4
    assert str(archive) in err["error"]
    r = _cli("--debug", "info", str(archive))
    assert r.returncode == 4 and "Traceback" in r.stderr and "parse_index" in r.stderr


@pytest.mark.parametrize("bound", ["abc", "2^x", "rel:", "1e999999", "nan"])
def test_cli_bad_error_bound_is_a_usage_error(model: Path, tmp_path: Path, bound: str) -> None:
    r = _cli("compress", str(model), "-o", str(tmp_path / "x.elves"), "--lossy", "elf", "--error-bound", bound)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error-bound" in r.stderr


def _swap_dims(index: dict) -> None:
    _tensor(index, "big")[2] = [1000, 300]  # the same count: the parser cannot tell


def _retype(index: dict) -> None:
    """F32 tensors declared I32, streams and codecs too: consistent, and wrong."""
    for st in index["streams"]:
        if st.get("dtype") == "F32":
            st["dtype"] = "I32"
            for c in st["pipeline"]:
                if "dtype" in c:
                    c["dtype"] = "I32"
    for f in index["files"]:
        for t in f["tensors"]:
            t[1] = "I32"


def _swap_names(index: dict) -> None:
    big, twin = _tensor(index, "big"), _tensor(index, "twin")
    big[0], twin[0] = "twin", "big"


@pytest.mark.parametrize("forge", [_swap_dims, _retype, _swap_names])
def test_tensor_entries_must_agree_with_the_safetensors_header(archive: Path, tmp_path: Path, forge) -> None:
    """The index's tensor entries are checked against the file's own header (restored, its hash
    checked): a forger who edits them alone gets an error from every tensor reader."""
    rewrite_index(archive, forge)
    with pytest.raises(CorruptArchiveError, match="a.safetensors: tensor .* is not the one its safetensors structure describes"):
        elves.load_file(archive)
    with elves.open(archive) as a, pytest.raises(CorruptArchiveError, match=str(archive)):
        a.get_tensor("small")
    out = tmp_path / "out"
    elves.restore(archive, out)  # the file itself is intact
    assert tree_hashes(out) == tree_hashes(tmp_path / "src")


def test_payload_longer_than_any_coding_of_its_chunk(archive: Path, tmp_path: Path) -> None:
    """A payload is read whole: a 256 KiB chunk may not claim a payload of most of the archive."""
    def edit(index):
        first = _stream_of(index, "big")["chunks"][0]
        first[1] = 4 * first[2] + (1 << 20) + 1

    rewrite_index(archive, edit)
    _refused(archive, tmp_path, "more than any coding")
