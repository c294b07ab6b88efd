"""The unpickler that never imports or calls anything: every global a pickle names is answered
with something of ours (a tensor rebuilder that only records, a plain container, or a stub)."""
from __future__ import annotations

import _compat_pickle
import gc
import pickle
import reprlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ...dtypes import DTYPES
from ...model import MAX_NAME
from .checkpoint import _DType, _Pickled, _StorageRef, _StorageType, _TensorRef
from .pickle_scan import _pickle_end

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
