"""Archive -> bytes: decode streams chunk by chunk, check them, and write files or hand out tensors.

Every chunk's checksum is checked before it is decoded and every stream's content hash after, so
a damaged archive raises :class:`~elves.errors.CorruptArchiveError` naming the tensor or file,
never returns wrong bytes. Restored files are written under temporary names and renamed into
place only when complete and verified.
"""
from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
from collections import Counter, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Generator, Iterable, Iterator, Protocol, Sequence

import numpy as np
import xxhash

from bitx.base import BaseModel, open_base

from .archive import ArchiveReader, public_mode, safe_relpath, temp_sibling
from .chunks import ChunkSource, decode_chunk
from .errors import (
    ArchiveError,
    CorruptArchiveError,
    InputError,
    OutputError,
    OutputExistsError,
    UnsafePathError,
)
from .index import FileEntry, Stream, Where
from .model import SourceFile
from .parallel import Sha256Beside, batched_map, default_threads
from .readers import ctranslate2, gguf, onnx, safetensors, torch
from .references import Sources

ProgressFn = Callable[[int], None]


@dataclass
class RestoreSummary:
    """What :func:`elves.restore` did."""

    output: Path
    files: int
    bytes_written: int


def attach_base(reader: ArchiveReader, base: str | os.PathLike[str] | BaseModel | None) -> None:
    """Make ``base`` the source of the archive's references by content, after checking every
    reference its index records (:meth:`bitx.base.BaseModel.check`).

    Does nothing for an archive that needs no base (a base given anyway is ignored). Raises
    :class:`BaseRequiredError` when one is needed and none is given, and
    :class:`BaseMismatchError` when the one given lacks a referenced tensor or holds other bytes.
    """
    needed = reader.base_needed
    if not needed:
        return
    if base is None:
        raise reader.references.missing()
    model = base if isinstance(base, BaseModel) else open_base(base)
    try:
        model.check(needed.get("tensors", []))
    except BaseException:
        if model is not base:
            model.close()
        raise
    reader.references.close()
    reader.references.content, reader.references.owns_content = model, model is not base


class StreamReader(ChunkSource, Protocol):
    """What :func:`iter_stream` decodes from: an :class:`ArchiveReader`, or a store object
    (``elves.store.objects.StoredObject``), each with the sources of its references."""

    @property
    def path(self) -> Where: ...   # for messages: a file, or an object's URL in a store

    @property
    def streams(self) -> list[Stream]: ...

    @property
    def files(self) -> list[FileEntry]: ...

    @property
    def references(self) -> Sources: ...


def stream_label(reader: StreamReader, index: int) -> str:
    """How errors name a stream: the tensor (or file) it holds."""
    for entry in reader.files:
        for t in entry.tensors:
            if t.segment >= 0 and entry.segments[t.segment] == index:
                return f"tensor {t.name!r} in {entry.path}"
        if index in entry.segments:
            return f"{entry.path} (segment {entry.segments.index(index)})"
    return f"stream {index}"


def iter_stream(reader: StreamReader, index: int, pool: Executor, window: int) -> Iterator[np.ndarray]:
    """The decoded chunks of stream ``index``, in order, each checked; then the stream's hash."""
    return iter_streams([(reader, index)], pool, window)


def iter_streams(streams: Sequence[tuple[StreamReader, int]], pool: Executor,
                 window: int) -> Generator[np.ndarray, None, None]:
    """The decoded chunks of ``streams`` (stream ``index`` of ``reader`` each: a file's segments
    in an archive, or the store objects that hold a file), in order, each checked; each stream's
    hash at its end. One decode window spans them all: a file of many small tensors (a stream of
    one or two chunks each) keeps every thread busy, where a window per stream would wait for
    each stream's last chunk before starting the next."""

    def decoder(reader: StreamReader, index: int) -> Callable[[int], np.ndarray]:
        stream = reader.streams[index]
        pipeline = stream.decoder()
        ref_of = reader.references.chunk_refs(stream)  # the reference's bytes of each chunk, if it has one
        # A stream that later ones reference, or that is read again: its chunks are kept for them
        # (and one being decoded is waited for, not decoded twice).
        kept = reader.references.kept(index)

        def decode(i: int) -> np.ndarray:
            try:
                ref = ref_of(i) if ref_of is not None else None  # the reference's bytes here
                return decode_chunk(reader, stream, pipeline, i, ref)
            except ArchiveError as e:  # name the tensor only when something is wrong: it costs a scan
                raise type(e)(f"{stream_label(reader, index)}: chunk {i}: {e.message}", reader.path) from None

        if kept is None:
            return decode
        return lambda i: kept(i, decode)

    def jobs() -> Iterator[tuple[Callable[[int], np.ndarray], int, int]]:
        for reader, index in streams:
            chunks = reader.streams[index].chunks
            decode = decoder(reader, index)  # made as the window reaches the stream: a reference opens then
            for i in range(len(chunks)):
                yield decode, i, chunks[i][2]

    decoded = batched_map(pool, lambda job: job[0](job[1]), jobs(), window, nbytes=lambda job: job[2])
    for reader, index in streams:
        stream = reader.streams[index]
        h = xxhash.xxh3_128()
        total = 0
        for _ in range(len(stream.chunks)):
            chunk = next(decoded)
            h.update(chunk.data)
            total += chunk.shape[0]
            yield chunk
        if total != stream.nbytes or h.hexdigest() != stream.expected_hash:  # lossy: the decoded bytes' hash
            raise CorruptArchiveError(f"{stream_label(reader, index)}: decoded bytes do not match the stored hash",
                                      reader.path)


# Structure that check_tensors rebuilds in memory to parse; a file with more opaque bytes than
# this (a checkpoint of storages elves keeps as bytes) is served unchecked.
MAX_STRUCTURE_BYTES = 1 << 30


def check_tensors(reader: ArchiveReader, entry: FileEntry, pool: Executor, window: int) -> None:
    """Check that the tensors the index lists for a file are those the file itself describes:
    name, dtype, shape, strides and place. The file's structure (its safetensors header; a
    checkpoint's pickle and zip records; an ONNX file's protobuf) is restored from its streams,
    whose hashes are checked, and parsed by the reader that compress used; so a forger who edits
    only the index's tensor entries (swapping two dimensions, say) gets an error here, not a
    tensor of the wrong shape. Restore needs no such check: it writes the structure with the file."""
    if entry.format not in _PARSERS or not entry.tensors or not entry.segments:
        return
    try:
        sf = _PARSERS[entry.format](reader, entry, pool, window)
    except InputError as e:
        raise CorruptArchiveError(f"{entry.path}: its restored {entry.format} structure is malformed: "
                                  f"{e.message}", reader.path) from None
    if sf is None:
        return
    starts = np.concatenate(([0], np.cumsum([reader.streams[i].nbytes for i in entry.segments])))
    # Counted, not keyed by name: one name may stand for several tensors (an ONNX file's If
    # branches each hold an initializer of the same name).
    from_file = Counter((v.name, _placed(v.dtype, v.shape, v.strides, sf.segments[v.segment].offset + v.offset
                                         if v.segment >= 0 else -1)) for v in sf.tensors)
    from_index = Counter((t.name, _placed(t.dtype, t.shape, t.strides, int(starts[t.segment]) + t.offset
                                          if t.segment >= 0 else -1)) for t in entry.tensors)
    # The index may name fewer tensors than today's reader finds (an archive from an elves that
    # named fewer); every one it names must be the file's.
    wrong = sorted(name for (name, placed), n in from_index.items() if from_file[(name, placed)] < n)
    if wrong:
        raise CorruptArchiveError(f"{entry.path}: tensor {wrong[0]!r} in the index is not the one its "
                                  f"{entry.format} structure describes", reader.path)


def _placed(dtype: str, shape: tuple[int, ...], strides: tuple[int, ...] | None, at: int) -> tuple[object, ...]:
    """What must agree between a tensor entry and the file: an empty tensor lies nowhere."""
    return (dtype, tuple(shape), None if strides is None else tuple(strides), at if math.prod(shape) else -1)


def _safetensors_structure(reader: ArchiveReader, entry: FileEntry, pool: Executor, window: int) -> SourceFile:
    """The file's tensors from its header, the first segment."""
    head = read_stream(reader, entry.segments[0], pool, window)
    n = int.from_bytes(head[:8].tobytes(), "little") if head.shape[0] >= 8 else -1
    if not 0 <= n <= min(head.shape[0] - 8, safetensors.MAX_HEADER):
        raise CorruptArchiveError(f"{entry.path}: its first segment is no safetensors header", reader.path)
    return safetensors.from_header(Path(entry.path), entry.path, head[8:8 + n].tobytes(), entry.size)


def _skeleton_structure(reader: ArchiveReader, entry: FileEntry, pool: Executor, window: int) -> SourceFile | None:
    """The file's tensors as its reader finds them in a skeleton of the file held in memory: its
    opaque segments (pickle, zip records, protobuf) where they lie, zeros for the tensor data,
    which these readers skip."""
    if sum(reader.streams[i].nbytes for i in entry.segments if reader.streams[i].kind == "bytes") > MAX_STRUCTURE_BYTES:
        return None
    fd = os.memfd_create("elves-structure", os.MFD_CLOEXEC) if hasattr(os, "memfd_create") else None
    with (os.fdopen(fd, "w+b") if fd is not None else tempfile.TemporaryFile()) as f:
        f.truncate(entry.size)  # holes: the tensor data costs nothing
        pos = 0
        for i in entry.segments:
            if reader.streams[i].kind == "bytes":
                for chunk in iter_stream(reader, i, pool, window):
                    os.pwrite(f.fileno(), chunk.data, pos)
                    pos += chunk.shape[0]
            else:
                pos += reader.streams[i].nbytes
        parse = torch.parse if entry.format.startswith("torch") else _SKELETON_PARSERS[entry.format]
        sf = parse(Path(entry.path), entry.path, f)
    if sf is None or sf.format != entry.format:
        raise CorruptArchiveError(f"{entry.path}: its restored structure is no {entry.format} file", reader.path)
    return sf


_PARSERS: dict[str, Callable[[ArchiveReader, FileEntry, Executor, int], SourceFile | None]] = {
    "safetensors": _safetensors_structure, "torch-zip": _skeleton_structure,
    "torch-legacy": _skeleton_structure, "onnx": _skeleton_structure, "gguf": _skeleton_structure,
    "ctranslate2": _skeleton_structure,
}
_SKELETON_PARSERS: dict[str, Callable[[Path, str, BinaryIO | None], SourceFile | None]] = {
    "onnx": onnx.parse, "gguf": gguf.parse, "ctranslate2": ctranslate2.parse,
}


def read_stream(reader: ArchiveReader, index: int, pool: Executor, window: int) -> np.ndarray:
    """A whole stream as one uint8 array (for tensors handed to the caller)."""
    stream: Stream = reader.streams[index]
    try:
        out = np.empty(stream.nbytes, dtype=np.uint8)
    except MemoryError:  # a real tensor, or a forged one its chunks decode to: either way, say so
        raise ArchiveError(f"{stream_label(reader, index)}: {stream.nbytes} bytes do not fit in memory",
                           reader.path) from None
    pos = 0
    for chunk in iter_stream(reader, index, pool, window):
        out[pos:pos + chunk.shape[0]] = chunk
        pos += chunk.shape[0]
    return out


class FileCheck:
    """The end of one file's checks: its size, and its sha256 (``sha256``; None: none, for a lossy
    file or with the check off, whose decoded streams' hashes are the check) computed by a thread
    beside the decode. :meth:`result` waits for the hash and raises a CorruptArchiveError
    (``problem``, at ``where``) unless the file is the one its index or manifest describes."""

    def __init__(self, size: int, sha256: str | None, window: int, problem: str, where: Where):
        self.expected = size, sha256
        self.problem, self.where = problem, where
        self.sha = Sha256Beside(window) if sha256 is not None else None
        self.size = 0

    def update(self, chunk: np.ndarray) -> None:
        if self.sha is not None:
            self.sha.update(chunk)
        self.size += chunk.shape[0]

    def close(self) -> None:
        """Let the hash's thread finish and end (also for a check that an error left untaken)."""
        if self.sha is not None:
            self.sha.close()

    def result(self) -> None:
        self.close()
        if (self.size, self.sha.hexdigest() if self.sha is not None else self.expected[1]) != self.expected:
            raise CorruptArchiveError(self.problem, self.where)


class LaterChecks:
    """Files' last checks (:class:`FileCheck`), each taken once the next file has been written,
    so that the tail of its hash runs beside that file's decode; the last file's at its end, so
    every one before the model moves into place. ``links`` are the files' link targets (None for
    a file with content: links have no check). Leaving the context lets the hashes of checks that
    an error left untaken finish."""

    def __init__(self, links: Sequence[str | None]):
        self.last = max((i for i, link in enumerate(links) if link is None), default=-1)
        self.pending: deque[FileCheck] = deque()

    def after(self, write: Callable[[int, Path], int]) -> Callable[[int, Path], int]:
        """``write(i, target)`` (for :func:`write_files`), then the checks file ``i`` no longer overlaps."""
        def written(i: int, target: Path) -> int:
            n = write(i, target)
            while len(self.pending) > (1 if i < self.last else 0):
                self.pending.popleft().result()
            return n
        return written

    def __enter__(self) -> LaterChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        for check in self.pending:
            check.close()


def file_chunks(reader: ArchiveReader, entry: FileEntry, pool: Executor, window: int,
                check_sha256: bool = True, later: LaterChecks | None = None) -> Iterator[np.ndarray]:
    """The decoded bytes of one file, chunk by chunk; raises once the end shows a wrong sha256
    (or, with ``later``, appends that last check there for the caller to take).

    Every stream's xxh3-128 is checked either way, and the streams tile the file. The sha256
    (on a thread beside the decode) adds the check that the file is what was hashed at compress
    time, whatever the index says of its streams. A lossy file (``elf``) decodes to other bytes
    than the original the sha256 is of: its decoded streams' hashes are the check.
    """
    check = FileCheck(entry.size, entry.sha256 if check_sha256 and not entry.lossy and entry.link is None else None,
                      window, f"{entry.path}: restored bytes do not match the stored sha256", reader.path)
    yield from checked(iter_streams([(reader, i) for i in entry.segments], pool, window), check, later)


def checked(chunks: Iterable[np.ndarray], check: FileCheck, later: LaterChecks | None) -> Iterator[np.ndarray]:
    """``chunks``, each handed to ``check`` on the way; at their end the check is taken, or left
    to ``later``."""
    try:
        for chunk in chunks:
            check.update(chunk)
            yield chunk
    except BaseException:
        check.close()
        raise
    if later is None:
        check.result()
    else:
        later.pending.append(check)


def restore_file(reader: ArchiveReader, entry: FileEntry, target: Path, pool: Executor, window: int,
                 progress: ProgressFn | None, check_sha256: bool, later: LaterChecks | None = None) -> int:
    """Write one file's bytes to ``target`` (a temporary name); return the byte count. With
    ``later``, the file's last check (its sha256) is left there (:func:`file_chunks`)."""
    try:
        with open_new(target) as out:
            for chunk in file_chunks(reader, entry, pool, window, check_sha256, later):
                out.write(chunk.data)
                if progress:
                    progress(chunk.shape[0])
    except OSError as e:
        raise OutputError(f"cannot write {entry.path}: {e.strerror}", target) from None
    return entry.size


def open_new(path: Path) -> BinaryIO:
    """``path`` (a temporary name of ours) opened for writing; a link put there is not followed."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "wb")


def restore(
    archive: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    threads: int | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    base: str | os.PathLike[str] | None = None,
    verify: bool = True,
) -> RestoreSummary:
    """Restore the model in ``archive`` to ``dst``: a folder, or a file path for a single-file model.

    Files are written under temporary names and renamed into place once checked, so ``dst``
    never holds a half-written file. An existing ``dst`` is refused unless ``force``; even then,
    nothing is written through a link inside it. Every chunk's checksum and every stream's
    content hash are checked; ``verify`` (the default) also checks each file's sha256 as it is
    written, on a thread beside the decode (``verify=False``, ``--no-verify``: a little faster).

    An archive compressed against a base model needs that base (``base``: the model file or
    folder, or an ``.elves`` archive of it); every base tensor it references is checked before
    anything is written (:class:`~elves.errors.BaseRequiredError`,
    :class:`~elves.errors.BaseMismatchError`).
    """
    dst = Path(dst)
    nthreads = default_threads(threads)
    window = 2 * nthreads + 2
    with ArchiveReader(archive) as reader, ThreadPoolExecutor(nthreads) as pool:
        attach_base(reader, base)  # before anything is written: a missing or wrong base is an error
        files = reader.files
        with LaterChecks([e.link for e in files]) as later:
            return write_files(dst, [(e.path, e.link, e.mode) for e in files], reader.source_kind == "file", force,
                               reader.path, later.after(lambda i, target: restore_file(
                                   reader, files[i], target, pool, window, progress, verify, later)))


def write_files(dst: Path, files: Sequence[tuple[str, str | None, int | None]], single: bool, force: bool,
                source: Where, write: Callable[[int, Path], int]) -> RestoreSummary:
    """Put a restored model at ``dst``: ``files`` are the (path, link target or None, recorded
    permission bits or None) of its files, and ``write(i, target)`` writes file ``i`` to the temporary path ``target`` and returns
    its size. Links are made here.

    A single-file model (``single``) goes to ``dst``, or into it when ``dst`` is a folder; a
    folder model is written to a staging folder next to ``dst`` and moved in once every file is
    complete. Moving into an existing ``dst`` (``force``) walks its folders without following
    links, so nothing lands outside it. ``source`` (the archive or store) is what errors about
    unsafe names point at.
    """
    if single:
        if len(files) != 1 or files[0][1] is not None:
            raise CorruptArchiveError("a single-file model must hold one regular file", source)
        if dst.is_dir():
            dst = dst / safe_relpath(files[0][0], source).rsplit("/", 1)[-1]
        if os.path.lexists(dst) and not force:
            raise OutputExistsError("already exists (use --force to overwrite)", dst)
        if not dst.parent.is_dir():
            raise OutputError("the folder to write into does not exist", dst.parent)
        tmp = temp_sibling(dst)
        try:
            n = write(0, tmp)
            os.chmod(tmp, public_mode(files[0][2] or 0o666))
            os.replace(tmp, dst)
        except OSError as e:
            raise OutputError(f"cannot write the restored model: {e.strerror}", dst) from None
        finally:
            tmp.unlink(missing_ok=True)
        return RestoreSummary(dst, 1, n)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not force:
        raise OutputExistsError("already exists and is not empty (use --force to overwrite)", dst)
    if dst.exists() and not dst.is_dir():
        raise OutputExistsError("exists and is not a folder", dst)
    if not dst.parent.is_dir():
        raise OutputError("the folder to write into does not exist", dst.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".elves-tmp", dir=dst.parent))
    except OSError as e:
        raise OutputError(f"cannot write here: {e.strerror}", dst) from None
    total = 0
    try:
        for i, (path, link, mode) in enumerate(files):
            target = staging / safe_relpath(path, source)
            target.parent.mkdir(parents=True, exist_ok=True)  # our own folder: no links in it but ours
            if link is not None:
                os.symlink(link, target)
            else:
                total += write(i, target)
                os.chmod(target, public_mode(mode or 0o666))
        if not dst.exists():
            os.chmod(staging, public_mode(0o777))
            os.replace(staging, dst)
        else:
            _move_into(staging, dst, [p for p, _, _ in files])
    except OSError as e:
        raise OutputError(f"cannot write the restored model: {e.strerror}", dst) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RestoreSummary(dst, len(files), total)


def _move_into(staging: Path, dst: Path, paths: list[str]) -> None:
    """Move each restored file from ``staging`` to the same place under ``dst``, which exists:
    its folders are opened one level at a time without following links, so a link inside ``dst``
    (to a folder outside it, say) is refused, never written through."""
    root = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for path in paths:
            *folders, name = path.split("/")
            fd = os.dup(root)
            try:
                for k, part in enumerate(folders):
                    try:
                        os.mkdir(part, dir_fd=fd)
                    except FileExistsError:
                        pass
                    try:
                        sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    except OSError:
                        where = dst / "/".join(folders[:k + 1])
                        raise UnsafePathError("is a link or not a folder: refusing to write through it", where) from None
                    os.close(fd)
                    fd = sub
                try:
                    if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise OutputExistsError("is a folder: cannot put a restored file there", dst / path)
                except FileNotFoundError:
                    pass
                os.replace(staging / path, name, dst_dir_fd=fd)
            finally:
                os.close(fd)
    finally:
        os.close(root)
