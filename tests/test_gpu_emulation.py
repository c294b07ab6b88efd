"""Whole archives through the GPU decode path on the host: elves.gpu.plan chooses each stream's
kernel, cuts its chunks into batches, lays out the descriptors and references, reads and checks
the payloads into a staging buffer, and the kernels of cuda/ (compiled for the host by
tests/cuda_host.py) decode them; what the CPU decoder gives must come out byte for byte, and a
damaged payload must raise what the GPU loader raises.

This is elves.gpu.decode.StreamDecoder with host memory where device memory would be: the same
two rounds (streams gathered from first), the same plan calls and the same launches. Planes/rANS
(every dtype), BitX against a base model (dense, masked, ranked, grown, rows appended, empty
payloads; sparse, through its second kernel), BitX against an earlier stream of the archive (a
gather, block-mapped or not), and the streams the CPU decodes (zstd bytes) are covered.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import elves
from elves.archive import ArchiveReader
from elves.decoder import attach_base, read_stream, stream_label
from elves.errors import CorruptArchiveError
from elves.gpu import plan
from elves.errors import BaseMismatchError, UsageError
from elves.gpu.base import DeviceBase, attach
from elves.gpu.device import Target
from elves.gpu.launcher import DESC, STORED, raise_status
from tests.conftest import write_safetensors

from .cuda_host import KERNELS, HostKernels, aligned, compile_source
from .test_codecs import weights_like

STAGING = 1 << 20  # small: several batches per archive
POOL = ThreadPoolExecutor(1)  # the CPU decoder's


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    return compile_source(KERNELS, tmp_path_factory.mktemp("emulation"))


class HostDecoder:
    """StreamDecoder's work on the host: streams -> decoded bytes (numpy), and the chunk that
    failed, as the loader names it."""

    def __init__(self, reader: ArchiveReader, kernels: HostKernels):
        self.reader = reader
        self.kernels = kernels
        self.kinds: dict[str, int] = {}  # how many streams each path decoded

    def run(self) -> dict[int, np.ndarray]:
        reader = self.reader
        streams = list(range(len(reader.streams)))
        on_gpu = {s for s in streams if plan.gpu_width(reader.streams[s]) is not None}
        gathered = {s: src for s in on_gpu if (src := plan.gathered_from(reader.streams[s])) is not None}
        out: dict[int, np.ndarray] = {}
        for s in streams:
            if s not in on_gpu:
                out[s] = read_stream(reader, s, POOL, 2)
                self._count("cpu")
        for round_ in (sorted(on_gpu - set(gathered)), sorted(gathered)):
            out.update(self._decode(round_, out))
        return out

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _reference(self, s: int, decoded: dict[int, np.ndarray], keep: list[Any]) -> plan.DeviceRef:
        rp = plan.reference_plan(self.reader, s)
        assert rp is not None
        if rp.device is not None:  # a base "on the device": CPU torch tensors stand for it
            buf = rp.device if rp.grown is None else HostTarget().grown(rp.device, *rp.grown)
            self._count("xor against a base on the device")
        elif rp.host is not None:
            buf = aligned(rp.host.nbytes)
            buf[:] = rp.host
            self._count("xor against a base")
        else:
            assert rp.stream is not None
            buf = aligned(rp.nbytes)
            source = decoded[rp.stream]
            descs = plan.gather_descs(rp, source.ctypes.data, buf.ctypes.data)
            status = np.zeros(len(descs), np.uint32)
            self.kernels.launch(descs.ctypes.data, status.ctypes.data, [(STORED, 0, len(descs))])
            assert not status.any()
            self._count("xor against a gathered stream")
        keep.append(buf)
        table = 0
        xor = plan.xor_of(self.reader.streams[s])
        if xor is not None and xor.remap is not None:
            from bitx.codec import rank_tables

            tab = np.ascontiguousarray(rank_tables(xor.remap)[1])
            keep.append(tab)
            table = tab.ctypes.data
            self._count("ranked")
        ptr = buf.data_ptr() if hasattr(buf, "data_ptr") else buf.ctypes.data
        return plan.DeviceRef(ptr, int(buf.shape[0]), table)

    def _decode(self, streams: list[int], decoded: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        reader = self.reader
        batches, staging_bytes = plan.batches(reader, streams, STAGING)
        outputs = {s: aligned(reader.streams[s].nbytes, 0xA5) for s in streams}
        refs: dict[int, plan.DeviceRef] = {}
        keep: list[Any] = []
        for s in streams:
            if plan.needs_reference(reader.streams[s]):
                refs[s] = self._reference(s, decoded, keep)
            else:
                self._count("planes/rans" if reader.streams[s].pipeline else "stored")
        for batch in batches:
            host = aligned(staging_bytes)
            layout = plan.lay_out(batch, host.ctypes.data, {s: b.ctypes.data for s, b in outputs.items()}, 0, refs)
            plan.fill(host, reader, batch, layout)
            if layout.links:
                sizes = plan.scratch_sizes(host, batch, layout)
                scratch = aligned(plan.scratch_bytes(sizes))
                plan.link(host, layout, scratch.ctypes.data, sizes)
                for i, _, _ in layout.links:
                    elf = batch.chunks[i].elf
                    self._count("sparse xor" if elf is None else "elf delta" if elf.delta else "elf")
            status = np.zeros(len(layout.order), np.uint32)
            self.kernels.launch(host.ctypes.data, status.ctypes.data, layout.groups)
            chunks = [batch.chunks[i] for i in layout.order]
            raise_status(status, lambda i: f"{stream_label(reader, chunks[i].stream)}: chunk {chunks[i].index}",
                         reader.path)
        return outputs


class HostTarget(Target):
    """elves.gpu's device buffers, in host memory."""

    def empty(self, nbytes: int) -> tuple[Any, int]:
        buf = aligned(nbytes)
        return buf, buf.ctypes.data


def decode_both(path: Path, kernels: HostKernels, base: Any = None) -> tuple[HostDecoder, dict[int, np.ndarray]]:
    """The archive's streams through the emulated GPU path; each is checked against the CPU
    decoder's bytes."""
    with ArchiveReader(path) as reader:
        attach(reader, base, None)
        emu = HostDecoder(reader, kernels)
        got = emu.run()
        for s in range(len(reader.streams)):
            want = read_stream(reader, s, POOL, 2)
            assert got[s].tobytes() == want.tobytes(), stream_label(reader, s)
    return emu, got


def model(rng: np.random.Generator, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: (dt, shape, weights_like(dt, int(np.prod(shape)), rng).tobytes()) for k, (dt, shape) in shapes.items()}


def fine_tune(dt: str, raw: bytes, rng: np.random.Generator, scale: float) -> bytes:
    """Small updates of a float tensor, as continued training makes (about half of them zero)."""
    a = np.frombuffer(raw, dtype=elves.dtypes.numpy_dtype(dt)).astype(np.float32)
    with np.errstate(all="ignore"):  # the weights hold NaN and infinity too
        step = rng.standard_normal(a.shape[0]).astype(np.float32) * np.float32(scale) * np.abs(a)
        step[rng.random(a.shape[0]) < 0.5] = 0
        return (a + step).astype(elves.dtypes.numpy_dtype(dt)).tobytes()


def test_planes_rans_every_dtype(kernels: HostKernels, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = model(rng, {f"t.{dt}": (dt, (200, 300)) for dt in ["BF16", "F16", "F32", "F64", "I8", "U8", "I32",
                                                                "I64", "F8_E4M3", "BOOL", "C128"]})
    tensors["big"] = ("F32", (512, 1024), weights_like("F32", 512 * 1024, rng).tobytes())  # several chunks
    write_safetensors(tmp_path / "m.safetensors", tensors)
    (tmp_path / "notes.txt").write_text("opaque bytes, coded with zstd " * 50)
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "m.safetensors").rename(src / "m.safetensors")
    (tmp_path / "notes.txt").rename(src / "notes.txt")
    elves.compress(src, tmp_path / "m.elves")
    emu, _ = decode_both(tmp_path / "m.elves", kernels)
    assert emu.kinds.get("planes/rans", 0) >= 5 and emu.kinds.get("stored", 0) >= 1 and emu.kinds.get("cpu", 0) >= 1, emu.kinds


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base model and a fine-tune of it compressed against it: lightly and heavily retrained
    tensors (masked and ranked XOR), an unchanged one (empty payloads), a vocabulary with rows
    appended and a widened layer (a grown reference)."""
    tmp = tmp_path_factory.mktemp("fine_tuned")
    rng = np.random.default_rng(11)
    base = model(rng, {"embed": ("BF16", (1000, 128)), "light": ("F32", (256, 256)), "heavy": ("BF16", (512, 256)),
                       "same": ("F32", (128, 128)), "wide": ("F32", (64, 96)), "f16": ("F16", (300, 200))})
    write_safetensors(tmp / "base.safetensors", base)
    tuned = {
        "embed": ("BF16", (1100, 128), fine_tune("BF16", base["embed"][2], rng, 0.01)
                  + weights_like("BF16", 100 * 128, rng).tobytes()),
        "light": ("F32", (256, 256), fine_tune("F32", base["light"][2], rng, 1e-4)),
        "heavy": ("BF16", (512, 256), fine_tune("BF16", base["heavy"][2], rng, 0.5)),
        "same": base["same"],
        "wide": ("F32", (64, 128), np.concatenate([np.frombuffer(base["wide"][2], np.float32).reshape(64, 96),
                                                   np.zeros((64, 32), np.float32)], axis=1).tobytes()),
        "f16": ("F16", (300, 200), fine_tune("F16", base["f16"][2], rng, 0.02)),
    }
    (tmp / "ft").mkdir()
    write_safetensors(tmp / "ft" / "model.safetensors", tuned)
    elves.compress(tmp / "ft", tmp / "ft.elves", base=tmp / "base.safetensors")
    return tmp / "ft.elves", tmp / "base.safetensors"


def test_bitx_against_a_base(kernels: HostKernels, fine_tuned: tuple[Path, Path]) -> None:
    archive, base = fine_tuned
    emu, _ = decode_both(archive, kernels, base)
    assert emu.kinds.get("xor against a base", 0) >= 4, emu.kinds
    with ArchiveReader(archive) as r:
        xors = [plan.xor_of(s) for s in r.streams if s.pipeline and s.pipeline[0]["id"] == "xor"]
        gpu_xors = [x for x in xors if x is not None]
        # what the archive holds, and what the kernels decode of it
        assert any(x.mask != (1 << (8 * x.width)) - 1 for x in gpu_xors), "no masked xor"
        assert any(x.shape is not None for x in gpu_xors), "no grown reference"
        assert any(not c[1] for s in r.streams if s.pipeline and s.pipeline[0]["id"] == "xor" for c in s.chunks), \
            "no empty payload"


def test_a_ranked_delta_decodes_in_the_kernel(kernels: HostKernels, tmp_path: Path) -> None:
    """Ranked XOR decodes in the kernel (its table on the device); sparse XOR in two (see
    test_sparse_xor_archive)."""
    from bitx.codec import Xor
    from elves.codecs import Pipeline
    from elves.codecs.planes import Planes
    from elves.codecs.rans import Rans

    rng = np.random.default_rng(4)
    base = weights_like("BF16", 4096, rng)
    ft = np.frombuffer(fine_tune("BF16", base.tobytes(), rng, 0.3), np.uint8)
    import xxhash

    digest = xxhash.xxh3_128_hexdigest(base.tobytes())
    for kw, where in [({"remap": [[120, [121, 119]], [119, [120]]]}, "gpu"), ({"sparse": True}, "gpu")]:
        xor = Xor("BF16", digest, base.nbytes, **kw)
        pipeline = Pipeline([xor, Planes("BF16"), Rans()])
        payload = pipeline.encode(ft, ref=base)
        want = np.empty(ft.shape[0], np.uint8)
        Pipeline.from_config(pipeline.get_config()).decode(np.frombuffer(payload, np.uint8).copy(), want, ref=base)
        assert want.tobytes() == ft.tobytes()
        from elves.index import Stream

        stream = Stream.__new__(Stream)
        object.__setattr__(stream, "pipeline", pipeline.get_config())
        object.__setattr__(stream, "codecs", Pipeline.from_config(pipeline.get_config()))
        assert (plan.gpu_width(stream) is not None) == (where == "gpu"), kw
        if xor.sparse:
            continue
        src, dst, ref = aligned(len(payload)), aligned(ft.shape[0]), aligned(base.nbytes)
        src[:], ref[:] = np.frombuffer(payload, np.uint8), base
        tab = np.ascontiguousarray(rank_inverse(xor))
        from elves.gpu.launcher import FLAG_REMAP, FLAG_ROTATE, FLAG_XOR

        descs = np.zeros(1, DESC)
        descs[0] = (src.ctypes.data, len(payload), dst.ctypes.data, ft.shape[0], 2, FLAG_ROTATE | FLAG_XOR | FLAG_REMAP,
                    ref.ctypes.data, base.nbytes, xor.mask, tab.ctypes.data)
        status = np.zeros(1, np.uint32)
        kernels.launch(descs.ctypes.data, status.ctypes.data, [(2, 0, 1)])
        assert status[0] == 0 and dst.tobytes() == ft.tobytes()


@pytest.mark.parametrize("spec", ["2^-24", "1e-3", "rel:1e-2"])
def test_elf_archives(kernels: HostKernels, tmp_path: Path, spec: str) -> None:
    """Lossy archives: planes + rANS decode each chunk's codes into scratch memory, the elf kernel
    dequantises them (every dtype it takes); deltas: see test_elf_deltas."""
    rng = np.random.default_rng(9)
    src = tmp_path / "src"
    src.mkdir()
    tensors = model(rng, {f"w.{dt}": (dt, (300, 200)) for dt in ("F16", "BF16", "F32", "F64")})
    tensors["table"] = ("F32", (64, 100), np.repeat(np.linspace(-1, 1, 16, dtype=np.float32), 400).tobytes())
    write_safetensors(src / "m.safetensors", tensors)
    elves.compress(src, tmp_path / "m.elves", lossy="elf", error_bound=spec)
    emu, _ = decode_both(tmp_path / "m.elves", kernels)
    assert emu.kinds.get("elf", 0) >= 1, emu.kinds


def rank_inverse(xor: Any) -> np.ndarray:
    from bitx.codec import rank_tables

    return rank_tables(xor.remap)[1]


def versions(folder: Path, rng: np.random.Generator) -> Path:
    """Two releases of one model in a folder (the second coded against the first: ``xor`` with
    ``ref``) and an LSTM's gates reordered on export (a block-mapped reference)."""
    folder.mkdir()
    v1 = model(rng, {"a": ("F32", (300, 64)), "b": ("BF16", (256, 128))})
    write_safetensors(folder / "v1.safetensors", v1)
    write_safetensors(folder / "v2.safetensors", {k: (dt, shape, fine_tune(dt, raw, rng, 1e-3))
                                                  for k, (dt, shape, raw) in v1.items()})
    gates = [weights_like("F32", 64 * 128, rng) for _ in range(4)]
    write_safetensors(folder / "w_torch.safetensors", {"rnn.weight_ih": ("F32", (256, 128), b"".join(
        g.tobytes() for g in gates))})
    write_safetensors(folder / "x_onnx.safetensors", {"onnx::LSTM": ("F32", (1, 256, 128), b"".join(
        g.tobytes() for g in [gates[0], gates[3], gates[1], gates[2]]))})
    return folder


def test_bitx_against_earlier_streams_gathered(kernels: HostKernels, tmp_path: Path) -> None:
    src = versions(tmp_path / "src", np.random.default_rng(6))
    elves.compress(src, tmp_path / "m.elves")
    with ArchiveReader(tmp_path / "m.elves") as r:
        refs = [s for s in r.streams if s.ref is not None and plan.gpu_width(s) is not None]
        assert any(s.ref_map for s in refs) and any(not s.ref_map for s in refs), "no plain or block-mapped reference"
    emu, _ = decode_both(tmp_path / "m.elves", kernels)
    assert emu.kinds.get("xor against a gathered stream", 0) == len(refs), emu.kinds


def test_damaged_payloads_are_refused_as_the_cpu_refuses_them(kernels: HostKernels, fine_tuned: tuple[Path, Path]
                                                              ) -> None:
    """Payloads damaged after their checksum was checked (what a forger who recomputes checksums
    gets through): in a staged batch of a real BitX archive, bits flipped in a chunk's payload.
    The kernel flags the chunk exactly when the CPU decoder refuses it, with the same message,
    and otherwise decodes the same bytes."""
    archive, base = fine_tuned
    rng = np.random.default_rng(2)
    with ArchiveReader(archive) as reader:
        attach_base(reader, base)
        streams = [s for s, st in enumerate(reader.streams) if plan.gpu_width(st) is not None and plan.xor_of(st) is not None
                   and plan.gathered_from(st) is None]
        emu = HostDecoder(reader, kernels)
        keep: list[Any] = []
        refs = {s: emu._reference(s, {}, keep) for s in streams}
        batches, staging_bytes = plan.batches(reader, streams, STAGING)
        outputs = {s: aligned(reader.streams[s].nbytes) for s in streams}
        refused = 0
        for trial in range(24):
            batch = batches[trial % len(batches)]
            host = aligned(staging_bytes)
            layout = plan.lay_out(batch, host.ctypes.data, {s: b.ctypes.data for s, b in outputs.items()}, 0, refs)
            plan.fill(host, reader, batch, layout)
            k = int(rng.integers(0, len(batch.chunks)))
            c = batch.chunks[k]
            if not c.length:
                continue
            payload = host[layout.offsets[k]:layout.offsets[k] + c.length]
            for _ in range(int(rng.integers(1, 4))):
                payload[int(rng.integers(0, c.length))] ^= 1 << int(rng.integers(0, 8))
            if layout.links:  # sparse chunks: scratch sized from the (damaged) headers
                sizes = plan.scratch_sizes(host, batch, layout)
                keep.append(scratch := aligned(plan.scratch_bytes(sizes)))
                plan.link(host, layout, scratch.ctypes.data, sizes)
            status = np.zeros(len(layout.order), np.uint32)
            kernels.launch(host.ctypes.data, status.ctypes.data, layout.groups)
            # the first failure, as the loader reports it: planes + rANS before a second kernel
            got = next((int(status[d]) for d, i in enumerate(layout.order) if i == k and status[d]), 0)
            stream = reader.streams[c.stream]
            out = np.empty(c.decoded, np.uint8)
            ref_fn = reader.references.chunk_refs(stream)
            assert ref_fn is not None
            try:
                stream.decoder().decode(payload.copy(), out, ref=ref_fn(c.index))
                want = None
            except CorruptArchiveError as e:
                want = e.message
            if want is None:
                assert got == 0, trial
                dst = outputs[c.stream][c.dst_offset:c.dst_offset + c.decoded]
                assert dst.tobytes() == out.tobytes(), trial
            else:
                refused += 1
                assert got != 0, (trial, want)
                with pytest.raises(CorruptArchiveError) as e:
                    raise_status(np.array([got], np.uint32), lambda i: "chunk")
                assert want in e.value.message or "rans container" in want, (want, e.value.message)
        assert refused >= 6


def test_sparse_xor_archive(kernels: HostKernels, tmp_path: Path) -> None:
    """Continued training that leaves most weights bit for bit unchanged: the encoder picks the
    sparse form, which planes + rANS decode into scratch memory and the sparse kernel expands
    against the base, bit for bit the CPU's."""
    rng = np.random.default_rng(12)
    base = model(rng, {"a": ("BF16", (512, 256)), "b": ("F32", (300, 200)), "c": ("F16", (64, 64))})
    write_safetensors(tmp_path / "base.safetensors", base)
    tuned = {}
    for k, (dt, shape, raw) in base.items():
        a = np.frombuffer(raw, np.uint8).reshape(-1, elves.dtypes.get(dt).itemsize).copy()
        hit = rng.random(a.shape[0]) < 0.02
        a[hit] = rng.integers(0, 256, a[hit].shape, dtype=np.uint8)  # a few weights retrained, the rest as they were
        tuned[k] = (dt, shape, a.tobytes())
    (tmp_path / "ft").mkdir()
    write_safetensors(tmp_path / "ft" / "model.safetensors", tuned)
    elves.compress(tmp_path / "ft", tmp_path / "ft.elves", base=tmp_path / "base.safetensors")
    with ArchiveReader(tmp_path / "ft.elves") as r:
        sparse = [s for s in r.streams if (x := plan.xor_of(s) if s.pipeline else None) is not None and x.sparse]
        assert sparse and all(plan.gpu_width(s) is not None for s in sparse)
    emu, _ = decode_both(tmp_path / "ft.elves", kernels, tmp_path / "base.safetensors")
    assert emu.kinds.get("sparse xor", 0) >= len(sparse), emu.kinds


def base_on_device(path: Path) -> dict[str, Any]:
    """The base model's tensors as torch tensors, as ``state_dict()`` gives them (on the CPU
    here: the emulation's "device" is host memory)."""
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def test_a_base_on_the_device_is_read_in_place(kernels: HostKernels, fine_tuned: tuple[Path, Path]) -> None:
    """base= as tensors already on the device (names with a wrapper prefix, as a Lightning
    state_dict has): the kernels read their memory, grown shapes included; the same bytes as
    the CPU decoder with the base's file."""
    archive, base = fine_tuned
    tensors = {f"model.{k}": v for k, v in base_on_device(base).items()}
    with ArchiveReader(archive) as reader:
        attach(reader, tensors, None)
        emu = HostDecoder(reader, kernels)
        got = emu.run()
    with ArchiveReader(archive) as reader:
        attach_base(reader, base)
        for s in range(len(reader.streams)):
            assert got[s].tobytes() == read_stream(reader, s, POOL, 2).tobytes(), stream_label(reader, s)
    assert emu.kinds.get("xor against a base on the device", 0) >= 4 and not emu.kinds.get("xor against a base"), \
        emu.kinds


def test_a_base_on_the_device_is_checked(fine_tuned: tuple[Path, Path]) -> None:
    """Each tensor the archive's references need must be there by name, of their dtype and byte
    count, contiguous and on the target device: otherwise a BaseMismatchError naming it, before
    anything is decoded. On the CPU path such a base is a usage error."""
    import torch

    archive, base = fine_tuned
    tensors = base_on_device(base)
    with ArchiveReader(archive) as reader:
        needed = reader.base_needed
        assert needed
        DeviceBase(tensors, needed, reader.path)  # as given: every check passes
        with pytest.raises(BaseMismatchError, match="is on cpu, not on cuda:0"):
            DeviceBase(tensors, needed, reader.path).on(0)
        name = needed["tensors"][0]["name"]
        cases = [
            ({k: v for k, v in tensors.items() if k != name}, f"has no tensor '{name}'"),
            ({**tensors, name: tensors[name].view(torch.int16 if tensors[name].element_size() == 2 else torch.int32)},
             "but the archive's references need"),
            ({**tensors, name: tensors[name].reshape(-1)[:-1]}, "bytes), but the archive's references need"),
            ({**tensors, name: torch.cat([tensors[name].reshape(-1, 2)] * 2, 1)[:, ::2]}, "is not contiguous"),
            ({**tensors, name: np.zeros(4)}, "not a torch tensor or cupy array"),
        ]
        for given, message in cases:
            with pytest.raises(BaseMismatchError) as e:
                DeviceBase(given, needed, reader.path)
            assert name in e.value.message and message in e.value.message, (message, e.value.message)
    with pytest.raises(UsageError, match="for loads onto that device"):
        elves.load_file(archive, base=tensors)


def test_a_store_model_decodes_through_the_kernels(kernels: HostKernels, tmp_path: Path) -> None:
    """Store.load on a GPU: a fine-tune stored as its base's delta (dense and sparse xor against
    the base's objects, uploaded as the CPU reads them) and small tensors packed together, read
    as one archive (elves.store.reading.ModelObjects) and decoded by the emulated kernels: each
    tensor bit for bit what Store.restore writes."""
    import safetensors.numpy

    from elves.store import Store
    from elves.store.reading import ModelObjects

    rng = np.random.default_rng(14)
    base = model(rng, {"a": ("BF16", (512, 256)), "b": ("F32", (300, 200)), "tiny": ("F32", (4,))})
    (tmp_path / "base").mkdir()
    write_safetensors(tmp_path / "base" / "model.safetensors", base)
    tuned = {"a": ("BF16", (512, 256), fine_tune("BF16", base["a"][2], rng, 0.01)),
             "b": ("F32", (300, 200), base["b"][2][:-400] + weights_like("F32", 100, rng).tobytes()),
             "tiny": base["tiny"]}
    (tmp_path / "ft").mkdir()
    write_safetensors(tmp_path / "ft" / "model.safetensors", tuned)
    (tmp_path / "ft" / "config.json").write_text('{"model_type": "bert"}')
    store = Store.init(tmp_path / "s.store")
    store.add(tmp_path / "base", "base", base=None)
    assert store.add(tmp_path / "ft", "ft", base="base").base == "base"
    store.restore("ft", tmp_path / "restored")
    want = safetensors.numpy.load_file(str(tmp_path / "restored" / "model.safetensors"))
    with ModelObjects(store.storage, "ft", store.manifest("ft"), lambda f: f["path"].endswith(".safetensors")) as objs:
        emu = HostDecoder(objs, kernels)
        got = emu.run()
        assert emu.kinds.get("xor against a base", 0) >= 1, emu.kinds
        for entry in objs.files:
            for t in entry.tensors:
                raw = want[t.name].tobytes()
                s = entry.segments[t.segment]
                assert got[s][t.offset:t.offset + len(raw)].tobytes() == raw, t.name


@pytest.mark.parametrize("spec", ["1e-3", "rel:1e-2", "rel:2^-6", "2^-24"])
def test_elf_deltas(kernels: HostKernels, tmp_path: Path, spec: str) -> None:
    """Lossy versions of one model: the second release's tensors are elf deltas against the
    first's decoded (lossy) bytes, gathered on the device. The elf kernel quantises each
    reference element on the chunk's grid (uniform, binade with its bound check, exact) and
    adds the differences back: bit for bit the CPU decoder's."""
    versions(tmp_path / "src", np.random.default_rng(6))
    elves.compress(tmp_path / "src", tmp_path / "m.elves", lossy="elf", error_bound=spec)
    emu, _ = decode_both(tmp_path / "m.elves", kernels)
    assert emu.kinds.get("elf delta", 0) >= 2 and not emu.kinds.get("cpu", 0) > 1, emu.kinds
