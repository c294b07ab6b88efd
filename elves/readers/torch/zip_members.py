"""The members of a zip and their bytes: from the central directory, or, for a zip that lost its
end (a truncated shard), by walking the local headers; deflated members inflate within caps."""
from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ...errors import InputError

_LOCAL_HEADER = b"PK\x03\x04"
_DATA_DESCRIPTOR = b"PK\x07\x08"

# A deflated member may inflate to at most MAX_INFLATION times its stored size (real pickles
# deflate about 3:1, a zip bomb 1000:1), or 1 MiB, whichever is larger.
MAX_INFLATION = 100
_INFLATION_FLOOR = 1 << 20
_INFLATE_STEP = 1 << 20


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int      # where the member's data starts
    size: int        # stored (compressed) size
    method: int      # 0 stored, 8 deflated


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
