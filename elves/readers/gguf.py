"""GGUF (ggml's model file, versions 2 and 3): a header of metadata and tensor infos, then the
tensors' data, each at an aligned offset.

```
"GGUF"  u32 version  u64 tensor_count  u64 metadata_kv_count
metadata_kv_count x (string key, u32 value_type, value)       string = u64 length + UTF-8 bytes
tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
padding to general.alignment (32 unless the metadata says otherwise), then the data
```

``ne[0]`` is the fastest-varying dimension, so the shape a tensor is listed with is ``ne``
reversed. F32, F16 and BF16 tensors (and the plain integer and F64 ones) become tensor segments,
which get the float codecs and dedup; a quantised tensor (Q4_0, Q8_0, the K-quants, ...) is
a bytes segment of its own, cut at its exact byte range, so identical quantised tensors dedup
too; its layout (type and shape) is the file's own header, which is restored with it. The
header, the metadata and the padding are opaque.

A file that starts with the magic is parsed strictly, as ggml does: a field past the end of the
file, a count the file cannot hold, a tensor outside the file or overlapping another, a bad
alignment or a shape whose rows are not whole blocks raise :class:`InputError` naming the file.
A version this reader does not parse (1, which used 32-bit counts; a big-endian file; a later
one) and a ggml type it does not know keep the file opaque: its bytes still come back exactly.
"""
from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError
from ..model import MAX_NAME, MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, open_source, opened
from .binary import Cursor, Short

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
HEADER_BYTES = 24   # magic, version, tensor count, metadata count
# Metadata values: type id -> bytes per value, for the fixed-size ones.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# Tensors and metadata entries a file may have: models have thousands; the tensor infos are
# held in memory, so a forged header of many tiny ones must not make them gigabytes.
MAX_ENTRIES = 1 << 20
# Arrays of arrays nest at most this deep (ggml's writer never nests).
MAX_NESTING = 8
# ggml types kept as elements: type id -> safetensors spelling.
ELEMENT_TYPES = {0: "F32", 1: "F16", 30: "BF16", 28: "F64", 24: "I8", 25: "I16", 26: "I32", 27: "I64"}
# ggml types stored as blocks: type id -> (name, elements per block, bytes per block); from
# ggml's type traits (gguf-py's GGML_QUANT_SIZES).
BLOCK_TYPES = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    29: ("IQ1_M", 256, 56), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8}


class _Unknown(Exception):
    """Something this reader does not parse but a valid file may hold: the file stays opaque."""


def looks_like(path: Path) -> bool:
    """The file starts with the GGUF magic (whatever its name)."""
    with open_source(path) as f:
        return f.read(4) == MAGIC


def parse(path: Path, relpath: str, source: BinaryIO | None = None) -> SourceFile | None:
    """The file's segments and tensors; None for a GGUF this reader keeps opaque (see the module
    docstring); :class:`InputError` for a malformed one. ``source``: the file already open (see
    :func:`elves.model.opened`)."""
    with opened(path, source) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            raise InputError(f"malformed GGUF file: {size} bytes, shorter than its {HEADER_BYTES}-byte header", path)
        # mmap: the walk reads the header's fields where they lie, never the tensors' data.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                found = _walk(Cursor(buf), size)
            except Short as e:
                raise InputError(f"malformed GGUF file: {e}", path) from None
            except _Unknown:
                return None
            finally:
                buf.release()
    return _source_file(path, relpath, size, found)


# One tensor: name, ggml type id, ne, absolute offset, bytes.
_Info = tuple[str, int, tuple[int, ...], int, int]


def _walk(c: Cursor, size: int) -> list[_Info]:
    c.skip(4)
    version = c.u32()
    if version not in VERSIONS:
        raise _Unknown
    n_tensors, n_kv = c.u64(), c.u64()
    # A key-value pair takes at least 12 bytes (key length, value type), a tensor info 24 (name
    # length, n_dims, type, offset): counts the file cannot hold fail before any loop.
    if n_kv > size // 12 or n_tensors > size // 24:
        raise Short(f"{n_tensors} tensors and {n_kv} metadata entries do not fit in {size} bytes")
    if n_kv > MAX_ENTRIES or n_tensors > MAX_ENTRIES:
        raise Short(f"{n_tensors} tensors and {n_kv} metadata entries: elves reads at most {MAX_ENTRIES} of each")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = _string(c, "metadata key")
        kind = c.u32()
        if key == "general.alignment":
            if kind != _UINT32:
                raise Short(f"general.alignment has value type {kind}, not uint32")
            alignment = c.u32()
            if alignment <= 0 or alignment & (alignment - 1):
                raise Short(f"general.alignment is {alignment}, not a power of two")
        else:
            _value(c, kind, 0)
    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    for _ in range(n_tensors):
        name = _string(c, "tensor name", MAX_NAME)
        n_dims = c.u32()
        if n_dims > MAX_RANK:
            raise Short(f"tensor {name!r:.80} has {n_dims} dimensions (at most {MAX_RANK})")
        ne = tuple(c.u64() for _ in range(n_dims))
        if any(d >= 1 << 63 for d in ne):
            raise Short(f"tensor {name!r:.80} has a dimension past 2^63")
        infos.append((name, c.u32(), ne, c.u64()))
    data_start = -(-c.pos // alignment) * alignment
    if data_start > size:
        raise Short(f"the data section would start at {data_start}, past the end of the file ({size} bytes)")
    out: list[_Info] = []
    for name, kind, ne, offset in infos:
        out.append((name, kind, ne, data_start + offset, _nbytes(name, kind, ne, offset, alignment, size - data_start)))
    return out


def _string(c: Cursor, what: str, limit: int | None = None) -> str:
    n = c.u64()
    if limit is not None and n > limit:
        raise Short(f"a {what} of {n} bytes (at most {limit})")
    return c.take(n).decode("utf-8", "replace")


def _value(c: Cursor, kind: int, depth: int) -> None:
    """Step over one metadata value of type ``kind``."""
    if kind in _FIXED:
        c.skip(_FIXED[kind])
    elif kind == _STRING:
        c.skip(c.u64())
    elif kind == _ARRAY:
        item, count = c.u32(), c.u64()
        if item in _FIXED:
            if count > (c.end - c.pos) // _FIXED[item]:
                raise Short(f"an array of {count} values of type {item} runs past the end of the file")
            c.skip(count * _FIXED[item])
        elif item in (_STRING, _ARRAY):
            if depth >= MAX_NESTING:
                raise Short(f"arrays nest deeper than {MAX_NESTING}")
            # Each element takes at least 8 bytes (a string's length, an array's type and count).
            if count > (c.end - c.pos) // 8:
                raise Short(f"an array of {count} values runs past the end of the file")
            if item == _STRING:
                c.skip_strings(count)
            else:
                for _ in range(count):
                    _value(c, item, depth + 1)
        else:
            raise Short(f"an array of unknown value type {item}")
    else:
        raise Short(f"a metadata value of unknown type {kind}")


def _nbytes(name: str, kind: int, ne: tuple[int, ...], offset: int, alignment: int, room: int) -> int:
    """The tensor's bytes, after checking that it lies inside the ``room``-byte data section."""
    count = math.prod(ne)
    if kind in ELEMENT_TYPES:
        nbytes = count * _ITEMSIZE[ELEMENT_TYPES[kind]]
    elif kind in BLOCK_TYPES:
        type_name, block, block_bytes = BLOCK_TYPES[kind]
        if ne and ne[0] % block:
            raise Short(f"tensor {name!r:.80} of {type_name} has rows of {ne[0]} elements, "
                        f"not whole blocks of {block}")
        nbytes = count // block * block_bytes
    else:
        raise _Unknown
    if offset % alignment:
        raise Short(f"tensor {name!r:.80} lies at offset {offset}, not a multiple of the alignment {alignment}")
    if offset > room or nbytes > room - offset:
        raise Short(f"tensor {name!r:.80} lies at bytes [{offset}, {offset + nbytes}) of a {room}-byte "
                    "data section")
    return nbytes


def _source_file(path: Path, relpath: str, size: int, found: list[_Info]) -> SourceFile:
    if len({name for name, *_ in found}) != len(found):
        raise InputError("malformed GGUF file: two tensors have the same name", path)
    placed = sorted(((Segment(at, n, ELEMENT_TYPES.get(kind), name), kind, ne) for name, kind, ne, at, n in found),
                    key=lambda e: e[0].offset)
    claimed = [seg for seg, _, _ in placed if seg.length]
    for a, b in zip(claimed, claimed[1:]):
        if a.offset + a.length > b.offset:
            raise InputError(f"malformed GGUF file: tensors {a.name!r:.80} and {b.name!r:.80} overlap", path)
    segments = fill_gaps(size, claimed)
    index = {id(s): i for i, s in enumerate(segments)}
    # Quantised tensors are not listed: the archive's tensor entries hold element types only.
    views = [TensorView(seg.name or "", seg.dtype, tuple(reversed(ne)), index[id(seg)] if seg.length else -1)
             for seg, _, ne in placed if seg.dtype is not None]
    return SourceFile(path, relpath, "gguf", size, segments, views)
