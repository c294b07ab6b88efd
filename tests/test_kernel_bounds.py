"""Forged payloads and configs at the codec level: every one is a clean CorruptArchiveError or
CodecError, never a write past a buffer, an allocation sized by a forged number, or another
exception type (issue 10). Payload checksums are beside the point here: a forger recomputes them.

The triggers that once corrupted the heap run in a subprocess under an address-space limit, so
that a crash or a huge allocation fails its test instead of killing pytest.
"""
from __future__ import annotations

import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zstandard

from bitx.codec import Xor
from elves.codecs import Expected, Pipeline, codec_from_config
from elves.bounds import parse_error_bound
from elves.lossy import elf_pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.codecs.zstd import Zstd
from elves.errors import CodecError, CorruptArchiveError
from elves.kernels import elf as ek
from elves.kernels import planes_rans as k

from .test_codecs import weights_like

ROOT = Path(__file__).resolve().parent.parent
ADDRESS_SPACE = 6 << 30  # numba and LLVM reserve some; a forged 16 GiB allocation fails under it

PRELUDE = """
import struct
import numpy as np
from elves.codecs import Pipeline
from elves.bounds import parse_error_bound
from elves.lossy import elf_pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.errors import CorruptArchiveError
rng = np.random.default_rng(0)
raw = (rng.standard_normal(65536) * 0.02).astype(np.float32).view(np.uint8)
f32 = Pipeline([Planes("F32"), Rans()])
payload = f32.encode(raw)

def refused(pipeline, payload, nbytes):
    try:
        pipeline.decode(np.frombuffer(payload, np.uint8), np.empty(nbytes, np.uint8))
    except CorruptArchiveError as e:
        print("refused:", e)
    else:
        print("decoded")
"""

TRIGGERS = {
    "decoded length halved": "refused(f32, payload, raw.size // 2)",
    "decoded length doubled": "refused(f32, payload, raw.size * 2)",
    "planes dtype F32 -> I64": "refused(Pipeline([Planes('I64'), Rans()]), payload, raw.size)",
    "planes dtype F32 -> C128": "refused(Pipeline([Planes('C128'), Rans()]), payload, raw.size)",
    "planes dtype F32 -> BF16": "refused(Pipeline([Planes('BF16'), Rans()]), payload, raw.size)",
    "container claims n + 64": "refused(f32, struct.pack('<I', raw.size // 4 + 64) + payload[4:], raw.size)",
    "container claims 255 planes of 2^32 - 1": (
        "refused(f32, struct.pack('<IHB', 2**32 - 1, 32, 255) + payload[7:], raw.size)"),
    "elf dropped from a lossy pipeline": """
lossy = elf_pipeline("F32", parse_error_bound("1e-3"))
refused(Pipeline(lossy.codecs[1:]), lossy.encode(raw), raw.size)""",
}


def run_isolated(code: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, preexec_fn=limit)


@pytest.mark.parametrize("case", list(TRIGGERS))
def test_forged_sizes_are_refused_not_written(case: str) -> None:
    proc = run_isolated(PRELUDE + textwrap.dedent(TRIGGERS[case]))
    assert proc.returncode == 0, f"{case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("refused:"), f"{case}: {proc.stdout}"


# ---------------------------------------------------------------------------- expected sizes

def test_expected_sizes_run_backwards_from_the_decoded_length() -> None:
    p = Pipeline([Planes("BF16"), Rans()])
    assert p.expected(4096) == [Expected(4096, 4096), Expected(4096, 4096, 2)]
    with pytest.raises(CorruptArchiveError, match="not whole BF16 elements"):
        p.expected(4097)
    lossy = elf_pipeline("F32", parse_error_bound("1e-3")).expected(4096)
    assert lossy[0] == Expected(4096, 4096) and lossy[2].planes == 4
    assert lossy[1].lo == lossy[2].lo >= 4096 + 4 and lossy[2].hi <= 8 * 4096 + 1024


@pytest.mark.parametrize("dtype, bound", [("F32", "1e-3"), ("BF16", "rel:1e-2"), ("F16", "2^-12"), ("F64", "1e-9")])
def test_real_elf_payloads_fit_their_expected_sizes(dtype: str, bound: str) -> None:
    """The bounds are not too tight: what the encoder writes (palette chunks included) lies
    within what the decoder expects."""
    p = elf_pipeline(dtype, parse_error_bound(bound))
    rng = np.random.default_rng(5)
    w = p.codecs[0].width
    for raw in (weights_like(dtype, 20000, rng),
                np.repeat(weights_like(dtype, 7, rng).reshape(7, w), 3000, axis=0).reshape(-1)):  # few values
        codes = p.codecs[0].encode(raw)
        want = p.expected(raw.size)[1]
        assert want.lo <= codes.size <= want.hi
        out = np.empty(raw.size, np.uint8)
        p.decode(p.encode(raw), out)


# ---------------------------------------------------------------------------- codec payloads

def test_rans_refuses_a_container_before_allocating() -> None:
    payload = np.frombuffer(Pipeline([Planes("F32"), Rans()]).encode(weights_like("F32", 1000, np.random.default_rng(1))),
                            np.uint8)
    with pytest.raises(CorruptArchiveError, match="4 byte planes, expected 8"):
        Rans().decode(payload, expected=Expected(8000, 8000, 8))
    with pytest.raises(CorruptArchiveError, match="holds 4000 bytes, expected 4004"):
        Rans().decode(payload, expected=Expected(4004, 4004, 4))
    with pytest.raises(CodecError):
        Rans().decode(payload)  # neither an output nor an expected size: nothing to trust


def test_elf_refuses_forged_sections() -> None:
    rng = np.random.default_rng(3)
    raw = (rng.standard_normal(4096) * 0.05).astype(np.float32).view(np.uint8)
    elf = elf_pipeline("F32", parse_error_bound("rel:1e-3")).codecs[0]
    codes = elf.encode(raw)
    out = np.empty(raw.size, np.uint8)
    elf.decode(codes, out)
    grid = codes.reshape(-1, 4)
    assert grid[0, 0] == 2  # a binade grid: e0 is the section's bytes 8..11 (3 per word)
    for e0 in (-(2 ** 31), 2 ** 31 - 1, -1023, 1024):
        bad = grid.copy()
        section = bytearray(bad[:, :3].tobytes())
        section[8:12] = struct.pack("<i", e0)
        bad[:, :3] = np.frombuffer(bytes(section), np.uint8).reshape(-1, 3)
        with pytest.raises(CorruptArchiveError, match="binade grid"):
            elf.decode(bad.reshape(-1), out)
    with pytest.raises(CorruptArchiveError, match="holds 16380 bytes, expected 16384"):
        elf.decode(codes[:-4], out)
    short = np.empty(raw.size - 4, np.uint8)
    with pytest.raises(CorruptArchiveError):
        elf.decode(codes, short)


def test_zstd_checks_the_declared_size_first() -> None:
    data = np.arange(10000, dtype=np.uint32).view(np.uint8)
    frame = Zstd().encode(data)
    out = np.empty(data.size, np.uint8)
    Zstd().decode(frame, out)
    assert np.array_equal(out, data)
    for wrong in (data.size - 1, data.size + 1):
        with pytest.raises(CorruptArchiveError, match="zstd frame holds 40000 bytes"):
            Zstd().decode(frame, np.empty(wrong, np.uint8))
    with pytest.raises(CorruptArchiveError, match="does not decode"):
        Zstd().decode(frame + b"\0" * 9, out)  # trailing garbage after the frame
    with pytest.raises(CorruptArchiveError, match="more than"):
        Zstd().decode(_unsized_frame(data.tobytes() * 2), out)
    with pytest.raises(CorruptArchiveError):
        Zstd().decode(_unsized_frame(data.tobytes()[:-1]), out)
    assert np.array_equal(Zstd().decode(_unsized_frame(data.tobytes()), out), data)


def _unsized_frame(data: bytes) -> bytes:
    c = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    return c.compress(data) + c.flush()


BOMB = """
import resource, zstandard, numpy as np
from elves.codecs.zstd import Zstd
from elves.errors import CorruptArchiveError
zeros = bytes(16 << 20)
def bomb(declared):
    c = zstandard.ZstdCompressor(write_content_size=declared).compressobj(size=(1 << 30) if declared else -1)
    return b"".join([c.compress(zeros) for _ in range(64)] + [c.flush()])
frames = bomb(True), bomb(False)
del zeros
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for frame in frames:
    try:
        Zstd().decode(frame, np.empty(4 << 20, np.uint8))
    except CorruptArchiveError as e:
        print("refused:", e)
print("grew KiB:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_zstd_bomb_is_refused_without_inflating() -> None:
    proc = run_isolated(BOMB)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused", "refused", "grew KiB"], proc.stdout
    assert "1073741824 bytes" in lines[0]  # the declared size, refused from the header
    assert int(lines[2].split()[-1]) < 64 << 10  # peak RSS: the 4 MiB chunk and zstd's window, not 1 GiB


# ---------------------------------------------------------------------------- kernels

def test_kernels_refuse_short_buffers() -> None:
    planes = np.zeros((4, 100), np.uint8)
    assert k.merge(planes, 100, 4, True, np.empty(399, np.uint8)) == k.ERR_SIZE
    assert k.merge(planes, 100, 8, False, np.empty(800, np.uint8)) == k.ERR_SIZE  # fewer planes than w
    assert k.merge(planes, 101, 4, False, np.empty(404, np.uint8)) == k.ERR_SIZE
    assert k.merge(planes, 100, 4, True, np.empty(400, np.uint8)) == k.OK
    assert k.split(np.empty(399, np.uint8), 100, 4, True, planes) == k.ERR_SIZE
    assert k.encode_planes(planes, 32, 12, np.empty(100, np.uint8)) == -1
    payload = np.frombuffer(Rans().encode(planes), np.uint8)
    assert k.decode_planes(payload, np.empty((4, 99), np.uint8)) == k.ERR_SIZE
    assert k.decode_planes(payload, np.empty((2, 200), np.uint8)) == k.ERR_SIZE
    codes = np.zeros(100, np.uint64)
    out = np.empty(99, np.uint32)
    assert not ek.dequant_exact(codes, 100, 4, out)
    assert not ek.kernels("F32").dequant_uniform(codes, 100, 4, 0.5, np.uint64(10), np.uint64(0), out)
    L = np.array([4], np.int64)
    assert not ek.kernels("F32").dequant_binade(codes, 100, 4, 0, 2, L, L, np.uint64(4), np.empty(100, np.uint32))
    assert not ek.undelta_codes(codes, codes[:99], 4, np.empty(100, np.uint64))
    assert not ek.scatter(np.empty(10, np.uint32), np.arange(3), np.zeros(2, np.uint32))


def test_bitx_kernels_refuse_short_buffers() -> None:
    from bitx.kernels import xor_ranked, xor_sparse, xor_unsparse

    a = np.arange(100, dtype=np.uint16)
    table = np.zeros((256, 256), np.uint8)
    assert not xor_ranked(a, a[:99], np.uint16(1), np.uint16(7), table, np.empty(100, np.uint16))
    assert not xor_ranked(a, a, np.uint16(1), np.uint16(7), table[:255], np.empty(100, np.uint16))
    assert xor_sparse(a, a, np.uint16(1), np.zeros(12, np.uint8), np.empty(100, np.uint16)) == -1
    from bitx.kernels import sample_stats
    h = lambda rows: np.zeros((rows, 256), np.int64)  # noqa: E731
    joint, tail = np.zeros((256, 256), np.int64), np.zeros(256, np.int64)
    assert sample_stats(a, a, 2, True, h(2), h(2), h(2), joint, tail) == 0
    assert sample_stats(a, a, 2, True, h(1), h(2), h(2), joint, tail) == -1  # a plane short
    assert sample_stats(a, a, 4, True, h(4), h(4), h(4), joint, tail) == -1  # not the words' size
    assert sample_stats(a, a, 2, True, h(2), h(2), h(2), joint[:255], tail) == -1
    assert xor_unsparse(np.zeros(12, np.uint8), a, a, np.uint16(1), np.empty(100, np.uint16)) == -1
    ref = np.zeros(200, np.uint8)
    with pytest.raises(CorruptArchiveError):  # a sparse chunk whose bitmap asks for more values than it holds
        Xor("BF16", "0" * 32, 200, sparse=True).decode(np.full(26, 0xFF, np.uint8), np.empty(200, np.uint8), ref=ref)


# ---------------------------------------------------------------------------- configs

H = "0" * 32
BAD_CONFIGS = [
    {"id": "rans", "lanes": 0}, {"id": "rans", "lanes": 4097}, {"id": "rans", "lanes": "32"},
    {"id": "rans", "lanes": True}, {"id": "rans", "prob_bits": 13}, {"id": "rans", "prob_bits": 12.0},
    {"id": "rans", "extra": 1},
    {"id": "zstd", "level": 23}, {"id": "zstd", "level": "3"}, {"id": "zstd", "level": None},
    {"id": "planes", "dtype": "F12"}, {"id": "planes", "dtype": 4}, {"id": "planes", "dtype": ["F32"]},
    {"id": "planes", "dtype": "F32", "rotate": "yes"}, {"id": "planes"},
    {"id": "elf", "dtype": "I32"}, {"id": "elf", "dtype": "F32", "mode": "max"},
    {"id": "elf", "dtype": "F32", "bound": -1.0}, {"id": "elf", "dtype": "F32", "bound": float("nan")},
    {"id": "elf", "dtype": "F32", "bound": "1e-3"}, {"id": "elf", "dtype": "F32", "mode": "rel", "bound": 2.0},
    {"id": "elf", "dtype": "F32", "delta": "yes"}, {"id": "elf", "dtype": "F32", "lanes": 0},
    {"id": "elf", "dtype": {"F32": 1}},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2, "mask": -1},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2, "mask": "1"},
    {"id": "xor", "dtype": "BF16", "ref_hash": "zz" * 16, "ref_nbytes": 2},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": -2},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2.0},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2, "sparse": 1},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2, "remap": [[300, [1]]]},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2, "remap": [[1, 2]]},
    {"id": "xor", "dtype": "BF16", "ref_hash": H, "ref_nbytes": 2, "ref_shape": [1], "shape": [2.5]},
    {"id": "xor", "dtype": "C128", "ref_hash": H, "ref_nbytes": 16},
    {"id": None}, {"id": ["rans"]}, {},
]


@pytest.mark.parametrize("config", BAD_CONFIGS, ids=lambda c: repr(c)[:60])
def test_bad_codec_parameters_are_codec_errors(config: dict) -> None:
    with pytest.raises(CodecError):
        codec_from_config(config)


@pytest.mark.parametrize("configs", [
    "rans", [["rans"]], [{"id": "rans"}], [{"id": "planes", "dtype": "F32"}],
    [{"id": "rans"}, {"id": "planes", "dtype": "F32"}],
    [{"id": "planes", "dtype": "F32"}, {"id": "planes", "dtype": "F32"}, {"id": "rans"}],
    [{"id": "planes", "dtype": "F32"}, {"id": "xor", "dtype": "F32", "ref_hash": H, "ref_nbytes": 4}, {"id": "rans"}],
    [{"id": "zstd"}, {"id": "elf", "dtype": "F32", "delta": True}],
], ids=repr)
def test_pipelines_that_cannot_decode_are_refused(configs: object) -> None:
    with pytest.raises(CodecError):
        Pipeline.from_config(configs)
