"""The PyTorch checkpoint reader: segments tile the file, storages get the right dtype, the named
views read back exactly what torch saved, and no pickle is ever executed."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from elves.dtypes import numpy_dtype
from elves.errors import InputError, UnsafePickleError
from elves.readers.torch import parse, read_state_dict

# torch dtype -> safetensors name, for every dtype the synthetic checkpoints hold.
DTYPE_NAMES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64", "uint16": "U16", "float8_e4m3fn": "F8_E4M3",
}


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _checkpoint(torch) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in ("float32", "float16", "bfloat16", "float64", "complex64", "float8_e4m3fn"):
        sd[f"x_{name}"] = torch.randn(3, 5, generator=g).to(getattr(torch, name))
    for name in ("int64", "int32", "int16", "int8"):
        sd[f"x_{name}"] = torch.randint(-100, 100, (4, 3), generator=g, dtype=getattr(torch, name))
    sd["x_uint8"] = torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8)
    sd["x_uint16"] = torch.randint(0, 60000, (6,), generator=g, dtype=torch.int32).to(torch.uint16)
    sd["x_bool"] = torch.randn(9, generator=g) > 0
    tied = torch.randn(4, 4, generator=g)
    sd["embed.weight"] = tied
    sd["head.weight"] = tied
    sd["offset_view"] = torch.arange(20, dtype=torch.float32)[5:15]
    sd["transposed"] = torch.randn(3, 4, generator=g).t()
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    return {
        "state_dict": sd,
        "meta": {"epoch": 3, "lr": [0.1, 0.01], "name": "model", "raw": b"\x00\x01"},
        "extra": [torch.ones(2, dtype=torch.int64), (torch.full((2, 2), 7.0),)],
    }


def _dtype_name(t) -> str:
    return DTYPE_NAMES[str(t.dtype).removeprefix("torch.")]


def _flatten(obj, prefix: str = "") -> dict:
    """The tensors in ``obj``'s dicts, lists and tuples, by dotted path (the reader's names)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj} if hasattr(obj, "untyped_storage") else {}
    out = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _through_view(path: Path, sf, view) -> np.ndarray:
    """Read a TensorView's elements straight from the file, the way a consumer of the model would."""
    seg = sf.segments[view.segment]
    dtype = numpy_dtype(view.dtype)
    data = path.read_bytes()[seg.offset:seg.offset + seg.length]
    count = (len(data) - view.offset) // dtype.itemsize
    flat = np.frombuffer(data, dtype, offset=view.offset, count=count)
    strides = view.strides or tuple(int(np.prod(view.shape[i + 1:])) for i in range(len(view.shape)))
    return np.lib.stride_tricks.as_strided(flat, view.shape, [s * dtype.itemsize for s in strides])


def _same(array: np.ndarray, t) -> bool:
    """Same shape and the same bits (bf16 and float8 included, which numpy() refuses)."""
    import torch

    expected = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
    return tuple(array.shape) == tuple(t.shape) and np.ascontiguousarray(array).tobytes() == expected


def _save(torch, obj, path: Path, fmt: str, protocol: int = 2) -> None:
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=(fmt == "zip"))


@pytest.mark.parametrize("fmt, protocol", [("zip", 2), ("legacy", 2), ("zip", 4), ("legacy", 5)])
def test_synthetic_checkpoint(torch, tmp_path, fmt, protocol):
    obj = _checkpoint(torch)
    path = tmp_path / "model.pt"
    _save(torch, obj, path, fmt, protocol)
    sf = parse(path, "model.pt")
    assert sf is not None and sf.format == f"torch-{fmt}"
    sf.check()
    assert not sf.warnings

    tensors = _flatten(obj)
    storages = {}
    for t in tensors.values():
        if t.untyped_storage().nbytes():
            storages[t.untyped_storage().data_ptr()] = _dtype_name(t)
    assert sorted(s.dtype for s in sf.segments if s.dtype) == sorted(storages.values())

    views = {v.name: v for v in sf.tensors}
    assert set(views) == set(tensors)
    for name, v in views.items():
        t = tensors[name]
        assert v.dtype == _dtype_name(t) and v.shape == tuple(t.shape)
        if v.segment == -1:  # an empty tensor has no bytes to point into
            assert t.numel() == 0
            continue
        assert sf.segments[v.segment].dtype == v.dtype
        assert _same(_through_view(path, sf, v), t), name
    assert views["state_dict.empty"].segment == -1
    assert views["state_dict.embed.weight"].segment == views["state_dict.head.weight"].segment
    assert views["state_dict.offset_view"].offset == 5 * 4
    assert views["state_dict.transposed"].strides == (1, 4)
    assert views["state_dict.x_float32"].strides is None

    arrays = read_state_dict(path)
    assert set(arrays) == set(tensors)
    for name, t in tensors.items():
        assert arrays[name].dtype == numpy_dtype(_dtype_name(t))
        assert _same(arrays[name], t), name
    assert np.array_equal(arrays["state_dict.x_float32"], tensors["state_dict.x_float32"].numpy())


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_named_by_its_dtype(torch, tmp_path):
    """A persistent id may name the storage's dtype (torch.float16) rather than a storage class."""
    t = torch.randn(6, generator=torch.Generator().manual_seed(1)).to(torch.float16)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                return ("storage", obj.dtype, "0", "cpu", obj.size())
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": t})
    with zipfile.ZipFile(tmp_path / "m.pt", "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", t.view(torch.int16).numpy().tobytes())
    sf = parse(tmp_path / "m.pt", "m.pt")
    sf.check()
    assert [s.dtype for s in sf.segments if s.dtype] == ["F16"] and not sf.warnings
    assert _same(read_state_dict(tmp_path / "m.pt")["w"], t)


def test_truncated_legacy_is_an_input_error(torch, tmp_path):
    _save(torch, {"w": torch.randn(64)}, tmp_path / "a.pt", "legacy")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "b.pt").write_bytes(data[:-10])
    with pytest.raises(InputError, match="past the end"):
        parse(tmp_path / "b.pt", "b.pt")


def test_not_a_checkpoint(tmp_path):
    for name, data in {"a.bin": b"\x00" * 100, "b.pkl": pickle.dumps({"a": 1}, protocol=2),
                       "c.txt": b"hello", "d.bin": b""}.items():
        (tmp_path / name).write_bytes(data)
        assert parse(tmp_path / name, name) is None
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as z:
        z.writestr("x/y.npy", b"123")
    assert parse(tmp_path / "e.zip", "e.zip") is None
    with pytest.raises(InputError):
        read_state_dict(tmp_path / "a.bin")


def _rezip(src: Path, dst: Path, compression: int = zipfile.ZIP_STORED,
           byteorder: bytes | None = None) -> None:
    """Copy a torch zip with Python's zipfile: no alignment padding, no data descriptors."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if byteorder is not None and info.filename.endswith("/byteorder"):
                data = byteorder
            zout.writestr(info.filename, data)


def test_plain_zip_layout(torch, tmp_path):
    obj = {"w": torch.randn(5, 3), "b": torch.arange(4)}
    _save(torch, obj, tmp_path / "a.pt", "zip")
    _rezip(tmp_path / "a.pt", tmp_path / "b.pt")
    sf = parse(tmp_path / "b.pt", "b.pt")
    sf.check()
    assert [v.name for v in sf.tensors] == ["w", "b"]
    for v in sf.tensors:
        assert _same(_through_view(tmp_path / "b.pt", sf, v), obj[v.name])


def test_compressed_and_big_endian_storages_stay_opaque(torch, tmp_path):
    _save(torch, {"w": torch.randn(5, 3)}, tmp_path / "a.pt", "zip")
    _rezip(tmp_path / "a.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    _rezip(tmp_path / "a.pt", tmp_path / "big.pt", byteorder=b"big")
    for name in ("deflated.pt", "big.pt"):
        sf = parse(tmp_path / name, name)
        sf.check()
        assert sf.format == "torch-zip" and not any(s.dtype for s in sf.segments) and not sf.tensors
        with pytest.raises(InputError):
            read_state_dict(tmp_path / name)
    assert "big-endian" in parse(tmp_path / "big.pt", "big.pt").warnings[0]


def test_truncated_zip(torch, tmp_path):
    g = torch.Generator().manual_seed(0)
    obj = {f"layer{i}": torch.randn(256, generator=g) for i in range(8)}
    _save(torch, obj, tmp_path / "full.pt", "zip")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "part.bin").write_bytes(data[: len(data) * 2 // 3])
    sf = parse(tmp_path / "part.bin", "part.bin")
    sf.check()
    assert "no central directory" in sf.warnings[0]
    assert 3 <= sum(1 for s in sf.segments if s.dtype == "F32") < 8
    assert sf.tensors
    for v in sf.tensors:
        assert _same(_through_view(tmp_path / "part.bin", sf, v), obj[v.name])


def test_truncated_zip_storages_are_found_by_their_recorded_size(torch, tmp_path):
    """A storage whose bytes happen to hold a valid-looking data descriptor: the size the pickle
    records finds the real one, where scanning would stop at the fake and lose what follows."""
    import struct
    import zlib

    fake = b"PK\x07\x08" + struct.pack("<III", zlib.crc32(b"x" * 64), 64, 64) + b"PK"
    data = bytearray(range(64)) + bytearray(fake) + bytearray(200)
    obj = {"a": torch.frombuffer(bytearray(data), dtype=torch.uint8).clone(), "b": torch.ones(300)}
    _save(torch, obj, tmp_path / "full.pt", "zip")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "part.bin").write_bytes(raw[:raw.rindex(b"PK\x01\x02")])  # no central directory
    sf = parse(tmp_path / "part.bin", "part.bin")
    assert {v.name for v in sf.tensors} == {"a", "b"}
    for v in sf.tensors:
        assert _same(_through_view(tmp_path / "part.bin", sf, v), obj[v.name])


def test_parsing_leaves_nothing_for_the_garbage_collector(torch, tmp_path):
    """The unpickled objects are freed by reference counting as soon as the tensors are known
    (the cyclic collector would otherwise walk all of them, once per generation)."""
    obj = _checkpoint(torch)
    obj["table"] = [{"k": i, "v": [i, str(i)]} for i in range(2000)]
    _save(torch, obj, tmp_path / "model.pt", "zip")
    # in a fresh interpreter: threads that earlier tests leave behind (fsspec's event loop, say)
    # make garbage of their own while parse runs. The first parse imports numba and loads the
    # pickle scanner's kernel, which leave cycles of their own; the second is the one measured.
    code = ("import gc, sys; from pathlib import Path; from elves.readers.torch import parse; "
            "parse(Path(sys.argv[1]), 'model.pt'); gc.collect(); "
            "parse(Path(sys.argv[1]), 'model.pt'); print(gc.collect())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript(torch, tmp_path):
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()))
    path = tmp_path / "model.jit"
    model.save(str(path))
    sf = parse(path, "model.jit")
    sf.check()
    assert sf.format == "torch-zip"
    assert sorted(s.length for s in sf.segments if s.dtype == "F32") == [16, 48]
    assert "__torch__" in sf.warnings[0]
    with pytest.raises(UnsafePickleError):
        read_state_dict(path)


class _Pwn:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_not_executed(torch, tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.randn(4, 4), "payload": _Pwn(target)}, path)
    sf = parse(path, "evil.pt")
    assert not target.exists()
    sf.check()
    assert [s.dtype for s in sf.segments if s.dtype] == ["F32"]
    assert [v.name for v in sf.tensors] == ["weight"]
    assert len(sf.warnings) == 1 and f"{os.system.__module__}.system" in sf.warnings[0]
    with pytest.raises(UnsafePickleError, match="system"):
        read_state_dict(path)
    assert not target.exists()


def _crafted(target: Path) -> dict[str, bytes]:
    """Hand-written pickles that create ``target`` when unpickled for real, by the global used."""
    sh = f"touch {target}".encode()
    py = f"open({str(target)!r}, 'w').close()".encode()
    return {
        "posix.system": b"cposix\nsystem\n(S'" + sh + b"'\ntR.",
        "os.system": b"(S'" + sh + b"'\nios\nsystem\n.",  # INST: find the class, then call it
        "builtins.getattr": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR"
                            b"(S'" + sh + b"'\ntR.",
        "builtins.exec": b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93X"
                         + len(py).to_bytes(4, "little") + py + b"\x85R.",
    }


@pytest.mark.parametrize("qualname", list(_crafted(Path("x"))))
def test_crafted_pickles_run_nothing(tmp_path, qualname):
    target = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", _crafted(target)[qualname])
    sf = parse(tmp_path / "evil.pt", "evil.pt")
    sf.check()
    assert qualname in sf.warnings[0]
    with pytest.raises(UnsafePickleError, match=qualname):
        read_state_dict(tmp_path / "evil.pt")
    assert not target.exists()


def test_unpickler_imports_nothing(tmp_path, monkeypatch):
    """A global naming an importable module must not import it (importing runs its code)."""
    marker = tmp_path / "imported"
    module = f"open({str(marker)!r}, 'w').close()\nboom = print\n"
    (tmp_path / "elves_evil_module.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    # {"a": elves_evil_module.boom("hi")}
    payload = b"\x80\x02}X\x01\x00\x00\x00acelves_evil_module\nboom\nX\x02\x00\x00\x00hi\x85Rs."
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", b"3\n")
    sf = parse(tmp_path / "evil.pt", "evil.pt")
    sf.check()
    assert "elves_evil_module.boom" in sf.warnings[0]
    assert not marker.exists() and "elves_evil_module" not in sys.modules


def test_malformed_pickle_is_an_input_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.pt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00(X")
    with pytest.raises(InputError, match="data.pkl"):
        parse(tmp_path / "bad.pt", "bad.pt")


# --- Real checkpoints -----------------------------------------------------------------------------

REAL = [  # dataset, file pattern, share of the file that must be storage bytes, expected warning
    # the newer openff files pickle 6 MB of lookup tables next to 10 MB of weights
    ("openff", "*.pt", 0.6, "openff.nagl.nn.activation.ActivationFunction"),
    ("astra", "astra_encoder.pt", 0.99, None),
    ("fall", "best.pt", 0.99, "ultralytics.nn.tasks.DetectionModel"),
    ("silero", "*.jit", 0.95, "__torch__"),
    ("merlin-p1", "part.bin", 0.99, "no central directory"),
]


@pytest.mark.realdata
@pytest.mark.parametrize("name, pattern, share, warning", REAL, ids=[r[0] for r in REAL])
def test_real_checkpoint(dataset, name, pattern, share, warning):
    paths = sorted(dataset(name).rglob(pattern))
    assert paths
    for path in paths:
        sf = parse(path, path.name)
        assert sf is not None and sf.format == "torch-zip"
        sf.check()
        storage_bytes = sum(s.length for s in sf.segments if s.dtype)
        assert storage_bytes >= share * sf.size, (path, storage_bytes, sf.size)
        if warning is None:
            assert not sf.warnings
        else:
            assert len(sf.warnings) == 1 and warning in sf.warnings[0]


@pytest.mark.realdata
def test_real_astra(dataset, torch):
    path = next(dataset("astra").rglob("astra_encoder.pt"))
    sf = parse(path, path.name)
    assert sum(1 for s in sf.segments if s.dtype == "BF16") > 500
    assert not sf.warnings and len(sf.tensors) == 930
    arrays = read_state_dict(path)
    expected = _flatten(torch.load(path, weights_only=True, mmap=True))
    assert set(arrays) == set(expected)
    for name in sorted(expected)[::97]:
        assert _same(arrays[name], expected[name]), name
