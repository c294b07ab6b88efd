"""Archive -> bytes: decode streams chunk by chunk, check them, and write files or hand out tensors.

Every chunk's checksum is checked before it is decoded and every stream's content hash after, so
a damaged archive raises :class:`~elves.errors.CorruptArchiveError` naming the tensor or file,
never returns wrong bytes. Restored files are written under temporary names and renamed into
place only when complete and verified.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash

from .archive import ArchiveReader, Stream, safe_relpath, temp_sibling
from .codecs import Pipeline
from .encoder import INLINE_BYTES, default_threads, ordered_map
from .errors import ArchiveError, CorruptArchiveError, OutputError, OutputExistsError
from .references import RefReader, decode_chunk

ProgressFn = Callable[[int], None]


@dataclass
class RestoreSummary:
    """What :func:`elves.restore` did."""

    output: Path
    files: int
    bytes_written: int


def attach_base(reader: ArchiveReader, base: str | os.PathLike[str] | None) -> None:
    """Check ``base`` against the base model the archive needs and give it to ``reader``
    (``bitx.base.attach_base``; bitx is imported here, not at the top, to keep imports one way)."""
    if reader.base_needed or base is not None:
        from bitx.base import attach_base as attach

        attach(reader, base)


def stream_label(reader: ArchiveReader, index: int) -> str:
    """How errors name a stream: the tensor (or file) it holds."""
    for entry in reader.files:
        for t in entry["tensors"]:
            if t[3] >= 0 and entry["segments"][t[3]] == index:
                return f"tensor {t[0]!r} in {entry['path']}"
        if index in entry["segments"]:
            return f"{entry['path']} (segment {entry['segments'].index(index)})"
    return f"stream {index}"


def iter_stream(reader: ArchiveReader, index: int, pool: Executor, window: int) -> Iterator[np.ndarray]:
    """The decoded chunks of stream ``index``, in order, each checked; then the stream's hash."""
    stream = reader.streams[index]
    pipeline = Pipeline.from_config(stream.pipeline)
    ref_of: Callable[[int], np.ndarray] | None = None
    if stream.ref is not None:  # coded against another stream of this archive
        ref_reader = RefReader(reader, reader.streams[stream.ref])
        starts = np.concatenate(([0], np.cumsum([c[2] for c in stream.chunks], dtype=np.int64)))

        def from_ref(i: int) -> np.ndarray:
            return ref_reader.reference(stream.ref_map, int(starts[i]), int(starts[i + 1]))
        ref_of = from_ref
    elif pipeline.ref_codec is not None:  # BitX: coded against a tensor of the base model
        from bitx.base import chunk_refs

        ref_of = chunk_refs(reader, stream, pipeline)

    def decode(i: int) -> np.ndarray:
        try:
            ref = ref_of(i) if ref_of is not None else None  # the reference's bytes here
            out = decode_chunk(reader, stream, pipeline, i, ref)
        except ArchiveError as e:  # name the tensor only when something is wrong: it costs a scan
            raise type(e)(f"{stream_label(reader, index)}: chunk {i}: {e.message}", reader.path) from None
        return out

    h = xxhash.xxh3_128()
    total = 0
    for chunk in ordered_map(pool, decode, range(len(stream.chunks)), window,
                             inline=lambda i: stream.chunks[i][2] < INLINE_BYTES):
        h.update(chunk)
        total += chunk.shape[0]
        yield chunk
    if total != stream.nbytes or h.hexdigest() != stream.expected_hash:  # lossy: the decoded bytes' hash
        raise CorruptArchiveError(f"{stream_label(reader, index)}: decoded bytes do not match the stored hash",
                                  reader.path)


def read_stream(reader: ArchiveReader, index: int, pool: Executor, window: int) -> np.ndarray:
    """A whole stream as one uint8 array (for tensors handed to the caller)."""
    stream: Stream = reader.streams[index]
    out = np.empty(stream.nbytes, dtype=np.uint8)
    pos = 0
    for chunk in iter_stream(reader, index, pool, window):
        out[pos:pos + chunk.shape[0]] = chunk
        pos += chunk.shape[0]
    return out


def file_chunks(reader: ArchiveReader, entry: dict, pool: Executor, window: int,
                check_sha256: bool = True) -> Iterator[np.ndarray]:
    """The decoded bytes of one file, chunk by chunk; raises once the end shows a wrong sha256.

    Every stream's xxh3-128 is checked either way, and the streams tile the file, so the sha256
    (about 1.5 GB/s, often slower than decoding) only adds the check that the file is what was
    hashed at compress time: ``verify`` does it, ``restore`` skips it. A lossy file (``elf``)
    decodes to other bytes than the original the sha256 is of: its decoded streams' hashes are
    the check.
    """
    sha = hashlib.sha256() if check_sha256 and not entry.get("lossy") else None
    size = 0
    for index in entry["segments"]:
        for chunk in iter_stream(reader, index, pool, window):
            if sha is not None:
                sha.update(chunk)
            size += chunk.shape[0]
            yield chunk
    if size != entry["size"] or (sha is not None and sha.hexdigest() != entry["sha256"]):
        raise CorruptArchiveError(f"{entry['path']}: restored bytes do not match the stored sha256", reader.path)


def _write_file(reader: ArchiveReader, entry: dict, target: Path, pool: Executor, window: int,
                progress: ProgressFn | None) -> int:
    """Write one file's bytes to ``target`` (a temporary name); return the byte count."""
    try:
        with open(target, "wb") as out:
            for chunk in file_chunks(reader, entry, pool, window, check_sha256=False):
                out.write(chunk)
                if progress:
                    progress(chunk.shape[0])
    except OSError as e:
        raise OutputError(f"cannot write {entry['path']}: {e.strerror}", target) from None
    return entry["size"]


def restore(
    archive: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    threads: int | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    base: str | os.PathLike[str] | None = None,
) -> RestoreSummary:
    """Restore the model in ``archive`` to ``dst``: a folder, or a file path for a single-file model.

    Files are written under temporary names and renamed into place once verified, so ``dst``
    never holds a half-written file. An existing ``dst`` is refused unless ``force``.

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
        single = reader.source_kind == "file" and len(reader.files) == 1
        return write_files(dst, reader.files, single, force, reader.path,
                           lambda entry, target: _write_file(reader, entry, target, pool, window, progress))


def write_files(dst: Path, entries: list[dict], single: bool, force: bool, source: Path,
                write: Callable[[dict, Path], int]) -> RestoreSummary:
    """Put a restored model at ``dst``: ``write(entry, target)`` writes the file of ``entry`` (an
    index entry: ``path``, ``size``) to the temporary path ``target`` and returns its size.

    A single-file model (``single``) goes to ``dst``, or into it when ``dst`` is a folder; a
    folder model is written to a staging folder next to ``dst`` and moved in once every file is
    complete. ``source`` (the archive or store) is what errors about unsafe names point at.
    """
    if single:
        entry = entries[0]
        if dst.is_dir():
            dst = dst / safe_relpath(entry["path"], source).rsplit("/", 1)[-1]
        if dst.exists() and not force:
            raise OutputExistsError("already exists (use --force to overwrite)", dst)
        if not dst.parent.is_dir():
            raise OutputError("the folder to write into does not exist", dst.parent)
        tmp = temp_sibling(dst)
        try:
            n = write(entry, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return RestoreSummary(dst, 1, n)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not force:
        raise OutputExistsError("already exists and is not empty (use --force to overwrite)", dst)
    if dst.exists() and not dst.is_dir():
        raise OutputExistsError("exists and is not a folder", dst)
    parent = dst.parent if dst.parent.exists() else None
    if parent is None:
        raise OutputError("the folder to write into does not exist", dst.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".elves-tmp", dir=parent))
    total = 0
    try:
        for entry in entries:
            rel = safe_relpath(entry["path"], source)
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            total += write(entry, target)
        if not dst.exists():
            os.replace(staging, dst)
        else:
            for entry in entries:
                final = dst / entry["path"]
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / entry["path"], final)
    except OSError as e:
        raise OutputError(f"cannot write the restored model: {e.strerror}", dst) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RestoreSummary(dst, len(entries), total)
