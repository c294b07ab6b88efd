"""ONNX: find the tensors' ``raw_data`` inside the protobuf, so they get the float codec.

An ONNX model is a protobuf ``ModelProto``; its weights are ``TensorProto`` messages (graph
initializers, Constant nodes' attributes, subgraphs of If/Loop nodes) whose ``raw_data`` field
holds the elements little-endian. The walker below reads only the protobuf wire format (no
``onnx`` package) and records where each ``raw_data`` lies; the rest of the file stays opaque,
so the file comes back byte for byte. Anything that does not parse as expected is left opaque.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from collections.abc import Iterator
from typing import Any, BinaryIO

from .. import dtypes
from ..model import MAX_NAME, MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, opened

# TensorProto.DataType -> safetensors spelling (types without a fixed element size are absent).
ONNX_DTYPES = {
    1: "F32", 2: "U8", 3: "I8", 4: "U16", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16",
    11: "F64", 12: "U32", 13: "U64", 14: "C64", 15: "C128", 16: "BF16", 17: "F8_E4M3", 19: "F8_E5M2",
}
# Field numbers: ModelProto.graph; GraphProto.node, .initializer; NodeProto.attribute;
# AttributeProto.t, .g, .tensors, .graphs; TensorProto.dims, .data_type, .name, .raw_data.
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_ATTRIBUTE = 5
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS = 5, 6, 10, 11
TENSOR_DIMS, TENSOR_TYPE, TENSOR_NAME, TENSOR_RAW = 1, 2, 8, 9
# Subgraphs (If/Loop bodies) nest this deep at most: the walk recurses once per level.
MAX_DEPTH = 32


class _Malformed(Exception):
    pass


def looks_like(path: Path) -> bool:
    return path.suffix == ".onnx"


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value or (start, end) of a length-delimited field). The value is
    Any: which of the two it is follows from the wire type, which every caller checks."""
    pos = start
    while pos < end:
        # Keys and lengths are mostly one byte: read those here, not through _varint (a model's
        # graph has tens of thousands of fields).
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 2:
            if pos >= end:
                raise _Malformed
            length = buf[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed
            yield field, wire, (pos, pos + length)
            pos += length
        elif wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed
        else:
            raise _Malformed


# A tensor found: its segment, dtype and shape.
_Found = tuple[Segment, str, tuple[int, ...]]


def _tensor(buf: memoryview, start: int, end: int, out: list[_Found]) -> None:
    dims: list[int] = []
    dtype, name, raw = None, "", None
    for field, wire, value in _fields(buf, start, end):
        if field == TENSOR_DIMS and wire == 0:
            if len(dims) <= MAX_RANK:
                dims.append(value)
        elif field == TENSOR_DIMS and wire == 2:  # packed
            pos, stop = value
            while pos < stop and len(dims) <= MAX_RANK:
                d, pos = _varint(buf, pos, stop)
                dims.append(d)
        elif field == TENSOR_TYPE and wire == 0:
            dtype = ONNX_DTYPES.get(value)
        elif field == TENSOR_NAME and wire == 2:
            if value[1] - value[0] > MAX_NAME:
                return  # left opaque rather than a name of megabytes
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif field == TENSOR_RAW and wire == 2:
            raw = value
    # more dimensions than a tensor may have (a packed field of a million): left opaque
    if dtype is None or raw is None or raw[1] == raw[0] or len(dims) > MAX_RANK:
        return
    count = 1
    for d in dims:
        count *= d
    if count * dtypes.get(dtype).itemsize == raw[1] - raw[0]:
        out.append((Segment(raw[0], raw[1] - raw[0], dtype, name), dtype, tuple(dims)))


def _graph(buf: memoryview, start: int, end: int, out: list[_Found], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed
    for field, wire, value in _fields(buf, start, end):
        if wire != 2:
            continue
        if field == GRAPH_INITIALIZER:
            _tensor(buf, value[0], value[1], out)
        elif field == GRAPH_NODE:
            for nf, nw, attr in _fields(buf, *value):
                if nf != NODE_ATTRIBUTE or nw != 2:
                    continue
                for af, aw, v in _fields(buf, *attr):
                    if aw == 2 and af in (ATTR_T, ATTR_TENSORS):
                        _tensor(buf, v[0], v[1], out)
                    elif aw == 2 and af in (ATTR_G, ATTR_GRAPHS):
                        _graph(buf, v[0], v[1], out, depth + 1)


def parse(path: Path, relpath: str, source: BinaryIO | None = None) -> SourceFile | None:
    """The ONNX file's tensors as segments, or None when it does not parse as ONNX. ``source``:
    the file already open (see :func:`elves.model.opened`)."""
    found: list[_Found] = []
    with opened(path, source) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        # mmap: the walk touches only the protobuf's keys and lengths, not the weights it skips.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                for field, wire, value in _fields(buf, 0, size):
                    if field == MODEL_GRAPH and wire == 2:
                        _graph(buf, value[0], value[1], found, 0)
            except _Malformed:
                return None
            finally:
                buf.release()
    found.sort(key=lambda f: f[0].offset)
    segments = fill_gaps(size, [s for s, _, _ in found])
    index = {(s.offset, s.length): i for i, s in enumerate(segments)}
    views = [TensorView(s.name or f"tensor{i}", dtype, shape, index[(s.offset, s.length)])
             for i, (s, dtype, shape) in enumerate(found)]
    return SourceFile(path, relpath, "onnx", size, segments, views)
