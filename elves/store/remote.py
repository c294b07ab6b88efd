"""A store on object storage: :class:`FsspecStorage`, the :class:`~elves.store.storage.Storage` of
an fsspec URL (``s3://bucket/prefix``; ``gs://``, ``az://`` and ``memory://`` through fsspec).

Keys map to ``<url>/<key>``. A file is written to a local temporary file, then PUT at its key in
one request (a multipart upload for a large one), which S3 makes visible whole or not at all;
reads are ranged GETs, through an optional local read-through cache. Object storage has no
flock: writers take turns on a lease object (:class:`Lease`) instead, taken and renewed with
the backend's conditional writes (:data:`CONDITIONAL`: S3's and Azure's If-None-Match and
If-Match, GCS's generation match). docs/FORMAT.md ("Object storage") says why that is safe.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import xxhash

from ..errors import CorruptArchiveError, ElvesError, OutputError, StoreError
from .layout import LOCK
from .storage import Blob, Entry, FileBlob, Upload

ENV_CACHE = "ELVES_CACHE"          # a folder for the read-through cache of object ranges
ENV_STAGING = "ELVES_STAGING"      # where a remote store's files in flight lie on this machine
ENV_LEASE_TTL = "ELVES_LEASE_TTL"  # seconds a lease lasts unrenewed (tests shorten it)
LEASE_TTL = 60.0
GC_GRACE = 3600.0
S3 = ("s3", "s3a")


def _why(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs's options with what a command needs: a wrong endpoint or a dead network fails in
    seconds (bounded connects and retries) instead of hanging, and no listing is cached (other
    writers change the store under us)."""
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config.setdefault("connect_timeout", 5)
    config.setdefault("read_timeout", 60)
    config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
    out["config_kwargs"] = config
    out.setdefault("use_listings_cache", False)
    out.setdefault("skip_instance_cache", True)
    return out


def _conflict(e: BaseException) -> bool:
    """Whether a conditional write failed on its condition (the object is there, or changed):
    botocore's error codes, azure-core's and google-api-core's HTTP statuses, or FileExistsError
    (what s3fs, gcsfs and adlfs make of some)."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    status = getattr(e, "status_code", None) or getattr(e, "code", None)
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or status in (409, 412)


class Conditional(Protocol):
    """Conditional writes of one small object (the lease), as a backend offers them: each write
    lands only if the object is as the writer last saw it, atomically on the server. ``tag`` is
    what tells versions apart (S3's and Azure's ETag, GCS's generation). A write whose condition
    fails raises an exception that :func:`_conflict` recognises."""

    def create(self, data: bytes) -> str:
        """Write ``data`` if there is no object yet; the new tag."""
        ...

    def replace(self, data: bytes, tag: str) -> str:
        """Write ``data`` if the object's tag is still ``tag``; the new tag."""
        ...

    def current(self) -> tuple[str, bytes]:
        """The object's tag and content as they are now (FileNotFoundError if there is none)."""
        ...


class _S3Conditional:
    """S3's conditional PUTs: ``If-None-Match: *`` and ``If-Match: <ETag>``, through s3fs."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> str:
        return str(self.fs.pipe_file(self.path, data, IfNoneMatch="*")["ETag"])

    def replace(self, data: bytes, tag: str) -> str:
        return str(self.fs.pipe_file(self.path, data, IfMatch=tag)["ETag"])

    def current(self) -> tuple[str, bytes]:
        tag = str(self.fs.info(self.path)["ETag"])
        return tag, bytes(self.fs.cat_file(self.path))


class _AzureConditional:
    """Azure Blob's conditional PUTs (``If-None-Match: *``, ``If-Match: <ETag>``): adlfs hands
    ``overwrite``, ``etag`` and ``match_condition`` to azure-storage-blob's ``upload_blob``."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.if_not_modified = importlib.import_module("azure.core").MatchConditions.IfNotModified

    def create(self, data: bytes) -> str:
        return _etag(self.fs.pipe_file(self.path, data, overwrite=False)["etag"])

    def replace(self, data: bytes, tag: str) -> str:
        out = self.fs.pipe_file(self.path, data, overwrite=True, etag=tag, match_condition=self.if_not_modified)
        return _etag(out["etag"])

    def current(self) -> tuple[str, bytes]:
        tag = _etag(self.fs.info(self.path)["etag"])
        return tag, bytes(self.fs.cat_file(self.path))


def _etag(value: Any) -> str:
    """An Azure ETag as its requests want it: quoted (adlfs's listings quote it, uploads may not)."""
    return f'"{str(value).strip(chr(34))}"'


class _GcsConditional:
    """GCS's generation preconditions (``ifGenerationMatch``: 0 for "none yet", else the
    generation last seen), through google-cloud-storage, which gcsfs depends on; gcsfs's own
    writes offer only the first. It uses gcsfs's project and credentials (and honours
    STORAGE_EMULATOR_HOST, as gcsfs does)."""

    def __init__(self, fs: Any, path: str):
        storage = importlib.import_module("google.cloud.storage")
        self.not_found = importlib.import_module("google.api_core.exceptions").NotFound
        bucket, key = path.split("/", 1)
        creds = getattr(getattr(fs, "credentials", None), "credentials", None)
        client = storage.Client(project=getattr(fs, "project", None) or None, credentials=creds)
        self.blob = client.bucket(bucket).blob(key)

    def _write(self, data: bytes, generation: int) -> str:
        self.blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        return str(self.blob.generation)

    def create(self, data: bytes) -> str:
        return self._write(data, 0)

    def replace(self, data: bytes, tag: str) -> str:
        return self._write(data, int(tag))

    def current(self) -> tuple[str, bytes]:
        try:
            self.blob.reload()
            data: bytes = self.blob.download_as_bytes(if_generation_match=self.blob.generation)
        except self.not_found:
            raise FileNotFoundError(self.blob.name) from None
        return str(self.blob.generation), data


class _MemoryConditional:
    """memory:// lives in this process: its conditional writes are compare-and-set under a lock
    (what a server does atomically), with a counter for a tag. With it, the lease protocol
    itself runs, and is tested, on memory://."""

    _guard = threading.Lock()
    _tags: dict[str, int] = {}

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def _write(self, data: bytes, expect: str | None) -> str:
        with self._guard:
            now = self._tags.get(self.path) if self.fs.exists(self.path) else None
            if (None if now is None else str(now)) != expect:
                raise FileExistsError(self.path)
            self.fs.pipe_file(self.path, data)
            tag = self._tags[self.path] = (now or 0) + 1
        return str(tag)

    def create(self, data: bytes) -> str:
        return self._write(data, None)

    def replace(self, data: bytes, tag: str) -> str:
        return self._write(data, tag)

    def current(self) -> tuple[str, bytes]:
        with self._guard:
            if not self.fs.exists(self.path):
                raise FileNotFoundError(self.path)
            return str(self._tags.get(self.path, 0)), bytes(self.fs.cat_file(self.path))


CONDITIONAL: dict[str, Callable[[Any, str], Conditional]] = {
    "s3": _S3Conditional, "s3a": _S3Conditional, "gs": _GcsConditional, "gcs": _GcsConditional,
    "az": _AzureConditional, "abfs": _AzureConditional, "abfss": _AzureConditional, "memory": _MemoryConditional,
}
"""The backends whose writers take turns on the lease, by URL scheme: those with conditional writes."""


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("LastModified", info.get("created", info.get("mtime", 0.0)))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else 0.0


class _RemoteBlob:
    """An object opened for ranged GETs; each range read once through the cache, if any (keyed
    by the object's ETag, since repack replaces an object by a delta under the same key)."""

    def __init__(self, storage: FsspecStorage, key: str, what: str, size: int, etag: str):
        self.storage, self.key, self.what, self.size = storage, key, what, size
        self.cache = (storage.cache / key / xxhash.xxh3_64_hexdigest(etag.encode())
                      if storage.cache is not None and etag else None)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        cached = self.cache / f"{offset}-{end}" if self.cache is not None else None
        if cached is not None:
            try:
                return cached.read_bytes()
            except OSError:
                pass
        st = self.storage
        with st.reading(self.key, self.what):
            data: bytes = st.fs.cat_file(st.path_of(self.key), start=offset, end=end)
        if cached is not None:
            _cache_put(cached, data)
        return data

    def close(self) -> None:
        pass


def _cache_put(path: Path, data: bytes) -> None:
    """Keep ``data`` at ``path`` for later reads; the cache is an optimisation, so a full or
    read-only cache folder is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


class _RemoteUpload:
    """A file to be PUT: written to a local temporary file, which the storage reads as ``temp``
    until :meth:`FsspecStorage.commit` sends it."""

    def __init__(self, storage: FsspecStorage, key: str):
        self.storage, self.where = storage, storage.where(key)
        folder = storage.local / "uploads"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="obj.", dir=folder)
        except OSError as e:
            raise OutputError(f"cannot stage an upload: {e.strerror or e}", folder) from None
        self.f = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.temp = f"tmp/upload.{self.path.name}"
        storage.pending[self.temp] = self.path

    def write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise OutputError(f"cannot stage an upload: {e.strerror or e}", self.path) from None

    def finish(self) -> None:
        try:
            self.f.close()
        except OSError as e:
            raise OutputError(f"cannot stage an upload: {e.strerror or e}", self.path) from None

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass
        self.storage.drop(self.temp)


class FsspecStorage:
    """A store at an fsspec URL. Failures are ElvesErrors naming the URL: an object store that
    cannot be reached, or that refuses the credentials, a StoreError within seconds.

    ``storage_options`` go to the fsspec filesystem (for s3://, s3fs's: ``endpoint_url``,
    ``key``, ``secret``, ``client_kwargs``...; by default the standard AWS variables and files).
    ``cache_dir`` (or ELVES_CACHE) keeps the object ranges read on the local disk. Files in
    flight (uploads, a staged add's scratch) lie under ELVES_STAGING, by default
    ``~/.cache/elves/staging/<xxh3 of the URL>/``, so that a resumed add on this machine finds them.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, lease_ttl: float | None = None):
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        options = dict(storage_options or {})
        if self.protocol in S3:
            options = _s3_options(options)
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:
            raise StoreError(f"a store on {self.protocol}:// needs {e.name or 'an fsspec backend'}: "
                             "pip install 'elves[s3]'", self.url) from None
        except (ValueError, TypeError) as e:
            raise StoreError(f"cannot open the store: {_why(e)}", self.url) from None
        self.root = str(root).rstrip("/")
        tag = xxhash.xxh3_64_hexdigest(self.url.encode())
        self.local = Path(os.environ.get(ENV_STAGING) or Path.home() / ".cache" / "elves" / "staging") / tag
        cache = cache_dir if cache_dir is not None else os.environ.get(ENV_CACHE)
        self.cache = Path(cache) / tag if cache else None
        self.ttl = lease_ttl or float(os.environ.get(ENV_LEASE_TTL) or LEASE_TTL)
        # memory:// lives in this process: a writer cannot stall unknown to the gc beside it
        self.gc_grace = 0.0 if self.protocol == "memory" else GC_GRACE
        self.pending: dict[str, Path] = {}   # uploads not yet committed, by their temp key
        self.lease: Lease | None = None

    @classmethod
    def create(cls, url: str, storage_options: dict[str, Any] | None = None) -> FsspecStorage:
        """An empty store at ``url``: nothing may lie under it yet; an S3 bucket must exist."""
        st = cls(url, storage_options)
        with st.reading("", "the store's location"):
            if st.protocol in S3:
                bucket = st.root.split("/", 1)[0]
                if not st.fs.exists(bucket):
                    raise StoreError(f"the bucket {bucket!r} does not exist: create it first", st.url)
        if next(st.list(""), None) is not None:
            raise StoreError("already exists and is not empty", st.url)
        return st

    def path_of(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def where(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    @contextmanager
    def reading(self, key: str, what: str) -> Iterator[None]:
        """A backend's failure to read ``key`` as a StoreError naming it (missing: FileNotFoundError)."""
        try:
            yield
        except (FileNotFoundError, ElvesError):
            raise
        except PermissionError as e:
            raise StoreError(f"access denied reading {what}: check the credentials ({_why(e)})",
                             self.where(key)) from None
        except Exception as e:  # noqa: BLE001 (a backend's errors come in every kind: botocore's, aiohttp's)
            raise StoreError(f"cannot read {what}: {_why(e)}", self.where(key)) from None

    @contextmanager
    def writing(self, key: str) -> Iterator[None]:
        """A backend's failure to write ``key`` as an OutputError naming it."""
        try:
            yield
        except ElvesError:
            raise
        except PermissionError as e:
            raise OutputError(f"access denied writing to the store: check the credentials ({_why(e)})",
                              self.where(key)) from None
        except Exception as e:  # noqa: BLE001 (as in reading)
            raise OutputError(f"cannot write to the store: {_why(e)}", self.where(key)) from None

    def check(self, folders: Iterable[str]) -> None:
        """Nothing to check: folders are key prefixes, and an object store has no links."""

    def _info(self, key: str) -> dict[str, Any]:
        """A file's type, size and ETag (FileNotFoundError if it is missing). On S3 that is one
        HEAD: s3fs's ``info`` LISTs after a miss, to find a folder of that name, which no key of
        a store is."""
        path = self.path_of(key)
        if self.protocol not in S3:
            return dict(self.fs.info(path))
        from fsspec.asyn import sync
        bucket, name, _ = self.fs.split_path(path)
        out = sync(self.fs.loop, self.fs._call_s3, "head_object", Bucket=bucket, Key=name)
        return {"type": "file", "size": int(out["ContentLength"]), "ETag": str(out.get("ETag", ""))}

    def open(self, key: str, what: str) -> Blob:
        local = self.pending.get(key)
        if local is not None:
            return FileBlob(functools.partial(os.open, local, os.O_RDONLY), str(local))
        with self.reading(key, what):
            info = self._info(key)
        if info.get("type") != "file":
            raise CorruptArchiveError(f"{what} is not a file", self.where(key))
        return _RemoteBlob(self, key, what, int(info["size"]), str(info.get("ETag") or info.get("etag") or ""))

    def read_small(self, key: str, what: str, limit: int) -> bytes:
        path = self.path_of(key)
        with self.reading(key, what):
            info = self._info(key)
            if info.get("type") != "file":
                raise CorruptArchiveError(f"{what} is not a file", self.where(key))
            size = int(info["size"])
            if size > limit:
                raise CorruptArchiveError(f"{what} is over {limit} bytes: not one elves wrote", self.where(key))
            data: bytes = self.fs.cat_file(path, start=0, end=size) if size else b""
        return data

    def exists(self, key: str) -> bool:
        if key in self.pending:
            return True
        with self.reading(key, key):
            if key.endswith("/"):
                return bool(self.fs.exists(self.path_of(key)))
            try:
                self._info(key)
            except FileNotFoundError:
                return False
            return True

    def list(self, prefix: str) -> Iterator[Entry]:
        base = self.path_of(prefix.rstrip("/"))
        with self.reading(prefix, f"the listing of {prefix or 'the store'}"):
            try:
                items = self.fs.ls(base, detail=True, refresh=True)
            except FileNotFoundError:  # object storage has no empty folders
                items = []
        for item in items:
            name = str(item["name"]).rstrip("/")
            if not name.startswith(self.root + "/") or name == base:
                continue
            rel = name[len(self.root) + 1:]
            if item.get("type") == "directory":
                yield Entry(rel + "/", 0)
            else:
                yield Entry(rel, int(item.get("size") or 0), _mtime(item))

    def upload(self, key: str) -> Upload:
        return _RemoteUpload(self, key)

    def drop(self, temp: str) -> None:
        """Forget the upload at ``temp`` and remove its local file."""
        local = self.pending.pop(temp, None)
        if local is not None:
            local.unlink(missing_ok=True)

    def commit(self, temp: str, key: str) -> None:
        try:
            self.check_lease()
            local = self.pending[temp]
            with self.writing(key):
                self.fs.put_file(str(local), self.path_of(key))
        finally:
            self.drop(temp)

    def sync(self, folders: Iterable[str]) -> None:
        """Nothing to do: a PUT that returned is durable."""

    def put(self, key: str, data: bytes) -> None:
        self.check_lease()
        with self.writing(key):
            self.fs.pipe_file(self.path_of(key), data)

    def delete(self, key: str) -> None:
        if key in self.pending:
            self.drop(key)
            return
        self.check_lease()
        with self.writing(key):
            try:
                if key.endswith("/"):
                    self.fs.rm(self.path_of(key), recursive=True)
                else:
                    self.fs.rm_file(self.path_of(key))
            except FileNotFoundError:
                pass
        if key.endswith("/"):
            shutil.rmtree(self.local / key, ignore_errors=True)

    def scratch(self, folder: str) -> Path:
        p = self.local / folder
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot make a staging folder: {e.strerror or e}", p) from None
        return p

    def check_lease(self) -> None:
        """Refuse to write once this writer's lease is lost (another may hold it now)."""
        if self.lease is not None:
            self.lease.check()

    def adding(self, exclusive: bool = False) -> AbstractContextManager[None]:
        """Nothing: gc keeps objects younger than its grace period, and those named by a young
        journal of a staged add (``gc_grace``)."""
        return nullcontext()

    @contextmanager
    def locked(self) -> Iterator[None]:
        if self.protocol not in CONDITIONAL:
            raise StoreError(f"cannot write to a {self.protocol}:// store: writers take turns on a lease written "
                             "with conditional writes, which elves has for "
                             f"{', '.join(p + '://' for p in sorted(CONDITIONAL))} only", self.url)
        lease = Lease(self)
        lease.acquire()
        self.lease = lease
        try:
            yield
        finally:
            self.lease = None
            lease.release()


class Lease:
    """The writers' lock of a store on object storage: the object ``lock``, a JSON record of who
    holds it, written only with the backend's conditional writes (:class:`Conditional`).

    Taken by creating it (``If-None-Match: *``, a generation of 0) when there is none, or by
    replacing it under its tag (``If-Match``, a generation match) when it is released, or
    expired; renewed every ``ttl/4`` by a heartbeat (replaced under our own tag), released by
    replacing it with a released record. Expiry needs no synchronised clocks: a waiter takes a
    lease over only after it has seen the same tag for ``ttl`` seconds of its own clock, while
    the holder stops writing once ``ttl/2`` has passed since it sent the last renewal that
    succeeded (:meth:`check`)."""

    def __init__(self, storage: FsspecStorage):
        self.storage = storage
        self.path, self.where, self.ttl = storage.path_of(LOCK), storage.where(LOCK), storage.ttl
        try:
            self.cond = CONDITIONAL[storage.protocol](storage.fs, self.path)
        except ImportError as e:
            raise StoreError(f"writing to a {storage.protocol}:// store needs {e.name}", storage.url) from None
        self.etag = ""
        self.confirmed = 0.0     # monotonic time at which the last renewal that succeeded was sent
        self.lost: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def record(self, state: str) -> bytes:
        return json.dumps({"state": state, "owner": f"{socket.gethostname()}:{os.getpid()}",
                           "host": socket.gethostname(), "pid": os.getpid(), "ttl": self.ttl,
                           "expires": time.time() + self.ttl}).encode()

    def current(self) -> tuple[str, dict[str, Any]]:
        """The lease's tag and record, as they are now (a record that does not parse: held)."""
        with self.storage.reading(LOCK, "the store's lease"):
            tag, data = self.cond.current()
        try:
            raw = json.loads(data)
        except ValueError:
            raw = {}
        return tag, raw if isinstance(raw, dict) else {}

    def acquire(self) -> None:
        seen, since, delay = "", 0.0, 0.05
        while True:
            sent = time.monotonic()
            try:
                with self.storage.writing(LOCK):
                    try:
                        self.etag = self.cond.create(self.record("held"))
                        break
                    except Exception as e:  # noqa: BLE001 (a failed condition is one of many kinds)
                        if not _conflict(e):
                            raise
                    try:
                        etag, raw = self.current()
                    except FileNotFoundError:  # released by deletion just now
                        continue
                    if etag != seen:
                        seen, since = etag, time.monotonic()
                    if raw.get("state") == "released" or time.monotonic() - since >= self.ttl:
                        sent = time.monotonic()
                        try:
                            self.etag = self.cond.replace(self.record("held"), etag)
                            break
                        except Exception as e:  # noqa: BLE001
                            if not _conflict(e):
                                raise
            except OutputError as e:
                raise StoreError(f"cannot take the store's lease: {e.message}", self.where) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0, self.ttl / 4)
        self.confirmed = sent
        self.thread = threading.Thread(target=self.beat, name="elves-lease", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        while not self.stop.wait(self.ttl / 4):
            sent = time.monotonic()
            try:
                self.etag = self.cond.replace(self.record("held"), self.etag)
                self.confirmed = sent
            except Exception as e:  # noqa: BLE001 (a renewal that fails is retried until check gives up)
                if _conflict(e):
                    self.lost = "lost the store's lease: another writer took it over; nothing more is written"
                    return

    def check(self) -> None:
        if self.lost is not None:
            raise StoreError(self.lost, self.where)
        if time.monotonic() - self.confirmed > self.ttl / 2:
            raise StoreError(f"lost the store's lease: it could not be renewed for {self.ttl / 2:.0f} s; nothing "
                             "more is written (run the command again)", self.where)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost is None:
            try:
                self.cond.replace(self.record("released"), self.etag)
            except Exception:  # noqa: BLE001 (unreleased, it expires after ttl)
                pass
