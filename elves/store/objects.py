"""Store objects: one segment each, coded the way the encoder codes an archive stream
(``pipeline_for``, the codec ``Pipeline``, chunks with xxh3-64 checksums), in a small
self-describing container: the payloads back to back, a msgpack trailer (:class:`ObjectMeta`),
then a footer (the trailer's length and xxh3-64, a magic). An object coded against a base
tensor (``xor``) names the objects it reads (``refs``); those are never deltas themselves, so
restoring any object reads at most one other. Keys are the raw content's hash, so re-coding an
object keeps its key."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import xxhash

from ..chunks import ChunkSource
from ..errors import CorruptArchiveError, UnsupportedFormatError
from ..index import (
    Chunk,
    FileEntry,
    Stream,
    check_chunks,
    check_ref,
    checksum,
    ints,
    parse_stream,
)
from ..references import Reference, Sources
from .layout import KEY_RE, STORE_VERSION, StoreFields, object_at, object_key
from .storage import Storage, Upload

if TYPE_CHECKING:
    from typing_extensions import Self

OBJECT_MAGIC = b"ELVOBJ\x00\n"
FOOTER = struct.Struct("<QQ8s")   # trailer length, xxh3-64 of the trailer, magic


def checked_at(storage: Storage, key: str) -> str:
    """Where object ``key`` lies, once ``key`` (read from a manifest or an object) is one."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise CorruptArchiveError(f"invalid object key {key!r:.80} in a manifest or an object", storage.where(""))
    return object_at(key)


@dataclass
class ObjectMeta(Stream):
    """An object's trailer: its one stream, as an archive index entry describes a stream (chunk
    offsets within the object file), and the objects it references."""

    refs: list[str] = field(default_factory=list)  # keys of the objects the ``xor`` filter reads
    size: int = 0                 # of the object file

    def to_trailer(self) -> bytes:
        packed: bytes = msgpack.packb({
            "v": list(STORE_VERSION), "kind": self.kind, "dtype": self.dtype, "nbytes": self.nbytes,
            "hash": self.hash, "pipeline": self.pipeline, "chunk_elems": self.chunk_elems,
            "chunks": [[c.length, c.decoded_length, c.checksum] for c in self.chunks], "refs": self.refs,
            **({} if self.ref_cast is None else {"ref_cast": {"from": self.ref_cast[0], "round": self.ref_cast[1]}}),
        }, use_bin_type=True)
        return packed


class StoredObject:
    """An object opened for reading: its trailer checked and parsed, payloads read on demand
    with their checksums checked. It reads like a one-stream :class:`~elves.archive.ArchiveReader`,
    so :func:`elves.decoder.iter_stream` decodes it (a delta's ``references`` read the plain
    object it names, ``StoreBase``).

    The trailer is untrusted (whoever forged it recomputed its checksum): every field is typed and
    checked against the file and its key (:func:`elves.index.parse_stream`, ``check_chunks``)
    before a payload is read. ``at`` is where it lies, if not at its key's place (an object being
    written under ``tmp/``)."""

    def __init__(self, storage: Storage, key: str, at: str | None = None):
        at = at or checked_at(storage, key)
        self.key = key
        self.path = storage.where(at)    # how messages name it (a URL as it is)
        self.files: list[FileEntry] = []  # no file entries: errors name the object by its path
        try:
            self.blob = storage.open(at, f"object {key}")
        except FileNotFoundError:
            raise CorruptArchiveError(f"object {key} is missing: the store is damaged", self.path) from None
        try:
            self.meta = self._parse()
        except BaseException:
            self.blob.close()
            raise
        self.references = Sources(self, [self.meta], self.path)

    def _parse(self) -> ObjectMeta:
        size = self.blob.size
        foot = self.blob.read(size - FOOTER.size, FOOTER.size) if size >= FOOTER.size else b""
        if len(foot) != FOOTER.size or foot[-8:] != OBJECT_MAGIC:
            raise CorruptArchiveError(f"object {self.key} is not a complete object (bad footer)", self.path)
        tlen, thash, _ = FOOTER.unpack(foot)
        start = size - FOOTER.size - tlen
        trailer = self.blob.read(start, tlen) if 0 <= start else b""
        if len(trailer) != tlen or xxhash.xxh3_64_intdigest(trailer) != thash:
            raise CorruptArchiveError(f"object {self.key}: its trailer is corrupted (checksum mismatch)", self.path)
        try:
            raw = msgpack.unpackb(trailer, raw=False)
        except Exception as e:  # noqa: BLE001 (msgpack's errors for every kind of malformed input)
            raise CorruptArchiveError(f"object {self.key}: its trailer is not valid msgpack: {e}", self.path) from None
        return self._check_trailer(raw, start, size)

    def _check_trailer(self, raw: Any, start: int, size: int) -> ObjectMeta:
        label = f"object {self.key}"
        f = StoreFields(raw, f"the trailer of {label}", self.path)
        version = f.list("v")
        if not ints(version, 2):
            f.fail("has no valid 'v' (two integers expected)")
        if version[0] > STORE_VERSION[0]:
            raise UnsupportedFormatError(f"{label} was written by a newer elves: upgrade elves", self.path)
        chunks, refs = f.list("chunks"), f.list("refs")
        if not all(ints(c, 3) for c in chunks):
            f.fail("has a malformed chunk (three non-negative integers expected)")
        if not all(isinstance(r, str) and KEY_RE.fullmatch(r) for r in refs):
            f.fail("has a malformed 'refs' (object keys expected)")
        if any(k in raw for k in ("decoded_hash", "ref", "ref_map")):
            f.fail("has fields of a lossy stream or an in-archive reference, which no object has")
        placed, pos = [], 0
        for length, decoded, check in chunks:  # payloads lie back to back from offset 0
            placed.append([pos, length, decoded, check])
            pos += length
        stream = parse_stream({**raw, "chunks": placed}, label, self.path)
        check_chunks(stream, label, self.path, 0, start)
        if pos != start:
            raise CorruptArchiveError(f"{label}: its payloads end at byte {pos}, but its trailer starts at {start}",
                                      self.path)
        if object_key(stream.hash, stream.dtype) != self.key:
            raise CorruptArchiveError(f"{label}: its trailer's hash and dtype do not give its key", self.path)
        check_ref([stream], 0, self.path)  # a reference by content hash (xor), cast or not, and no other
        ref = Reference.of(stream)
        source_dtype = stream.ref_cast[0] if stream.ref_cast is not None else stream.dtype
        wanted = [object_key(ref.content[0], source_dtype)] if ref is not None and ref.content is not None else []
        if refs != wanted:
            raise CorruptArchiveError(f"{label}: its 'refs' ({', '.join(refs) or 'none'}) are not the objects "
                                      f"its pipeline reads ({', '.join(wanted) or 'none'})", self.path)
        return ObjectMeta(**{k: getattr(stream, k) for k in Stream.__dataclass_fields__}, refs=refs, size=size)

    @property
    def streams(self) -> list[Stream]:
        return [self.meta]

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        offset, length, _, check = stream.chunks[chunk]
        data = self.blob.read(offset, length)
        if len(data) != length or checksum(data) != check:
            raise CorruptArchiveError(f"object {self.key}: the payload is corrupted (checksum mismatch)", self.path)
        return data

    def close(self) -> None:
        if hasattr(self, "references"):
            self.references.close()
        self.blob.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_: type[ChunkSource] = StoredObject  # mypy proves that decoders can read an object's chunks


class ObjectWriter:
    """Writes one object to be committed at its key: payloads, then the trailer and footer, then
    made durable. Errors name the object's place."""

    def __init__(self, storage: Storage, key: str, meta: ObjectMeta):
        self.upload: Upload = storage.upload(object_at(key))
        self.meta = meta
        self.pos = 0

    def write_chunk(self, payload: bytes, decoded: int, check: int) -> None:
        """Append a chunk's payload; ``check`` is its :func:`~elves.index.checksum`, which the coding
        thread computed."""
        self.upload.write(payload)
        self.meta.chunks.append(Chunk(self.pos, len(payload), decoded, check))
        self.pos += len(payload)

    def finish(self) -> str:
        """Where the finished object lies until it is committed."""
        trailer = self.meta.to_trailer()
        self.upload.write(trailer + FOOTER.pack(len(trailer), xxhash.xxh3_64_intdigest(trailer), OBJECT_MAGIC))
        self.upload.finish()
        self.meta.size = self.pos + len(trailer) + FOOTER.size
        return self.upload.temp

    def abort(self) -> None:
        self.upload.abort()
