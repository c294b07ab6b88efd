"""The writers' lease of a store on object storage, run on memory://, whose conditional writes are
compare-and-set in this process (gs:// and az:// take the same protocol through their own
conditional writes, but their emulators do not run here): every store operation under it, a
writer waiting for another, a stalled holder taken over only once its lease lapsed and stopped
from writing, and a clear refusal for a backend without conditional writes."""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fsspec")

from elves.errors import StoreError  # noqa: E402
from elves.store import Store  # noqa: E402
from elves.store.layout import LOCK  # noqa: E402
from elves.store.remote import FsspecStorage, Lease, _conflict  # noqa: E402

from .conftest import toy_model, tree_hashes  # noqa: E402


@pytest.fixture()
def url() -> str:
    return f"memory://lease-{uuid.uuid4().hex[:12]}"


def toy(path: Path, seed: int) -> Path:
    return toy_model(path, seed, 4096)


def record(storage: FsspecStorage) -> dict[str, object]:
    return dict(json.loads(storage.fs.cat_file(storage.path_of(LOCK))))


def test_store_operations_under_the_lease(url: str, tmp_path: Path) -> None:
    store = Store.init(url)
    src = toy(tmp_path / "m", 1)
    store.add(src, "m")
    assert record(store.storage)["state"] == "released"   # each writer released it
    store.restore("m", tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)
    store.remove("m")
    assert store.gc().objects_removed > 0 and store.verify().ok


def test_a_writer_waits_for_the_holder(url: str) -> None:
    storage = FsspecStorage(url)
    order: list[str] = []
    held = threading.Event()

    def other() -> None:
        held.wait()
        with FsspecStorage(url).locked():
            order.append("second")

    th = threading.Thread(target=other)
    th.start()
    with storage.locked():
        held.set()
        time.sleep(0.5)      # the other writer polls meanwhile
        order.append("first")
    th.join(10)
    assert order == ["first", "second"]


def stalled_lease(url: str, ttl: float, options: dict[str, str] | None = None) -> Lease:
    """A lease taken on the store at ``url`` whose heartbeat has stopped: its holder stalls."""
    lease = Lease(FsspecStorage(url, options, lease_ttl=ttl))
    lease.acquire()
    lease.stop.set()
    assert lease.thread is not None
    lease.thread.join()
    return lease


def test_a_stalled_holder_is_taken_over_only_after_its_lease_lapsed(url: str) -> None:
    ttl = 0.8
    lease = stalled_lease(url, ttl)
    t0 = time.monotonic()
    b = FsspecStorage(url, lease_ttl=ttl)
    with b.locked():
        waited = time.monotonic() - t0
        assert waited >= ttl                       # not before the lease lapsed on b's clock
        with pytest.raises(StoreError, match="lost the store's lease"):
            lease.check()                          # the stalled holder writes nothing more
        lease.release()                            # its release cannot clobber b's lease
        assert record(b)["state"] == "held"
        b.put("models/x.json", b"{}")              # b's lease is valid
    assert record(b)["state"] == "released"


def test_a_renewal_that_finds_the_lease_taken_is_lost(url: str) -> None:
    a = FsspecStorage(url, lease_ttl=0.4)
    lease = Lease(a)
    lease.acquire()
    # another writer overwrites it (as one that took over would): the next heartbeat sees it
    tag, _ = lease.cond.current()
    lease.cond.replace(b'{"state": "held", "owner": "other"}', tag)
    time.sleep(0.3)
    with pytest.raises(StoreError, match="another writer took it over"):
        lease.check()
    lease.release()


def test_a_backend_without_conditional_writes_is_refused_for_writing() -> None:
    storage = FsspecStorage("http://127.0.0.1:9/store")
    with pytest.raises(StoreError, match=r"cannot write to a http:// store: .* gs://, .* s3://"):
        with storage.locked():
            pass


class _Refused(Exception):
    def __init__(self, **attrs: object):
        super().__init__("precondition")
        self.__dict__.update(attrs)


def test_conflicts_of_every_backend_are_recognised() -> None:
    assert _conflict(FileExistsError("x"))                      # s3fs, gcsfs, adlfs
    assert _conflict(_Refused(status_code=412))                 # azure-core's HttpResponseError
    assert _conflict(_Refused(code=412))                        # google-api-core's PreconditionFailed
    assert _conflict(_Refused(response={"Error": {"Code": "PreconditionFailed"}}))  # botocore
    assert not _conflict(_Refused(status_code=503)) and not _conflict(OSError("down"))
