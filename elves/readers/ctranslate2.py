"""CTranslate2 ``model.bin``: a header, then each variable's header and bytes, then aliases.

As ``ctranslate2.specs.ModelSpec._serialize`` writes it and ``models::Model::load`` reads it
(binary versions 1 to 6):

```
u32 binary_version
[version >= 2] string spec_name, u32 spec_revision          string = u16 length (with the NUL) + bytes + NUL
u32 num_variables
num_variables x (string name, u8 rank, u32 dims[rank],
                 [version >= 4] u8 dtype_id, u32 num_bytes     0 F32, 1 I8, 2 I16, 3 I32, 4 F16, 5 BF16
                 [version <  4] u8 item_size, u32 count        4 F32, 2 I16, 1 I8
                 data)
[version >= 3] u32 num_aliases, num_aliases x (string alias, string variable)
```

Each variable's data becomes a tensor segment: F32, F16 and BF16 get the float codecs, int8 and
int16 weights (the ``int8*`` and ``int16`` quantisations) are integer tensors coded as byte
planes, as the other readers code them. The headers between are opaque.

The file has no magic number, so a ``.bin`` file is taken for a CTranslate2 model only when the
whole structure parses and ends exactly at the end of the file; anything else (a malformed or
truncated model, another format) is kept opaque, its bytes restored exactly, as the ONNX reader
does with what it cannot parse.
"""
from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import BinaryIO

from ..model import MAX_RANK, Segment, SourceFile, TensorView, fill_gaps, opened
from .binary import Cursor, Short

CURRENT_VERSION = 6
DTYPE_IDS = {0: "F32", 1: "I8", 2: "I16", 3: "I32", 4: "F16", 5: "BF16"}
_OLD_ITEM_SIZES = {4: "F32", 2: "I16", 1: "I8"}   # versions 1 to 3: the dtype from the item size
_ITEMSIZE = {"F32": 4, "I8": 1, "I16": 2, "I32": 4, "F16": 2, "BF16": 2}
# Variables a model may have (Whisper large has about 1,300); a forged count of many tiny ones
# must not fill memory with their headers.
MAX_VARIABLES = 1 << 20
# A variable's header takes at least 9 bytes: name length, NUL, rank, dtype, byte count.
_MIN_VARIABLE = 9


def looks_like(path: Path) -> bool:
    return path.suffix == ".bin"


def parse(path: Path, relpath: str, source: BinaryIO | None = None) -> SourceFile | None:
    """The model's variables as tensor segments; None when the file is not a CTranslate2 model
    this reader parses whole. ``source``: the file already open (see :func:`elves.model.opened`)."""
    with opened(path, source) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                found = _walk(Cursor(buf), size)
            except Short:
                return None
            finally:
                buf.release()
    if found is None or len({name for name, *_ in found}) != len(found):
        return None
    segments = fill_gaps(size, [seg for _, _, seg in found if seg.length])
    index = {id(s): i for i, s in enumerate(segments)}
    views = [TensorView(name, seg.dtype or "", shape, index[id(seg)] if seg.length else -1)
             for name, shape, seg in found]
    return SourceFile(path, relpath, "ctranslate2", size, segments, views)


def _string(c: Cursor) -> str:
    """A string as the C++ reader takes it: its bytes up to the NUL the length includes."""
    raw = c.take(c.u16())
    if not raw or raw[-1] != 0:
        raise Short("a string without its NUL")
    return raw[:-1].decode("utf-8", "replace")


def _walk(c: Cursor, size: int) -> list[tuple[str, tuple[int, ...], Segment]] | None:
    version = c.u32()
    if not 1 <= version <= CURRENT_VERSION:
        return None
    if version >= 2:
        _string(c)   # the spec's name
        c.u32()      # its revision
    n = c.u32()
    if n > (size - c.pos) // _MIN_VARIABLE or n > MAX_VARIABLES:
        return None
    found = []
    for _ in range(n):
        name = _string(c)
        rank = c.u8()
        if rank > MAX_RANK:
            return None
        shape = tuple(c.u32() for _ in range(rank))
        if version >= 4:
            dtype = DTYPE_IDS.get(c.u8())
            nbytes = c.u32()
        else:
            item = c.u8()
            dtype = _OLD_ITEM_SIZES.get(item)
            nbytes = c.u32() * item
        if dtype is None or math.prod(shape) * _ITEMSIZE[dtype] != nbytes:
            return None
        found.append((name, shape, Segment(c.skip(nbytes), nbytes, dtype, name)))
    if version >= 3:
        aliases = c.u32()
        if aliases > (size - c.pos) // 6:   # two strings of at least 3 bytes each
            return None
        for _ in range(aliases):
            _string(c)
            _string(c)
    return found if c.pos == size else None
