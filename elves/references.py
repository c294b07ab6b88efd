"""References: the bytes a stream is coded against, from wherever they come.

A tensor is often close to one elves has seen already: the same layer in the base model of a
fine-tune, in an earlier checkpoint of the same run, or in a copy of the model at another
precision. Coded against that tensor (``xor``, or ``elf`` with ``delta``), it costs its
differences. Whatever the source, a stream's reference is one :class:`Reference`, read from its
index entry (docs/FORMAT.md):

- its source: an earlier stream of the same archive (``ref``), or bytes known by content hash
  outside it (the ``xor`` codec's ``ref_hash``): a base model's tensor (``--base``) or a store
  object;
- and a transform of that source: a block map (``ref_map``: the source's 4 KiB blocks in another
  order), a grown shape (``ref_shape`` inside ``shape``: the source at the origin of a larger
  tensor), or a precision cast (``ref_cast``: the source's elements rounded to this stream's dtype).

:class:`Sources` turns a stream's reference into the reference bytes of any of its byte ranges, in
one way for the encoder (which reads back what it wrote, so both sides see what restore
produces), the CPU decoder, the store and the GPU loader. References are one level deep: a
source is coded on its own, so a chunk never needs more than one other chunk decoded.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from . import casts, dtypes
from .chunks import ChunkSource, decode_chunk
from .errors import (
    ArchiveError,
    BaseMismatchError,
    BaseRequiredError,
    CorruptArchiveError,
    ElvesError,
)
from .index import Stream, Where

RefMap = list[list[int]]  # [[dst, src, length], ...]: bytes of the reference copied from the source
RangeFn = Callable[[int, int], np.ndarray]  # (offset, length) in the stream -> its reference bytes there
# Decoded chunks of referenced streams are kept up to this many bytes: a restore decodes a
# referenced stream for its own file first, and its chunks then serve the streams coded against it
# without a second decode (versions of a small model fit whole; a larger one keeps what it can).
CACHE_BYTES = 256 << 20
CACHED_READERS = 16  # stream readers kept: memory stays bounded however many streams are referenced


@dataclass(frozen=True)
class Reference:
    """Where a stream's reference bytes come from (``stream`` or ``content``), and how they are
    laid out (at most one of ``map``, ``grown``, ``cast``; none: the source's bytes at the same
    places)."""

    stream: int | None = None                 # an earlier stream of the same archive
    content: tuple[str, int] | None = None    # (xxh3-128, length) of bytes outside the archive
    map: RefMap | None = None
    grown: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (source shape, this stream's shape)
    cast: tuple[str, str] | None = None       # (source dtype, rounding): see elves.casts

    @classmethod
    def of(cls, stream: Stream) -> Reference | None:
        """The reference a stream's index entry records, if any (checked by ``index.check_ref``)."""
        if stream.ref is not None:
            return cls(stream=stream.ref, map=stream.ref_map, cast=stream.ref_cast)
        found = stream.decoder().ref_codec
        if found is None or found.codec_id != "xor":
            return None
        codec = cast(NamesContent, found)
        grown = None if codec.shape is None or codec.ref_shape is None else (codec.ref_shape, codec.shape)
        return cls(content=(codec.ref_hash, codec.ref_nbytes), grown=grown, cast=stream.ref_cast)


class NamesContent(Protocol):
    """A filter that names its reference by content (BitX's ``xor``)."""

    ref_hash: str
    ref_nbytes: int
    ref_shape: tuple[int, ...] | None
    shape: tuple[int, ...] | None


class ContentSource(Protocol):
    """Bytes known by content hash: a base model (``bitx.base.BaseModel``) or a store's objects."""

    @property
    def path(self) -> Where: ...   # for messages: a file or folder, or a store's URL

    def find(self, digest: str, nbytes: int) -> object | None:
        """Something (truthy) when bytes of that hash and length are known."""
        ...

    def hash_segments(self, nbytes: Iterable[int] | None = None, with_sha256: bool = False) -> None:
        """Hash what is not hashed yet (only pieces of the given lengths)."""
        ...

    def read(self, digest: str, offset: int, length: int) -> np.ndarray:
        """``length`` bytes at ``offset`` of those bytes, cut short at their end."""
        ...

    def close(self) -> None: ...


def describe(needed: dict[str, Any]) -> str:
    """One phrase naming the base model an archive needs, from its index's ``base`` field."""
    files = needed.get("model", {}).get("files", [])
    if not files:
        return "a base model"
    names = ", ".join(f["path"] for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"a base model ({names}; sha256 {files[0]['sha256'][:12]}…)" if len(files) == 1 else f"a base model ({names})"


class ChunkCache:
    """Decoded chunks by (stream, chunk), least recently used dropped past ``budget`` bytes.
    Thread-safe. A chunk is put only once its payload's checksum and its decode have passed."""

    def __init__(self, budget: int):
        self.budget = budget
        self.size = 0
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._making: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            got = self._chunks.get(key)
            if got is not None:
                self._chunks.move_to_end(key)
            return got

    def obtain(self, key: tuple[int, int], make: Callable[[], np.ndarray], copy: bool = False) -> np.ndarray:
        """The chunk at ``key``, kept or made by ``make`` and put. One thread makes it; others that
        ask meanwhile wait for it rather than decode it again (a decode window spans a file's
        streams, so a chunk and the chunk coded against it can be in flight together). With
        ``copy``, the maker gets its own array and the cache a copy: a decoder hands its chunks on."""
        while True:
            with self._lock:
                got = self._chunks.get(key)
                if got is not None:
                    self._chunks.move_to_end(key)
                    return got
                making = self._making.get(key)
                if making is None:
                    making = self._making[key] = threading.Event()
                    break
            # Then look again: a maker that failed, or a chunk too large to keep, leaves it to this thread.
            making.wait()
        try:
            chunk = make()
            self.put(key, chunk.copy() if copy else chunk)
            return chunk
        finally:
            with self._lock:
                del self._making[key]
            making.set()

    def put(self, key: tuple[int, int], chunk: np.ndarray) -> None:
        """Keep ``chunk`` (read-only from now on: the caller hands it to no one else)."""
        chunk.setflags(write=False)
        with self._lock:
            if key in self._chunks or chunk.nbytes > self.budget:
                return
            self._chunks[key] = chunk
            self.size += chunk.nbytes
            while self.size > self.budget:
                self.size -= self._chunks.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self.size = 0


class RefReader:
    """Reads the decoded bytes of stream ``index`` at any offset, decoding the chunks it needs
    unless ``cache`` holds them; ``refs`` gives each chunk's reference, for a stream coded against
    one (a base archive's tensor read as a reference; a referenced stream itself has none).
    Thread-safe."""

    def __init__(self, source: ChunkSource, stream: Stream, index: int, cache: ChunkCache,
                 refs: Callable[[int], np.ndarray] | None = None):
        self.source = source
        self.stream = stream
        self.index = index
        self.cache = cache
        self.refs = refs
        self.pipeline = stream.decoder()
        self.starts = np.concatenate(([0], np.cumsum([c[2] for c in stream.chunks], dtype=np.int64)))

    def _chunk(self, i: int) -> np.ndarray:
        return self.cache.obtain((self.index, i), lambda: self._decode(i))

    def _decode(self, i: int) -> np.ndarray:
        try:
            return decode_chunk(self.source, self.stream, self.pipeline, i, self.refs(i) if self.refs else None)
        except ArchiveError as e:  # say which chunk of which stream: the caller names only its own
            raise type(e)(f"chunk {i} of stream {self.index}: {e.message}", e.path) from None

    def read(self, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` with the stream's decoded bytes from ``offset``."""
        pos = 0
        i = int(np.searchsorted(self.starts, offset, side="right")) - 1
        while pos < out.shape[0]:
            chunk = self._chunk(i)
            a = offset + pos - int(self.starts[i])
            take = min(chunk.shape[0] - a, out.shape[0] - pos)
            out[pos:pos + take] = chunk[a:a + take]
            pos += take
            i += 1

    def reference(self, ref_map: RefMap | None, lo: int, hi: int) -> np.ndarray:
        """The reference bytes ``[lo, hi)`` of a stream that references this one through
        ``ref_map`` (None: the same bytes at the same place); zeros where the map has none.
        Read-only: it may be a decoded chunk itself."""
        if ref_map is None:
            i = int(np.searchsorted(self.starts, lo, side="right")) - 1
            if 0 <= i < len(self.stream.chunks) and self.starts[i] == lo and self.starts[i + 1] == hi:
                return self._chunk(i)  # chunked alike, as streams of one size and dtype are: no copy
            ref_map = [[0, 0, int(self.starts[-1])]]
        out = np.zeros(hi - lo, dtype=np.uint8)
        for dst, src, length in ref_map:
            a, b = max(lo, dst), min(hi, dst + length)
            if a < b:
                self.read(src + a - dst, out[a - lo:b - lo])
        return out


def _grown(source: RangeFn, width: int, shape: tuple[int, ...], ref_shape: tuple[int, ...]) -> RangeFn:
    """The reference of a tensor grown along any dimensions: the source element at the same index
    in every dimension, zero where the source has none."""

    def read(offset: int, length: int) -> np.ndarray:
        out = np.zeros(length, dtype=np.uint8)
        idx = np.arange(offset // width, (offset + length) // width, dtype=np.int64)
        multi = np.unravel_index(idx, shape)
        inside = np.ones(idx.shape[0], dtype=bool)
        for m, d in zip(multi, ref_shape):
            inside &= m < d
        if inside.any():
            bidx = np.ravel_multi_index(tuple(m[inside] for m in multi), ref_shape)
            lo, hi = int(bidx[0]), int(bidx[-1]) + 1  # C order: increasing
            src = source(lo * width, (hi - lo) * width).reshape(-1, width)
            out.reshape(-1, width)[inside] = src[bidx - lo]
        return out

    return read


def _cast(source: RangeFn, src: str, dst: str, rounding: str) -> RangeFn:
    """The reference as the source's elements cast to ``dst``: element ``k`` of the stream against
    the cast of element ``k`` of the source."""
    ws, wd = casts.WIDTH[src], casts.WIDTH[dst]

    def read(offset: int, length: int) -> np.ndarray:
        first, last = offset // wd, (offset + length) // wd
        return casts.cast(source(first * ws, (last - first) * ws), src, dst, rounding)

    return read


class Sources:
    """What one archive (or store object) resolves references against: its own streams, read
    through ``chunks``, and a :class:`ContentSource` for references by content hash (``content``:
    the base model given to restore, the store's objects, None until one is given). ``needed`` is
    the index's ``base`` field, for the error when a reference by content finds no source."""

    def __init__(self, chunks: ChunkSource | None, streams: Sequence[Stream], path: Where,
                 needed: dict[str, Any] | None = None, again: Iterable[int] = ()):
        self.chunks = chunks
        self.streams = streams
        self.path = path
        self.needed = needed
        self.content: ContentSource | None = None
        self.owns_content = False   # close ``content`` with these sources
        self.cache = ChunkCache(CACHE_BYTES)
        # Streams that are read again after their first use (a tensor that several files of
        # the model hold, a stream of packed tensors read one by one): their chunks are kept as
        # the references' are, and served from there; not a stream so large that it would push
        # most of the cache out before its own end.
        self.again = frozenset(i for i in again if streams[i].nbytes <= CACHE_BYTES // 4)
        self._referenced: set[int] | None = None
        self._readers: OrderedDict[int, RefReader] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def of_content(cls, content: ContentSource) -> Sources:
        """Sources that hold only ``content`` (planning deltas against a base model)."""
        sources = cls(None, [], content.path)
        sources.content = content
        return sources

    def stream_reader(self, index: int) -> RefReader:
        """A reader of stream ``index``'s decoded bytes (kept for the next references to it)."""
        assert self.chunks is not None, "a stream reference needs the archive's chunks"
        with self._lock:
            got = self._readers.get(index)
            if got is None:
                got = self._readers[index] = RefReader(self.chunks, self.streams[index], index, self.cache)
                while len(self._readers) > CACHED_READERS:
                    self._readers.popitem(last=False)
            else:
                self._readers.move_to_end(index)
            return got

    def kept(self, index: int) -> Callable[[int, Callable[[int], np.ndarray]], np.ndarray] | None:
        """For a decoder of stream ``index`` whose chunks later streams reference, or that is read
        again: ``(i, decode) -> chunk i``, from the cache (read-only) or decoded and kept (None for
        any other stream). A chunk it decodes is the decoder's own array, the cache keeping a copy:
        it hands its chunks on (to a file, or to the caller as a tensor)."""
        if self._referenced is None:
            self._referenced = {s.ref for s in self.streams if s.ref is not None} | self.again
        if index not in self._referenced:
            return None
        return lambda i, decode: self.cache.obtain((index, i), lambda: decode(i), copy=True)

    def missing(self) -> ElvesError:
        """The error for a reference by content with no content source given."""
        return BaseRequiredError(f"this archive was compressed against {describe(self.needed or {})}: pass "
                                 "--base (base= in Python) with that model or an .elves archive of it", self.path)

    def _content(self, digest: str, nbytes: int) -> ContentSource:
        model = self.content
        if model is None:
            raise self.missing()
        if model.find(digest, nbytes) is None:
            model.hash_segments([nbytes])
            if model.find(digest, nbytes) is None:
                raise BaseMismatchError(f"the base has no tensor with xxh3-128 {digest} ({nbytes} bytes)", model.path)
        return model

    def reader(self, ref: Reference, dtype: str | None, nbytes: int) -> RangeFn:
        """``(offset, length) -> reference bytes`` for a stream of ``dtype`` and ``nbytes`` bytes
        coded against ``ref``. A source by content is cut short at its end (a tensor with rows
        appended past its base's); a mapped stream source is zero where the map has nothing."""
        source: RangeFn
        if ref.stream is not None:
            stream_reader = self.stream_reader(ref.stream)
            if ref.map is not None:
                ref_map = ref.map
                return lambda offset, length: stream_reader.reference(ref_map, offset, offset + length)
            source = lambda offset, length: stream_reader.reference(None, offset, offset + length)  # noqa: E731
        else:
            assert ref.content is not None
            digest, src_bytes = ref.content
            model = self._content(digest, src_bytes)
            source = lambda offset, length: model.read(digest, offset, length)  # noqa: E731
        if ref.cast is not None:
            assert dtype is not None
            return _cast(source, ref.cast[0], dtype, ref.cast[1])
        if ref.grown is not None:
            assert dtype is not None
            ref_shape, shape = ref.grown
            width = dtypes.get(dtype).itemsize
            if math.prod(shape) * width != nbytes:
                raise CorruptArchiveError(f"xor: shape {list(shape)} does not hold the stream's {nbytes} bytes",
                                          self.path)
            return _grown(source, width, shape, ref_shape)
        return source

    def chunk_refs(self, stream: Stream) -> Callable[[int], np.ndarray] | None:
        """For a stream coded against a reference: chunk number -> that chunk's reference bytes.
        None for a stream coded on its own."""
        ref = Reference.of(stream)
        if ref is None:
            return None
        read = self.reader(ref, stream.dtype, stream.nbytes)
        step, nbytes = stream.chunk_bytes, stream.nbytes  # every chunk but the last is step long (check_chunks)
        return lambda i: read(i * step, min(step, nbytes - i * step))

    def close(self) -> None:
        # The readers point back at the archive that holds these sources: a cycle that only the
        # cyclic collector would free, with up to CACHE_BYTES of chunks in it, once per archive
        # read (a server's memory grew by that much per restore). So it is broken here.
        with self._lock:
            self._readers.clear()
        self.cache.clear()
        if self.content is not None and self.owns_content:
            self.content.close()
        self.content = None
