"""A checkpoint as a :class:`~elves.model.SourceFile` (storages as tensor segments, the rest
opaque, tensors as views), or its tensors as numpy arrays."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...dtypes import DTYPES, numpy_dtype
from ...errors import InputError, UnsafePickleError
from ...model import MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, open_source, opened
from .checkpoint import _Checkpoint, _Locations, _TensorRef
from .legacy import _read_legacy
from .zip_format import _read_zip
from .zip_members import _LOCAL_HEADER


def _read(path: Path, source: BinaryIO | None = None) -> _Checkpoint | None:
    with opened(path, source) as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) == _LOCAL_HEADER:
            return _read_zip(path, f, size)
        return _read_legacy(path, f, size)


# --- Segments, views and arrays -----------------------------------------------------------------

def _storage_segments(storages: _Locations, dtypes: dict[str, str | None]) -> list[Segment]:
    """Tensor segments for the storages whose dtype is known, sorted by offset. A storage that
    overlaps an earlier one (only a crafted zip has those) is left to the opaque gaps."""
    out: list[Segment] = []
    for name, (offset, length) in sorted(storages.items(), key=lambda item: item[1]):
        dtype = dtypes.get(name)
        if dtype is None or length % DTYPES[dtype].itemsize:
            continue
        if out and offset < out[-1].offset + out[-1].length:
            continue
        out.append(Segment(offset, length, dtype, name))
    return out


def _byte_range(t: _TensorRef, itemsize: int) -> tuple[int, int]:
    """(start, length) in bytes, within its storage, of the elements ``t`` spans."""
    elems = 0 if 0 in t.shape else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.strides))
    return t.storage.offset + t.offset * itemsize, elems * itemsize


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _view(name: str, t: _TensorRef, segments: list[Segment],
          index: dict[str | None, int]) -> TensorView | None:
    if len(t.shape) > MAX_RANK:  # torch makes none; the archive index could not hold it
        return None
    if t.dtype is not None and 0 in t.shape:  # no bytes to point at: segment -1, as for safetensors
        return TensorView(name, t.dtype, t.shape, -1)
    i = index.get(t.storage.name)
    if i is None or t.dtype is None or t.dtype != segments[i].dtype:
        return None
    start, length = _byte_range(t, DTYPES[t.dtype].itemsize)
    if start + length > segments[i].length:  # the pickle claims more than the storage holds
        return None
    strides = None if _is_contiguous(t.shape, t.strides) else t.strides
    return TensorView(name, t.dtype, t.shape, i, start, strides)


def _names(qualnames: dict[str, None], shown: int = 8) -> str:
    names = list(qualnames)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def parse(path: Path, relpath: str, source: BinaryIO | None = None) -> SourceFile | None:
    """Cut a PyTorch checkpoint into segments (storages as tensor segments, the rest opaque) and
    name the tensors its pickle holds in plain containers; None if ``path`` is not a checkpoint.
    ``source``: the file already open (see :func:`elves.model.opened`)."""
    ck = _read(path, source)
    if ck is None:
        return None
    warnings = [f"{relpath}: {note}" for note in ck.notes]
    dtypes = ck.pickled.storage_dtypes()
    if not ck.little_endian:  # the codecs assume little-endian elements
        dtypes = {}
        warnings.append(f"{relpath}: big-endian checkpoint; its storages are kept as bytes")
    if ck.pickled.unknown:
        warnings.append(f"{relpath}: pickle references {_names(ck.pickled.unknown)}: not executed; "
                        "its storages are compressed and the pickle is kept as bytes")
    segments = fill_gaps(ck.size, _storage_segments(ck.storages, dtypes))
    index = {s.name: i for i, s in enumerate(segments) if s.dtype}
    views = [v for name, t in ck.pickled.named.items()
             if (v := _view(name, t, segments, index)) is not None]
    return SourceFile(path, relpath, ck.format, ck.size, segments, views, warnings)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor a checkpoint holds in plain containers, by dotted name, as numpy arrays copied
    out of the file. :class:`UnsafePickleError` if the pickle references anything else: what it
    builds from those objects cannot be known without running them."""
    path = Path(os.path.realpath(path))  # the caller named it: a link is followed, once
    ck = _read(path)
    if ck is None:
        raise InputError("not a PyTorch checkpoint", path)
    if ck.pickled.unknown:
        raise UnsafePickleError(f"the pickle references {_names(ck.pickled.unknown)}, which elves "
                                "never executes; load it with torch only if you trust it", path)
    if not ck.little_endian:
        raise InputError("big-endian checkpoints are not supported", path)
    with open_source(path) as f:
        return {name: _read_tensor(path, f, ck.storages, name, t)
                for name, t in ck.pickled.named.items()}


def _read_tensor(path: Path, f: BinaryIO, storages: _Locations, name: str,
                 t: _TensorRef) -> np.ndarray:
    if t.dtype is None:
        raise InputError(f"tensor {name!r} has a dtype elves does not support", path)
    if len(t.shape) > MAX_RANK:
        raise InputError(f"tensor {name!r} has {len(t.shape)} dimensions (at most {MAX_RANK})", path)
    dtype = numpy_dtype(t.dtype)
    start, length = _byte_range(t, DTYPES[t.dtype].itemsize)
    if not length:
        return np.empty(t.shape, dtype)
    location = storages.get(t.storage.name)
    if location is None:
        raise InputError(f"the storage of tensor {name!r} is missing or compressed", path)
    if start + length > location[1]:
        raise InputError(f"tensor {name!r} reaches past the end of its storage", path)
    f.seek(location[0] + start)
    flat = np.frombuffer(f.read(length), dtype)
    strides = tuple(s * dtype.itemsize for s in t.strides)
    tensor: np.ndarray = np.lib.stride_tricks.as_strided(flat, t.shape, strides).copy()
    return tensor
