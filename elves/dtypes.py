"""Element types, named as safetensors names them, and how each maps to numpy and torch.

The float codec needs to know where the sign and exponent sit; everything else only needs the
item size, since non-float tensors are coded as byte planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CodecError


@dataclass(frozen=True)
class DType:
    name: str            # safetensors spelling: "BF16", "F32", ...
    itemsize: int        # bytes per element; 0 for sub-byte kinds is never used here
    is_float: bool       # IEEE-like layout: sign in the top bit, exponent below it
    numpy: str           # numpy (or ml_dtypes) name used to build arrays
    torch: str           # attribute of the torch module


_TABLE = [
    DType("BOOL", 1, False, "bool", "bool"),
    DType("U8", 1, False, "uint8", "uint8"),
    DType("I8", 1, False, "int8", "int8"),
    DType("U16", 2, False, "uint16", "uint16"),
    DType("I16", 2, False, "int16", "int16"),
    DType("U32", 4, False, "uint32", "uint32"),
    DType("I32", 4, False, "int32", "int32"),
    DType("U64", 8, False, "uint64", "uint64"),
    DType("I64", 8, False, "int64", "int64"),
    DType("F16", 2, True, "float16", "float16"),
    DType("BF16", 2, True, "bfloat16", "bfloat16"),
    DType("F32", 4, True, "float32", "float32"),
    DType("F64", 8, True, "float64", "float64"),
    DType("F8_E4M3", 1, True, "float8_e4m3fn", "float8_e4m3fn"),
    DType("F8_E5M2", 1, True, "float8_e5m2", "float8_e5m2"),
    DType("F8_E8M0", 1, False, "float8_e8m0fnu", "float8_e8m0fnu"),
    DType("C64", 8, False, "complex64", "complex64"),
    DType("C128", 16, False, "complex128", "complex128"),
]
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}

# Sub-byte kinds of the safetensors spec, with their bits per element: kept as bytes (their
# elements do not fill a byte; a tensor of them fills whole bytes).
PACKED = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def get(name: str) -> DType:
    """The :class:`DType` called ``name`` (safetensors spelling); :class:`CodecError` if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for ``name``; bfloat16 and float8 kinds come from ml_dtypes."""
    spec = get(name).numpy
    if hasattr(np, spec):
        return np.dtype(spec)
    import ml_dtypes

    kind: type[np.generic] = getattr(ml_dtypes, spec)
    return np.dtype(kind)
