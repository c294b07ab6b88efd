"""GPU decoding (elves.gpu) gives bit for bit what the CPU decoder gives, and refuses damaged data.

The GPU tests (marked ``gpu``) need cupy and a CUDA device and skip without them. The host side
runs anywhere: chunk batches, descriptors and staged payloads are checked by decoding what the
descriptors point at on the CPU, and a machine without cupy gets a clear error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import elves
import elves.api
from elves import dtypes
from elves.codecs import Pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.encoder import TENSOR_CHUNK_BYTES
from elves.errors import CorruptArchiveError
from tests.conftest import write_safetensors

from .test_codecs import ALL, cpu_decode, weights_like

FRAMEWORKS = ["cupy", "pt"]


@pytest.fixture(scope="module")
def cp() -> Any:
    cupy = pytest.importorskip("cupy")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        devices = 0
    if not devices:
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture
def gpu(cp: Any) -> Any:
    import elves.gpu

    return elves.gpu


def framework_or_skip(framework: str) -> None:
    if framework == "pt":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch without CUDA")


def host_bytes(x: Any) -> bytes:
    """The bytes of a cupy array or a torch tensor, C order."""
    if hasattr(x, "get"):
        return np.ascontiguousarray(x.get()).tobytes()
    import torch

    return x.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def assert_same(got: dict[str, Any], want: dict[str, np.ndarray], framework: str) -> None:
    """``got`` (from elves.gpu) holds the same names, shapes, dtypes and bits as ``want`` (CPU)."""
    assert list(got) == list(want)
    for name, ref in want.items():
        t = got[name]
        assert tuple(t.shape) == ref.shape, name
        if framework == "pt":
            assert str(t.dtype) == f"torch.{ref.dtype.name}", name
            assert t.device.type == "cuda", name
        else:  # cupy hands out bfloat16 and float8 as their bits
            assert t.dtype == (ref.dtype if hasattr(np, ref.dtype.name) else np.dtype(f"<u{ref.dtype.itemsize}")), name
        assert host_bytes(t) == np.ascontiguousarray(ref).tobytes(), name


def every_bit_pattern(dt: str) -> bytes:
    """All values of a 1- or 2-byte dtype, shuffled (NaN payloads, infinities, denormals, -0.0);
    for wider ones, uniformly random bits: every exponent, NaNs and denormals among them."""
    w = dtypes.get(dt).itemsize
    rng = np.random.default_rng(w)
    if w <= 2:
        return rng.permutation(np.arange(1 << (8 * w), dtype=f"<u{w}")).tobytes()
    return rng.integers(0, 256, size=w * 70_001, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def every_dtype_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dtype at sizes that matter: one element, fewer and not a multiple of the 32 lanes,
    one full chunk plus a tail, several chunks; all special bit patterns; empty and scalar
    tensors; tied (deduplicated) weights; a packed sub-byte tensor."""
    tmp = tmp_path_factory.mktemp("every_dtype")
    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for dt in ALL:
        w = dtypes.get(dt).itemsize
        per_chunk = TENSOR_CHUNK_BYTES // w
        for n in (1, 7, 33, 1000, per_chunk + 5, 3 * per_chunk + 17):
            tensors[f"{dt.lower()}.{n}"] = (dt, (n,), weights_like(dt, n, rng).tobytes())
        raw = every_bit_pattern(dt)
        tensors[f"{dt.lower()}.bits"] = (dt, (len(raw) // w,), raw)
    tensors["matrix.bf16"] = ("BF16", (300, 517), weights_like("BF16", 300 * 517, rng).tobytes())
    tensors["tied.a"] = ("F16", (4000,), weights_like("F16", 4000, rng).tobytes())
    tensors["tied.b"] = tensors["tied.a"]
    tensors["empty"] = ("F32", (0, 4), b"")
    tensors["scalar"] = ("BF16", (), b"\x80\x3f")
    tensors["packed.f4"] = ("F4", (100_000, 2), bytes(100_000))  # kept as zstd bytes: the CPU path
    src = write_safetensors(tmp / "m.safetensors", tensors)
    elves.compress(src, tmp / "m.elves")
    return tmp / "m.elves"


@pytest.mark.gpu
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_dtype_is_bit_exact(gpu: Any, every_dtype_archive: Path, framework: str) -> None:
    framework_or_skip(framework)
    assert_same(gpu.load_file(every_dtype_archive, framework=framework), elves.load_file(every_dtype_archive),
                framework)


@pytest.mark.gpu
def test_small_staging_buffers_many_batches(gpu: Any, every_dtype_archive: Path) -> None:
    """Buffers smaller than a few chunks: the copy/decode pipeline turns over many times."""
    got = gpu.load_file(every_dtype_archive, framework="cupy", staging_bytes=300_000)
    assert_same(got, elves.load_file(every_dtype_archive), "cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_open_loads_one_tensor_at_a_time(gpu: Any, every_dtype_archive: Path, framework: str) -> None:
    framework_or_skip(framework)
    with elves.open(every_dtype_archive) as cpu, gpu.open(every_dtype_archive, framework=framework) as a:
        assert a.keys() == cpu.keys()
        names = cpu.keys()[::7] + ["tied.b", "empty", "scalar", "packed.f4"]
        assert_same({k: a.get_tensor(k) for k in names}, {k: cpu.get_tensor(k) for k in names}, framework)
        with pytest.raises(KeyError):
            a.get_tensor("nope")


@pytest.mark.gpu
def test_tensor_memory_is_bounded(gpu: Any, every_dtype_archive: Path) -> None:
    """GPU memory at its peak is the tensors plus the staging buffers, not a second model copy."""
    framework_or_skip("pt")
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    staging = 1 << 20
    tensors = gpu.load_file(every_dtype_archive, framework="pt", staging_bytes=staging)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    extra = torch.cuda.max_memory_allocated() - before - total
    assert extra <= gpu.STAGING_BUFFERS * staging + (2 << 20), extra


@pytest.mark.gpu
def test_views_of_storages_and_cpu_fallback(gpu: Any, tmp_path: Path) -> None:
    """PyTorch checkpoints hold tensors that are views (offset, strides) of shared storages."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 500, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 33, generator=g)
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"a": a, "a.rows": a[10:20], "a.t": a.t(), "a.col": a[:, 3], "a.tail": a.reshape(-1)[-7:],
                "b": b, "b.t": b.t(), "b.every2": b[::2, 1::3], "i64": torch.arange(1000),
                "scalar": torch.tensor(3.5)}, model / "views.pt")
    archive = tmp_path / "m.elves"
    elves.compress(model, archive)
    want = elves.load_file(archive)
    assert_same(gpu.load_file(archive, framework="cupy"), want, "cupy")
    if torch.cuda.is_available():
        assert_same(gpu.load_file(archive, framework="pt"), want, "pt")


def encoded_chunks(dt: str, sizes: list[int], lanes: int, prob_bits: int, seed: int
                   ) -> tuple[Pipeline, list[np.ndarray], list[bytes]]:
    rng = np.random.default_rng(seed)
    pipeline = Pipeline([Planes(dt), Rans(lanes=lanes, prob_bits=prob_bits)])
    raws = [weights_like(dt, n, rng) for n in sizes]
    return pipeline, raws, [pipeline.encode(r) for r in raws]


def on_device(cp: Any, payloads: list[bytes]) -> tuple[Any, list[int]]:
    """The payloads in one device buffer, each on a 16-byte boundary."""
    offsets, pos = [], 0
    for p in payloads:
        offsets.append(pos)
        pos += -(-len(p) // 16) * 16
    host = np.zeros(max(pos, 16), dtype=np.uint8)
    for offset, p in zip(offsets, payloads):
        host[offset:offset + len(p)] = np.frombuffer(p, dtype=np.uint8)
    return cp.asarray(host), offsets


def gpu_decode(cp: Any, gpu: Any, payloads: list[bytes], sizes: list[int], width: int, rotate: bool) -> bytes:
    buf, offsets = on_device(cp, payloads)
    out = cp.full(sum(sizes), 0xA5, dtype=cp.uint8)  # poisoned: every byte must be written
    gpu.decode_chunks(buf, [(o, len(p), n) for o, p, n in zip(offsets, payloads, sizes)], out,
                      width=width, rotate=rotate)
    return out.get().tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("lanes", [1, 5, 32, 33, 100, 4096])
@pytest.mark.parametrize("dt", ["BF16", "F32", "U8", "F64", "C128"])
def test_lane_counts_and_table_sizes_the_writer_does_not_use(cp: Any, gpu: Any, dt: str, lanes: int) -> None:
    """Other lane counts (more than a warp: several lane groups per thread) and table sizes."""
    w = dtypes.get(dt).itemsize
    for prob_bits in (9, 12):
        sizes = [5000, 1, 4097]
        pipeline, raws, payloads = encoded_chunks(dt, sizes, lanes, prob_bits, seed=lanes + prob_bits)
        got = gpu_decode(cp, gpu, payloads, [len(r) for r in raws], w, pipeline.codecs[0].rotate)
        assert got == b"".join(r.tobytes() for r in raws)


@pytest.mark.gpu
def test_corrupted_payloads_raise_like_the_cpu(cp: Any, gpu: Any) -> None:
    """Damage that bypasses the host checksum (bytes flipped in the device copy of the payload)
    raises CorruptArchiveError, never returns wrong data, wherever the CPU decoder refuses it;
    where it does not (a flipped raw byte decodes fine), both decoders agree on the bytes."""
    pipeline, (raw,), (payload,) = encoded_chunks("BF16", [50_000], 32, 12, seed=3)
    enc = np.frombuffer(payload, dtype=np.uint8)
    plane0 = int.from_bytes(enc[8:12].tobytes(), "little")
    assert enc[plane0] == 2  # the exponent plane is rANS-coded
    k = int.from_bytes(enc[plane0 + 2:plane0 + 4].tobytes(), "little")
    freqs = plane0 + 4 + k + (k & 1)
    lane_table = freqs + 2 * k + (-(freqs + 2 * k - plane0) % 4)
    streams = lane_table + 4 * 32
    damage = {
        "mode": (plane0, 0x07), "prob_bits": (plane0 + 1, 0x10), "a frequency": (freqs + 2, 0x01),
        "a lane length": (lane_table + 8, 0x02), "a lane's first state": (streams + 1, 0x40),
        "inside lane 0": (streams + 40, 0x08), "the header's plane count": (6, 0x01),
    }
    for what, (pos, bit) in damage.items():
        bad = bytearray(payload)
        bad[pos] ^= bit
        assert cpu_decode(pipeline, bytes(bad), len(raw)) is None, what
        with pytest.raises(CorruptArchiveError):
            gpu_decode(cp, gpu, [bytes(bad)], [len(raw)], 2, True)
    with pytest.raises(CorruptArchiveError):  # cut short
        gpu_decode(cp, gpu, [payload[:len(payload) // 2]], [len(raw)], 2, True)

    rng = np.random.default_rng(4)
    for _ in range(40):
        bad = bytearray(payload)
        bad[int(rng.integers(0, len(bad)))] ^= 1 << int(rng.integers(0, 8))
        want = cpu_decode(pipeline, bytes(bad), len(raw))
        if want is None:
            with pytest.raises(CorruptArchiveError):
                gpu_decode(cp, gpu, [bytes(bad)], [len(raw)], 2, True)
        else:
            assert gpu_decode(cp, gpu, [bytes(bad)], [len(raw)], 2, True) == want


@pytest.mark.gpu
def test_damaged_archive_raises(gpu: Any, every_dtype_archive: Path, tmp_path: Path) -> None:
    """A flipped payload byte in the file is caught by the chunk checksum, naming the tensor."""
    from elves.archive import ArchiveReader

    with ArchiveReader(every_dtype_archive) as r:
        stream = next(s for s in r.streams if s.pipeline and s.nbytes > 1 << 20)
        offset = stream.chunks[1][0] + 100
    data = bytearray(every_dtype_archive.read_bytes())
    data[offset] ^= 0xFF
    damaged = tmp_path / "damaged.elves"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError, match=r"tensor .* chunk 1: the payload is corrupted"):
        gpu.load_file(damaged, framework="cupy")


@pytest.mark.gpu
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["minilm", "astra"])
def test_real_models(gpu: Any, dataset: Any, tmp_path: Path, name: str) -> None:
    archive = tmp_path / f"{name}.elves"
    elves.compress(dataset(name), archive)
    want = elves.load_file(archive)
    assert_same(gpu.load_file(archive, framework="cupy"), want, "cupy")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        assert_same(gpu.load_file(archive, framework="pt"), want, "pt")


def test_without_cupy_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """elves.gpu imports anywhere; using it without cupy raises a clear ElvesError."""
    import sys

    import elves.gpu

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail, installed or not
    with pytest.raises(elves.errors.GpuUnavailableError, match=r"cupy is not installed: pip install 'elves\[gpu\]'"):
        elves.gpu.load_file(tmp_path / "any.elves", framework="cupy")
    assert issubclass(elves.errors.GpuUnavailableError, elves.ElvesError)


# ---------------------------------------------------------------------------- host side, no GPU

def host_plan(archive: Path, staging_bytes: int) -> tuple[Any, list[int], list[Any], int]:
    """The reader (open), the streams the kernels decode, and their batches for ``staging_bytes``."""
    from elves.archive import ArchiveReader
    from elves.gpu import plan

    reader = ArchiveReader(archive)
    streams = [s for s, st in enumerate(reader.streams) if st.chunks and plan.gpu_width(st) is not None]
    batches, staging = plan.batches(reader, streams, staging_bytes)
    return reader, streams, batches, staging


def test_kernels_and_cpu_fallback_are_chosen_per_stream(every_dtype_archive: Path) -> None:
    """planes+rans streams go to the kernel of their element width, streams stored as they are
    to the copy kernel; zstd streams (the packed F4 tensor's) stay on the CPU."""
    from elves.archive import ArchiveReader
    from elves.gpu import plan
    from elves.gpu.launcher import STORED
    from elves.index import tensor_names

    with ArchiveReader(every_dtype_archive) as r:
        chosen = {}
        for s in r.streams:
            ids = tuple(c["id"] for c in s.pipeline)
            chosen.setdefault(ids, set()).add(plan.gpu_width(s))
            if ids == ("planes", "rans"):
                assert plan.gpu_width(s) == dtypes.get(s.dtype).itemsize, s.dtype
        assert chosen == {(): {STORED}, ("planes", "rans"): {1, 2, 4, 8, 16}, ("zstd",): {None}}
        entry, t = tensor_names(r.files)["packed.f4"]
        assert plan.gpu_width(r.streams[entry.segments[t.segment]]) is None


@pytest.mark.parametrize("staging_bytes", [300_000, 64 << 20])
def test_batches_fit_staging_and_cover_every_chunk_once(every_dtype_archive: Path, staging_bytes: int) -> None:
    reader, streams, batches, staging = host_plan(every_dtype_archive, staging_bytes)
    with reader:
        assert staging == staging_bytes  # no chunk is larger than the buffer
        assert all(b.size() <= staging for b in batches)
        assert (len(batches) > 10) == (staging_bytes < 1 << 20)
        seen = [(c.stream, c.index) for b in batches for c in b.chunks]
        assert seen == [(s, i) for s in streams for i in range(len(reader.streams[s].chunks))]
        for s in streams:  # each stream's chunks tile its buffer
            chunks = [c for b in batches for c in b.chunks if c.stream == s]
            assert [c.dst_offset for c in chunks] == [sum(c.decoded for c in chunks[:i]) for i in range(len(chunks))]
            assert sum(c.decoded for c in chunks) == reader.streams[s].nbytes


def test_a_chunk_bigger_than_staging_grows_it(every_dtype_archive: Path) -> None:
    from elves.gpu.launcher import DESC, align

    reader, _, batches, staging = host_plan(every_dtype_archive, 1000)
    with reader:
        largest = max(c.length for b in batches for c in b.chunks)
        assert staging == align(DESC.itemsize) + align(largest)
        assert all(b.size() <= staging for b in batches)


def test_staged_descriptors_decode_like_the_cpu(every_dtype_archive: Path) -> None:
    """Emulate the GPU on the host: lay each batch out in a staging buffer whose "device
    address" is its own, fill it from the archive, then decode what every descriptor points at
    with the CPU pipeline. The streams come out as the CPU reader's; descriptors are grouped by
    width, one launch each, and carry each stream's rotate flag."""
    from concurrent.futures import ThreadPoolExecutor

    from elves.decoder import read_stream
    from elves.gpu import plan
    from elves.gpu.launcher import DESC, FLAG_ROTATE, STORED

    reader, streams, batches, staging = host_plan(every_dtype_archive, 300_000)
    with reader, ThreadPoolExecutor(2) as pool:
        out = {s: np.full(reader.streams[s].nbytes, 0xA5, dtype=np.uint8) for s in streams}
        where = {o.ctypes.data: s for s, o in out.items()}
        host = np.zeros(staging, dtype=np.uint8)
        base, status_base = host.ctypes.data, 0
        for batch in batches:
            layout = plan.lay_out(batch, base, {s: o.ctypes.data for s, o in out.items()}, status_base)
            status_base += len(batch.chunks)
            plan.fill(host, reader, batch, layout)
            descs = host[:len(batch.chunks) * DESC.itemsize].view(DESC)
            assert [(w, f, n) for w, f, n in layout.groups] == [
                (int(w), int(np.argmax(descs["width"] == w)), int((descs["width"] == w).sum()))
                for w in sorted(set(descs["width"].tolist()))]
            assert list(descs["width"]) == sorted(descs["width"])
            for d in descs:
                s = next(s for addr, s in where.items() if addr <= d["dst"] < addr + max(out[s].size, 1))
                stream = reader.streams[s]
                payload = host[d["src"] - base:d["src"] - base + d["src_len"]]
                dst = out[s][d["dst"] - out[s].ctypes.data:][:d["dst_len"]]
                assert d["width"] == plan.gpu_width(stream)
                if d["width"] == STORED:
                    dst[:] = payload
                else:
                    assert bool(d["flags"] & FLAG_ROTATE) == stream.decoder().codecs[0].rotate
                    stream.decoder().decode(payload, dst)
        for s in streams:
            assert np.array_equal(out[s], read_stream(reader, s, pool, 4)), s


def test_fill_refuses_a_damaged_payload(every_dtype_archive: Path, tmp_path: Path) -> None:
    """Payloads are checked on the host before they travel: a flipped byte names its chunk."""
    from elves.gpu import plan

    reader, _, batches, staging = host_plan(every_dtype_archive, 300_000)
    with reader:
        victim = batches[3].chunks[1]
    data = bytearray(every_dtype_archive.read_bytes())
    data[victim.offset + victim.length // 2] ^= 0x10
    damaged = tmp_path / "damaged.elves"
    damaged.write_bytes(bytes(data))
    reader, _, batches, staging = host_plan(damaged, 300_000)
    host = np.zeros(staging, dtype=np.uint8)
    with reader:
        plan.fill(host, reader, batches[2], plan.lay_out(batches[2], 0, dict.fromkeys(range(len(reader.streams)), 0), 0))
        with pytest.raises(CorruptArchiveError, match=rf"chunk {victim.index}: the payload is corrupted"):
            plan.fill(host, reader, batches[3], plan.lay_out(batches[3], 0, dict.fromkeys(range(len(reader.streams)), 0), 0))


@pytest.mark.parametrize("installed", [True, False])
def test_kernel_source_is_found(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    """From the package data, or (a checkout that was not installed) the repository's cuda/."""
    import importlib.resources

    from elves.gpu.launcher import WIDTHS, kernel_source

    if not installed:
        def no_package(name: str) -> Any:
            raise ModuleNotFoundError(name)

        monkeypatch.setattr(importlib.resources, "files", no_package)
    source = kernel_source()
    assert "void elves_copy_chunks(" in source
    assert all(f"ELVES_DECODE_KERNEL({w}," in source for w in WIDTHS)


def test_imports_without_cupy() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['cupy'] = None; import elves.gpu; print(sorted(elves.gpu.__all__))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "load_file" in r.stdout and "ChunkDecoder" in r.stdout


@pytest.mark.gpu
def test_a_delta_against_its_base_loads_on_the_gpu(gpu: Any, tmp_path: Path) -> None:
    """``base=`` on the GPU: chunks coded against the base (and the cast of an earlier stream)
    read their references as the CPU decoder does, then land on the device bit-exact."""
    rng = np.random.default_rng(21)
    base = {f"w.{i}": ("F32", (256, 96), weights_like("F32", 256 * 96, rng).tobytes()) for i in range(3)}
    write_safetensors(tmp_path / "base.safetensors", base)
    tuned = {k: (dt, shape, (np.frombuffer(raw, np.float32) * np.float32(1.001)).tobytes())
             for k, (dt, shape, raw) in base.items()}
    (tmp_path / "ft").mkdir()
    write_safetensors(tmp_path / "ft" / "model.safetensors", tuned)
    elves.compress(tmp_path / "ft", tmp_path / "ft.elves", base=tmp_path / "base.safetensors")
    with pytest.raises(elves.errors.BaseRequiredError):
        gpu.load_file(tmp_path / "ft.elves", framework="cupy")
    got = gpu.load_file(tmp_path / "ft.elves", framework="cupy", base=tmp_path / "base.safetensors")
    assert_same(got, elves.load_file(tmp_path / "ft.elves", base=tmp_path / "base.safetensors"), "cupy")
    with gpu.open(tmp_path / "ft.elves", framework="cupy", base=tmp_path / "base.safetensors") as a:
        assert_same({"w.1": a.get_tensor("w.1")}, {"w.1": got["w.1"].get()}, "cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_base_already_on_the_device(gpu: Any, tmp_path: Path, framework: str) -> None:
    """``base=`` as the base's tensors on the device (its state_dict there): read in place by the
    kernels (dense, sparse, grown, rows appended), the same bytes as with the base's file; a
    tensor on another device, or of another dtype, is refused naming it."""
    framework_or_skip(framework)
    rng = np.random.default_rng(22)
    base = {"embed": ("F32", (300, 64), weights_like("F32", 300 * 64, rng).tobytes()),
            "wide": ("F32", (64, 48), weights_like("F32", 64 * 48, rng).tobytes()),
            "sparse": ("F32", (256, 256), weights_like("F32", 256 * 256, rng).tobytes()),
            "dense": ("F32", (128, 96), weights_like("F32", 128 * 96, rng).tobytes())}
    write_safetensors(tmp_path / "base.safetensors", base)
    sparse = np.frombuffer(base["sparse"][2], np.uint8).reshape(-1, 4).copy()
    sparse[rng.random(sparse.shape[0]) < 0.02] = 7
    tuned = {"embed": ("F32", (330, 64), base["embed"][2] + weights_like("F32", 30 * 64, rng).tobytes()),
             "wide": ("F32", (64, 64), np.concatenate([np.frombuffer(base["wide"][2], np.float32).reshape(64, 48),
                                                       np.zeros((64, 16), np.float32)], 1).tobytes()),
             "sparse": ("F32", (256, 256), sparse.tobytes()),
             "dense": ("F32", (128, 96), (np.frombuffer(base["dense"][2], np.float32) * np.float32(1.001)).tobytes())}
    (tmp_path / "ft").mkdir()
    write_safetensors(tmp_path / "ft" / "model.safetensors", tuned)
    elves.compress(tmp_path / "ft", tmp_path / "ft.elves", base=tmp_path / "base.safetensors")
    host = {k: np.frombuffer(raw, np.float32).reshape(shape) for k, (_, shape, raw) in base.items()}
    if framework == "pt":
        import torch

        on_device = {k: torch.from_numpy(v.copy()).to("cuda:0") for k, v in host.items()}
        wrong = {**on_device, "dense": on_device["dense"].to(torch.float64)}
    else:
        import cupy

        on_device = {k: cupy.asarray(v) for k, v in host.items()}
        wrong = {**on_device, "dense": on_device["dense"].astype(cupy.float64)}
    got = gpu.load_file(tmp_path / "ft.elves", framework=framework, base=on_device)
    assert_same(got, elves.load_file(tmp_path / "ft.elves", base=tmp_path / "base.safetensors"), framework)
    with pytest.raises(elves.errors.BaseMismatchError, match="'dense'"):
        gpu.load_file(tmp_path / "ft.elves", framework=framework, base=wrong)


@pytest.mark.gpu
def test_store_load_decodes_on_the_gpu(gpu: Any, tmp_path: Path) -> None:
    """Store.load(name, device="cuda:0"): a fine-tune stored as its base's delta, its objects
    decoded on the device, the same tensors as the CPU's Store.load."""
    framework_or_skip("pt")
    from elves.store import Store

    rng = np.random.default_rng(23)
    base = {f"w.{i}": ("BF16", (256, 128), weights_like("BF16", 256 * 128, rng).tobytes()) for i in range(3)}
    for name, tensors in [("base", base), ("ft", {k: (dt, shape, (np.frombuffer(raw, np.uint16) ^ np.uint16(1)).tobytes())
                                                  for k, (dt, shape, raw) in base.items()})]:
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", tensors)
    store = Store.init(tmp_path / "s.store")
    store.add(tmp_path / "base", "base", base=None)
    store.add(tmp_path / "ft", "ft", base="base")
    got = store.load("ft", device="cuda:0")
    want = store.load("ft")
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].device.type == "cuda" and host_bytes(got[k]) == v.tobytes(), k


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["2^-24", "rel:1e-3"])
def test_elf_archives_decode_on_the_gpu(gpu: Any, tmp_path: Path, spec: str) -> None:
    """Lossy archives: planes + rANS into scratch memory, then the elf kernel; bit for bit the CPU's."""
    rng = np.random.default_rng(23)
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "m.safetensors", {f"w.{dt}": (dt, (256, 300), weights_like(dt, 256 * 300, rng).tobytes())
                                              for dt in ("F16", "BF16", "F32", "F64")})
    elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound=spec)
    assert_same(gpu.load_file(tmp_path / "m.elves", framework="cupy"), elves.load_file(tmp_path / "m.elves"), "cupy")


@pytest.mark.gpu
def test_versions_gathered_on_the_gpu(gpu: Any, tmp_path: Path) -> None:
    """A later version coded against an earlier stream of the archive, block-mapped or not: the
    reference is gathered on the device, the delta decoded in the second round."""
    from .test_gpu_emulation import versions

    src = versions(tmp_path / "src", np.random.default_rng(6))
    elves.compress(src, tmp_path / "m.elves")
    assert_same(gpu.load_file(tmp_path / "m.elves", framework="cupy"), elves.load_file(tmp_path / "m.elves"), "cupy")
    with gpu.open(tmp_path / "m.elves", framework="cupy") as a:  # one tensor: its source decodes too
        name = a.keys()[-1]
        assert_same({name: a.get_tensor(name)}, {name: elves.load_file(tmp_path / "m.elves")[name]}, "cupy")


@pytest.mark.gpu
def test_load_into_a_transformers_model_on_the_gpu(gpu: Any, dataset: Any, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    framework_or_skip("pt")
    src = dataset("minilm")
    elves.compress(src, tmp_path / "m.elves")
    ref = transformers.AutoModel.from_pretrained(src).eval()
    model = elves.api.load_into(transformers.AutoModel.from_config(ref.config), tmp_path / "m.elves", device="cuda:0")
    assert all(p.device.type == "cuda" for p in model.parameters())
    for k, v in ref.state_dict().items():
        assert host_bytes(model.state_dict()[k]) == host_bytes(v), k


def test_load_into_a_transformers_model(dataset: Any, tmp_path: Path) -> None:
    """The helper on the CPU (what runs without a GPU): an archive and a store's model put into a
    freshly built transformers model give the published model's weights and outputs."""
    transformers = pytest.importorskip("transformers")
    import torch

    from elves.store import Store

    src = dataset("minilm")
    elves.compress(src, tmp_path / "m.elves")
    store = Store.init(tmp_path / "store")
    store.add(src, "minilm")
    ref = transformers.AutoModel.from_pretrained(src).eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (elves.api.load_into(transformers.AutoModel.from_config(ref.config), tmp_path / "m.elves"),
                  elves.api.load_into(transformers.AutoModel.from_config(ref.config), tmp_path / "store",
                                      name="minilm")):
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
        assert torch.equal(model.eval()(x).last_hidden_state, ref(x).last_hidden_state)
    with pytest.raises(elves.errors.UsageError, match="none of its tensors"):
        elves.api.load_into(torch.nn.Linear(3, 3), tmp_path / "m.elves")
    arrays = store.load("minilm")
    assert set(ref.state_dict()) <= set(arrays)
    assert all(np.array_equal(arrays[k], v.numpy()) for k, v in ref.state_dict().items())
