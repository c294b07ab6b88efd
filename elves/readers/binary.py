"""A bounds-checked reader of little-endian fields in a mapped file, for the binary headers of
GGUF and CTranslate2 files.

Every count, length and offset in those headers is untrusted: a field that would run past the
end of the file raises :class:`Short` before anything is sliced or allocated from it, so a forged
length costs nothing. The readers turn :class:`Short` into their own answer (an error, or the
file kept opaque).
"""
from __future__ import annotations

import struct


class Short(Exception):
    """A field runs past the end of the buffer, or holds a value its reader cannot use."""


_U8, _U16, _U32, _U64 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class Cursor:
    """Reads fields of ``buf`` from ``pos`` on, never past ``len(buf)``."""

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf = buf
        self.pos = pos
        self.end = len(buf)

    def skip(self, n: int) -> int:
        """Step over ``n`` bytes; the offset where they start."""
        if n < 0 or n > self.end - self.pos:
            raise Short(f"{n} bytes at offset {self.pos} run past the end of the file ({self.end} bytes)")
        start = self.pos
        self.pos += n
        return start

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` strings, each a u64 length and its bytes: in one loop, as a
        tokenizer's vocabulary in a GGUF header is tens of thousands of them."""
        buf, pos, end, length = self.buf, self.pos, self.end, _U64.unpack_from
        for _ in range(count):
            if end - pos < 8:
                raise Short(f"a string length at offset {pos} runs past the end of the file ({end} bytes)")
            n = length(buf, pos)[0]
            if n > end - pos - 8:
                raise Short(f"{n} bytes at offset {pos + 8} run past the end of the file ({end} bytes)")
            pos += 8 + n
        self.pos = pos

    def _int(self, s: struct.Struct) -> int:
        value: int = s.unpack_from(self.buf, self.skip(s.size))[0]
        return value

    def u8(self) -> int:
        return self._int(_U8)

    def u16(self) -> int:
        return self._int(_U16)

    def u32(self) -> int:
        return self._int(_U32)

    def u64(self) -> int:
        return self._int(_U64)

    def take(self, n: int) -> bytes:
        start = self.skip(n)
        return bytes(self.buf[start:start + n])
