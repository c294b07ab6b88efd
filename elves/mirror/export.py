"""Exporting a mirrored commit out of the store (:func:`export`): as a plain folder, or into a
Hugging Face cache that huggingface_hub reads offline as if it had downloaded the repo itself.

The cache layout is the one huggingface_hub 2.4 writes (``file_download.py``,
``_snapshot_download.py``, ``_tree_cache.py``) and reads (the same, and
``utils/_cache_manager.py``), under ``{cache}/{models|datasets}--{org}--{name}/``:

- ``blobs/<etag>``: each file's bytes, named by its Hub ETag (the sha256 of an LFS file, else its
  git blob id), as ``_hf_hub_download_to_cache_dir`` names them. Written under a temporary
  ``<etag>.<hex>.incomplete`` name (the client's own, so ``scan_cache_dir`` reports one left by a
  killed export) and renamed into place once checked.
- ``snapshots/<commit>/<path>``: a relative link into ``blobs/`` (``../`` once per folder level),
  as ``_create_symlink`` makes them.
- ``trees/<commit>.json``: the commit's file listing (``write_tree_cache``'s format). Offline,
  ``snapshot_download`` returns a snapshot folder only if every file this listing names is there
  (``_raise_if_incomplete_snapshot``); without it, it cannot tell a partial folder from a whole
  one. It is written first, so that an export cut short leaves a snapshot the client knows to
  be incomplete, never one it takes for whole.
- ``refs/<revision>``: the commit's 40 hex digits, no newline, when the revision is a branch or
  tag (``refs/pr/1`` lands at ``refs/refs/pr/1``); written last, as
  ``_cache_commit_hash_for_specific_revision`` writes it. Offline, ``snapshot_download`` and
  ``hf_hub_download`` read it to turn the revision into a commit.
- ``{cache}/CACHEDIR.TAG``, as every download writes it (``_create_cachedir_tag``).

Everything below the cache folder is opened one level at a time without following links, so a
link planted where a folder or a blob is expected is refused, never written through. A blob
already there is kept, never rewritten, once its bytes hash to its name.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    CorruptArchiveError,
    ElvesError,
    HubNotFoundError,
    OutputError,
    UsageError,
)
from ..index import safe_relpath
from ..model import READ_PIECE
from ..parallel import default_threads
from ..store import Store
from ..store.layout import manifest_at
from ..store.manifests import manifest
from .records import RemoteFile, Snapshot, check_revision, check_type, repo, snapshot

ProgressFn = Callable[[int], None]

# What huggingface_hub writes into CACHEDIR.TAG (_local_folder.CACHEDIR_TAG_CONTENT).
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by huggingface_hub.\n"
    "# For information about cache directory tags, see:\n"
    "#\thttps://bford.info/cachedir/\n"
)
TREE_FORMAT_VERSION = 1   # _tree_cache.TREE_CACHE_FORMAT_VERSION: the client ignores any other


@dataclass
class ExportResult:
    """What :func:`export` did."""

    repo_type: str
    repo_id: str
    revision: str                 # as asked (main when none was)
    commit: str                   # what it resolved to in the mirror
    files: int                    # in the exported commit
    bytes: int                    # their total size
    bytes_written: int            # of file bytes written (a reused blob writes none)
    blobs_reused: int             # blobs the cache already held, checked and kept
    where: Path                   # the folder (``to``), or the snapshot folder in the cache
    seconds: float = 0.0


def export(store: Store, repo_id: str, revision: str | None = None, *, repo_type: str = "model",
           to: str | os.PathLike[str] | None = None, hf_cache: str | os.PathLike[str] | None = None,
           force: bool = False, threads: int | None = None, progress: ProgressFn | None = None) -> ExportResult:
    """Write ``repo_id`` at ``revision`` (a tracked branch or tag, or a stored commit sha; None:
    main) out of ``store``, bit-exact: with ``to``, as a plain folder (a non-empty one is refused
    unless ``force``); with ``hf_cache``, into that Hugging Face cache folder (created if missing),
    where ``snapshot_download`` and ``hf_hub_download`` find it with HF_HUB_OFFLINE=1. Exporting
    into a cache again, or another revision beside one, reuses the blobs it holds.

    ``threads`` decode each file; files go one at a time, so memory stays at a few chunks.
    ``progress`` is handed each piece's byte count, written or checked. HubNotFoundError if the
    mirror holds no such repo or revision.
    """
    t0 = time.perf_counter()
    check_type(repo_type)
    if revision is not None and "." in check_revision(revision).split("/"):
        raise UsageError(f"not a valid revision: {revision!r:.120}")
    if (to is None) == (hf_cache is None):
        raise UsageError("export needs one destination: a folder (--to) or a Hugging Face cache (--hf-cache)")
    rec = repo(store, repo_type, repo_id)
    rev = revision or "main"
    commit = rec.resolve(rev)
    if commit is None:
        tracked = ", ".join(f"{r} ({c[:12]})" for r, c in sorted(rec.refs.items())) or "none"
        raise HubNotFoundError(f"the mirror holds no revision {rev!r} of {repo_id!r}: it tracks {tracked}; "
                               f"a stored commit may also be given by its full sha", store.path)
    snap = snapshot(store, repo_type, repo_id, commit)
    result = ExportResult(repo_type, repo_id, rev, commit, len(snap.files), sum(f.size for f in snap.files), 0, 0,
                          Path())
    if to is not None:
        summary = store.restore(snap.model, to, force=force, threads=threads, progress=progress)
        result.bytes_written, result.where = summary.bytes_written, summary.output
    elif hf_cache is not None:
        _to_cache(store, snap, rev, Path(hf_cache), threads, progress, result)
    result.seconds = time.perf_counter() - t0
    return result


def repo_folder(repo_type: str, repo_id: str) -> str:
    """The repo's folder in a Hugging Face cache (``file_download.repo_folder_name``)."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def _to_cache(store: Store, snap: Snapshot, revision: str, cache: Path, threads: int | None,
              progress: ProgressFn | None, result: ExportResult) -> None:
    where = store.storage.where(manifest_at(snap.model))
    sha256s = {e["path"]: e["sha256"] for e in manifest(store.storage, snap.model)["files"]}
    for f in snap.files:
        safe_relpath(f.path, where)  # each part becomes a folder or link name below the snapshot
        # the store checks every file it decodes against this sha256: equal to the LFS oid, that
        # check is the etag's, with no second hash of the bytes
        if f.lfs_sha256 is not None and sha256s.get(f.path) != f.lfs_sha256:
            raise CorruptArchiveError(f"model {snap.model!r}, file {f.path}: its sha256 is not the Hub's LFS oid "
                                      f"{f.lfs_sha256}", where)
    try:
        cache.mkdir(parents=True, exist_ok=True)   # the cache folder itself may be a link (to another disk)
        root = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise OutputError(f"cannot use it as a Hugging Face cache: {e.strerror}", cache) from None
    name = repo_folder(snap.repo_type, snap.repo_id)
    top = cache / name
    try:
        _write_small(root, "CACHEDIR.TAG", CACHEDIR_TAG.encode(), cache / "CACHEDIR.TAG", replace=False)
        with _folder(root, name, top) as repo_fd:
            with _folder(repo_fd, "trees", top / "trees") as trees:
                _write_small(trees, f"{snap.commit}.json", _tree_listing(snap.files),
                             top / "trees" / f"{snap.commit}.json")
            with _folder(repo_fd, "blobs", top / "blobs") as blobs, \
                    ThreadPoolExecutor(default_threads(threads)) as pool:
                for f in snap.files:
                    _blob(store, snap.model, f, blobs, top / "blobs", pool, progress, result)
                    _link(repo_fd, top, snap.commit, f)
            if revision != snap.commit:
                *folders, last = f"refs/{revision}".split("/")
                with _folders(repo_fd, folders, top) as refs:
                    _write_small(refs, last, snap.commit.encode(), top / "refs" / revision)
    finally:
        os.close(root)
    result.where = top / "snapshots" / snap.commit


def _tree_listing(files: list[RemoteFile]) -> bytes:
    """``trees/<commit>.json`` as ``_tree_cache.write_tree_cache`` writes it, byte for byte."""
    entries: dict[str, dict[str, Any]] = {}
    for f in sorted(files, key=lambda f: f.path):
        entries[f.path] = {"size": f.size, "blob_id": f.blob_id}
        if f.lfs_sha256 is not None:
            entries[f.path].update(lfs_sha256=f.lfs_sha256, lfs_size=f.size)
    return json.dumps({"format_version": TREE_FORMAT_VERSION, "files": entries}, indent=1).encode()


def _blob(store: Store, model: str, f: RemoteFile, blobs: int, where: Path, pool: Executor,
          progress: ProgressFn | None, result: ExportResult) -> None:
    """Put ``f``'s bytes at ``blobs/<etag>``, unless a blob there already holds them.

    A blob already there is hashed before it is kept: its name is only a claim (another tool, a
    copy, a disk may have written it), and reading it costs far less than decoding it. One that
    fails is replaced by renaming a fresh blob over it, never rewritten in place, so that a
    reader holding it open keeps what it had."""
    if _holds(blobs, f, where / f.etag, progress):
        result.blobs_reused += 1
        return
    tmp = f"{f.etag}.{secrets.token_hex(4)}.incomplete"
    digest = f.hasher() if f.lfs_sha256 is None else None
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=blobs)
            with os.fdopen(fd, "wb") as out:
                for piece in store.read_file(model, f.path, pool=pool):
                    out.write(piece)
                    if digest is not None:
                        digest.update(piece)
                    if progress:
                        progress(len(piece))
            if digest is not None and digest.hexdigest() != f.blob_id:
                raise CorruptArchiveError(f"model {model!r}, file {f.path}: its bytes are not git blob {f.blob_id}",
                                          store.storage.where(manifest_at(model)))
            os.replace(tmp, f.etag, src_dir_fd=blobs, dst_dir_fd=blobs)
        except OSError as e:
            raise OutputError(f"cannot write the blob of {f.path}: {e.strerror}", where / f.etag) from None
    except BaseException:
        _unlink(blobs, tmp)
        raise
    result.bytes_written += f.size


def _holds(blobs: int, f: RemoteFile, where: Path, progress: ProgressFn | None) -> bool:
    """Whether ``blobs/<etag>`` is a file of ``f``'s bytes; OutputError if it is a link or not a file."""
    try:
        # O_NONBLOCK: a fifo planted there must not hang the open
        fd = os.open(f.etag, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=blobs)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _refused(e, where, "a file") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError("is not a file: refusing to take it for a blob", where)
        if st.st_size != f.size:
            return False
        digest = f.hasher()
        while piece := fh.read(READ_PIECE):
            digest.update(piece)
            if progress:
                progress(len(piece))
    return bool(digest.hexdigest() == f.etag)


def _link(repo_fd: int, top: Path, commit: str, f: RemoteFile) -> None:
    """``snapshots/<commit>/<path>``: a relative link to its blob (one already right is kept)."""
    *folders, name = f.path.split("/")
    target = "../" * (len(folders) + 2) + f"blobs/{f.etag}"
    where = top / "snapshots" / commit / f.path
    with _folders(repo_fd, ["snapshots", commit, *folders], top) as fd:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OutputError(f"cannot look at it: {e.strerror}", where) from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError("is a folder: cannot put the file's link there", where)
        if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=fd) == target:
            return
        # a wrong link, or a copy of the file, is replaced by renaming the right link over it
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.symlink(target, tmp, dir_fd=fd)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as e:
            _unlink(fd, tmp)
            raise OutputError(f"cannot link it to its blob: {e.strerror}", where) from None


def _write_small(fd: int, name: str, data: bytes, where: Path, replace: bool = True) -> None:
    """File ``name`` of folder ``fd`` holding ``data``, written under a temporary name and renamed
    into place; left alone if it already holds them (or, without ``replace``, if it exists)."""
    try:
        old = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ELOOP:  # a link is replaced by the rename below, never followed
            raise OutputError(f"cannot read it: {e.strerror}", where) from None
    else:
        with os.fdopen(old, "rb") as fh:
            st = os.fstat(old)
            if stat.S_ISDIR(st.st_mode):
                raise OutputError("is a folder: cannot write a file there", where)
            if stat.S_ISREG(st.st_mode) and (not replace or (st.st_size == len(data) and fh.read() == data)):
                return
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=fd)
        with os.fdopen(out, "wb") as fh:
            fh.write(data)
        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except OSError as e:
        _unlink(fd, tmp)
        raise OutputError(f"cannot write it: {e.strerror}", where) from None


@contextmanager
def _folder(parent: int, name: str, where: Path) -> Iterator[int]:
    """Folder ``name`` of the open folder ``parent``, made if missing and opened without
    following a link; OutputError if it is a link or not a folder."""
    try:
        os.mkdir(name, 0o777, dir_fd=parent)
    except FileExistsError:
        pass
    except OSError as e:
        raise OutputError(f"cannot make the folder: {e.strerror}", where) from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as e:
        raise _refused(e, where, "a folder") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _folders(parent: int, names: list[str], top: Path) -> Iterator[int]:
    """The folder ``top/names[0]/names[1]/...`` (``parent`` is ``top``), each level made if
    missing and opened as :func:`_folder` opens it."""
    if not names:
        yield parent
        return
    with _folder(parent, names[0], top / names[0]) as fd, _folders(fd, names[1:], top / names[0]) as inner:
        yield inner


def _refused(e: OSError, where: Path, expected: str) -> ElvesError:
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return OutputError(f"is a link or not {expected}: refusing to write through it", where)
    return OutputError(f"cannot open it: {e.strerror}", where)


def _unlink(fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
