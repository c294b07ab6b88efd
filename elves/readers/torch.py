"""Read PyTorch checkpoints (``torch.save`` zips, TorchScript zips, the legacy pre-zip format)
without ever executing their pickles.

A checkpoint's pickle is a program: unpickling calls whatever globals it names, so ``torch.load``
on an untrusted file can run arbitrary code. elves has to read whatever model it is handed, so its
unpickler (:class:`_SafeUnpickler`) imports nothing and answers every global with something of
ours: tensor "rebuilders" that only record where a tensor's elements lie, plain containers, or an
inert :class:`_Stub` for anything else. That is enough to learn each storage's dtype and to cut the
file into segments: storage bytes become tensor segments (coded by the float codecs), everything
else (zip records, the pickles, code) stays opaque bytes. Restore writes the segments back, so the
file comes back byte for byte whatever its pickle references.
"""
from __future__ import annotations

import _compat_pickle
import gc
import mmap
import os
import pickle
import re
import reprlib
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numba import njit

from ..dtypes import DTYPES, numpy_dtype
from ..errors import InputError, UnsafePickleError
from ..model import MAX_NAME, MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, open_source, opened

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LEGACY_MAGIC_LONG1 = pickle.LONG1 + bytes([10]) + LEGACY_MAGIC.to_bytes(10, "little")

_LOCAL_HEADER = b"PK\x03\x04"
_DATA_DESCRIPTOR = b"PK\x07\x08"
_PICKLE_MEMBER = re.compile(r"(.+)/(data|constants)\.pkl")

# Unpickling builds Python objects several times the pickle's size, so a pickle is read whole
# only up to this size (a 70B model's data.pkl is a few MB). A deflated member may inflate to
# at most MAX_INFLATION times its stored size (real pickles deflate about 3:1, a zip bomb 1000:1),
# or 1 MiB, whichever is larger.
MAX_PICKLE = 256 << 20
MAX_INFLATION = 100
_INFLATION_FLOOR = 1 << 20
_INFLATE_STEP = 1 << 20
# Tensors are named only this deep in the pickle's containers, and with names up to MAX_NAME:
# a crafted pickle nests containers (or repeats one long key) so that the dotted names would
# fill the memory, quadratically in the nesting.
MAX_NESTING = 64

# torch dtype attribute -> safetensors name. Other torch dtypes are known (so not reported as
# unsafe) but not coded as tensors: their storages stay opaque.
_TORCH_DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "complex64": "C64", "complex128": "C128",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_OTHER_TORCH_DTYPES = [
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32",
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
    *(f"uint{n}" for n in range(1, 8)), *(f"int{n}" for n in range(1, 8)),
]

# Legacy typed storage class -> (safetensors dtype, item size). Quantized storages have no dtype
# we code, but the legacy format needs their item size to find the storages after them.
_STORAGE_CLASSES = {
    "FloatStorage": ("F32", 4), "HalfStorage": ("F16", 2), "BFloat16Storage": ("BF16", 2),
    "DoubleStorage": ("F64", 8), "LongStorage": ("I64", 8), "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2), "CharStorage": ("I8", 1), "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1), "ComplexFloatStorage": ("C64", 8),
    "ComplexDoubleStorage": ("C128", 16),
    "QInt8Storage": (None, 1), "QUInt8Storage": (None, 1), "QInt32Storage": (None, 4),
    "QUInt4x2Storage": (None, 1), "QUInt2x4Storage": (None, 1),
}


# --- What the unpickler hands the pickle instead of real objects -------------------------------
# slots=True matters: pickle's BUILD opcode writes into an object's __dict__ directly, which would
# let a crafted pickle rewrite these records; without a __dict__ it fails instead.

@dataclass(frozen=True, slots=True)
class _DType:
    """A ``torch.<dtype>`` global; ``name`` is None for dtypes elves does not code."""

    name: str | None


@dataclass(frozen=True, slots=True)
class _StorageType:
    """A ``torch.<X>Storage`` global. An untyped storage holds bytes; its tensors give its dtype."""

    dtype: str | None
    itemsize: int          # 0 when unknown
    untyped: bool = False


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage the pickle points at (its persistent id). ``name`` is the storage key, prefixed by
    ``constants/`` for TorchScript constants; ``offset`` is in bytes (legacy storage views)."""

    name: str
    type: _StorageType
    offset: int = 0


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """Where a tensor's elements lie: ``offset``, ``shape`` and ``strides`` count elements."""

    storage: _StorageRef
    dtype: str | None
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


class _Stub:
    """Stands in for every global outside the allowlist: it accepts whatever the pickle does to
    it (construct, call, ``__setstate__``, set items, append) and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _first_arg(data: Any, *_rest: Any) -> Any:
    """``_rebuild_parameter[_with_state]``: a parameter is its tensor, for our purposes."""
    return data


def _rebuild_from_type(func: Callable[..., Any], _new_type: Any, args: tuple[Any, ...], _state: Any) -> Any:
    # Everything callable a pickle can reach here came from find_class, so this runs only ours.
    return func(*args)


def _bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int):  # bytearray(n) would let a pickle allocate n bytes
        raise pickle.UnpicklingError("bytearray of a length")
    return bytearray(*args)


_SAFE_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch.Size": tuple,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.bytearray": _bytearray,
    # protocol-2 pickles build bytes with _codecs.encode(text, "latin1"); str.encode only knows
    # text encodings, and being C it adds no Python call per bytes object (numpy scalars are many)
    "_codecs.encode": str.encode,
    "torch._utils._rebuild_parameter": _first_arg,
    "torch._utils._rebuild_parameter_with_state": _first_arg,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.storage.UntypedStorage": _StorageType(None, 1, untyped=True),
    "torch.UntypedStorage": _StorageType(None, 1, untyped=True),
    **{f"torch.{n}": _DType(d) for n, d in _TORCH_DTYPES.items()},
    **{f"torch.{n}": _DType(None) for n in _OTHER_TORCH_DTYPES},
    # tensors the legacy format saved from a GPU name torch.cuda.<X>Storage
    **{f"{module}.{cls}": _StorageType(*v)
       for cls, v in _STORAGE_CLASSES.items() for module in ("torch", "torch.cuda")},
}
# Harmless torch globals that carry no tensor data: stubbed, but not worth a warning.
_INERT_GLOBALS = {"torch.Tensor", "torch.nn.parameter.Parameter", "torch.device"}
# Rebuild functions that record tensors, as methods of the unpickler.
_REBUILDERS = {
    "torch._utils._rebuild_tensor": "_rebuild_typed",
    "torch._utils._rebuild_tensor_v2": "_rebuild_typed",
    "torch._utils._rebuild_tensor_v3": "_rebuild_untyped",
}


@dataclass
class _Pickled:
    """What the pickles of one checkpoint told us."""

    # the tensors that data.pkl (or the legacy pickle) holds in plain containers, by dotted name
    named: dict[str, _TensorRef] = field(default_factory=dict)
    storage_types: dict[str, _StorageType] = field(default_factory=dict)
    tensors: list[_TensorRef] = field(default_factory=list)
    # globals outside the allowlist, in the order the pickle first uses them (a dict keeps it)
    unknown: dict[str, None] = field(default_factory=dict)
    # storage name -> its size in bytes, as the pickle records it (a hint for finding it in a zip)
    storage_bytes: dict[str, int] = field(default_factory=dict)

    def storage_dtypes(self) -> dict[str, str | None]:
        """Each storage's dtype: its class's, or for an untyped storage the one dtype its tensors
        agree on (None when they do not, or when none views it)."""
        viewed: dict[str, set[str | None]] = {}
        for t in self.tensors:
            viewed.setdefault(t.storage.name, set()).add(t.dtype)
        out = {}
        for name, stype in self.storage_types.items():
            if stype.untyped:
                kinds = viewed.get(name, set())
                out[name] = kinds.pop() if len(kinds) == 1 else None
            else:
                out[name] = stype.dtype
        return out


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` never imports or returns anything but our stand-ins."""

    def __init__(self, file: _Window, found: _Pickled, namespace: str = ""):
        super().__init__(file, encoding="utf-8")  # as torch.load reads Python 2 strings
        self._found = found
        self._namespace = namespace

    def find_class(self, module: str, name: str) -> Any:
        # torch pickles with protocol 2, which names builtins by their Python 2 module, __builtin__
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        qualname = f"{module}.{name}"
        if qualname in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualname]
        if qualname in _REBUILDERS:
            return getattr(self, _REBUILDERS[qualname])
        if qualname not in _INERT_GLOBALS:
            self._found.unknown.setdefault(qualname)
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            return pid[1]  # legacy format: an nn.Module class with its source; pid[1] is a stub
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {reprlib.repr(pid)}")
        stype, key = pid[1], pid[2]
        if isinstance(stype, _DType):  # newer writers may name the dtype instead of a class
            stype = _StorageType(stype.name, DTYPES[stype.name].itemsize if stype.name else 0)
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"unexpected storage record {reprlib.repr(pid)}")
        view = pid[5] if len(pid) == 6 else None  # legacy: (view key, element offset, size)
        if view is not None and not (isinstance(view, tuple) and len(view) == 3
                                     and _is_count(view[1])):
            raise pickle.UnpicklingError(f"unexpected storage view {reprlib.repr(view)}")
        name = self._namespace + key
        # The legacy format sizes a storage by the item size of its first reference.
        self._found.storage_types.setdefault(name, stype)
        if _is_count(pid[4]) and stype.itemsize:
            self._found.storage_bytes.setdefault(name, pid[4] * stype.itemsize)
        return _StorageRef(name, stype, view[1] * stype.itemsize if view else 0)

    def _rebuild_typed(self, storage: Any, offset: Any, size: Any, stride: Any,
                       *_rest: Any) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor without a storage")
        return self._tensor(storage, storage.type.dtype, offset, size, stride)

    def _rebuild_untyped(self, storage: Any, offset: Any, size: Any, stride: Any,
                         _requires_grad: Any, _hooks: Any, dtype: Any, *_rest: Any) -> _TensorRef:
        if not isinstance(storage, _StorageRef) or not isinstance(dtype, _DType):
            raise pickle.UnpicklingError("tensor without a storage or a dtype")
        return self._tensor(storage, dtype.name, offset, size, stride)

    def _tensor(self, storage: _StorageRef, dtype: str | None, offset: Any, size: Any,
                stride: Any) -> _TensorRef:
        if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(map(_is_count, size + stride))):
            raise pickle.UnpicklingError("malformed tensor record")
        tensor = _TensorRef(storage, dtype, offset, size, stride)
        self._found.tensors.append(tensor)
        return tensor


def _is_count(x: Any) -> bool:
    return type(x) is int and 0 <= x < 1 << 63  # torch's sizes, strides and offsets are int64


def _unpickle(buf: Any, start: int, found: _Pickled, namespace: str = "",
              tensors: bool = False) -> tuple[Any, int]:
    """What the pickle at ``start`` in ``buf`` (bytes or a mapped file) builds, and where it ends;
    with ``tensors``, only the tensors it holds in plain containers, by dotted name
    (:func:`_plain_tensors`). The pickle is checked first (:func:`_pickle_end`)."""
    end = _pickle_end(buf, start)
    # A pickle may build millions of objects, none of them garbage until the end, and the cyclic
    # collector would walk them over and over (most of the time, on a 6 MB data.pkl). So it is off
    # until what is not kept has been freed by reference counting; that needs the memo cleared:
    # it holds the unpickler's own bound methods (the rebuilders), a cycle through everything.
    unpickler = _SafeUnpickler(_Window(buf, start, end), found, namespace)
    enabled = gc.isenabled()
    gc.disable()
    try:
        obj = unpickler.load()
        if tensors:
            obj = _plain_tensors(obj)
        return obj, end
    finally:
        unpickler.memo.clear()
        if enabled:
            gc.enable()


class _Window:
    """``buf[pos:end]`` as the file the unpickler reads. ``peek`` lets the C unpickler fetch its
    input in blocks rather than an opcode at a time."""

    def __init__(self, buf: Any, pos: int, end: int):
        self.buf, self.pos, self.end = buf, pos, end

    def _take(self, n: int) -> bytes:
        data: bytes = self.buf[self.pos:min(self.end, self.pos + max(n, 0))]
        self.pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(self.end - self.pos if n < 0 else n)

    def readinto(self, b: Any) -> int:
        # released before returning: the unpickler frees the buffer when the pickle is truncated
        with memoryview(b) as view, view.cast("B") as out:
            data = self._take(out.nbytes)
            out[:len(data)] = data
        return len(data)

    def readline(self) -> bytes:
        stop = self.buf.find(b"\n", self.pos, self.end)
        return self._take((self.end if stop < 0 else stop + 1) - self.pos)

    def peek(self, n: int = 1) -> bytes:
        data: bytes = self.buf[self.pos:min(self.end, self.pos + max(n, 1))]
        return data


# --- Checking a pickle before it is unpickled ---------------------------------------------------
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


@njit(cache=True, nogil=True)
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


# --- Where the storages lie in the file ---------------------------------------------------------

_Locations = dict[str, tuple[int, int]]  # storage name -> (offset, length) of its bytes in the file


@dataclass
class _Checkpoint:
    format: str                    # "torch-zip" or "torch-legacy"
    size: int
    pickled: _Pickled
    storages: _Locations           # the storages stored plainly (not compressed)
    little_endian: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int      # where the member's data starts
    size: int        # stored (compressed) size
    method: int      # 0 stored, 8 deflated


def _read(path: Path, source: BinaryIO | None = None) -> _Checkpoint | None:
    with opened(path, source) as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) == _LOCAL_HEADER:
            return _read_zip(path, f, size)
        return _read_legacy(path, f, size)


def _read_zip(path: Path, f: BinaryIO, size: int) -> _Checkpoint | None:
    notes = []
    found = _Pickled()
    done: set[str] = set()  # the pickle members read

    def unpickle(member: _Member, match: re.Match[str]) -> None:
        done.add(member.name)
        archive = match.group(2)
        raw = _member_bytes(path, f, member, MAX_PICKLE)
        if raw is None:  # an unknown compression: its storages' dtypes stay unknown, so opaque
            return
        try:
            named, _ = _unpickle(raw, 0, found, "" if archive == "data" else "constants/", tensors=True)
        except Exception as e:  # a malformed pickle fails in many ways, none of which runs code
            raise InputError(f"cannot read {member.name}: {str(e)[:200]}", path) from e
        if archive == "data":
            found.named = named

    try:
        members = _central_members(path, f, size)
    except zipfile.BadZipFile:
        # Each member's size follows its data, so finding the next member means scanning for the
        # descriptor. The pickle comes first and records every storage's size: read it first,
        # then look for each storage's descriptor where its size puts it before scanning.
        first = _scanned_members(f, size, limit=1)
        if first and (match := _PICKLE_MEMBER.fullmatch(first[0].name)):
            unpickle(first[0], match)
            start = match.group(1) + "/"

            def expected(name: str) -> int | None:
                storage = _storage_name(name[len(start):]) if name.startswith(start) else None
                return found.storage_bytes.get(storage) if storage is not None else None

            members = _scanned_members(f, size, expected)
        else:
            members = _scanned_members(f, size)
        notes.append(f"the zip has no central directory (truncated?); found {len(members)} "
                     "complete members by their local headers")
    pickles = [(m, match) for m in members if (match := _PICKLE_MEMBER.fullmatch(m.name))]
    if not pickles:
        return None
    prefix = pickles[0][1].group(1)
    for member, match in pickles:
        if match.group(1) == prefix and member.name not in done:
            unpickle(member, match)

    storages: _Locations = {}
    little_endian = True
    for m in members:
        if not m.name.startswith(prefix + "/"):
            continue
        rel = m.name[len(prefix) + 1:]
        if rel == "byteorder":
            little_endian = _member_bytes(path, f, m, limit=16) != b"big"
        elif m.method == 0 and (name := _storage_name(rel)) is not None:
            storages[name] = (m.offset, m.size)
    return _Checkpoint("torch-zip", size, found, storages, little_endian, notes)


def _storage_name(rel: str) -> str | None:
    """The storage a zip member holds, from its path under the checkpoint's folder: ``data/KEY``
    is storage KEY, ``constants/KEY`` (TorchScript) keeps its prefix; None for other members."""
    if rel.startswith("data/"):
        return rel[len("data/"):]
    if rel.startswith("constants/"):
        return rel
    return None


def _central_members(path: Path, f: BinaryIO, size: int) -> list[_Member]:
    """The members the central directory lists. Their data offsets come from the LOCAL headers:
    torch pads the local extra field to align the data, and the central copy does not say so."""
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except (ValueError, NotImplementedError, EOFError, OSError, struct.error) as e:
        # zipfile trusts the directory's fields: undecodable names, unknown versions, bad offsets
        raise InputError(f"malformed zip central directory: {str(e)[:200]}", path) from None
    members = []
    for info in infos:
        if not 0 <= info.header_offset <= size - 30:
            raise InputError(f"zip member {info.filename!r:.200} has its local header at {info.header_offset}, "
                             f"outside the {size}-byte file", path)
        f.seek(info.header_offset)
        head = f.read(30)
        if len(head) < 30 or head[:4] != _LOCAL_HEADER:
            raise InputError(
                f"zip member {info.filename!r} has no local header at {info.header_offset}", path)
        name_len, extra_len = struct.unpack_from("<HH", head, 26)
        offset = info.header_offset + 30 + name_len + extra_len
        if offset + info.compress_size > size:
            raise InputError(f"zip member {info.filename!r} runs past the end of the file", path)
        members.append(_Member(info.filename, offset, info.compress_size, info.compress_type))
    return members


def _scanned_members(f: BinaryIO, size: int, expected: Callable[[str], int | None] = lambda name: None,
                     limit: int | None = None) -> list[_Member]:
    """The complete members of a zip that lost its end (and with it the central directory), found
    by walking the local headers from the start (the first ``limit`` of them). ``expected(name)``
    is a member's likely size, which saves the scan for its descriptor when it is right."""
    members: list[_Member] = []
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0
        while pos + 30 <= size and buf[pos:pos + 4] == _LOCAL_HEADER and (limit is None or len(members) < limit):
            flags, method = struct.unpack_from("<HH", buf, pos + 6)
            data_size, _, name_len, extra_len = struct.unpack_from("<IIHH", buf, pos + 18)
            name = buf[pos + 30:pos + 30 + name_len].decode("utf-8", "replace")
            offset = pos + 30 + name_len + extra_len
            if flags & 0x08:  # torch streams its members: the sizes follow the data
                found = _data_descriptor(buf, offset, method == 0, expected(name))
                if found is None:
                    break
                data_size, end = found
            else:
                end = offset + data_size
            if end > size:
                break
            members.append(_Member(name, offset, data_size, method))
            pos = end
    return members


def _data_descriptor(buf: mmap.mmap, start: int, stored: bool, expected: int | None = None) -> tuple[int, int] | None:
    """(data size, end of the descriptor) of the member whose data starts at ``start``: the
    descriptor ``expected`` bytes on, or else the first one, whose recorded size reaches back
    exactly to ``start`` and that is followed by the next zip record or the end of the file."""
    if expected is not None and (found := _descriptor_at(buf, start, start + expected, stored)) is not None:
        return found
    hit = buf.find(_DATA_DESCRIPTOR, start)
    while hit != -1:
        if (found := _descriptor_at(buf, start, hit, stored)) is not None:
            return found
        hit = buf.find(_DATA_DESCRIPTOR, hit + 1)
    return None


def _descriptor_at(buf: mmap.mmap, start: int, hit: int, stored: bool) -> tuple[int, int] | None:
    """(data size, end of the descriptor) if a valid descriptor of the data at ``start`` is at ``hit``."""
    if buf[hit:hit + 4] != _DATA_DESCRIPTOR:
        return None
    n = hit - start
    for sizes in ("<II", "<QQ"):  # zip32 and zip64 descriptors
        end = hit + 8 + struct.calcsize(sizes)
        if end > len(buf):
            continue
        packed, unpacked = struct.unpack_from(sizes, buf, hit + 8)
        if packed == n and (unpacked == n or not stored) and buf[end:end + 2] in (b"PK", b""):
            return n, end
    return None


def _member_bytes(path: Path, f: BinaryIO, member: _Member, limit: int) -> bytes | None:
    """A member's content, at most ``limit`` bytes of it (:class:`InputError` beyond, before it is
    read or inflated further); None for a compression method other than deflate."""
    if member.method == 0:
        if member.size > limit:
            raise InputError(f"zip member {member.name!r} holds {member.size} bytes; elves reads at most "
                             f"{limit} of it", path)
        f.seek(member.offset)
        return _exactly(path, f, member.size)
    if member.method != 8:
        return None
    cap = min(limit, max(_INFLATION_FLOOR, MAX_INFLATION * member.size))
    inflater = zlib.decompressobj(-15)
    f.seek(member.offset)
    out: list[bytes] = []
    total, left = 0, member.size
    try:
        while not inflater.eof:
            if not left:
                raise InputError(f"zip member {member.name!r} ends in the middle of its deflate stream", path)
            step = _exactly(path, f, min(left, _INFLATE_STEP))
            left -= len(step)
            # max_length: the output stops one byte past the cap, however far the input would go
            out.append(inflater.decompress(step, cap + 1 - total))
            total += len(out[-1])
            if total > cap:
                raise InputError(f"zip member {member.name!r} inflates past {cap} bytes from {member.size} "
                                 f"(at most {MAX_INFLATION}:1 and {limit} bytes are read): a zip bomb?", path)
    except zlib.error as e:
        raise InputError(f"cannot inflate zip member {member.name!r}: {e}", path) from None
    return b"".join(out)


def _exactly(path: Path, f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise InputError("the file shrank while it was being read", path)
    return data


def _read_legacy(path: Path, f: BinaryIO, size: int) -> _Checkpoint | None:
    """The pre-zip format: pickles of the magic number, the protocol version, sys_info, the object
    and the sorted storage keys, then per key an 8-byte element count and the storage's bytes."""
    # Every file that is not a zip comes here, so rule most out cheaply before unpickling: torch
    # writes protocol 2 or later, where the magic is a LONG1 opcode within the first few bytes.
    f.seek(0)
    head = f.read(32)
    if head[:1] != pickle.PROTO or _LEGACY_MAGIC_LONG1 not in head:
        return None
    found = _Pickled()
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            magic, pos = _unpickle(buf, 0, found)
        except Exception:  # not a pickle, so not a checkpoint
            return None
        if type(magic) is not int or magic != LEGACY_MAGIC:
            return None
        try:
            version, pos = _unpickle(buf, pos, found)
            sys_info, pos = _unpickle(buf, pos, found)
            found.named, pos = _unpickle(buf, pos, found, tensors=True)
            keys, pos = _unpickle(buf, pos, found)
        except Exception as e:  # a malformed pickle fails in many ways, none of which runs code
            raise InputError(f"cannot read the legacy checkpoint's pickles: {str(e)[:200]}", path) from e
    if version != LEGACY_PROTOCOL or not (
            isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise InputError(f"unexpected legacy checkpoint (protocol {reprlib.repr(version)})", path)
    little_endian = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)

    storages: _Locations = {}
    notes = []
    for key in keys:
        stype = found.storage_types.get(key)
        if stype is None or not stype.itemsize:
            notes.append(f"storage {key} has an unknown item size; the bytes from it on "
                         "are kept as they are")
            break
        f.seek(pos)
        count = int.from_bytes(f.read(8), "little" if little_endian else "big")
        start, pos = pos + 8, pos + 8 + count * stype.itemsize
        if pos > size:
            raise InputError(f"storage {key} ends past the end of the file (truncated?)", path)
        storages[key] = (start, pos - start)
    return _Checkpoint("torch-legacy", size, found, storages, little_endian, notes)


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


def _plain_tensors(root: Any) -> dict[str, _TensorRef]:
    """The tensors reachable from ``root`` through dicts, lists and tuples, by dotted path (first
    path wins), down to MAX_NESTING containers deep and MAX_NAME characters. Each container is
    entered once: pickles share containers, and a crafted one can nest them in cycles or make the
    number of paths explode."""
    out: dict[str, _TensorRef] = {}
    entered: set[int] = set()
    stack: list[tuple[str, int, Any]] = [("", 0, root)] if isinstance(root, _NAMED) else []
    while stack:
        prefix, depth, obj = stack.pop()
        if isinstance(obj, _TensorRef):
            if prefix:  # a bare tensor saved on its own has no name
                out.setdefault(prefix, obj)
            continue
        if depth == MAX_NESTING or id(obj) in entered:
            continue
        entered.add(id(obj))
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        found = [(key, value) for key, value in items if isinstance(value, _NAMED) and _is_key(key)]
        for key, value in reversed(found):
            name = f"{prefix}.{key}" if prefix else str(key)
            if len(name) <= MAX_NAME:
                stack.append((name, depth + 1, value))
    return out


_NAMED = (_TensorRef, dict, list, tuple)


def _is_key(key: Any) -> bool:
    # a 5000-digit int has no str() (Python's limit on int digits), nor a use as a name
    return len(key) <= MAX_NAME if isinstance(key, str) else isinstance(key, int) and key.bit_length() < 64


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
