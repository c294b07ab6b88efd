"""The store on Azure Blob storage (az://, through adlfs) against Azurite, Azure's own emulator,
speaking the real Blob protocol over HTTP on 127.0.0.1: store operations under the lease, whose
conditional writes (If-None-Match, If-Match on the ETag) Azurite enforces; a stalled holder taken
over only once its lease lapsed, and its release not clobbering the new holder's.

Runs where adlfs is installed and Azurite's blob service is found (``azurite-blob`` on PATH, or
AZURITE_BLOB naming it: ``npm install -g azurite``); skipped otherwise."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

adlfs = pytest.importorskip("adlfs")

from elves.errors import StoreError  # noqa: E402
from elves.store import Store  # noqa: E402
from elves.store.layout import LOCK  # noqa: E402
from elves.store.remote import FsspecStorage, Lease  # noqa: E402

from .conftest import toy_model, tree_hashes  # noqa: E402
from .test_store_lease import stalled_lease  # noqa: E402

# Azurite's well-known development account (public, in Azure's documentation)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "elves-tests"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    exe = os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")
    if not exe:
        pytest.skip("Azurite is not installed (npm install -g azurite)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--skipApiVersionCheck", "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None, "Azurite did not start"
                time.sleep(0.1)
        cs = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
              f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
        adlfs.AzureBlobFileSystem(connection_string=cs).mkdir(CONTAINER)
        mp = pytest.MonkeyPatch()
        mp.setenv("ELVES_STAGING", str(tmp_path_factory.mktemp("staging")))
        yield {"connection_string": cs}
        mp.undo()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # it waits for its open connections: none matter now
            proc.kill()
            proc.wait(5)


@pytest.fixture()
def url() -> str:
    return f"az://{CONTAINER}/{uuid.uuid4().hex[:12]}"


def toy(path: Path, seed: int) -> Path:
    return toy_model(path, seed, 65536)


def test_store_operations_on_azure(url: str, options: dict[str, str], tmp_path: Path) -> None:
    store = Store.init(url, options)
    src = toy(tmp_path / "m", 1)
    added = store.add(src, "m")
    assert added.objects_new > 0
    assert json.loads(store.storage.read_small(LOCK, "the lease", 1000))["state"] == "released"
    store.restore("m", tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)
    store.remove("m")
    assert store.gc(grace=0).objects_removed > 0 and store.verify().ok


def test_a_stalled_holder_is_taken_over_after_the_lapse(url: str, options: dict[str, str]) -> None:
    Store.init(url, options)
    ttl = 1.0
    lease = stalled_lease(url, ttl, options)
    t0 = time.monotonic()
    b = FsspecStorage(url, options, lease_ttl=ttl)
    with b.locked():
        assert time.monotonic() - t0 >= ttl
        with pytest.raises(StoreError, match="lost the store's lease"):
            lease.check()
        lease.release()              # If-Match on its old ETag: Azurite refuses it
        assert json.loads(b.read_small(LOCK, "the lease", 1000))["state"] == "held"
    assert json.loads(b.read_small(LOCK, "the lease", 1000))["state"] == "released"


def test_a_renewal_that_finds_the_lease_taken_is_lost(url: str, options: dict[str, str]) -> None:
    Store.init(url, options)
    lease = Lease(FsspecStorage(url, options, lease_ttl=0.6))
    lease.acquire()
    tag, _ = lease.cond.current()
    with pytest.raises(FileExistsError):
        lease.cond.create(b"{}")     # If-None-Match: * on a lease that is there
    lease.cond.replace(b'{"state": "held", "owner": "other"}', tag)
    time.sleep(0.5)
    with pytest.raises(StoreError, match="another writer took it over"):
        lease.check()
    lease.release()
