"""Base models: where BitX reads its reference tensors, and the checks made before it uses them.

A base is given as a model (a file or a folder, read by elves' readers) or as an ``.elves``
archive of one. Either way it is seen as a set of tensor segments (the raw bytes of a tensor or
of a PyTorch storage), each known by the xxh3-128 of its bytes, which is how an archive names the
reference of each ``xor`` stream. Restore looks references up by that hash, so the base may be
given in another form than at compress time (the archive of the folder, say), and checks every
referenced hash before decoding anything: a wrong base is an error naming the tensor, never wrong
bytes.
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from elves.archive import MAGIC, ArchiveReader, safe_relpath
from elves.errors import (
    ArchiveError,
    BaseMismatchError,
    BaseModelError,
    InputError,
)
from elves.index import Where
from elves.model import SourceFile
from elves.parallel import Sha256Beside, default_threads
from elves.references import Reference, RefReader

READ_PIECE = 8 << 20
PARALLEL_HASH_BYTES = 16 << 20  # less than this is hashed on the calling thread: a pool costs more

# Prefixes that wrappers add to tensor names (Lightning's state_dict, DDP's module, HF's model, torch.compile).
STRIP_PREFIXES = ("state_dict.", "module.", "model.", "_orig_mod.")


def normalize(name: str) -> str:
    """A tensor name without the wrapper prefixes, for matching a fine-tune to its base."""
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name, changed = name[len(p):], True
    return name


@dataclass
class BaseSegment:
    """The bytes of one base tensor (or storage): where they are and what they hash to."""

    dtype: str
    nbytes: int
    file: str                     # path of the base file that holds it (relative, as in archives)
    loc: tuple[int, int]          # model: (file number, byte offset); archive: (stream index, 0)
    hash: str | None = None       # xxh3-128 hex, once known
    names: list[str] = field(default_factory=list)


@dataclass
class BaseTensor:
    """A named tensor of the base model, as a view of one of its segments."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segment: BaseSegment
    exact: bool                   # the view is the whole segment: offset 0, C-contiguous, same size


class BaseModel:
    """A base model opened for reading reference tensors. Use :func:`open_base`."""

    kind: str                     # "file", "folder" or "archive"

    def __init__(self, path: Where):
        self.path = path   # for messages: a file or folder, or a store's URL (StoreBase)
        self._segments: list[BaseSegment] = []
        self._tensors: list[BaseTensor] = []
        self._by_hash: dict[str, BaseSegment] | None = None
        self._lock = threading.Lock()

    # -- what the subclasses provide
    def _load(self) -> None:
        """Make ``segments`` and ``tensors`` complete (a subclass that reads them lazily)."""

    def _hash(self, wanted: Callable[[BaseSegment], bool], with_sha256: bool) -> None:
        raise NotImplementedError

    def _read_segment(self, seg: BaseSegment, offset: int, length: int) -> np.ndarray:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What the index records about the base model as a whole: its files and their sha256."""
        raise NotImplementedError

    def file_offset(self, seg: BaseSegment) -> int | None:
        """Where ``seg``'s bytes start in its file, for a base that is a model file or folder."""
        return None

    def locate(self, refs: list[dict[str, Any]]) -> None:
        """Find recorded references cheaply where the index says they were, before ``check``."""

    def close(self) -> None:
        pass

    # -- shared
    @property
    def segments(self) -> list[BaseSegment]:
        self._load()
        return self._segments

    @property
    def tensors(self) -> list[BaseTensor]:
        self._load()
        return self._tensors

    def hash_segments(self, nbytes: Iterable[int] | None = None, with_sha256: bool = False) -> None:
        """Hash the segments (only those of the given lengths, when given) that are not hashed yet."""
        lengths = set(nbytes) if nbytes is not None else None
        self._load()
        self._hash(lambda s: s.hash is None and (lengths is None or s.nbytes in lengths), with_sha256)
        self._by_hash = None

    @property
    def by_hash(self) -> dict[str, BaseSegment]:
        if self._by_hash is None:
            self._by_hash = {}
            for s in self._segments:
                if s.hash is not None:
                    self._by_hash.setdefault(s.hash, s)
        return self._by_hash

    def find(self, digest: str, nbytes: int) -> BaseSegment | None:
        seg = self.by_hash.get(digest)
        return seg if seg is not None and seg.nbytes == nbytes else None

    def read(self, digest: str, offset: int, length: int) -> np.ndarray:
        """``length`` bytes at ``offset`` of the base segment whose content hash is ``digest``;
        cut short at the segment's end."""
        seg = self.by_hash.get(digest)
        if seg is None:
            raise BaseMismatchError(f"the base has no tensor with xxh3-128 {digest}", self.path)
        length = max(0, min(length, seg.nbytes - offset))
        if length == 0:
            return np.empty(0, dtype=np.uint8)
        return self._read_segment(seg, offset, length)

    def check(self, refs: list[dict[str, Any]]) -> None:
        """Raise :class:`BaseMismatchError` unless every recorded reference is in this base,
        byte for byte (its xxh3-128 and length). Hashes only what it has to: the recorded places
        first, then, for what is not there, every segment of a recorded length."""
        self.locate(refs)
        missing = [r for r in refs if self.find(r["hash"], int(r["nbytes"])) is None]
        if missing:
            self.hash_segments({int(r["nbytes"]) for r in missing})
            missing = [r for r in missing if self.find(r["hash"], int(r["nbytes"])) is None]
        if not missing:
            return
        r = missing[0]
        name, where = r.get("name", "?"), r.get("file", "?")
        same = [t for t in self.tensors if t.name == name] or \
               [t for t in self.tensors if normalize(t.name) == normalize(name)]
        if same:
            got = same[0].segment
            detail = (f"base tensor {name!r} (in {where}) differs from the one this archive was compressed "
                      f"against: xxh3-128 {got.hash or 'of other length'}, expected {r['hash']}")
        else:
            detail = f"base tensor {name!r} (in {where}) is not in the base given"
        more = f" ({len(missing) - 1} more tensors do not match either)" if len(missing) > 1 else ""
        raise BaseMismatchError(f"wrong base model: {detail}{more}", self.path)

    def __enter__(self) -> BaseModel:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelBase(BaseModel):
    """A base given as a model file or folder, read through elves' readers.

    Parsing a checkpoint can cost more than restoring the fine-tune (a pickle of millions of
    opcodes), so it is done only when needed: to match tensors by name (compress), or when a
    referenced tensor is not found at the offset the archive recorded (:meth:`locate`).
    """

    path: Path

    def __init__(self, path: Path):
        super().__init__(path)
        if not (path.is_file() or path.is_dir()):
            raise InputError("no such file or folder", path)
        self.kind = "file" if path.is_file() else "folder"
        self._files: list[SourceFile] | None = None
        self._paths: list[Path] = []           # file number (``loc[0]``) -> path
        self._numbers: dict[Path, int] = {}
        self._fds: dict[int, int] = {}
        self._sha256: dict[int, Sha256Beside] = {}

    def _number(self, path: Path) -> int:
        if path not in self._numbers:
            self._numbers[path] = len(self._paths)
            self._paths.append(path)
        return self._numbers[path]

    def _load(self) -> None:
        if self._files is not None:
            return
        from elves import dtypes
        from elves.readers import read_model

        self._files, _ = read_model(self.path)
        located = {s.loc: s for s in self._segments}
        self._segments = []
        for sf in self._files:
            fi = self._number(sf.path)
            segs: dict[int, BaseSegment] = {}
            for si, s in enumerate(sf.segments):
                if s.dtype is not None and s.length:
                    seg = located.get((fi, s.offset))
                    if seg is None or seg.nbytes != s.length:
                        seg = BaseSegment(s.dtype, s.length, sf.relpath, (fi, s.offset))
                    seg.dtype, seg.names = s.dtype, []
                    segs[si] = seg
                    self._segments.append(seg)
            for t in sf.tensors:
                seg = segs.get(t.segment)
                if seg is None:
                    continue
                count = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
                size = count * dtypes.get(t.dtype).itemsize if t.dtype in dtypes.DTYPES else -1
                exact = t.offset == 0 and t.strides is None and size == seg.nbytes
                seg.names.append(t.name)
                self._tensors.append(BaseTensor(t.name, t.dtype, tuple(t.shape), seg, exact))
        self._by_hash = None

    def locate(self, refs: list[dict[str, Any]]) -> None:
        """Hash each reference's bytes at its recorded ``offset`` in its ``file`` (the given file,
        for a single-file base) and keep those that match; the rest are left to a full parse."""
        if self._files is not None:
            return
        found: list[tuple[BaseSegment, str]] = []
        for r in refs:
            offset, nbytes, digest = r.get("offset"), r.get("nbytes"), r.get("hash")
            if type(offset) is not int or type(nbytes) is not int or not isinstance(digest, str) \
                    or offset < 0 or nbytes <= 0 or self.find(digest, nbytes) is not None:
                continue
            if self.kind == "file":
                path = self.path
            else:
                try:
                    path = self.path / safe_relpath(r.get("file"), self.path)
                except ArchiveError:
                    continue
            try:
                if offset + nbytes > path.stat().st_size:
                    continue
            except OSError:
                continue
            found.append((BaseSegment(str(r.get("dtype")), nbytes, str(r.get("file")), (self._number(path), offset),
                                      names=[str(r.get("name", ""))]), digest))
        for (seg, digest), got in zip(found, self._xxh3_all([seg for seg, _ in found])):
            if got == digest:
                seg.hash = digest
                self._segments.append(seg)
                self._by_hash = None

    def _fd(self, fi: int) -> int:
        with self._lock:
            if fi not in self._fds:
                try:
                    self._fds[fi] = os.open(self._paths[fi], os.O_RDONLY)
                except OSError as e:
                    raise InputError(f"cannot read the base model: {e.strerror}", self._paths[fi]) from None
            return self._fds[fi]

    def _pread(self, fi: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(fi), length, offset)
        if len(data) != length:
            raise InputError("the base model file changed or shrank while it was being read", self._paths[fi])
        return data

    def _xxh3(self, seg: BaseSegment) -> str:
        fi, start = seg.loc
        h = xxhash.xxh3_128()
        for off in range(start, start + seg.nbytes, READ_PIECE):
            h.update(self._pread(fi, off, min(READ_PIECE, start + seg.nbytes - off)))
        return h.hexdigest()

    def _xxh3_all(self, segs: list[BaseSegment], spare: int = 0) -> list[str]:
        """The segments' content hashes, on a thread per CPU but ``spare``: reads and xxh3
        release the GIL, and a base of 100 GB is 10-20 s of hashing on one thread, before a
        restore starts."""
        threads = min(default_threads(None) - spare, len(segs))
        if threads < 2 or sum(seg.nbytes for seg in segs) < PARALLEL_HASH_BYTES:
            return [self._xxh3(seg) for seg in segs]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self._xxh3, segs))

    def _hash(self, wanted: Callable[[BaseSegment], bool], with_sha256: bool) -> None:
        assert self._files is not None
        by_file: dict[int, dict[int, BaseSegment]] = {}
        for s in self._segments:
            by_file.setdefault(s.loc[0], {})[s.loc[1]] = s
        for sf in self._files:
            fi = self._numbers[sf.path]
            if with_sha256 and fi not in self._sha256:
                # The files' sha256 is wanted only when the index is written (summary), and costs
                # 5x the content hashes that planning waits for: a thread reads and hashes
                # each file beside everything else.
                sha = self._sha256[fi] = Sha256Beside()
                sha.read(functools.partial(self._pread, fi), sf.size, READ_PIECE)
        todo = [b for sf in self._files for b in by_file.get(self._numbers[sf.path], {}).values() if wanted(b)]
        # a CPU left to the sha256 threads, when they run: on two, hashing beside them lost 5%
        for b, digest in zip(todo, self._xxh3_all(todo, spare=1 if with_sha256 else 0)):
            b.hash = digest

    def _read_segment(self, seg: BaseSegment, offset: int, length: int) -> np.ndarray:
        return np.frombuffer(self._pread(seg.loc[0], seg.loc[1] + offset, length), dtype=np.uint8)

    def file_offset(self, seg: BaseSegment) -> int | None:
        return seg.loc[1]

    def summary(self) -> dict[str, Any]:
        self.hash_segments([], with_sha256=True)
        assert self._files is not None
        return {"source": self.kind,
                "files": [{"path": sf.relpath, "size": sf.size,
                           "sha256": self._sha256[self._numbers[sf.path]].hexdigest()} for sf in self._files]}

    def close(self) -> None:
        for sha in self._sha256.values():  # its reads use the descriptors closed below
            sha.cancel()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class ArchiveBase(BaseModel):
    """A base given as an ``.elves`` archive: reference bytes are decoded chunk by chunk, each
    chunk's checksum checked, and the stream hashes come from its index."""

    kind = "archive"

    def __init__(self, path: Path):
        super().__init__(path)
        self.reader = ArchiveReader(path)
        self._streams: dict[int, RefReader] = {}  # stream index -> reader of its decoded bytes
        segs: dict[int, BaseSegment] = {}
        for entry in self.reader.files:
            for name, dt, shape, segment, offset, strides in entry.tensors:
                if segment < 0:
                    continue
                index = entry.segments[segment]
                st = self.reader.streams[index]
                if st.kind != "tensor" or not st.nbytes:
                    continue
                if index not in segs:
                    segs[index] = BaseSegment(st.dtype or "", st.nbytes, entry.path, (index, 0), st.hash)
                    self.segments.append(segs[index])
                seg = segs[index]
                from elves import dtypes

                count = int(np.prod(shape, dtype=np.int64)) if shape else 1
                size = count * dtypes.get(dt).itemsize if dt in dtypes.DTYPES else -1
                seg.names.append(name)
                self.tensors.append(BaseTensor(name, dt, tuple(shape), seg,
                                               offset == 0 and strides is None and size == seg.nbytes))

    def _hash(self, wanted: Callable[[BaseSegment], bool], with_sha256: bool) -> None:
        pass  # every stream's hash is in the index; the decoder checks chunks as it reads them

    def _stream(self, seg: BaseSegment) -> RefReader:
        index = seg.loc[0]
        with self._lock:
            if index not in self._streams:
                stream = self.reader.streams[index]
                ref = Reference.of(stream)
                if ref is not None and ref.content is not None:
                    raise BaseModelError(
                        f"the base archive was itself compressed against a base (tensor {seg.names[0]!r}); "
                        "restore it and pass the restored model as the base", self.path)
                # a version coded against an earlier one in the same archive reads that one too
                sources = self.reader.references
                self._streams[index] = RefReader(self.reader, stream, index, sources.cache, sources.chunk_refs(stream))
            return self._streams[index]

    def _read_segment(self, seg: BaseSegment, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        try:
            self._stream(seg).read(offset, out)
        except ArchiveError as e:
            raise type(e)(f"base tensor {seg.names[0]!r}: {e.message}", self.path) from None
        return out

    def summary(self) -> dict[str, Any]:
        return {"source": self.reader.source_kind,
                "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in self.reader.files]}

    def close(self) -> None:
        self.reader.close()


def is_archive(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def open_base(path: str | os.PathLike[str]) -> BaseModel:
    """Open a base model: an ``.elves`` archive, or a model file or folder."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such base model (file, folder or .elves archive)", p)
    if p.is_file() and is_archive(p):
        return ArchiveBase(p)
    return ModelBase(p)
