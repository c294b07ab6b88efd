"""Decode an archive's streams onto the device, batch by batch.

Each batch of chunks (:mod:`.plan`) is read into a pinned staging buffer on a worker thread,
copied to the device on a copy stream while the previous batch decodes on the target's stream,
and decoded by the kernels straight into the streams' own buffers. Streams the kernels cannot
decode (zstd bytes) go through the CPU instead, on a thread of their own while
the GPU decodes the others: :meth:`StreamDecoder.decode_on_cpu` is the one place where that
happens.

BitX deltas decode in the same launches, the ``xor`` filter fused into the kernel: each stream's
reference is put on the device first, either the base model's tensor the CPU reads (a cast or a
grown shape of one: whatever :mod:`elves.references` builds) uploaded, or a base tensor already
on the device (:mod:`.base`) read in place, or gathered on the device from an earlier stream of
the archive, block map and all. Streams gathered from are decoded in a
first round, the streams that need them in a second.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generator, Iterator

import numpy as np

from bitx.codec import rank_tables

from ..decoder import StreamReader, iter_stream, stream_label
from ..parallel import default_threads
from . import plan
from .device import Staging, Target
from .launcher import STORED, kernels, raise_status

STAGING_BYTES = 64 << 20   # one staging buffer (pinned on the host, and on the device)
STAGING_BUFFERS = 3        # read, copy and decode overlap: one buffer each


class StreamDecoder:
    """Decodes streams of one archive onto one device (see the module docstring).

    Run it inside ``device.on(target)``. :meth:`run` yields each stream's buffer once every chunk
    of it has been enqueued: work on it enqueued afterwards on ``target.stream`` is ordered after
    the decode. :meth:`finish` waits for the GPU and raises CorruptArchiveError if a chunk failed.
    """

    def __init__(self, reader: StreamReader, target: Target, staging_bytes: int):
        self.reader = reader
        self.target = target
        self.kernels = kernels(target.device)
        self.cp = self.kernels.cp
        self.staging_bytes = staging_bytes
        self.status: Any = None
        self.status_ptr = 0
        self.status_chunks: list[plan.Chunk] = []
        self._threads = default_threads(None)
        self._cpu_pool: ThreadPoolExecutor | None = None
        self.kept: dict[int, Any] = {}        # decoded streams that references are gathered from
        self.refs: dict[int, list[Any]] = {}  # device references (and what makes them) by stream

    def run(self, streams: list[int]) -> Generator[tuple[int, Any], None, None]:
        reader = self.reader
        wanted = set(streams)
        on_gpu = {s for s in streams if plan.gpu_width(reader.streams[s]) is not None}
        # Streams gathered from (an earlier stream a delta references) decode in the first round
        # and stay until the second has used them.
        gathered = {s: src for s in on_gpu if (src := plan.gathered_from(reader.streams[s])) is not None}
        sources = set(gathered.values())
        first = (on_gpu - set(gathered)) | {src for src in sources if plan.gpu_width(reader.streams[src]) is not None}
        on_cpu = [s for s in dict.fromkeys([*streams, *sorted(sources)]) if s not in on_gpu and s not in first]
        # The CPU decodes its streams (into pinned memory) while the GPU decodes the others, and
        # their copies to the device run on a stream of their own, beside the decode.
        cpu_pool = ThreadPoolExecutor(1)
        pending = {s: cpu_pool.submit(self.decode_on_cpu, s) for s in on_cpu}
        upload_stream = self.cp.cuda.Stream(non_blocking=True)
        pinned: list[Any] = []
        self.kept = {}
        # One status word per chunk of both rounds, checked by finish().
        total = sum(len(reader.streams[s].chunks) * plan.descs_per_chunk(reader.streams[s])
                    for s in on_gpu | first)
        if total:
            self.status, self.status_ptr = self.target.empty(4 * total)
            self.cp.cuda.runtime.memsetAsync(self.status_ptr, 0, 4 * total, self.target.stream.ptr)
        try:
            for s, buf in self._run_gpu(sorted(first, key=self._first_offset)):
                if s in sources:
                    self.kept[s] = buf
                if s in wanted:
                    yield s, buf
            for s, future in pending.items():
                buf = self._upload(future.result(), upload_stream, pinned)
                if s in sources:
                    self.kept[s] = buf
                if s in wanted:
                    yield s, buf
            yield from self._run_gpu(sorted(gathered, key=self._first_offset))
        finally:
            cpu_pool.shutdown(wait=True, cancel_futures=True)
            upload_stream.synchronize()  # no copy may still read a pinned buffer once it is freed
            self.kept = {}

    def decode_on_cpu(self, s: int) -> tuple[Any, np.ndarray]:
        """Worker thread: stream ``s`` decoded by the CPU decoder (every check of it applied) into
        pinned memory, to be uploaded (the buffer, its view): for streams no kernel decodes (zstd
        bytes, codecs the kernels do not know)."""
        if self._cpu_pool is None:
            self._cpu_pool = ThreadPoolExecutor(self._threads)
        nbytes = self.reader.streams[s].nbytes
        with self.cp.cuda.Device(self.target.device):
            mem = self.cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        host = np.frombuffer(mem, dtype=np.uint8, count=nbytes)
        pos = 0
        for chunk in iter_stream(self.reader, s, self._cpu_pool, 2 * self._threads + 2):  # sizes checked at its end
            host[pos:pos + chunk.shape[0]] = chunk[:max(0, nbytes - pos)]
            pos += chunk.shape[0]
        return mem, host

    def _upload(self, decoded: tuple[Any, np.ndarray], upload_stream: Any, pinned: list[Any]) -> Any:
        """A device buffer that a copy of ``decoded`` on ``upload_stream`` fills: work enqueued on
        the decode stream afterwards waits for it, work enqueued before does not."""
        cp, target = self.cp, self.target
        mem, host = decoded
        buf, ptr = target.empty(host.nbytes)
        if host.nbytes:
            allocated = cp.cuda.Event(disable_timing=True)
            allocated.record(target.stream)  # stream-ordered allocators: the memory is free from here
            upload_stream.wait_event(allocated)
            cp.cuda.runtime.memcpyAsync(ptr, host.ctypes.data, host.nbytes, cp.cuda.runtime.memcpyHostToDevice,
                                        upload_stream.ptr)
            copied = cp.cuda.Event(disable_timing=True)
            copied.record(upload_stream)
            target.stream.wait_event(copied)
        pinned.append(mem)
        return buf

    def _reference(self, s: int) -> plan.DeviceRef:
        """Stream ``s``'s reference put on the device (enqueued on the decode stream), with its
        remap table; the buffers are kept in ``self.refs`` while the stream decodes."""
        target, cp = self.target, self.cp
        rp = plan.reference_plan(self.reader, s)
        if rp is None:
            raise ValueError(f"stream {s} has an xor filter but no reference")
        keep: list[Any] = []
        if rp.device is not None:  # a base tensor on the device: read in place, or placed in a grown shape
            buf = rp.device if rp.grown is None else target.grown(rp.device, *rp.grown)
            nbytes = int(buf.shape[0])
        elif rp.host is not None:
            buf = target.upload(rp.host) if rp.host.nbytes else target.empty(0)[0]
            nbytes = rp.host.nbytes
        else:
            assert rp.stream is not None
            buf, ptr = target.empty(rp.nbytes)
            cp.cuda.runtime.memsetAsync(ptr, 0, rp.nbytes, target.stream.ptr)
            if rp.copies:
                descs = target.upload(plan.gather_descs(rp, target.address(self.kept[rp.stream]), ptr).view(np.uint8))
                status, status_ptr = target.empty(4 * len(rp.copies))
                self.kernels.launch(target.address(descs), status_ptr, [(STORED, 0, len(rp.copies))])
                keep += [descs, status]
            nbytes = rp.nbytes
        table = 0
        xor = plan.xor_of(self.reader.streams[s])
        if xor is not None and xor.remap is not None:
            tab = target.upload(np.ascontiguousarray(rank_tables(xor.remap)[1]))
            keep.append(tab)
            table = target.address(tab)
        self.refs[s] = [buf, *keep]
        return plan.DeviceRef(target.address(buf), nbytes, table)

    def _first_offset(self, s: int) -> int:
        chunks = self.reader.streams[s].chunks
        return chunks[0][0] if chunks else -1

    def _run_gpu(self, streams: list[int]) -> Iterator[tuple[int, Any]]:
        cp, target = self.cp, self.target
        batches, self.staging_bytes = plan.batches(self.reader, streams, self.staging_bytes)
        # The batch holding each stream's last chunk: once it is enqueued, the stream is handed out.
        done: dict[int, list[int]] = {}
        for k, b in enumerate(batches):
            for c in b.chunks:
                if c.index == len(self.reader.streams[c.stream].chunks) - 1:
                    done.setdefault(k, []).append(c.stream)
        for s in streams:
            if not self.reader.streams[s].chunks:
                yield s, target.empty(0)[0]
        if not batches:
            return

        staging = [Staging(cp, target, self.staging_bytes) for _ in range(min(STAGING_BUFFERS, len(batches)))]
        copy_stream = cp.cuda.Stream(non_blocking=True)
        # The allocators are stream-ordered: the staging memory may still be read by work queued
        # earlier on the decode stream, which the copy stream must not overtake.
        allocated = cp.cuda.Event(disable_timing=True)
        allocated.record(target.stream)
        copy_stream.wait_event(allocated)
        buffers: dict[int, tuple[Any, int]] = {}
        refs: dict[int, plan.DeviceRef] = {}
        layouts: dict[int, plan.Layout] = {}
        reads: deque[Future[None]] = deque()
        pool = ThreadPoolExecutor(len(staging))

        def submit(k: int) -> None:
            """Allocate the outputs that batch k writes, lay it out, and start reading it."""
            batch, slot = batches[k], staging[k % len(staging)]
            for c in batch.chunks:
                if c.stream not in buffers:
                    buffers[c.stream] = target.empty(self.reader.streams[c.stream].nbytes)
                if plan.needs_reference(self.reader.streams[c.stream]) and c.stream not in refs:
                    refs[c.stream] = self._reference(c.stream)
            layout = layouts[k] = plan.lay_out(batch, slot.dev_ptr, {s: ptr for s, (_, ptr) in buffers.items()},
                                               len(self.status_chunks), refs)
            self.status_chunks += [batch.chunks[i] for i in layout.order]
            reads.append(pool.submit(self._fill, slot, batch, layout))

        try:
            for k in range(len(staging)):
                submit(k)
            for k, batch in enumerate(batches):
                slot = staging[k % len(staging)]
                layout = layouts.pop(k)
                reads.popleft().result()  # read and checksummed, or raises
                if layout.links:  # elf, sparse xor: planes + rANS decode into scratch, a second kernel from there
                    sizes = plan.scratch_sizes(slot.host, batch, layout)
                    slot.scratch, scratch_ptr = target.empty(plan.scratch_bytes(sizes))
                    plan.link(slot.host, layout, scratch_ptr, sizes)
                copy_stream.wait_event(slot.decoded)
                cp.cuda.runtime.memcpyAsync(slot.dev_ptr, slot.host_mem.ptr, batch.size(),
                                            cp.cuda.runtime.memcpyHostToDevice, copy_stream.ptr)
                slot.copied.record(copy_stream)
                target.stream.wait_event(slot.copied)
                self.kernels.launch(slot.dev_ptr, self.status_ptr + 4 * layout.status_base, layout.groups)
                slot.decoded.record(target.stream)
                if k + len(staging) < len(batches):
                    submit(k + len(staging))
                for s in done.get(k, []):
                    # freed in stream order: the decode just enqueued still reads the reference
                    self.refs.pop(s, None)
                    refs.pop(s, None)
                    yield s, buffers.pop(s)[0]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            copy_stream.synchronize()  # no upload may still read a pinned buffer once it is freed
            target.stream.synchronize()

    def _fill(self, slot: Staging, batch: plan.Batch, layout: plan.Layout) -> None:
        """Worker thread: wait until the buffer's previous upload is done, then fill it."""
        with self.cp.cuda.Device(self.target.device):
            slot.copied.synchronize()
        plan.fill(slot.host, self.reader, batch, layout)

    def finish(self) -> None:
        """Wait for the decodes and raise CorruptArchiveError if a chunk failed."""
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown()
        if not self.status_chunks:
            return
        self.target.stream.synchronize()
        status = np.empty(len(self.status_chunks), dtype=np.uint32)
        self.cp.cuda.runtime.memcpy(status.ctypes.data, self.status_ptr, status.nbytes,
                                    self.cp.cuda.runtime.memcpyDeviceToHost)

        def name(i: int) -> str:
            c = self.status_chunks[i]
            return f"{stream_label(self.reader, c.stream)}: chunk {c.index}"

        raise_status(status, name, self.reader.path)

