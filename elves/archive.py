"""The ``.elves`` container: header, chunk payloads, index (docs/FORMAT.md).

:class:`ArchiveWriter` appends chunk payloads to a temporary file and renames it into place only
once the index and header are written, so a crash or a full disk never leaves something that
looks like an archive. :class:`ArchiveReader` checks the header, the index and every chunk it
reads, and names the stream (tensor or file) in any error.
"""
from __future__ import annotations

import collections
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import xxhash
import zstandard

from . import dtypes
from .errors import (
    ArchiveError,
    CorruptArchiveError,
    OutputError,
    OutputExistsError,
    TruncatedArchiveError,
    UnsupportedFormatError,
)
from .index import Chunk, FileEntry, Index, Stream, checksum, parse_index, safe_relpath
from .parallel import SyncBehind
from .references import Sources
from .version import __version__

__all__ = ["ArchiveReader", "ArchiveWriter", "Chunk", "FileEntry", "Stream", "safe_relpath", "temp_sibling"]

MAGIC = b"ELVES\x00\r\n"
FORMAT_VERSION = (1, 5)
HEADER = struct.Struct("<8sHHIQQQ")  # magic, major, minor, flags, index offset, length, xxh3-64
HEADER_SIZE = 64
DATA_START = 4096
ALIGN = 4096
ALIGN_STREAMS_FROM = 4 << 20
FLAG_LOSSY = 1
# An index that inflates past this is refused before it is parsed (a 1 GB model's index is ~1 MB).
MAX_INDEX_BYTES = 1 << 30


def inflate(blob: bytes, cap: int) -> bytes:
    """A zstd frame's content, refused (ValueError) past ``cap`` bytes before that much is
    allocated: the size a frame declares is as untrusted as the rest."""
    declared = zstandard.frame_content_size(blob)
    if declared > cap:
        raise ValueError(f"it declares {declared} bytes, over the {cap}-byte limit")
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(blob) as r:
        while len(out) <= cap and (piece := r.read(min(cap + 1 - len(out), 16 << 20))):
            out += piece
    if len(out) > cap:
        raise ValueError(f"it inflates past the {cap}-byte limit")
    return bytes(out)


def public_mode(mode: int) -> int:
    """``mode`` less the process's umask: what a plain ``open`` would give the file (temporary
    names are made private, 0600, and get this before they are renamed into place)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A fresh temporary name next to ``path``, so that renaming it into place is atomic."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".elves-tmp{suffix}", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write here: {e.strerror}", path) from None
    os.close(fd)
    return Path(name)


class ArchiveWriter:
    """Writes an archive to ``path`` through a temporary file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], force: bool = False):
        self.path = Path(path)
        if self.path.exists() and not force:
            raise OutputExistsError("already exists (use --force to overwrite)", self.path)
        if not self.path.parent.is_dir():
            raise OutputError("the folder to write into does not exist", self.path.parent)
        self.tmp = temp_sibling(self.path)
        self.f = open(self.tmp, "r+b")
        self.sync = SyncBehind(self.f)
        self.f.write(b"\0" * DATA_START)
        self.pos = DATA_START
        self.streams: list[Stream] = []
        self.files: list[FileEntry] = []
        self.lossy = False
        self.source_kind = "folder"
        self.base: dict[str, Any] | None = None  # the base model the streams reference (BitX)
        self.error_bound: dict[str, Any] | None = None  # the lossy mode asked for (ELF), if any

    def begin_stream(self, nbytes: int) -> None:
        """Start a stream's chunks on a 4 KiB boundary when the stream is large."""
        if nbytes >= ALIGN_STREAMS_FROM and self.pos % ALIGN:
            pad = ALIGN - self.pos % ALIGN
            self._write(b"\0" * pad)

    def write_chunk(self, payload: bytes, decoded_length: int, check: int) -> Chunk:
        """Append a chunk's payload; ``check`` is its :func:`checksum`, which the coding thread computed."""
        offset = self.pos
        self._write(payload)
        return Chunk(offset, len(payload), decoded_length, check)

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        """A chunk payload written earlier, read back (to serve as a reference); call
        :meth:`flush` after writing it. Safe to call from several threads."""
        offset, length, _, _ = stream.chunks[chunk]
        return os.pread(self.f.fileno(), length, offset)

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise OutputError(f"cannot write the archive: {e.strerror}", self.path) from None

    def add_stream(self, stream: Stream) -> int:
        self.streams.append(stream)
        return len(self.streams) - 1

    def add_file(self, entry: FileEntry) -> None:
        self.files.append(entry)

    def format_version(self) -> tuple[int, int]:
        """The oldest format that holds what was written, so that older readers read it: 1.5 only
        for tensors packed into a bytes stream with others; 1.4 only for what 1.3 does not have
        (a cast, ``xor`` against a stream of the archive, a file's mode, the gguf and ctranslate2
        file formats)."""
        if any(t.segment >= 0 and t.dtype not in dtypes.PACKED and self.streams[f.segments[t.segment]].kind == "bytes"
               for f in self.files for t in f.tensors):
            return FORMAT_VERSION
        if any(s.ref_cast is not None or (s.ref is not None and s.pipeline and s.pipeline[0]["id"] == "xor")
               for s in self.streams) or any(f.mode is not None or f.format in ("gguf", "ctranslate2")
                                             for f in self.files):
            return (1, 4)
        return (1, 3)

    def _write(self, data: bytes) -> None:
        try:
            self.f.write(data)
            self.sync.wrote(len(data))
        except OSError as e:
            raise OutputError(f"cannot write the archive: {e.strerror}", self.path) from None
        self.pos += len(data)

    def close(self) -> None:
        version = self.format_version()
        index = {
            "format": list(version),
            "writer": f"elves {__version__}",
            "lossy": self.lossy,
            "source": self.source_kind,
            "streams": [s.to_dict() for s in self.streams],
            "files": [e.to_dict() for e in self.files],
        }
        if self.base is not None:
            index["base"] = self.base
        if self.error_bound is not None:
            index["error_bound"] = self.error_bound
        blob = zstandard.ZstdCompressor(level=9).compress(msgpack.packb(index, use_bin_type=True))
        index_offset = self.pos
        self._write(blob)
        head = HEADER.pack(MAGIC, *version, FLAG_LOSSY if self.lossy else 0,
                           index_offset, len(blob), xxhash.xxh3_64_intdigest(blob))
        head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        try:
            self.f.seek(0)
            self.f.write(head)
            self.sync.finish()
            os.fchmod(self.f.fileno(), public_mode(0o666))
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot finish the archive: {e.strerror}", self.path) from None

    def abort(self) -> None:
        self.sync.close()
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ArchiveReader:
    """Random access to an archive's streams. Cheap to open: reads the header and the index."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self.f = open(self.path, "rb")
        except FileNotFoundError:
            raise CorruptArchiveError("no such archive", self.path) from None
        except IsADirectoryError:
            raise CorruptArchiveError("is a folder, not an archive", self.path) from None
        try:
            self._read_index()
        except BaseException:
            self.f.close()
            raise

    def _read_index(self) -> None:
        size = os.fstat(self.f.fileno()).st_size
        head = self.f.read(HEADER_SIZE)
        if len(head) < 8 or head[:8] != MAGIC:
            if MAGIC.startswith(head[:8]) and len(head) < 8:
                raise TruncatedArchiveError("the archive is truncated: its header is cut short", self.path)
            raise CorruptArchiveError("not an elves archive (bad magic)", self.path)
        if len(head) < HEADER_SIZE:
            raise TruncatedArchiveError("the archive is truncated: its header is cut short", self.path)
        magic, major, minor, flags, index_offset, index_len, index_hash = HEADER.unpack_from(head)
        (head_hash,) = struct.unpack_from("<Q", head, HEADER.size)
        if xxhash.xxh3_64_intdigest(head[:HEADER.size]) != head_hash:
            raise CorruptArchiveError("the archive header is corrupted (checksum mismatch)", self.path)
        if major > FORMAT_VERSION[0]:
            raise UnsupportedFormatError(
                f"written in format {major}.{minor}, newer than this elves reads "
                f"({FORMAT_VERSION[0]}.x): upgrade elves", self.path)
        if index_offset == 0:
            raise CorruptArchiveError("the archive was never finished (no index)", self.path)
        if index_offset < DATA_START:
            raise CorruptArchiveError(f"the index offset {index_offset} lies inside the header", self.path)
        if index_offset + index_len > size:
            raise TruncatedArchiveError(
                f"the archive is truncated: {size} bytes, but its index ends at byte {index_offset + index_len}",
                self.path)
        self.f.seek(index_offset)
        blob = self.f.read(index_len)
        if xxhash.xxh3_64_intdigest(blob) != index_hash:
            raise CorruptArchiveError("the archive index is corrupted (checksum mismatch)", self.path)
        try:
            raw = msgpack.unpackb(inflate(blob, MAX_INDEX_BYTES), raw=False, strict_map_key=False)
        except Exception as e:  # the checksum matched, so this is a writer bug or a forged index
            raise CorruptArchiveError(f"the archive index does not decode: {e}", self.path) from None
        index: Index = parse_index(raw, self.path, (major, minor), DATA_START, index_offset)
        self.index = index
        self.streams = index.streams
        self.files = index.files
        self.lossy = index.lossy
        self.writer = index.writer
        self.source_kind = index.source
        # A lossy archive's bound: {"codec": "elf", "mode": "abs"|"rel", "value", "spec"}.
        self.error_bound = index.error_bound
        # The base model the archive was compressed against (BitX), if any: decoder.attach_base
        # checks a given base against it and makes it the content source of ``references``.
        self.base_needed = index.base
        # A stream is read again when several files hold it, or when it holds several packed
        # tensors (each read by name decodes its stream).
        used = [i for f in index.files for i in f.segments] + \
               [f.segments[t.segment] for f in index.files for t in f.tensors
                if t.segment >= 0 and self.streams[f.segments[t.segment]].kind == "bytes"]
        self.references = Sources(self, self.streams, self.path, index.base,
                                  again={i for i, n in collections.Counter(used).items() if n > 1})
        self.flags = flags
        self.version = (major, minor)

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        """The payload of ``chunk`` of ``stream``, its checksum checked."""
        offset, length, _, check = stream.chunks[chunk]
        try:
            data = os.pread(self.f.fileno(), length, offset)
        except OSError as e:
            raise ArchiveError(f"cannot read the archive: {e.strerror}", self.path) from None
        if len(data) != length:
            raise TruncatedArchiveError("the payload is cut short", self.path)
        if checksum(data) != check:
            raise CorruptArchiveError("the payload is corrupted (checksum mismatch)", self.path)
        return data

    def close(self) -> None:
        if hasattr(self, "references"):
            self.references.close()
        self.f.close()

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
