"""The ONNX reader's walk of the protobuf wire format (elves/readers/onnx.py), as one kernel: a
graph of thousands of nodes is hundreds of thousands of fields, which cost Python about 40 ns
each (silero's six ONNX files: 8.6 ms, a quarter of their compress).

The walk visits what Python's did, in the same order: ``ModelProto.graph``; a graph's
initializers and nodes; a node's attributes; an attribute's tensors and subgraphs, at most
``MAX_DEPTH`` deep. For each ``TensorProto`` it records where its fields lie and what they say;
the reader decides which become tensors. Every read is checked against the message it lies in:
a field that runs past its message, a varint of more than ten bytes or a wire type protobuf
does not have makes the whole file malformed (-1), and the reader leaves it opaque.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ..jit import kernel
from ..model import MAX_NAME, MAX_RANK

# Field numbers: ModelProto.graph; GraphProto.node, .initializer; NodeProto.attribute;
# AttributeProto.t, .g, .tensors, .graphs; TensorProto.dims, .data_type, .name, .raw_data.
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_ATTRIBUTE = 5
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS = 5, 6, 10, 11
TENSOR_DIMS, TENSOR_TYPE, TENSOR_NAME, TENSOR_RAW = 1, 2, 8, 9
# Subgraphs (If/Loop bodies) nest this deep at most.
MAX_DEPTH = 32

# A row of ``found`` per TensorProto: where its raw_data and name lie (-1, -1 if absent), its
# data_type (-1 if absent, -2 past 2**31), how many dims it lists (past MAX_RANK: too many to be
# a tensor), a flag for a dim of 2**63 or more, then the first MAX_RANK dims.
RAW_START, RAW_END, DTYPE, NAME_START, NAME_END, NDIMS, HUGE, DIMS = range(8)
ROW = DIMS + MAX_RANK

_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR = 0, 1, 2, 3, 4  # what a message is (a tensor is read, not pushed)
_BIG = np.int64(-1)  # a field number past what a key of 64 bits holds: none of the above


@kernel("(ro(uint8[::1]), int64, int64)", internal=True)
def _varint(buf: NDArray[np.uint8], pos: int, end: int) -> tuple[int, int, bool]:
    """(value, position after it, whether it needed more than 64 bits); position -1 when it
    runs past ``end`` or over ten bytes. The value keeps its low 64 bits, as int64."""
    result = np.uint64(0)
    shift = 0
    over = False
    while True:
        if pos >= end or shift > 63:
            return 0, -1, False
        b = np.uint64(buf[pos])
        pos += 1
        part = b & np.uint64(0x7F)
        if shift > 0 and (part >> np.uint64(64 - shift)) != 0:
            over = True
        result |= part << np.uint64(shift)
        if b < 0x80:
            return np.int64(result), pos, over
        shift += 7


@kernel("(ro(uint8[::1]), int64, int64)", internal=True)
def _field(buf: NDArray[np.uint8], pos: int, end: int) -> tuple[int, int, int, int, int]:
    """The field at ``pos``: (number, wire type, value or its start, its end, position after it);
    position -1 when it is malformed. Wire type 0 gives its value (-1 for one of more than 63
    bits, which no field read here may hold), 2 its bytes' start and end, 1 and 5 nothing."""
    key, pos, over = _varint(buf, pos, end)
    if pos < 0:
        return 0, 0, 0, 0, -1
    wire = key & 7
    number = _BIG if over or key < 0 else key >> 3
    if wire == 2:
        length, pos, over = _varint(buf, pos, end)
        if pos < 0 or over or length < 0 or length > end - pos:
            return 0, 0, 0, 0, -1
        return number, wire, pos, pos + length, pos + length
    if wire == 0:
        value, pos, over = _varint(buf, pos, end)
        if pos < 0:
            return 0, 0, 0, 0, -1
        return number, wire, -1 if over or value < 0 else value, 0, pos
    if wire == 1 or wire == 5:
        pos += 8 if wire == 1 else 4
        if pos > end:
            return 0, 0, 0, 0, -1
        return number, wire, 0, 0, pos
    return 0, 0, 0, 0, -1


@kernel("(ro(uint8[::1]), int64, int64, int64[::1])", internal=True)
def _tensor(buf: NDArray[np.uint8], start: int, end: int, row: NDArray[np.int64]) -> int:
    """Fill ``row`` from the TensorProto at ``buf[start:end]``: 1, or 0 if it names itself with
    more than MAX_NAME bytes (left opaque, the rest of it unread), or -1 if it is malformed."""
    row[RAW_START] = row[RAW_END] = row[NAME_START] = row[NAME_END] = -1
    row[DTYPE] = -1
    row[NDIMS] = row[HUGE] = 0
    pos = start
    while pos < end:
        number, wire, a, b, pos = _field(buf, pos, end)
        if pos < 0:
            return -1
        if number == TENSOR_DIMS and wire == 0:
            if row[NDIMS] <= MAX_RANK:
                _dim(row, a)
        elif number == TENSOR_DIMS and wire == 2:  # packed
            q = a
            while q < b and row[NDIMS] <= MAX_RANK:
                value, q, over = _varint(buf, q, b)
                if q < 0:
                    return -1
                _dim(row, -1 if over or value < 0 else value)
        elif number == TENSOR_TYPE and wire == 0:
            row[DTYPE] = a if 0 <= a < (1 << 31) else -2
        elif number == TENSOR_NAME and wire == 2:
            if b - a > MAX_NAME:
                return 0
            row[NAME_START], row[NAME_END] = a, b
        elif number == TENSOR_RAW and wire == 2:
            row[RAW_START], row[RAW_END] = a, b
    return 1


@kernel("(int64[::1], int64)", internal=True)
def _dim(row: NDArray[np.int64], value: int) -> None:
    """Append a dim to ``row`` (-1: one of 2**63 or more, which no tensor of the file can have)."""
    n = row[NDIMS]
    if value < 0:
        row[HUGE] = 1
    elif n < MAX_RANK:
        row[DIMS + n] = value
    row[NDIMS] = n + 1


@kernel("(ro(uint8[::1]), int64[:, ::1])")
def onnx_tensors(buf: NDArray[np.uint8], found: NDArray[np.int64]) -> int:
    """Walk the ModelProto in ``buf``, a row of ``found`` per TensorProto met (see ``ROW``), in the
    order met; return how many were met (more than ``found`` holds: call again with that many
    rows), or -1 if the file is malformed."""
    if found.shape[1] != ROW:
        return -1
    stack = np.empty((4 * (MAX_DEPTH + 2), 4), dtype=np.int64)  # kind, position, end, depth
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = _MODEL, 0, buf.shape[0], 0
    top = 0
    count = 0
    row = np.empty(ROW, dtype=np.int64)
    while top >= 0:
        kind, pos, end, depth = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        if pos >= end:
            top -= 1
            continue
        number, wire, a, b, pos = _field(buf, pos, end)
        if pos < 0:
            return -1
        stack[top, 1] = pos
        if wire != 2:
            continue
        push = -1
        if kind == _MODEL:
            if number == MODEL_GRAPH:
                push = _GRAPH
        elif kind == _GRAPH:
            if number == GRAPH_INITIALIZER:
                push = _TENSOR
            elif number == GRAPH_NODE:
                push = _NODE
        elif kind == _NODE:
            if number == NODE_ATTRIBUTE:
                push = _ATTR
        elif number == ATTR_T or number == ATTR_TENSORS:
            push = _TENSOR
        elif number == ATTR_G or number == ATTR_GRAPHS:
            push = _GRAPH
            depth += 1
            if depth > MAX_DEPTH:
                return -1
        if push == _TENSOR:
            got = _tensor(buf, a, b, row)
            if got < 0:
                return -1
            if got > 0:
                if count < found.shape[0]:
                    found[count, :] = row
                count += 1
        elif push >= 0:
            top += 1
            stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = push, a, b, depth
    return count
