"""The legacy (pre-zip) checkpoint format: a sequence of pickles, then the storages' bytes."""
from __future__ import annotations

import mmap
import pickle
import reprlib
from pathlib import Path
from typing import BinaryIO

from ...errors import InputError
from .checkpoint import _Checkpoint, _Locations, _Pickled
from .unpickler import _unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LEGACY_MAGIC_LONG1 = pickle.LONG1 + bytes([10]) + LEGACY_MAGIC.to_bytes(10, "little")


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
