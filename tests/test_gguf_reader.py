"""The GGUF reader: real GGUF files (minilm's tensors written by gguf-py in F32, F16, BF16, Q8_0
and Q4_0) list their tensors as gguf-py reads them and restore byte for byte; identical tensors
share a stream; hostile headers are refused with an InputError naming the file, and versions the
reader does not parse are kept opaque."""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import elves
from elves.errors import InputError
from elves.readers import gguf as gguf_reader
from elves.readers import read_file

gguf = pytest.importorskip("gguf")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def roundtrip(src: Path, tmp_path: Path) -> elves.CompressSummary:
    archive = tmp_path / (src.name + ".elves")
    summary = elves.compress(src, archive)
    out = tmp_path / ("restored-" + src.name)
    elves.restore(archive, out)
    assert sha(out) == sha(src)
    return summary


# -- a GGUF writer whose every field the tests choose

def gstr(s: str | bytes, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, value)


def kv_str(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def info(name: str, ne: tuple[int, ...], kind: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", kind, offset)


def gguf_file(path: Path, tensors: list[tuple[str, tuple[int, ...], int, bytes]], kvs: list[bytes] | None = None,
              *, version: int = 3, alignment: int = 32, n_tensors: int | None = None, n_kv: int | None = None,
              offsets: list[int] | None = None) -> Path:
    """A GGUF file: ``tensors`` are (name, ne, ggml type, data), laid out at aligned offsets
    (or at ``offsets``); counts and version may lie."""
    kvs = [kv_str("general.architecture", "test")] + (kvs or [])
    pos, places, blobs = 0, [], []
    for _, _, _, data in tensors:
        places.append(pos)
        blobs.append(data + b"\0" * (-len(data) % alignment))
        pos += len(blobs[-1])
    places = offsets if offsets is not None else places
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(info(n, ne, k, o) for (n, ne, k, _), o in zip(tensors, places))
    head += b"\0" * (-len(head) % alignment)
    path.write_bytes(head + b"".join(blobs))
    return path


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    return {"w": (rng.standard_normal((64, 96)) * 0.02).astype(np.float32),
            "b": (rng.standard_normal(96) * 0.1).astype(np.float32)}


def small(weights: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    w, b = weights["w"], weights["b"]
    q8 = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    return [("w.f32", (96, 64), 0, w.tobytes()), ("b.f16", (96,), 1, b.astype(np.float16).tobytes()),
            ("w.bf16", (96, 64), 30, gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16).tobytes()),
            ("w.q8_0", (96, 64), 8, q8.tobytes())]


# -- real files

def test_real_gguf_tensors_match_gguf_py(dataset) -> None:
    for path in sorted(dataset("minilm-gguf").glob("*.gguf")):
        sf = read_file(path, path.name)
        assert sf.format == "gguf"
        theirs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        mine = {t.name: t for t in sf.tensors}
        quantised = {s.name: s for s in sf.segments if s.dtype is None and s.name is not None}
        assert set(mine) | set(quantised) == set(theirs) and not set(mine) & set(quantised)
        for name, t in theirs.items():
            kind = t.tensor_type.name
            seg = sf.segments[mine[name].segment] if name in mine else quantised[name]
            assert (seg.offset, seg.length) == (int(t.data_offset), int(t.n_bytes)), name
            if name in mine:
                assert mine[name].dtype == kind and seg.dtype == kind
                assert mine[name].shape == tuple(int(d) for d in reversed(t.shape))
            else:
                assert kind in ("Q8_0", "Q4_0")


def test_real_gguf_roundtrips_and_codes_floats(dataset, tmp_path: Path) -> None:
    folder = dataset("minilm-gguf")
    import zstandard

    for name in ("minilm-bf16.gguf", "minilm-q4_0.gguf"):
        src = folder / name
        summary = roundtrip(src, tmp_path)
        zstd = len(zstandard.ZstdCompressor(level=3).compress(src.read_bytes()))
        assert summary.archive_bytes < zstd, name
    info_ = elves.info(tmp_path / "minilm-bf16.gguf.elves")
    assert info_.files[0]["format"] == "gguf"


def test_identical_tensors_share_a_stream(weights, tmp_path: Path) -> None:
    tensors = small(weights)
    # the same F32 matrix and the same quantised blocks twice, under other names
    tensors += [("w.f32.copy", tensors[0][1], 0, tensors[0][3]), ("w.q8_0.copy", tensors[3][1], 8, tensors[3][3])]
    src = gguf_file(tmp_path / "dup.gguf", tensors)
    sf = read_file(src, src.name)
    assert [t.dtype for t in sf.tensors] == ["F32", "F16", "BF16", "F32"]
    summary = roundtrip(src, tmp_path)
    assert summary.unique_streams == len(sf.segments) - 2


def test_writer_here_matches_gguf_py(weights, tmp_path: Path) -> None:
    src = gguf_file(tmp_path / "m.gguf", small(weights), [kv_u32("general.alignment", 64)], alignment=64)
    theirs = {t.name: (int(t.data_offset), t.tensor_type.name) for t in gguf.GGUFReader(str(src)).tensors}
    sf = read_file(src, src.name)
    by_offset = {s.offset: s for s in sf.segments}
    assert all(by_offset[off].name == name for name, (off, _) in theirs.items())
    roundtrip(src, tmp_path)


# -- hostile and unusual files

def hostile_cases(weights: dict[str, np.ndarray]) -> dict[str, tuple[dict, str]]:
    t = small(weights)
    return {
        "huge tensor count": (dict(tensors=t, n_tensors=1 << 62), "do not fit"),
        "huge metadata count": (dict(tensors=t, n_kv=1 << 62), "do not fit"),
        "more tensors than elves reads": (dict(tensors=[("x", (1,), 0, b"\0" * 4)] * 3, n_tensors=(1 << 20) + 1,
                                               kvs=[gstr("k") + struct.pack("<I", 8) + gstr("v" * (25 << 20))]),
                                          "at most"),
        "key past the end": (dict(tensors=t, kvs=[gstr("k", 1 << 40)]), "past the end"),
        "string value past the end": (dict(tensors=t, kvs=[gstr("k") + struct.pack("<I", 8) + gstr("v", 1 << 50)]),
                                      "past the end"),
        "array past the end": (dict(tensors=t, kvs=[gstr("k") + struct.pack("<IIQ", 9, 4, 1 << 60)]), "array of"),
        "string of an array past the end": (dict(tensors=t, kvs=[gstr("k") + struct.pack("<IIQ", 9, 8, 3) + gstr("a")
                                                                 + gstr("b", 1 << 40) + gstr("c")]), "past the end"),
        "unknown value type": (dict(tensors=t, kvs=[gstr("k") + struct.pack("<I", 77)]), "unknown type"),
        "nested arrays": (dict(tensors=t, kvs=[gstr("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 20]),
                          "nest deeper"),
        "offset past the end": (dict(tensors=t, offsets=[0, 1 << 40, 0, 0]), "data section"),
        "overlapping tensors": (dict(tensors=t[:2], offsets=[0, 64]), "overlap"),
        "unaligned offset": (dict(tensors=t[:2], offsets=[8, 24576]), "not a multiple of the alignment"),
        "alignment not a power of two": (dict(tensors=t, kvs=[kv_u32("general.alignment", 48)]), "power of two"),
        "rows not whole blocks": (dict(tensors=[("q", (48, 2), 8, b"\0" * 102)]), "whole blocks"),
        "too many dimensions": (dict(tensors=[("x", (1,) * 70, 0, b"\0" * 4)]), "dimensions"),
        "long tensor name": (dict(tensors=[("n" * 5000, (1,), 0, b"\0" * 4)]), "tensor name"),
    }


def test_hostile_headers_are_refused(weights, tmp_path: Path) -> None:
    for label, (kw, message) in hostile_cases(weights).items():
        src = gguf_file(tmp_path / "bad.gguf", **kw)
        with pytest.raises(InputError) as e:
            elves.compress(src, tmp_path / "bad.elves", force=True)
        assert str(src) in str(e.value) and message in str(e.value), label


def test_duplicate_names_are_refused(weights, tmp_path: Path) -> None:
    t = small(weights)
    src = gguf_file(tmp_path / "dup.gguf", [t[0], ("w.f32", t[1][1], t[1][2], t[1][3])])
    with pytest.raises(InputError, match="same name"):
        read_file(src, src.name)


def test_truncated_files_are_refused_cleanly(weights, tmp_path: Path) -> None:
    whole = gguf_file(tmp_path / "whole.gguf", small(weights)).read_bytes()
    for cut in (6, 20, 60, 200, len(whole) - 1000, len(whole) - 1):
        src = tmp_path / "cut.gguf"
        src.write_bytes(whole[:cut])
        with pytest.raises(InputError, match="malformed GGUF"):
            read_file(src, src.name)


def test_cli_reports_a_hostile_file_without_a_traceback(weights, tmp_path: Path) -> None:
    src = gguf_file(tmp_path / "bad.gguf", small(weights), n_tensors=1 << 62)
    r = subprocess.run([sys.executable, "-m", "elves.cli.main", "compress", str(src), "-o", str(tmp_path / "x.elves")],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and str(src) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_versions_not_parsed_stay_opaque(weights, tmp_path: Path, version: int) -> None:
    # 1 (32-bit counts), a later one, and a big-endian v3 (its version reads byte-swapped)
    src = gguf_file(tmp_path / "v.gguf", small(weights), version=version)
    assert read_file(src, src.name).format == "opaque"
    roundtrip(src, tmp_path)


def test_unknown_ggml_type_stays_opaque(weights, tmp_path: Path) -> None:
    src = gguf_file(tmp_path / "t.gguf", [("x", (32,), 200, b"\1" * 64)])
    assert read_file(src, src.name).format == "opaque"
    assert gguf_reader.parse(src, src.name) is None


def test_bad_magic_is_not_gguf(weights, tmp_path: Path) -> None:
    src = gguf_file(tmp_path / "m.gguf", small(weights))
    src.write_bytes(b"GGUG" + src.read_bytes()[4:])
    assert read_file(src, src.name).format == "opaque"
    roundtrip(src, tmp_path)
