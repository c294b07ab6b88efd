"""Tensors onto the device: :func:`load_file` (all of an archive) and :class:`GpuArchive` (one
tensor at a time), as torch tensors or cupy arrays."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..archive import ArchiveReader
from ..decoder import StreamReader, check_tensors
from ..index import FileEntry, Stream, TensorEntry, tensor_names
from . import plan
from .base import BaseArg, attach
from .decode import STAGING_BYTES, StreamDecoder
from .device import (
    GpuFramework,
    Target,
    device_index,
    itemsize,
    make_target,
    on,
    shape_and_count,
)


def load_file(path: str | os.PathLike[str], device: Any = "cuda:0", framework: GpuFramework = "pt", *,
              staging_bytes: int = STAGING_BYTES, base: BaseArg = None
              ) -> dict[str, Any]:
    """Every tensor of the archive at ``path``, by name (as :func:`elves.load_file` names them),
    decoded on ``device``: torch tensors with ``framework="pt"``, cupy arrays with "cupy".

    Each stream is decoded once, straight into the tensor that is all of it; tensors that are
    part of a stream, or strided views of it (PyTorch storages), are copied out on the device.
    The host holds ``STAGING_BUFFERS`` pinned buffers of ``staging_bytes``, and so does the GPU
    besides the tensors. ``base``: the base model of an archive compressed against one, a
    model, a folder or an archive of one, whose references are read as the CPU decoder reads
    them (``elves.references``) and uploaded; or a mapping of tensor name -> device tensor (torch
    or cupy, on ``device``: the base's ``state_dict()`` already there), read in place
    (:mod:`elves.gpu.base`).
    """
    target = make_target(framework, device_index(device))
    with ArchiveReader(path) as reader:
        attach(reader, base, target.device)
        _check_tensors(reader, reader.files)
        return _load(reader, target, staging_bytes)


def load_model(reader: StreamReader, device: Any = "cuda:0", framework: GpuFramework = "pt", *,
               staging_bytes: int = STAGING_BYTES) -> dict[str, Any]:
    """Every tensor of the files ``reader`` lists, by name, decoded on ``device`` (as
    :func:`load_file` does for an archive): from any source of checked chunks with the sources of
    its references, a store's objects included (``elves.store.Store.load``)."""
    return _load(reader, make_target(framework, device_index(device)), staging_bytes)


def _load(reader: StreamReader, target: Target, staging_bytes: int) -> dict[str, Any]:
    with on(target):
        named = tensor_names(reader.files)
        users: dict[int, list[str]] = {}
        out: dict[str, Any] = {}
        for name, (entry, t) in named.items():
            s = _stream_of(entry, t, reader)
            if s is None:
                out[name] = target.empty_of(t)
            else:
                users.setdefault(s, []).append(name)
        decoder = StreamDecoder(reader, target, staging_bytes)
        with contextlib.closing(decoder.run(list(users))) as decoded:
            for s, buf in decoded:
                stream = reader.streams[s]
                whole_taken = False
                for name in users[s]:
                    t = named[name][1]
                    whole = not whole_taken and _is_whole(t, stream)
                    whole_taken |= whole
                    out[name] = target.tensor(buf, t, stream.nbytes, whole)
        decoder.finish()
    return {name: out[name] for name in named}


def _check_tensors(reader: ArchiveReader, entries: list[FileEntry]) -> None:
    """The files' tensor entries agree with their own headers (:func:`elves.decoder.check_tensors`),
    checked on the CPU: headers are small."""
    with ThreadPoolExecutor(2) as pool:
        for entry in entries:
            check_tensors(reader, entry, pool, 4)


def _stream_of(entry: FileEntry, t: TensorEntry, reader: StreamReader) -> int | None:
    """The stream holding tensor ``t``'s bytes, or None when it has none (empty tensors)."""
    if t.segment < 0:
        return None
    index = entry.segments[t.segment]
    _, count = shape_and_count(t.dtype, t.shape, reader.streams[index].nbytes)
    return index if count else None


def _is_whole(t: TensorEntry, stream: Stream) -> bool:
    """Whether tensor ``t`` is exactly its stream's bytes, so that it can be the stream's buffer."""
    _, count = shape_and_count(t.dtype, t.shape, stream.nbytes)
    return t.offset == 0 and t.strides is None and count * itemsize(t.dtype) == stream.nbytes


class GpuArchive:
    """An open archive whose tensors are decoded on a GPU one at a time; see :func:`open`."""

    def __init__(self, path: str | os.PathLike[str], device: Any = "cuda:0", framework: GpuFramework = "pt", *,
                 staging_bytes: int = STAGING_BYTES, base: BaseArg = None):
        self._device = device_index(device)
        self._framework = framework
        self._staging = staging_bytes
        make_target(framework, self._device)  # fail now, not at the first tensor: no cupy, no device
        self._reader = ArchiveReader(path)
        try:
            attach(self._reader, base, self._device)
        except BaseException:
            self._reader.close()
            raise
        self._named = tensor_names(self._reader.files)
        self._checked: set[str] = set()  # files whose tensor entries agree with their own structure

    @property
    def path(self) -> Path:
        return self._reader.path

    def keys(self) -> list[str]:
        """The names of the tensors, in file order."""
        return list(self._named)

    def __contains__(self, name: object) -> bool:
        return name in self._named

    def get_tensor(self, name: str) -> Any:
        """The tensor called ``name``, decoded on the device."""
        try:
            entry, t = self._named[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None
        if entry.path not in self._checked:
            _check_tensors(self._reader, [entry])
            self._checked.add(entry.path)
        target = make_target(self._framework, self._device)  # on the caller's current stream
        with on(target):
            s = _stream_of(entry, t, self._reader)
            if s is None:
                return target.empty_of(t)
            stream = self._reader.streams[s]
            # A small tensor needs no 64 MiB of staging.
            decoder = StreamDecoder(self._reader, target, min(self._staging, plan.staging_for(stream)))
            tensor = None
            with contextlib.closing(decoder.run([s])) as decoded:
                for _, buf in decoded:
                    tensor = target.tensor(buf, t, stream.nbytes, _is_whole(t, stream))
            decoder.finish()
            return tensor

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> GpuArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: str | os.PathLike[str], device: Any = "cuda:0", framework: GpuFramework = "pt", *,  # noqa: A001
         staging_bytes: int = STAGING_BYTES, base: BaseArg = None) -> GpuArchive:
    """Open an archive for lazy loading of single tensors onto ``device`` (``base``: as for
    :func:`load_file`)."""
    return GpuArchive(path, device, framework, staging_bytes=staging_bytes, base=base)
