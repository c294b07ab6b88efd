"""The CUDA sources in cuda/: NVRTC-compatible, compile for sm_90 without register spills, and
(on any machine with g++) decode exactly like the numba reference, run on the host.

elves/gpu/launcher.py compiles cuda/*.cu at run time with NVRTC, which has no host headers: the sources
must include none. NVRTC (libnvrtc, when found) and nvcc (when on PATH) compile them here, so
errors show on machines without a GPU. The host run compiles the decoder as C++ with a small shim
(tests/cuda_host.py), so the kernel's logic is tested against the numba decoder on every machine,
not only on those with a GPU; tests/test_gpu_emulation.py runs whole archives through it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from typing import Any
from pathlib import Path

import numpy as np
import pytest

from elves import dtypes
from elves.codecs import Pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans

from elves.gpu.launcher import DESC

from .cuda_host import CUDA_DIR, DECODER, HostKernels, aligned, compile_source
from .test_codecs import cpu_decode, weights_like

SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def test_the_decoder_source_is_there() -> None:
    assert DECODER in SOURCES
    assert not (CUDA_DIR / "__init__.py").exists(), "cuda/ must not become an importable `cuda` package"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_no_includes(src: Path) -> None:
    """NVRTC compiles without the host's headers, and elves.gpu hands it the source as a string
    with no include path: a source may include nothing, neither <...> nor "..."."""
    includes = [line.strip() for line in src.read_text().splitlines() if re.match(r"\s*#\s*include\b", line)]
    assert not includes, f"{src.name}: {includes}"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90_without_spills(src: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "-c", "-o", str(tmp_path / "x.o"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{log}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, log
    assert all(s == ("0", "0") for s in spills), f"register spills (local memory in the hot loop):\n{log}"


def nvrtc_library() -> ctypes.CDLL | None:
    """libnvrtc from the system, a CUDA toolkit or NVIDIA's pip wheels (torch pulls them in)."""
    candidates = [ctypes.util.find_library("nvrtc")]
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    for candidate in filter(None, candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_with_nvrtc(src: Path) -> None:
    """What elves.gpu does at run time (through cupy), without a GPU: the source as a string, no
    include path, C++17, sm_90."""
    lib = nvrtc_library()
    if lib is None:
        pytest.skip("libnvrtc not found")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.read_bytes(), src.name.encode(), 0, None, None) == 0
    options = [b"-std=c++17", b"--gpu-architecture=sm_90"]
    try:
        status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert status == 0, log.value.decode(errors="replace")


# ============================================================================ the kernel on the host

@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    return compile_source(DECODER, tmp_path_factory.mktemp("host_kernels"))


def host_decode(lib: HostKernels, width: int, payloads: list[bytes], sizes: list[int], rotate: bool
                ) -> tuple[bytes, np.ndarray]:
    """Run the kernel over the chunks: (decoded bytes, status per chunk). Each payload sits in
    its own 16-byte-aligned buffer, as on the device."""
    keep, descs = [], np.zeros(len(payloads), DESC)
    dst = aligned(sum(sizes), 0xA5)
    pos = 0
    for k, (p, n) in enumerate(zip(payloads, sizes)):
        src = aligned(len(p))
        src[:] = np.frombuffer(p, dtype=np.uint8)
        keep.append(src)
        descs[k] = (src.ctypes.data, len(p), dst.ctypes.data + pos, n, width, 1 if rotate else 0, 0, 0, 0, 0)
        pos += n
    status = np.zeros(len(payloads), dtype=np.uint32)
    lib.launch(descs.ctypes.data, status.ctypes.data, [(width, 0, len(payloads))])
    return dst.tobytes(), status


@pytest.mark.parametrize("dt", ["BOOL", "F8_E4M3", "BF16", "F16", "F32", "I32", "F64", "I64", "C128"])
def test_kernel_matches_the_numba_decoder(host_kernels: HostKernels, dt: str) -> None:
    w = dtypes.get(dt).itemsize
    rng = np.random.default_rng(w)
    for lanes, prob_bits in [(32, 12), (1, 12), (33, 9), (100, 10)]:
        pipeline = Pipeline([Planes(dt), Rans(lanes=lanes, prob_bits=prob_bits)])
        raws = [weights_like(dt, n, rng) for n in (1, 31, 1000, 3001)]
        payloads = [pipeline.encode(r) for r in raws]
        got, status = host_decode(host_kernels, w, payloads, [len(r) for r in raws], pipeline.codecs[0].rotate)
        assert not status.any(), (lanes, prob_bits, status)
        assert got == b"".join(r.tobytes() for r in raws), (lanes, prob_bits)


def test_kernel_refuses_what_the_numba_decoder_refuses(host_kernels: HostKernels) -> None:
    """Flipped bits, cut-short and padded payloads: the kernel flags a chunk exactly when the
    numba decoder refuses it, and otherwise decodes the same bytes."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        dt = ["BF16", "F32", "U8"][trial % 3]
        w = dtypes.get(dt).itemsize
        pipeline = Pipeline([Planes(dt), Rans(lanes=int(rng.choice([3, 32])))])
        raw = weights_like(dt, int(rng.integers(1, 2000)), rng)
        bad = bytearray(pipeline.encode(raw))
        if trial % 4 == 0:
            bad = bad[:int(rng.integers(0, len(bad)))]
        elif trial % 4 == 1:
            bad += bytes(int(rng.integers(1, 9)))
        else:
            for _ in range(int(rng.integers(1, 4))):
                bad[int(rng.integers(0, len(bad)))] ^= 1 << int(rng.integers(0, 8))
        want = cpu_decode(pipeline, bytes(bad), len(raw))
        got, status = host_decode(host_kernels, w, [bytes(bad)], [len(raw)], pipeline.codecs[0].rotate)
        assert (status[0] == 0) == (want is not None), (trial, status)
        if want is not None:
            assert got == want, trial


def test_copy_kernel(host_kernels: HostKernels) -> None:
    """Chunks stored as they are (an empty pipeline) are copied; a length mismatch is flagged."""
    rng = np.random.default_rng(1)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 15, 16, 17, 5000)]
    got, status = host_decode(host_kernels, 0, payloads, [len(p) for p in payloads], False)
    assert not status.any() and got == b"".join(payloads)
    _, status = host_decode(host_kernels, 0, payloads[:1], [2], False)
    assert status[0] != 0


# ============================================================================ the elf dequantiser

ELF_CASES = [(dt, mode, bound) for dt in ("F16", "BF16", "F32", "F64")
             for mode, bound in (("abs", 2.0 ** -24), ("abs", 1e-3), ("abs", 0.3), ("rel", 1e-3), ("rel", 2.0 ** -6))]


@pytest.fixture(scope="module")
def elf_kernel(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    return compile_source(CUDA_DIR / "elf_decode.cu", tmp_path_factory.mktemp("elf_kernel"))


def elf_payloads(dt: str, mode: str, bound: float, rng: np.random.Generator) -> list[tuple[bytes, bytes]]:
    """(elf bytes, original) per chunk: weights with NaN, infinities, zeros and huge values among
    them (exceptions and the exact zone), a chunk of a few repeated values (a palette), a tiny
    one, and the lossless (exact) kind."""
    from elves.codecs.elf import Elf

    w = dtypes.get(dt).itemsize
    npdt = dtypes.numpy_dtype(dt)
    weights = (rng.standard_normal(5000) * 0.05).astype(npdt)
    weights[rng.integers(0, 5000, 40)] = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e4, -3e4, 7.5e-6], npdt)[
        rng.integers(0, 8, 40)]
    table = np.repeat(np.linspace(-1, 1, 12).astype(npdt), 400)
    rng.shuffle(table)
    raws = [weights.view(np.uint8), table.view(np.uint8), weights[:3].view(np.uint8)]
    out = [(Elf(dt, mode, bound).encode(r).tobytes(), r.tobytes()) for r in raws]
    out.append((Elf(dt, mode, bound, exact=True).encode(raws[0]).tobytes(), raws[0].tobytes()))
    assert all(len(p) % w == 0 for p, _ in out)
    return out


def elf_run(kernel: HostKernels, dt: str, payloads: list[bytes], sizes: list[int]) -> tuple[list[bytes], np.ndarray]:
    """The elf kernel over the chunks (each in its own aligned buffer): decoded bytes and status."""
    from elves.gpu.launcher import ELF
    from elves.gpu.plan import elf_flags

    w = dtypes.get(dt).itemsize
    keep, outs = [], []
    descs = np.zeros(len(payloads), DESC)
    for k, (p, n) in enumerate(zip(payloads, sizes)):
        src, dst = aligned(len(p)), aligned(n, 0xA5)
        src[:] = np.frombuffer(p, np.uint8)
        keep.append(src)
        outs.append(dst)
        descs[k] = (src.ctypes.data, len(p), dst.ctypes.data, n, w, elf_flags(dt), 0, 0, 0, 0)
    status = np.zeros(len(payloads), np.uint32)
    kernel.launch(descs.ctypes.data, status.ctypes.data, [(ELF | w, 0, len(payloads))])
    return [o.tobytes() for o in outs], status


@pytest.mark.parametrize("dt, mode, bound", ELF_CASES)
def test_elf_kernel_matches_the_numba_decoder(elf_kernel: HostKernels, dt: str, mode: str, bound: float) -> None:
    from elves.codecs.elf import Elf

    chunks = elf_payloads(dt, mode, bound, np.random.default_rng(7))
    got, status = elf_run(elf_kernel, dt, [p for p, _ in chunks], [len(r) for _, r in chunks])
    assert not status.any(), status
    codec = Elf(dt, mode, bound)
    for (payload, raw), g in zip(chunks, got):
        want = codec.decode(np.frombuffer(payload, np.uint8).copy(), np.empty(len(raw), np.uint8))
        assert g == want.tobytes()


def test_elf_kernel_refuses_what_the_numba_decoder_refuses(elf_kernel: HostKernels) -> None:
    """Flipped bits, cut-short and padded chunks: the kernel flags a chunk exactly when the numba
    decoder refuses it, with its message, and otherwise decodes the same bytes."""
    from elves.codecs.elf import Elf
    from elves.errors import CorruptArchiveError
    from elves.gpu.launcher import ELF_STATUS

    rng = np.random.default_rng(3)
    refused = 0
    for trial in range(80):
        dt, mode, bound = ELF_CASES[trial % len(ELF_CASES)]
        w = dtypes.get(dt).itemsize
        payload, raw = elf_payloads(dt, mode, bound, rng)[trial % 2]
        bad = bytearray(payload)
        if trial % 5 == 0:
            bad = bad[:int(rng.integers(0, len(bad) // w)) * w]
        elif trial % 5 == 1:
            bad += bytes(w * int(rng.integers(1, 3)))
        else:  # the section (the first words) is where a flip is refused; the codes only change values
            for _ in range(int(rng.integers(1, 3))):
                bad[int(rng.integers(0, min(len(bad), 24 * w)))] ^= 1 << int(rng.integers(0, 8))
        try:
            want: bytes | None = Elf(dt, mode, bound).decode(np.frombuffer(bytes(bad), np.uint8).copy(),
                                                             np.empty(len(raw), np.uint8)).tobytes()
            message = ""
        except CorruptArchiveError as e:
            want, message = None, e.message
        except (ValueError, IndexError):  # the numba decoder's own crashes on some damage: no reference
            continue
        got, status = elf_run(elf_kernel, dt, [bytes(bad)], [len(raw)])
        if want is None:
            refused += 1
            assert status[0] != 0, (trial, message)
            expect = ELF_STATUS[int(status[0])]
            assert message.startswith(expect) or (status[0] == 24 and message.startswith("elf chunk holds")), \
                (trial, message, expect)
        else:
            assert status[0] == 0 and got[0] == want, (trial, status)
    assert refused >= 20


# ============================================================================ sparse xor

def sparse_run(kernel: HostKernels, w: int, chunks: list[tuple[bytes, bytes, int, int]]) -> tuple[list[bytes], np.ndarray]:
    """The sparse xor kernel (in the decoder's source) over (sparse form, reference, decoded bytes, mask) chunks, each in
    its own aligned buffers: decoded bytes and status."""
    from elves.gpu.launcher import SPARSE

    keep, outs = [], []
    descs = np.zeros(len(chunks), DESC)
    for k, (data, ref, n, mask) in enumerate(chunks):
        src, r, dst = aligned(len(data)), aligned(len(ref)), aligned(n, 0xA5)
        src[:], r[:] = np.frombuffer(data, np.uint8), np.frombuffer(ref, np.uint8)
        keep += [src, r]
        outs.append(dst)
        descs[k] = (src.ctypes.data, len(data), dst.ctypes.data, n, w, 0, r.ctypes.data, len(ref), mask, 0)
    status = np.zeros(len(chunks), np.uint32)
    kernel.launch(descs.ctypes.data, status.ctypes.data, [(SPARSE | w, 0, len(chunks))])
    return [o.tobytes() for o in outs], status


def sparse_chunks(dt: str, rng: np.random.Generator) -> list[tuple[Any, bytes, bytes, int]]:
    """(codec, sparse form, reference, decoded bytes) of fine-tunes of a base: mostly unchanged,
    mostly changed, masked, with rows past the reference, more than a tile of the kernel, tiny."""
    from bitx.codec import Xor

    w = dtypes.get(dt).itemsize
    out = []
    for n, changed, mask, short in [(5000, 0.1, None, 0), (3001, 0.9, None, 0), (20000, 0.3, 0xF0 if w == 1 else 0xFF00,
                                                                                  0), (777, 0.5, None, 100), (1, 1.0, None, 0)]:
        base = weights_like(dt, n, rng)
        ft = base.copy()
        hit = rng.random(n) < changed
        ft.view(np.uint8).reshape(n, w)[hit, 0] ^= rng.integers(1, 256, int(hit.sum()), dtype=np.uint8)
        ref = base[:n - short].tobytes()
        codec = Xor(dt, "0" * 32, len(ref), mask=mask, sparse=True)
        data = codec.encode(ft.view(np.uint8), np.frombuffer(ref, np.uint8))
        assert data is not None
        out.append((codec, data.tobytes(), ref, n * w))
    return out


@pytest.mark.parametrize("dt", ["U8", "BF16", "F32", "F64"])
def test_sparse_kernel_matches_the_numba_decoder(host_kernels: HostKernels, dt: str) -> None:
    chunks = sparse_chunks(dt, np.random.default_rng(5))
    got, status = sparse_run(host_kernels, dtypes.get(dt).itemsize, [(d, r, n, c.mask) for c, d, r, n in chunks])
    assert not status.any(), status
    for (codec, data, ref, n), g in zip(chunks, got):
        want = codec.decode(np.frombuffer(data, np.uint8), np.empty(n, np.uint8), np.frombuffer(ref, np.uint8))
        assert g == want.tobytes()


def test_sparse_kernel_refuses_what_the_numba_decoder_refuses(host_kernels: HostKernels) -> None:
    """Flipped bitmap bits, cut-short and padded chunks: the kernel flags a chunk exactly when the
    numba decoder refuses it, with its message, and otherwise decodes the same bytes."""
    from elves.errors import CorruptArchiveError
    from elves.gpu.launcher import SPARSE_STATUS

    rng = np.random.default_rng(8)
    refused = 0
    for trial in range(60):
        dt = ["U8", "BF16", "F32", "F64"][trial % 4]
        w = dtypes.get(dt).itemsize
        codec, data, ref, n = sparse_chunks(dt, rng)[trial % 4]
        bad = bytearray(data)
        nb = codec._bitmap_bytes(n // w)
        if trial % 3 == 0:
            bad = bad[:int(rng.integers(0, len(bad) // w)) * w]
        elif trial % 3 == 1:
            bad += bytes(w * int(rng.integers(0, 3)))
        for _ in range(int(rng.integers(0, 3)) if bad else 0):  # the bitmap: where values go, and how many
            bad[int(rng.integers(0, min(nb, len(bad))))] ^= 1 << int(rng.integers(0, 8))
        try:
            want: bytes | None = codec.decode(np.frombuffer(bytes(bad), np.uint8), np.empty(n, np.uint8),
                                              np.frombuffer(ref, np.uint8)).tobytes()
            message = ""
        except CorruptArchiveError as e:
            want, message = None, e.message
        got, status = sparse_run(host_kernels, w, [(bytes(bad), ref, n, codec.mask)])
        if want is None:
            refused += 1
            assert status[0] != 0 and SPARSE_STATUS[int(status[0])] == message, (trial, message, status)
        else:
            assert status[0] == 0 and got[0] == want, (trial, status)
    assert refused >= 20


@pytest.mark.parametrize("dt, mode, bound", ELF_CASES)
def test_elf_kernel_decodes_deltas_like_the_numba_decoder(elf_kernel: HostKernels, dt: str, mode: str,
                                                          bound: float) -> None:
    """``elf`` with ``delta``: the kernel quantises the reference chunk on the chunk's grid (the
    encoder's quantisers: exact, nearest uniform code, binade with its bound check) and adds the
    differences back, bit for bit the numba decoder's, exceptions and special values included; a
    reference of another length is refused with the CPU's message."""
    from elves.codecs.elf import Elf
    from elves.gpu.launcher import ELF, ELF_STATUS
    from elves.gpu.plan import elf_delta

    rng = np.random.default_rng(17)
    w = dtypes.get(dt).itemsize
    codec = Elf(dt, mode, bound, delta=True)
    flags, bits = elf_delta(codec)
    _, raw = elf_payloads(dt, mode, bound, rng)[0]  # weights with NaN, infinities, zeros, huge values
    base = np.frombuffer(raw, np.uint8).copy()
    near = Elf(dt, "rel", 1e-2)
    ft = near.decode(near.encode(base), np.empty(len(base), np.uint8))  # a nearby version (a lossy restore of it)
    for ref, data, exact in [(ft, base, False), (base, ft, False), (ft, base, True)]:
        payload = (Elf(dt, mode, bound, delta=True, exact=exact).encode(data, ref)).tobytes()
        want = codec.decode(np.frombuffer(payload, np.uint8).copy(), np.empty(len(data), np.uint8), ref)
        for r, status_want in [(ref, 0), (ref[:-w], 32)]:
            src, dst, rb = aligned(len(payload)), aligned(len(data), 0xA5), aligned(len(r))
            src[:], rb[:] = np.frombuffer(payload, np.uint8), r
            descs = np.zeros(1, DESC)
            descs[0] = (src.ctypes.data, len(payload), dst.ctypes.data, len(data), w, flags, rb.ctypes.data, len(r), bits, 0)
            status = np.zeros(1, np.uint32)
            elf_kernel.launch(descs.ctypes.data, status.ctypes.data, [(ELF | w, 0, 1)])
            assert status[0] == status_want, (exact, status)
            if status_want:
                assert ELF_STATUS[status_want].startswith("elf with delta needs a reference chunk as long")
            else:
                assert dst.tobytes() == want.tobytes(), exact
