"""Hostile model files and folders: every reader either accepts a layout (and compress restores
it byte for byte) or refuses it with an InputError naming the file and what is wrong. Never a
traceback of another type, unbounded memory, or a pickle run. The files are real safetensors and
real torch checkpoints, edited afterwards the way a forger would."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import elves
from elves.errors import InputError
from elves.model import Segment, SourceFile
from elves.kernels.onnx_walk import MAX_DEPTH
from elves.readers import onnx as onnx_reader
from elves.readers import read_file, read_model, safetensors
from elves.readers import torch as torch_reader
from elves.readers.torch import unpickler as torch_unpickler
from tests.conftest import tree_hashes, write_safetensors
from tests.test_onnx_reader import field, model_bytes, varint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _weights(rng: np.random.Generator) -> dict:
    w = (rng.standard_normal((16, 8)) * 0.02).astype(np.float32)
    b = (rng.standard_normal(8) * 0.1).astype(np.float16)
    ids = np.arange(6, dtype=np.int64)
    return {"w": ("F32", w.shape, w.tobytes()), "b": ("F16", b.shape, b.tobytes()),
            "ids": ("I64", ids.shape, ids.tobytes())}


def _forge(path: Path, edit) -> Path:
    """Rewrite the header of a safetensors file through ``edit(header) -> header or raw bytes``,
    keeping the data section as it is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return path


def _roundtrip(src: Path, tmp_path: Path) -> None:
    archive = tmp_path / "out.elves"
    elves.compress(src, archive)
    elves.restore(archive, tmp_path / "restored")
    assert tree_hashes(tmp_path / "restored") == tree_hashes(src)


# --- safetensors ----------------------------------------------------------------------------------

def test_empty_tensor_does_not_hide_an_overlap(tmp_path: Path) -> None:
    """The overlap check skipped pairs with an empty tensor: one sitting between two overlapping
    tensors hid their overlap, and model.py then failed on an assertion."""
    path = write_safetensors(tmp_path / "m.safetensors", {**_weights(np.random.default_rng(0)),
                                                         "empty": ("F32", (0, 4), b"")})

    def edit(h: dict) -> dict:
        h["b"]["data_offsets"] = [h["w"]["data_offsets"][1] - 8, h["w"]["data_offsets"][1] + 8]
        h["empty"]["data_offsets"] = [h["w"]["data_offsets"][1] - 12] * 2
        return h

    _forge(path, edit)
    with pytest.raises(InputError, match=r"m\.safetensors.*tensors 'w' and 'b' overlap"):
        read_model(path)


@pytest.mark.parametrize("where", ["start", "inside another", "between", "end"])
def test_empty_tensors_anywhere_restore_exactly(tmp_path: Path, where: str) -> None:
    src = tmp_path / "model"
    src.mkdir()
    path = write_safetensors(src / "m.safetensors", {**_weights(np.random.default_rng(1)),
                                                    "e0": ("BF16", (0,), b""), "e1": ("F32", (3, 0), b"")},
                             gap=4)

    def edit(h: dict) -> dict:
        w, b = h["w"]["data_offsets"], h["b"]["data_offsets"]
        at = {"start": 0, "inside another": w[0] + 20, "between": w[1] + 2, "end": b[1] + 4}[where]
        h["e0"]["data_offsets"] = h["e1"]["data_offsets"] = [at, at]
        return h

    _forge(path, edit)
    (sf,), _ = read_model(path)
    assert {t.name: t.segment for t in sf.tensors if 0 in t.shape} == {"e0": -1, "e1": -1}
    _roundtrip(src, tmp_path)


def test_deeply_nested_header_is_an_input_error(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", _weights(np.random.default_rng(2)))
    _forge(path, lambda h: b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(InputError, match=r"m\.safetensors.*not valid JSON"):
        read_model(path)


def _set(name: str, key: str, value):
    def edit(h: dict) -> dict:
        h[name][key] = value
        return h
    return edit


HOSTILE_HEADERS = {
    "unknown dtype": (_set("w", "dtype", "F24"), "'w' has unknown dtype"),
    "dtype not a string": (_set("w", "dtype", 4), "'w' has unknown dtype"),
    "negative dimension": (_set("w", "shape", [-16, -8]), "'w' has a shape"),
    "boolean dimension": (_set("b", "shape", [True] * 8), "'b' has a shape"),
    "float dimension": (_set("w", "shape", [16.0, 8]), "'w' has a shape"),
    "dimension past 2^63": (_set("w", "shape", [2**63, 0]), "'w' has a shape"),
    "shape too big for the bytes": (_set("w", "shape", [16, 9]), "'w' has 512 bytes for shape"),
    "shape of an empty tensor over bytes": (_set("w", "shape", [0, 514]), "'w' has 512 bytes"),
    "element count past 2^63": (_set("w", "shape", [2**62, 2**62]), "'w' has .* elements"),
    "65 dimensions": (_set("w", "shape", [1] * 65), "'w' has 65 dimensions"),
    "offsets not integers": (_set("w", "data_offsets", [0.0, 512.0]), "'w' has data_offsets"),
    "three offsets": (_set("w", "data_offsets", [0, 256, 512]), "'w' has data_offsets"),
    "offsets reversed": (_set("w", "data_offsets", [512, 0]), r"'w' lies at bytes \[512, 0\)"),
    "negative offset": (_set("w", "data_offsets", [-512, 0]), "'w' lies at bytes"),
    "past the end": (_set("ids", "data_offsets", [10**6, 10**6 + 48]), "'ids' lies at bytes"),
    "missing field": (lambda h: {**h, "w": {"dtype": "F32", "shape": [16, 8]}}, "'w' lacks"),
    "metadata not strings": (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ is not a map"),
    "metadata a list": (lambda h: {**h, "__metadata__": ["pt"]}, "__metadata__ is not a map"),
    "not an object": (lambda h: [h], "not a JSON object"),
    "huge integer": (lambda h: json.dumps(h).replace("[16, 8]", "[1" + "0" * 5000 + ", 8]").encode(),
                     "not valid JSON"),
    "duplicate name": (lambda h: json.dumps(h).encode().replace(b'"b":', b'"w":'), "'w' appears twice"),
    "not UTF-8": (lambda h: b'{"\xff": 1}', "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_header_is_an_input_error(tmp_path: Path, case: str) -> None:
    edit, message = HOSTILE_HEADERS[case]
    path = _forge(write_safetensors(tmp_path / "m.safetensors", _weights(np.random.default_rng(3)),
                                    {"format": "pt"}), edit)
    with pytest.raises(InputError, match=message) as caught:
        read_model(path)
    assert caught.value.path == str(path)


def test_header_longer_than_safetensors_allows(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", _weights(np.random.default_rng(4)))
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", safetensors.MAX_HEADER + 1))
        f.truncate(safetensors.MAX_HEADER + 64)
    with pytest.raises(InputError, match="at most 100000000"):
        read_model(path)


def test_packed_dtypes_are_sized_by_their_bits(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    # 6 F4 elements fill 3 bytes, 4 F6 elements 3 bytes; 5 F4 elements do not fill whole bytes
    path = write_safetensors(src / "m.safetensors", {"f4": ("F4", (2, 3), b"\x12\x34\x56"),
                                                    "f6": ("F6_E2M3", (4,), b"\xff\x00\x7f")})
    (sf,), _ = read_model(path)
    assert {t.name: t.dtype for t in sf.tensors} == {"f4": "F4", "f6": "F6_E2M3"}
    _roundtrip(src, tmp_path)
    _forge(path, _set("f4", "shape", [5]))
    with pytest.raises(InputError, match=r"'f4' has 3 bytes for shape \[5\] of F4"):
        read_model(path)


def test_segments_that_do_not_tile_are_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    for segments, size in ([Segment(0, 10), Segment(5, 10)], 15), ([Segment(0, 10)], 12), \
                          ([Segment(0, 0), Segment(0, 4)], 4):
        with pytest.raises(InputError, match=r"x\.bin"):
            SourceFile(path, "x.bin", "opaque", size, segments).check()


# --- torch checkpoints ----------------------------------------------------------------------------

def _state_dict(torch) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(32, 16, generator=g), "layer.bias": torch.randn(32, generator=g),
            "steps": torch.tensor(1000)}


def _replace_member(path: Path, member: str, data: bytes) -> None:
    """Rewrite a torch zip with one member's content replaced (the others as torch stored them)."""
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, content in members:
            z.writestr(info, data if info.filename.endswith(member) else content)


def _bomb(pickle_bytes: bytes, blocks: int) -> tuple[bytes, int, int]:
    """A deflate stream of ``pickle_bytes`` followed by ``blocks`` times 64 KiB of zeros, built
    from one flushed block repeated (so making it costs no GiB); its CRC-32 and inflated size."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(pickle_bytes) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(64 << 10)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(pickle_bytes)
    for _ in range(blocks):
        crc = zlib.crc32(zeros, crc)
    return head + block * blocks + deflate.flush(), crc, len(pickle_bytes) + blocks * len(zeros)


def _deflated_pickle_checkpoint(torch, path: Path, blocks: int) -> None:
    """A real checkpoint whose data.pkl is deflated, 64 KiB ``blocks`` of zeros after its STOP: zipfile
    writes the stream as a stored member, then the method, sizes and CRC are patched into both
    headers, as a forger would."""
    torch.save(_state_dict(torch), path)
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        stream, crc, size = _bomb(z.read(name), blocks)
    _replace_member(path, "data.pkl", stream)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(name).header_offset
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(name)] != name.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    for method_at, crc_at in ((local + 8, local + 14), (central + 10, central + 16)):
        struct.pack_into("<H", raw, method_at, 8)
        struct.pack_into("<III", raw, crc_at, crc, len(stream), size)
    path.write_bytes(bytes(raw))


def _peak_rss_parsing(path: Path, *, limit_gib: int = 4) -> tuple[str, int]:
    """(the error parse raised, peak RSS in bytes) in a fresh process under an address-space limit,
    so that a regression fails this test rather than the machine."""
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, ({limit_gib} << 30, {limit_gib} << 30))
from pathlib import Path
from elves.errors import InputError
from elves.readers.torch import parse
try:
    parse(Path({str(path)!r}), "x.pt")
    print("accepted")
except InputError as e:
    print(e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    message, rss = out.stdout.strip().rsplit("\n", 1)
    return message, int(rss) * 1024


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory) -> int:
    """Peak RSS of parsing an honest checkpoint: the interpreter, numpy, numba and elves."""
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("baseline") / "plain.pt"
    torch.save(_state_dict(torch), path)
    message, peak = _peak_rss_parsing(path)
    assert message == "accepted"
    return peak


def test_zip_bomb_pickle_is_refused_in_bounded_memory(torch, tmp_path: Path, baseline_rss: int) -> None:
    """A 1 MB data.pkl that inflates to 1 GiB peaked at 2 GiB RSS through zlib.decompress."""
    path = tmp_path / "bomb.pt"
    _deflated_pickle_checkpoint(torch, path, 1 << 14)
    assert path.stat().st_size < 2 << 20
    message, peak = _peak_rss_parsing(path)
    assert "zip bomb" in message and "data.pkl" in message
    # the cap is 100x the 1.4 MB member: 136 MB of output, far from the GiB it would inflate to
    assert peak - baseline_rss < 256 << 20, (peak, baseline_rss)


@pytest.mark.parametrize("blocks", [0, 8])  # 512 KiB of zeros: beyond 100:1, within the 1 MiB floor
def test_deflated_pickle_within_the_caps_is_read(torch, tmp_path: Path, blocks: int) -> None:
    path = tmp_path / "zipped.pt"
    _deflated_pickle_checkpoint(torch, path, blocks)
    sf = torch_reader.parse(path, "zipped.pt")
    assert {t.name for t in sf.tensors} == set(_state_dict(torch))


def test_pickle_larger_than_the_cap_is_refused(torch, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.pt"
    torch.save({**_state_dict(torch), "history": list(range(20_000))}, path)
    monkeypatch.setattr("elves.readers.torch.zip_format.MAX_PICKLE", 10_000)
    monkeypatch.setattr("elves.readers.torch.pickle_scan.MAX_PICKLE", 10_000)
    with pytest.raises(InputError, match=r"big\.pt.*data\.pkl.*holds \d+ bytes; elves reads at most 10000"):
        torch_reader.parse(path, "big.pt")
    path = tmp_path / "legacy.pt"
    torch.save({**_state_dict(torch), "history": list(range(20_000))}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy\.pt.*pickles.*runs past 10000 bytes"):
        torch_reader.parse(path, "legacy.pt")


def test_memo_index_bomb_is_refused(torch, tmp_path: Path, baseline_rss: int) -> None:
    """LONG_BINPUT 2^32-1 makes the C unpickler grow and zero a 32 GiB memo table."""
    path = tmp_path / "memo.pt"
    torch.save(_state_dict(torch), path)
    with zipfile.ZipFile(path) as z:
        original = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert original[2:4] == b"}q"  # PROTO 2, EMPTY_DICT, BINPUT 0
    _replace_member(path, "data.pkl", original[:3] + b"r\xff\xff\xff\xff" + original[5:])
    message, peak = _peak_rss_parsing(path)
    assert "memo index beyond the memo" in message and peak - baseline_rss < 64 << 20


def test_declared_length_past_the_pickle_is_refused(torch, tmp_path: Path, baseline_rss: int) -> None:
    """BINBYTES8 of 2^60 bytes: the unpickler would allocate that before reading."""
    path = tmp_path / "legacy.pt"
    torch.save(_state_dict(torch), path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    at = raw.index(b"protocol_version")
    forged = raw[:at - 5] + b"\x8e" + (1 << 60).to_bytes(8, "little") + raw[at - 5:]
    path.write_bytes(forged)
    message, peak = _peak_rss_parsing(path)
    assert "declares a length past its end" in message and peak - baseline_rss < 64 << 20


def test_deep_nesting_names_tensors_only_near_the_top(torch, tmp_path: Path) -> None:
    sd = _state_dict(torch)
    deep = {"w": sd["layer.weight"]}
    for _ in range(torch_unpickler.MAX_NESTING + 5):
        deep = {"d": deep}
    path = tmp_path / "deep.pt"
    torch.save({"deep": deep, "s": {"t": sd["layer.bias"]}}, path)
    sf = torch_reader.parse(path, "deep.pt")
    sf.check()
    assert [t.name for t in sf.tensors] == ["s.t"]
    assert sorted(s.dtype for s in sf.segments if s.dtype) == ["F32", "F32"]  # still coded as floats


def test_pickle_of_100k_nested_lists(torch, tmp_path: Path) -> None:
    n = 100_000
    path = tmp_path / "nested.pt"
    torch.save(_state_dict(torch), path)
    _replace_member(path, "data.pkl", b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
    sf = torch_reader.parse(path, "nested.pt")
    sf.check()
    assert sf.tensors == [] and not any(s.dtype for s in sf.segments)


def _header_offset_past_the_end(raw: bytearray, entry: int) -> None:
    struct.pack_into("<I", raw, entry + 42, 0xFFFFFFF0)


def _name_not_utf8(raw: bytearray, entry: int) -> None:
    struct.pack_into("<H", raw, entry + 8, 0x800)  # the flag that says the name is UTF-8
    raw[entry + 46] = 0xFF


@pytest.mark.parametrize("forge, message", [(_header_offset_past_the_end, "outside the"),
                                            (_name_not_utf8, "malformed zip central directory")])
def test_forged_central_directory(torch, tmp_path: Path, forge, message: str) -> None:
    path = tmp_path / "cd.pt"
    torch.save(_state_dict(torch), path)
    raw = bytearray(path.read_bytes())
    forge(raw, raw.index(b"PK\x01\x02"))
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=message):
        torch_reader.parse(path, "cd.pt")


# --- ONNX -----------------------------------------------------------------------------------------

def test_onnx_tensor_with_a_million_dims_stays_opaque(tmp_path: Path) -> None:
    dims = field(1, varint(1) * 1_000_000)
    tensor = dims + field(2, 1) + field(8, b"t") + field(9, bytes(4))
    path = tmp_path / "m.onnx"
    path.write_bytes(field(7, field(5, tensor)))
    sf = onnx_reader.parse(path, "m.onnx")
    sf.check()
    assert sf.tensors == [] and not any(s.dtype for s in sf.segments)


def test_onnx_varints_past_64_bits_never_alias_small_ones(tmp_path: Path) -> None:
    """The walk (a kernel) holds varints in 64 bits: a dim of 2**64 + 4 must not read as 4, a data
    type of 2**64 + 1 as F32, nor a field number of 2**61 + 9 (a key of 2**64 + 74) as raw_data.
    Each such tensor stays opaque; the one beside them is found."""
    ok = field(1, 4) + field(2, 1) + field(8, b"ok") + field(9, bytes(16))
    dim = field(1, 2**64 + 4) + field(2, 1) + field(8, b"dim") + field(9, bytes(16))
    dtype = field(1, 4) + field(2, 2**64 + 1) + field(8, b"dtype") + field(9, bytes(16))
    key = field(1, 4) + field(2, 1) + field(8, b"key") + field(2**61 + 9, bytes(16))
    path = tmp_path / "m.onnx"
    path.write_bytes(field(7, b"".join(field(5, t) for t in (dim, ok, dtype, key))))
    sf = onnx_reader.parse(path, "m.onnx")
    sf.check()
    assert [(t.name, t.dtype, t.shape) for t in sf.tensors] == [("ok", "F32", (4,))]


def test_onnx_subgraphs_nested_too_deep_stay_opaque(tmp_path: Path) -> None:
    data, _ = model_bytes(np.random.default_rng(5))
    graph = field(5, field(9, bytes(4)) + field(2, 1))
    for _ in range(MAX_DEPTH + 2):
        graph = field(1, field(5, field(6, graph)))
    path = tmp_path / "m.onnx"
    path.write_bytes(data + field(7, graph))
    assert onnx_reader.parse(path, "m.onnx") is None


# --- symbolic links -------------------------------------------------------------------------------

@pytest.fixture
def model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    write_safetensors(src / "model.safetensors", _weights(np.random.default_rng(6)))
    (src / "config.json").write_text('{"hidden": 8}')
    (src / "sub" / "tokenizer.json").write_text('{"vocab": {}}')
    return src


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "id_rsa"
    path.parent.mkdir()
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return path


def test_link_outside_the_model_is_refused(model: Path, secret: Path) -> None:
    (model / "sub" / "key").symlink_to(secret)
    with pytest.raises(InputError, match=r"sub/key: .* to .*outside/id_rsa, which points outside the "
                                         r"model folder; use --follow-symlinks") as caught:
        read_model(model)
    assert caught.value.path == str(model / "sub" / "key")


def test_link_to_a_folder_outside_is_refused(model: Path, secret: Path) -> None:
    (model / "ext").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(InputError, match="points outside the model folder"):
        read_model(model)


def test_follow_symlinks_reads_the_targets(model: Path, secret: Path) -> None:
    (model / "key").symlink_to(secret)
    (model / "ext").symlink_to(secret.parent, target_is_directory=True)
    files, single = read_model(model, follow_symlinks=True)
    by_name = {f.relpath: f for f in files}
    assert not single and set(by_name) == {"config.json", "key", "model.safetensors", "ext/id_rsa",
                                           "sub/tokenizer.json"}
    assert by_name["key"].format == "opaque" and by_name["key"].size == secret.stat().st_size
    assert by_name["key"].path == secret.resolve() and by_name["key"].link is None


def test_followed_links_that_loop_are_refused(model: Path, secret: Path) -> None:
    (model / "ext").symlink_to(secret.parent, target_is_directory=True)
    (secret.parent / "again").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(InputError, match="a loop"):
        read_model(model, follow_symlinks=True)


def test_links_inside_are_recorded_not_read(model: Path) -> None:
    (model / "sub" / "weights.safetensors").symlink_to("../model.safetensors")
    (model / "absolute.json").symlink_to(model / "sub" / "tokenizer.json")
    (model / "sub" / "up").symlink_to("..", target_is_directory=True)
    (model / "tok").symlink_to("sub", target_is_directory=True)
    files, _ = read_model(model)
    links = {f.relpath: f.link for f in files if f.format == "symlink"}
    assert links == {"absolute.json": "sub/tokenizer.json", "sub/weights.safetensors": "../model.safetensors",
                     "sub/up": "..", "tok": "sub"}
    for f in files:
        if f.format == "symlink":
            assert f.size == 0 and f.segments == [] and f.tensors == []
    # nothing is read through a link, and a linked folder is not walked
    assert [f.relpath for f in files if f.format != "symlink"] == \
        ["config.json", "model.safetensors", "sub/tokenizer.json"]


def test_broken_link_is_refused(model: Path, tmp_path: Path) -> None:
    (model / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"gone: broken symbolic link"):
        read_model(model)
    (model / "gone").unlink()
    (model / "self").symlink_to("self")
    with pytest.raises(InputError, match=r"self: broken symbolic link"):
        read_model(model)


def test_a_linked_model_named_by_the_user_is_followed(model: Path, tmp_path: Path) -> None:
    (tmp_path / "folder-link").symlink_to(model, target_is_directory=True)
    (tmp_path / "file-link.safetensors").symlink_to(model / "model.safetensors")
    files, _ = read_model(tmp_path / "folder-link")
    assert [f.relpath for f in files] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    (sf,), single = read_model(tmp_path / "file-link.safetensors")
    assert single and sf.format == "safetensors" and sf.relpath == "file-link.safetensors"


def test_a_file_swapped_for_a_link_is_not_read_through(model: Path, secret: Path) -> None:
    path = model / "config.json"
    path.unlink()
    path.symlink_to(secret)  # after the walk saw a regular file, before the reader opens it
    with pytest.raises(InputError, match="became a symbolic link"):
        read_file(path, "config.json")


def test_a_fifo_is_refused_without_blocking(model: Path) -> None:
    os.mkfifo(model / "pipe")

    def blocked(*_):  # opening a FIFO for reading waits for a writer: fail, rather than hang
        raise AssertionError("read_model blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(30)
    try:
        with pytest.raises(InputError, match="pipe: is not a regular file"):
            read_model(model)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
