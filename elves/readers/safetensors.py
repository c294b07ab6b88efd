"""safetensors: an 8-byte header length, a JSON header, then the tensors' bytes.

The header names each tensor's dtype, shape and byte range; those ranges become tensor segments
and everything else (the header itself, padding, bytes no tensor claims) stays opaque, so the
file comes back byte for byte even when it is not laid out the way safetensors writes it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .. import dtypes
from ..errors import InputError
from ..model import Segment, SourceFile, TensorView, fill_gaps

# safetensors itself refuses headers above 100 MB.
MAX_HEADER = 100_000_000


def looks_like(path: Path) -> bool:
    return path.suffix == ".safetensors"


def parse(path: Path, relpath: str) -> SourceFile:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError("not a safetensors file: shorter than its 8-byte header length", path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"corrupted safetensors header: length {n} does not fit a {size}-byte file", path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"corrupted safetensors header: not valid JSON ({e})", path) from None
    if not isinstance(header, dict):
        raise InputError("corrupted safetensors header: not a JSON object", path)

    data_start = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries.append(_entry(path, name, info, data_start, size))
    entries.sort(key=lambda e: e[0].offset)
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if a.offset + a.length > b.offset and a.length and b.length:
            raise InputError(f"corrupted safetensors header: tensors {a.name!r} and {b.name!r} overlap", path)

    segments = fill_gaps(size, [seg for seg, _ in entries if seg.length])
    index = {id(s): i for i, s in enumerate(segments)}
    views = [
        TensorView(seg.name, dt, shape, index[id(seg)])
        for seg, (dt, shape) in entries
        if seg.length  # an empty tensor has no bytes to point at
    ]
    views += [TensorView(seg.name, dt, shape, -1) for seg, (dt, shape) in entries if not seg.length]
    return SourceFile(path, relpath, "safetensors", size, segments, views)


def _entry(path: Path, name: str, info: object, data_start: int, size: int):
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise InputError(f"corrupted safetensors header: entry {name!r} lacks dtype, shape or data_offsets", path)
    dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or (dt not in dtypes.DTYPES and dt not in dtypes.PACKED):
        raise InputError(f"tensor {name!r} has unknown dtype {dt!r}", path)
    if (
        not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
    ):
        raise InputError(f"corrupted safetensors header: bad shape or data_offsets for {name!r}", path)
    begin, end = offs
    if not 0 <= begin <= end or data_start + end > size:
        raise InputError(f"corrupted safetensors header: {name!r} points past the end of the file", path)
    count = 1
    for d in shape:
        count *= d
    if dt in dtypes.DTYPES and count * dtypes.get(dt).itemsize != end - begin:
        raise InputError(f"corrupted safetensors header: {name!r} has {end - begin} bytes for shape {shape} of {dt}", path)
    # Packed sub-byte kinds are kept as opaque bytes: no element grid to split into planes.
    seg_dtype = dt if dt in dtypes.DTYPES else None
    return Segment(data_start + begin, end - begin, seg_dtype, name), (dt, tuple(shape))
