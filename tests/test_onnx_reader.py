"""The ONNX reader: tensors found wherever ONNX keeps them, malformed files left opaque."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import elves
from elves.readers import onnx
from tests.conftest import tree_hashes


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(num: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return varint(num << 3) + varint(payload)
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def tensor(name: str, arr: np.ndarray, onnx_type: int, packed_dims: bool = False) -> bytes:
    dims = b"".join(field(1, d) for d in arr.shape) if not packed_dims else \
        field(1, b"".join(varint(d) for d in arr.shape))
    return dims + field(2, onnx_type) + field(8, name.encode()) + field(9, arr.tobytes())


def model_bytes(rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    w = (rng.standard_normal((64, 32)) * 0.02).astype(np.float32)
    h = (rng.standard_normal(500) * 0.1).astype(np.float16)
    c = np.arange(6, dtype=np.int64).reshape(2, 3)
    s = (rng.standard_normal((8, 8))).astype(np.float32)
    subgraph = field(5, tensor("sub.w", s, 1))
    node_const = field(1, b"Constant") + field(5, field(1, b"value") + field(5, tensor("const", c, 7)))
    node_if = field(1, b"If") + field(5, field(1, b"then_branch") + field(6, subgraph))
    graph = field(1, node_const) + field(1, node_if) + field(5, tensor("w", w, 1)) + \
        field(5, tensor("h", h, 10, packed_dims=True)) + field(2, b"graph-name")
    model = field(1, 8) + field(2, b"elves-test") + field(7, graph)
    return model, {"w": w, "h": h, "const": c, "sub.w": s}


def test_finds_initializers_constants_and_subgraphs(tmp_path: Path) -> None:
    data, tensors = model_bytes(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    sf = onnx.parse(path, "m.onnx")
    sf.check()
    assert {t.name: t.shape for t in sf.tensors} == {k: v.shape for k, v in tensors.items()}
    archive = tmp_path / "m.elves"
    elves.compress(path, archive)
    got = elves.load_file(archive)
    for name, arr in tensors.items():
        assert got[name].tobytes() == arr.tobytes() and got[name].shape == arr.shape
    elves.restore(archive, tmp_path / "r.onnx")
    assert tree_hashes(tmp_path / "r.onnx") == tree_hashes(path)


def test_a_name_several_branches_share_reads_back(tmp_path: Path) -> None:
    """An If node's branches each hold an initializer of the same name (silero's export does):
    the index lists both, and reading tensors checks them against the file as two, not one."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    node_if = field(1, b"If") + field(5, field(1, b"then_branch") + field(6, field(5, tensor("w", a, 1)))) + \
        field(5, field(1, b"else_branch") + field(6, field(5, tensor("w", b, 1))))
    path = tmp_path / "m.onnx"
    path.write_bytes(field(1, 8) + field(7, field(1, node_if)))
    assert [t.name for t in onnx.parse(path, "m.onnx").tensors] == ["w", "w"]
    elves.compress(path, tmp_path / "m.elves")
    with elves.open(tmp_path / "m.elves") as got:
        assert got.get_tensor("m.onnx:w").tobytes() in (a.tobytes(), b.tobytes())


@pytest.mark.parametrize("cut", [1, 7, 100, -3])
def test_malformed_files_stay_opaque(tmp_path: Path, cut: int) -> None:
    data, _ = model_bytes(np.random.default_rng(1))
    path = tmp_path / "bad.onnx"
    path.write_bytes(data[:cut])
    assert onnx.parse(path, "bad.onnx") is None
    elves.compress(path, tmp_path / "bad.elves")  # still compressed, as opaque bytes
    elves.restore(tmp_path / "bad.elves", tmp_path / "r.onnx")
    assert (tmp_path / "r.onnx").read_bytes() == path.read_bytes()


def test_random_bytes_never_crash(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "x.onnx"
    for _ in range(200):
        path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        sf = onnx.parse(path, "x.onnx")
        if sf is not None:
            sf.check()


@pytest.mark.realdata
@pytest.mark.parametrize("name,file", [("silero", "silero_vad.onnx"), ("fall", "best_fp16.onnx")])
def test_real_onnx(dataset, name: str, file: str) -> None:
    path = dataset(name) / file
    sf = onnx.parse(path, file)
    sf.check()
    covered = sum(s.length for s in sf.segments if s.dtype) / sf.size
    assert covered > 0.9 and len(sf.tensors) > 40


def test_the_first_parse_of_a_process_that_compiles_the_walk(tmp_path: Path) -> None:
    """numba's first compile of the walk keeps the frames that called it, the mapped file's
    array among them: the reader must not fail to close the mapping then (it did, in CI, with
    an empty kernel cache)."""
    import os
    import subprocess
    import sys

    data, tensors = model_bytes(np.random.default_rng(3))
    (tmp_path / "m.onnx").write_bytes(data)
    code = ("import sys; from pathlib import Path; from elves.readers import onnx\n"
            "for _ in range(2): print(sorted(t.name for t in onnx.parse(Path(sys.argv[1]), 'm.onnx').tensors))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(sorted(tensors))] * 2
