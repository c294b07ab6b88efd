"""Checking a pickle before it is unpickled, in bounded memory and time."""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from ...jit import kernel

# Unpickling builds Python objects several times the pickle's size, so a pickle is read whole
# only up to this size (a 70B model's data.pkl is a few MB).
MAX_PICKLE = 256 << 20

# The C unpickler trusts two numbers it reads: a memo index (BINPUT 2^32-1 grows and zeroes a
# 32 GiB memo table: a 10-byte pickle takes the machine down) and a declared length (BINBYTES8
# allocates it before reading). So each pickle is walked first, opcode by opcode, in numba:
# memo indices must follow the puts before them (a pickler numbers its memo 0, 1, 2...),
# lengths must lie inside the pickle, and the opcodes, each of which builds at most one object,
# are counted, which bounds the memory the objects take.

MAX_PICKLE_OPS = 1 << 24  # the largest real data.pkl seen has 1.6 M
_LINE, _TWO_LINES, _LEN1, _LEN4, _LEN8, _UNKNOWN = -1, -2, -3, -4, -5, -6
_PUTS = np.zeros(256, np.bool_)
_PUTS[[ord(c) for c in "pqr\x94"]] = True


def _opcode_layout() -> np.ndarray:
    """Per opcode byte, how its argument is laid out: a fixed number of bytes, a line (two for
    GLOBAL and INST), a 1-, 4- or 8-byte length then that many bytes, or unknown."""
    import pickletools

    lengths = {pickletools.TAKEN_FROM_ARGUMENT1: _LEN1, pickletools.TAKEN_FROM_ARGUMENT4: _LEN4,
               pickletools.TAKEN_FROM_ARGUMENT4U: _LEN4, pickletools.TAKEN_FROM_ARGUMENT8U: _LEN8}
    table = np.full(256, _UNKNOWN, np.int64)
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            kind = 0
        elif arg.n >= 0:
            kind = arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            kind = _TWO_LINES if arg.name == "stringnl_noescape_pair" else _LINE
        else:
            kind = lengths[arg.n]
        table[ord(op.code)] = kind
    return table


_LAYOUT = _opcode_layout()
_SCAN_OK, _SCAN_TRUNCATED, _SCAN_UNKNOWN, _SCAN_MEMO, _SCAN_OPS = range(5)


@kernel("(ro(uint8[::1]), int64, int64, ro(int64[::1]), ro(boolean[::1]), int64)")
def _scan_pickle(buf: np.ndarray, pos: int, end: int, layout: np.ndarray, puts: np.ndarray,
                 max_ops: int) -> tuple[int, int]:
    """(status, position): the end of the pickle starting at ``pos`` (just past STOP), or what is
    wrong with it and where."""
    memo = 0
    ops = 0
    while pos < end:
        op = buf[pos]
        at = pos
        ops += 1
        if ops > max_ops:
            return _SCAN_OPS, at
        kind = layout[op]
        pos += 1
        if op == 0x2E:  # STOP
            return _SCAN_OK, pos
        if kind == _UNKNOWN:
            return _SCAN_UNKNOWN, at
        index = -1
        if kind >= 0:
            if pos + kind > end:
                return _SCAN_TRUNCATED, at
            if op == 0x71:  # BINPUT
                index = buf[pos]
            elif op == 0x72:  # LONG_BINPUT
                index = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16 | np.int64(buf[pos + 3]) << 24
            pos += kind
        elif kind == _LINE or kind == _TWO_LINES:
            value = 0
            for _ in range(1 if kind == _LINE else 2):
                while pos < end and buf[pos] != 0x0A:
                    if op == 0x70:  # PUT: a decimal index (anything else fails in the unpickler)
                        digit = np.int64(buf[pos]) - 0x30
                        value = value * 10 + digit if 0 <= digit <= 9 and value < 1 << 40 else 1 << 40
                    pos += 1
                if pos == end:
                    return _SCAN_TRUNCATED, at
                pos += 1
            if op == 0x70:
                index = value
        else:
            width = 1 if kind == _LEN1 else 4 if kind == _LEN4 else 8
            if pos + width > end:
                return _SCAN_TRUNCATED, at
            n = np.uint64(0)
            for k in range(width):
                n |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
            pos += width
            if n > np.uint64(end - pos):
                return _SCAN_TRUNCATED, at
            pos += np.int64(n)
        if puts[op]:
            if op != 0x94 and index > memo:  # MEMOIZE takes the next index itself
                return _SCAN_MEMO, at
            if op == 0x94 or index == memo:
                memo += 1
    return _SCAN_TRUNCATED, pos


def _pickle_end(buf: Any, start: int) -> int:
    """Where the pickle at ``start`` ends, once checked; :class:`pickle.UnpicklingError` if it is
    not one the unpickler can read in bounded memory, or runs past MAX_PICKLE bytes."""
    data = np.frombuffer(buf, np.uint8)
    size, limit = len(data), min(len(data), start + MAX_PICKLE)
    status, pos = _scan_pickle(data, start, limit, _LAYOUT, _PUTS, MAX_PICKLE_OPS)
    del data  # a traceback must not keep a mapped file's buffer exported: it could not be closed
    if status == _SCAN_OK:
        return pos
    if status == _SCAN_TRUNCATED and limit < size:
        raise pickle.UnpicklingError(f"the pickle runs past {MAX_PICKLE} bytes, more than elves reads")
    problem = {
        _SCAN_TRUNCATED: "ends before its STOP opcode (truncated?), or declares a length past its end",
        _SCAN_UNKNOWN: "has an unknown opcode",
        _SCAN_MEMO: "stores to a memo index beyond the memo",
        _SCAN_OPS: f"has more than {MAX_PICKLE_OPS} opcodes",
    }[status]
    raise pickle.UnpicklingError(f"the pickle {problem} (at byte {pos - start})")
