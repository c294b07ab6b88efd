"""ONNX: find the tensors' ``raw_data`` inside the protobuf, so they get the float codec.

An ONNX model is a protobuf ``ModelProto``; its weights are ``TensorProto`` messages (graph
initializers, Constant nodes' attributes, subgraphs of If/Loop nodes) whose ``raw_data`` field
holds the elements little-endian. A kernel walks the protobuf wire format (no ``onnx``
package: ``elves.kernels.onnx_walk``) and records where each ``raw_data`` lies; the rest of the
file stays opaque, so the file comes back byte for byte. Anything that does not parse as
expected is left opaque.
"""
from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .. import dtypes
from ..kernels.onnx_walk import (
    DIMS,
    DTYPE,
    HUGE,
    NAME_END,
    NAME_START,
    NDIMS,
    RAW_END,
    RAW_START,
    ROW,
    onnx_tensors,
)
from ..model import MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, opened

# TensorProto.DataType -> safetensors spelling (types without a fixed element size are absent).
ONNX_DTYPES = {
    1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16",
    11: "F64", 12: "U32", 13: "U64", 14: "C64", 15: "C128", 16: "BF16", 17: "F8_E4M3", 19: "F8_E5M2",
}


def looks_like(path: Path) -> bool:
    return path.suffix == ".onnx"


def _tensors(buf: np.ndarray) -> np.ndarray | None:
    """A row per TensorProto of the file (``elves.kernels.onnx_walk``), or None if it is malformed."""
    rows = np.empty((256, ROW), dtype=np.int64)
    count = onnx_tensors(buf, rows)
    if count > rows.shape[0]:
        rows = np.empty((count, ROW), dtype=np.int64)
        count = onnx_tensors(buf, rows)
    return rows[:count] if count >= 0 else None


def parse(path: Path, relpath: str, source: BinaryIO | None = None) -> SourceFile | None:
    """The ONNX file's tensors as segments, or None when it does not parse as ONNX. ``source``:
    the file already open (see :func:`elves.model.opened`)."""
    found: list[tuple[Segment, str, tuple[int, ...]]] = []
    with opened(path, source) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        # mmap: the walk touches only the protobuf's keys and lengths, not the weights it skips.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)
        try:
            rows = _tensors(buf)
            if rows is None:
                return None
            for r in rows.tolist():
                dtype = ONNX_DTYPES.get(r[DTYPE])
                ndims = r[NDIMS]
                # more dimensions than a tensor may have (a packed field of a million), or one
                # past 2**63: left opaque
                if dtype is None or r[RAW_START] < 0 or r[RAW_END] == r[RAW_START] or ndims > MAX_RANK or r[HUGE]:
                    continue
                shape = tuple(r[DIMS:DIMS + ndims])
                if math.prod(shape) * dtypes.get(dtype).itemsize != r[RAW_END] - r[RAW_START]:
                    continue
                name = bytes(buf[r[NAME_START]:r[NAME_END]]).decode("utf-8", "replace") \
                    if r[NAME_START] >= 0 else ""
                found.append((Segment(r[RAW_START], r[RAW_END] - r[RAW_START], dtype, name), dtype, shape))
        finally:
            del buf
            try:
                mm.close()
            except BufferError:  # still viewed: numba's first compile of the walk keeps the
                pass             # frames of its caller, so the mapping goes with them
    found.sort(key=lambda f: f[0].offset)
    segments = fill_gaps(size, [s for s, _, _ in found])
    index = {(s.offset, s.length): i for i, s in enumerate(segments)}
    views = [TensorView(s.name or f"tensor{i}", dtype, shape, index[(s.offset, s.length)])
             for i, (s, dtype, shape) in enumerate(found)]
    return SourceFile(path, relpath, "onnx", size, segments, views)
