"""safetensors: an 8-byte header length, a JSON header, then the tensors' bytes.

The header names each tensor's dtype, shape and byte range; those ranges become tensor segments
and everything else (the header itself, padding, bytes no tensor claims) stays opaque, so the
file comes back byte for byte even when it is not laid out the way safetensors writes it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .. import dtypes
from ..errors import InputError
from ..model import MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, open_source

# safetensors itself refuses headers above 100 MB.
MAX_HEADER = 100_000_000
# Element counts and byte offsets are u64 in safetensors and i64 in numpy.
_LIMIT = 1 << 63


def looks_like(path: Path) -> bool:
    return path.suffix == ".safetensors"


def parse(path: Path, relpath: str) -> SourceFile:
    """The file's segments (tensors and the opaque rest) and named tensors, after checking its
    whole header as the safetensors library does; :class:`InputError` naming the tensor if not."""
    with open_source(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise InputError("not a safetensors file: shorter than its 8-byte header length", path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"corrupted safetensors header: length {n} does not fit a {size}-byte file "
                             f"(at most {MAX_HEADER})", path)
        raw = f.read(n)
    if len(raw) != n:
        raise InputError("the file shrank while its header was being read", path)
    return from_header(path, relpath, raw, size)


def from_header(path: Path, relpath: str, raw: bytes, size: int) -> SourceFile:
    """The segments and tensors of a ``size``-byte safetensors file whose JSON header is ``raw``.
    Also how a reader of an archive checks the tensors its index lists against the header it
    restores (:func:`elves.decoder.check_tensors`)."""
    header = _json(path, raw)
    n = len(raw)

    data_start = 8 + n
    entries: list[tuple[Segment, str, str, tuple[int, ...]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            _check_metadata(path, info)
        else:
            seg, (dt, shape) = _entry(path, name, info, data_start, size)
            entries.append((seg, name, dt, shape))
    entries.sort(key=lambda e: e[0].offset)
    # An empty tensor claims no bytes, wherever its offsets say it lies; only the others can overlap.
    claimed = [seg for seg, *_ in entries if seg.length]
    for a, b in zip(claimed, claimed[1:]):
        if a.offset + a.length > b.offset:
            raise InputError(f"corrupted safetensors header: tensors {a.name!r:.200} and {b.name!r:.200} "
                             "overlap", path)

    segments = fill_gaps(size, claimed)
    index = {id(s): i for i, s in enumerate(segments)}
    views = [TensorView(name, dt, shape, index[id(seg)]) for seg, name, dt, shape in entries if seg.length]
    views += [TensorView(name, dt, shape, -1) for seg, name, dt, shape in entries if not seg.length]
    return SourceFile(path, relpath, "safetensors", size, segments, views)


def _json(path: Path, raw: bytes) -> dict[str, object]:
    """The header as a dict, refusing duplicate names (two readers could each see another tensor)."""
    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    raise InputError(f"corrupted safetensors header: {k!r:.200} appears twice", path)
                seen.add(k)
        return out

    # json's scanner recurses once per nesting level and stops with RecursionError, cleanly, at
    # the interpreter's limit; a valid header nests three deep.
    try:
        header = json.loads(raw, object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"corrupted safetensors header: not valid JSON ({str(e)[:200]})", path) from None
    if not isinstance(header, dict):
        raise InputError("corrupted safetensors header: not a JSON object", path)
    return header



def _check_metadata(path: Path, info: object) -> None:
    if info is not None and not (isinstance(info, dict)
                                 and all(isinstance(v, str) for v in info.values())):
        raise InputError("corrupted safetensors header: __metadata__ is not a map of strings to strings", path)


def _entry(path: Path, name: str, info: object, data_start: int,
           size: int) -> tuple[Segment, tuple[str, tuple[int, ...]]]:
    def bad(problem: str) -> InputError:
        return InputError(f"corrupted safetensors header: tensor {name!r:.200} {problem}", path)

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise bad("lacks dtype, shape or data_offsets")
    dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or (dt not in dtypes.DTYPES and dt not in dtypes.PACKED):
        raise bad(f"has unknown dtype {str(dt)[:40]!r}")
    # type() is int, not isinstance: JSON's true and false are ints to Python
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _LIMIT for d in shape):
        raise bad(f"has a shape that is not a list of dimensions: {str(shape)[:80]}")
    if len(shape) > MAX_RANK:
        raise bad(f"has {len(shape)} dimensions; elves handles at most {MAX_RANK}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise bad(f"has data_offsets that are not two integers: {str(offs)[:80]}")
    begin, end = offs
    if not 0 <= begin <= end or data_start + end > size:
        raise bad(f"lies at bytes [{begin}, {end}) of a {size - data_start}-byte data section")
    count = 1
    for d in shape:
        count *= d
    if count >= _LIMIT:
        raise bad(f"has {count} elements, more than a 64-bit count holds")
    bits = dtypes.PACKED.get(dt) or 8 * dtypes.get(dt).itemsize
    if count * bits != 8 * (end - begin):
        raise bad(f"has {end - begin} bytes for shape {shape} of {dt} ({count * bits / 8:g} expected)")
    # Packed sub-byte kinds are kept as opaque bytes: no element grid to split into planes.
    seg_dtype = dt if dt in dtypes.DTYPES else None
    return Segment(data_start + begin, end - begin, seg_dtype, name), (dt, tuple(shape))
