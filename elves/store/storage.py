"""The store's I/O, behind one small interface: :class:`Storage`, and :class:`LocalStorage`, a
folder on a local disk (object storage is :class:`elves.store.remote.FsspecStorage`).

Keys are '/'-separated names relative to the store's root (``objects/ab/<key>``,
``models/x.json``); a key ending in '/' is a folder (a prefix). What the store needs from its
storage is little: ranged reads of an object, whole reads of small files, files that appear whole
or not at all (written under ``tmp/``, then moved into place), listing, deleting, and one writer
at a time. An object store can give all of it (a ranged GET, a PUT, a conditional write or a lease).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Protocol

from ..errors import CorruptArchiveError, OutputError, StoreError
from ..parallel import SyncBehind
from .layout import ADDING, LOCK


class Entry(NamedTuple):
    """One entry of a listing: a file (its size, and when it was written, in seconds since the
    epoch) or a folder (its key ends in '/'; 0 and 0)."""

    key: str
    size: int
    mtime: float = 0.0


class Blob(Protocol):
    """A file opened for ranged reads."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
        ...

    def close(self) -> None: ...


class Upload(Protocol):
    """A file being written under a temporary key (``temp``), invisible at its own key until
    :meth:`Storage.commit` moves it there."""

    @property
    def temp(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None:
        """Everything written is durable under ``temp``."""
        ...

    def abort(self) -> None:
        """Discard it, as far as a failing storage lets us."""
        ...


class Storage(Protocol):
    """Where a store's files live. Failures are ElvesErrors naming :meth:`where` the key is: a
    read that finds something that is not a plain file is a CorruptArchiveError, a write that
    fails an OutputError; a missing key is FileNotFoundError."""

    #: How long (seconds) ``gc`` keeps an object nothing references yet: a writer that lost the
    #: lock without knowing it may still be about to name it (0 where the lock cannot be lost).
    gc_grace: float

    def where(self, key: str) -> str:
        """How messages name ``key`` (``""``: the store itself)."""
        ...

    def check(self, folders: Iterable[str]) -> None:
        """Refuse a store where writing under ``folders`` would go elsewhere, or that lacks them."""
        ...

    def open(self, key: str, what: str) -> Blob:
        """``key`` opened for ranged reads; ``what`` names it in errors."""
        ...

    def read_small(self, key: str, what: str, limit: int) -> bytes:
        """The whole of ``key``, refused when it is over ``limit`` bytes."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[Entry]:
        """The entries right under folder ``prefix``: files, and folders (never walked into)."""
        ...

    def upload(self, key: str) -> Upload:
        """A new file, to be committed at ``key``."""
        ...

    def commit(self, temp: str, key: str) -> None:
        """Move the finished upload at ``temp`` to ``key`` in one step (replacing what is there);
        ``temp`` is discarded if that fails."""
        ...

    def sync(self, folders: Iterable[str]) -> None:
        """The commits and deletions in ``folders`` are durable."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` durably, whole or not at all."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``: a file, or a folder and all under it; nothing if it is absent."""
        ...

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The writers' lock: one writer at a time, across processes."""
        ...

    def adding(self, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        """Held, shared, by a writer that writes objects before it takes :meth:`locked` to commit
        them, and ``exclusive`` by gc and verify, which would take those objects for garbage; taken
        before :meth:`locked`, never inside it. A flock on a local disk, where gc keeps no young
        object; nothing on object storage, where gc's grace period keeps them (``gc_grace``)."""
        ...

    def scratch(self, folder: str) -> Path:
        """A folder on the local disk standing for ``folder`` (a key ending in '/'), for a
        writer's files in flight; :meth:`delete` of ``folder`` removes it too."""
        ...


@contextmanager
def _writing(where: str) -> Iterator[None]:
    """An OSError while writing (a full disk, a quota, a read-only or forbidden folder, a
    file-size limit) as OutputError naming ``where``."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write to the store: {e.strerror or e}", where) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlob:
    """A local file opened for ranged reads. Its descriptor may be given up between reads
    (:class:`_Descriptors`) and the file opened again by ``opener``, which must give the same
    file: one that changed meanwhile (another inode, size or time) is a StoreError."""

    def __init__(self, opener: Callable[[], int], where: str):
        self._opener = opener
        self._where = where
        self._fd: int | None = opener()
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        self._readers = 0
        self._closed = False
        _DESCRIPTORS.idle(self)

    def _reopen(self) -> int:
        try:
            fd = self._opener()
        except FileNotFoundError:
            raise StoreError("was removed while it was being read", self._where) from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            os.close(fd)
            raise StoreError("changed while it was being read", self._where)
        return fd

    def read(self, offset: int, length: int) -> bytes:
        fd = _DESCRIPTORS.take(self)
        try:
            return os.pread(fd, length, offset)
        finally:
            _DESCRIPTORS.give_back(self)

    def close(self) -> None:
        _DESCRIPTORS.close(self)


class _Descriptors:
    """The descriptors of the open file blobs that no thread is reading: at most
    ``LIMIT``, the least recently read closed first (and opened again at their next read). A
    GPU load opens every object of a model, and a delta's base objects besides, which can be
    more than the 1024 descriptors a process commonly may hold."""

    LIMIT = 128

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[FileBlob, None] = OrderedDict()  # least recently read first

    def take(self, blob: FileBlob) -> int:
        with self._lock:
            if blob._closed:
                raise ValueError("read of a closed blob")
            if blob._fd is None:
                blob._fd = blob._reopen()
            self._idle.pop(blob, None)
            blob._readers += 1
            return blob._fd

    def give_back(self, blob: FileBlob) -> None:
        with self._lock:
            blob._readers -= 1
            if blob._readers == 0:
                self._rest(blob)

    def idle(self, blob: FileBlob) -> None:
        with self._lock:
            self._rest(blob)

    def _rest(self, blob: FileBlob) -> None:
        if blob._closed:  # closed while another thread read it: that read is over now
            self._release(blob)
            return
        self._idle[blob] = None
        while len(self._idle) > self.LIMIT:
            self._release(next(iter(self._idle)))

    def _release(self, blob: FileBlob) -> None:
        self._idle.pop(blob, None)
        if blob._fd is not None:
            os.close(blob._fd)
            blob._fd = None

    def close(self, blob: FileBlob) -> None:
        with self._lock:
            blob._closed = True
            if blob._readers == 0:
                self._release(blob)


_DESCRIPTORS = _Descriptors()


class _LocalUpload:
    def __init__(self, storage: LocalStorage, key: str, prefix: str):
        self.where = storage.where(key)
        with _writing(self.where):
            fd, name = tempfile.mkstemp(prefix=prefix, dir=storage.root / "tmp")
        self.f = os.fdopen(fd, "wb")
        self.sync = SyncBehind(self.f)
        self.path = Path(name)
        self.temp = f"tmp/{self.path.name}"

    def write(self, data: bytes) -> None:
        with _writing(self.where):
            self.f.write(data)
            self.sync.wrote(len(data))

    def finish(self) -> None:
        with _writing(self.where):
            self.sync.finish()
            self.f.close()

    def abort(self) -> None:
        self.sync.close()
        try:
            self.f.close()
        except OSError:  # the buffered rest cannot be written (a full disk): it is not wanted
            pass
        self.path.unlink(missing_ok=True)


class LocalStorage:
    """A store in a local folder. Reads follow no link below the root (a link planted in a store
    shared with others must not make elves read, or later delete, what lies outside it), refuse
    FIFOs and devices, and take no lock; writers hold an exclusive flock on ``lock``, which the
    kernel releases when its holder dies: nothing can still be writing once another writer has it."""

    gc_grace = 0.0

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    @classmethod
    def create(cls, root: str | os.PathLike[str], folders: Iterable[str]) -> LocalStorage:
        """An empty store folder at ``root`` (a new or empty folder) with ``folders`` and the lock."""
        p = Path(root)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise StoreError("already exists and is not an empty folder", p)
        try:
            p.mkdir(parents=True, exist_ok=True)
            for sub in folders:
                (p / sub).mkdir(exist_ok=True)
            (p / LOCK).touch()
        except OSError as e:
            raise OutputError(f"cannot create the store: {e.strerror}", p) from None
        return cls(p)

    def where(self, key: str) -> str:
        return str(self.root / key)

    def check(self, folders: Iterable[str]) -> None:
        for sub in folders:  # a link here would send writes elsewhere
            try:
                mode = os.lstat(self.root / sub).st_mode
            except FileNotFoundError:
                raise StoreError(f"not a complete store: {sub} is missing", self.root) from None
            if not stat.S_ISDIR(mode):
                raise StoreError("is a symbolic link or not a folder: the store follows no links", self.root / sub)

    def _open_fd(self, key: str, what: str) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        *folders, name = key.rstrip("/").split("/")
        try:
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for part in folders:
                    sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                    os.close(dfd)
                    dfd = sub
                fd = os.open(name, flags, dir_fd=dfd)
            finally:
                os.close(dfd)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptArchiveError(f"{what} is a symbolic link or lies in one: the store follows no links",
                                          self.where(key)) from None
            raise StoreError(f"cannot read {what}: {e.strerror}", self.where(key)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptArchiveError(f"{what} is not a regular file", self.where(key))
        return fd

    def open(self, key: str, what: str) -> Blob:
        return FileBlob(functools.partial(self._open_fd, key, what), self.where(key))

    def read_small(self, key: str, what: str, limit: int) -> bytes:
        with os.fdopen(self._open_fd(key, what), "rb") as f:
            blob = f.read(limit + 1)
        if len(blob) > limit:
            raise CorruptArchiveError(f"{what} is over {limit} bytes: not one elves wrote", self.where(key))
        return blob

    def exists(self, key: str) -> bool:
        return os.path.lexists(self.root / key)

    def list(self, prefix: str) -> Iterator[Entry]:
        with os.scandir(self.root / prefix) as it:
            for d in it:
                if d.is_dir(follow_symlinks=False):
                    yield Entry(f"{prefix}{d.name}/", 0)
                else:
                    st = d.stat(follow_symlinks=False)
                    yield Entry(f"{prefix}{d.name}", st.st_size, st.st_mtime)

    def upload(self, key: str) -> Upload:
        return _LocalUpload(self, key, "obj.")

    def commit(self, temp: str, key: str) -> None:
        tmp, final = self.root / temp, self.root / key
        try:
            with _writing(str(final)):
                self._folders(key)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _folders(self, key: str) -> None:
        """Make the folders ``key`` lies in, below the store's top folders, refusing links."""
        *folders, _ = key.split("/")
        for i in range(len(folders)):
            sub = self.root.joinpath(*folders[:i + 1])
            try:
                os.mkdir(sub)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(sub).st_mode):
                raise StoreError("is a symbolic link or not a folder: the store writes through no links", sub)

    def sync(self, folders: Iterable[str]) -> None:
        for folder in folders:
            with _writing(self.where(folder)):
                _fsync_dir(self.root / folder)

    def put(self, key: str, data: bytes) -> None:
        dst = self.root / key
        with _writing(str(dst)):
            self._folders(key)
            fd, name = tempfile.mkstemp(prefix="json.", dir=self.root / "tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(name, dst)
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
            _fsync_dir(dst.parent)

    def delete(self, key: str) -> None:
        p = self.root / key
        with _writing(str(p)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self._flock(LOCK, fcntl.LOCK_EX)

    def adding(self, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        return self._flock(ADDING, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    @contextmanager
    def _flock(self, name: str, how: int) -> Iterator[None]:
        try:
            fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open the store's lock: {e.strerror}", self.root / name) from None
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # releases the lock

    def scratch(self, folder: str) -> Path:
        self.put(f"{folder}.keep", b"")  # makes its folders, refusing links
        return self.root / folder
