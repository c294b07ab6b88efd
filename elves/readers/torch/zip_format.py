"""``torch.save`` zips and TorchScript zips (whose ``constants.pkl`` names storages under
``constants/``): their pickles, and where their stored storages lie."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import BinaryIO

from ...errors import InputError
from .checkpoint import _Checkpoint, _Locations, _Pickled
from .pickle_scan import MAX_PICKLE
from .unpickler import _unpickle
from .zip_members import _central_members, _Member, _member_bytes, _scanned_members

_PICKLE_MEMBER = re.compile(r"(.+)/(data|constants)\.pkl")


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
