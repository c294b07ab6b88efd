"""The store on object storage: every store operation on an s3:// store served by moto's server
mode (the real S3 protocol over HTTP on 127.0.0.1), writers taking turns on the lease, a writer
killed or stalled mid-add, gc beside an add, reads by range, a mirror pull, and clear errors for
a wrong endpoint or wrong credentials."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from elves import mirror  # noqa: E402
from elves.errors import CorruptArchiveError, StoreError, UsageError  # noqa: E402
from elves.readers import read_model  # noqa: E402
from elves.store import Store  # noqa: E402
from elves.store.layout import manifest_at  # noqa: E402
from elves.store.remote import FsspecStorage  # noqa: E402

from .conftest import tree_hashes, write_safetensors  # noqa: E402
from .hub_standin import HubStandin  # noqa: E402

BUCKET = "elves-tests"
TTL = 2.0   # the lease's, so that a killed or stalled writer is taken over quickly


class S3:
    def __init__(self, endpoint: str, env: dict[str, str]):
        self.endpoint, self.env = endpoint, env

    def keys(self, prefix: str) -> list[str]:
        import boto3
        out = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for o in out.get("Contents", [])]

    def auth(self, actions: str) -> None:
        """moto checks credentials after ``actions`` more requests ("inf": never)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=actions.encode(),
                                                      headers={"Content-Type": "text/plain"}), timeout=10)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "ELVES_LEASE_TTL": str(TTL),
           "ELVES_STAGING": str(tmp_path_factory.mktemp("staging"))}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.delenv("ELVES_CACHE", raising=False)
    import boto3
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield S3(endpoint, env)
    finally:
        mp.undo()
        server.stop()


@pytest.fixture()
def url(s3: S3, request: pytest.FixtureRequest) -> str:
    return f"s3://{BUCKET}/{request.node.name}"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elves.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def ok(*args: str) -> Any:
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def toy(path: Path, seed: int, tensors: int = 3, elems: int = 1 << 18) -> Path:
    """A small model of random float32 tensors (``elems`` each)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": f"toy{seed}"}))
    write_safetensors(path / "model.safetensors", {
        f"layer.{i}.weight": ("F32", (elems,), rng.standard_normal(elems).astype(np.float32).tobytes())
        for i in range(tensors)})
    return path


def wait_for(predicate: Any, what: str, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.mark.realdata
def test_every_store_operation_on_s3(url: str, dataset: Any, tmp_path: Path) -> None:
    base, ft = dataset("minilm"), dataset("minilm-family/last-layers")
    assert ok("store", "init", url)["store"] == url
    # the fine-tune first: adding its base later re-codes it as the base's deltas (a repack,
    # which replaces its objects under the same keys)
    assert ok("store", "add", url, str(ft), "--name", "ft")["base"] is None
    added = ok("store", "add", url, str(base), "--name", "base")
    assert added["repacked"] == ["ft"]
    assert [m["name"] for m in ok("store", "ls", url)["models"]] == ["ft", "base"]
    assert ok("store", "repack", url)["objects_rewritten"] == 0
    assert ok("store", "rm", url, "base")["removed"] == "base"
    gc = ok("store", "gc", url)
    assert gc["objects_removed"] == 0 and gc["kept_young"] > 0   # the grace period: an hour by default
    gc = ok("store", "gc", url, "--grace", "0")
    assert gc["objects_removed"] > 0 and gc["kept_young"] == 0
    stats = ok("store", "stats", url)
    assert stats["models"] == 1 and stats["garbage_objects"] == 0 and stats["delta_objects"] > 0
    # what ft's deltas read of the removed base stayed: ft restores bit-exact
    assert ok("store", "restore", url, "ft", "-o", str(tmp_path / "ft"))["ok"]
    assert tree_hashes(tmp_path / "ft") == tree_hashes(ft)


def test_ranged_read_gets_only_the_chunks_it_needs(url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = toy(tmp_path / "m", 1, tensors=1, elems=4 << 20)   # one 16 MiB tensor
    Store.init(url).add(src, "m")
    raw = (src / "model.safetensors").read_bytes()
    monkeypatch.setenv("ELVES_CACHE", str(tmp_path / "cache"))
    fetched: list[tuple[str, int]] = []

    def opened() -> Store:
        s = Store(url)
        cat = s.storage.fs.cat_file   # type: ignore[attr-defined]

        def counted(path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
            data: bytes = cat(path, start=start, end=end, **kw)
            if "/objects/" in path:
                fetched.append((path, len(data)))
            return data

        s.storage.fs.cat_file = counted   # type: ignore[attr-defined]
        return s

    start = len(raw) // 2
    got = b"".join(opened().read_file("m", "model.safetensors", start, start + 1000))
    assert got == raw[start:start + 1000]
    # the footer, the trailer and the one or two chunks that hold those bytes: not the object
    assert 3 <= len(fetched) <= 4 and sum(n for _, n in fetched) < len(raw) // 8
    fetched.clear()
    got = b"".join(opened().read_file("m", "model.safetensors", start, start + 1000))
    assert got == raw[start:start + 1000] and fetched == []   # the read-through cache had them all


def test_two_processes_add_at_once(url: str, tmp_path: Path) -> None:
    Store.init(url)
    a, b = toy(tmp_path / "a", 2), toy(tmp_path / "b", 3)
    procs = [subprocess.Popen([sys.executable, "-m", "elves.cli.main", "store", "add", url, str(src), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in (a, b)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    s = Store(url)
    assert sorted(m.name for m in s.models()) == ["a", "b"]
    for src in (a, b):
        s.restore(src.name, tmp_path / f"out-{src.name}")
        assert tree_hashes(tmp_path / f"out-{src.name}") == tree_hashes(src)
    report = ok("store", "verify", url, "--full")
    assert report["ok"] and report["files_checked"] == 4 and not report["orphans"]


def test_kill_during_add_then_gc_and_a_rerun(url: str, s3: S3, tmp_path: Path) -> None:
    Store.init(url)
    src = toy(tmp_path / "big", 4, tensors=8, elems=1 << 20)
    proc = subprocess.Popen([sys.executable, "-m", "elves.cli.main", "store", "add", url, str(src), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prefix = url.split("/", 3)[3] + "/objects/"
    try:
        wait_for(lambda: len(s3.keys(prefix)) >= 2 or proc.poll() is not None, "the add's first objects")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = Store(url)
    assert s.models() == [] and s.stats().garbage_objects >= 2
    kept = s.gc()   # waits out the dead writer's lease; its young objects stay for the grace period
    assert kept.objects_removed == 0 and kept.kept_young >= 2
    assert s.gc(grace=0).objects_removed >= 2 and s.stats().garbage_objects == 0
    r = cli("store", "add", url, str(src), "--json")
    assert r.returncode == 0, r.stderr
    s.restore("big", tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)


def test_gc_beside_an_add_keeps_its_objects(url: str, tmp_path: Path) -> None:
    """An add codes its files without the lease (it takes it only to commit): a gc between its
    files and its commit takes the lease, keeps the add's young objects, and the add commits."""
    Store.init(url)
    src = toy(tmp_path / "m", 5)
    files, _ = read_model(src, False)
    adder = Store(url)
    with adder.stage("m") as staged:
        for sf in files:
            staged.add_source(sf)
        assert adder.storage.lease is None   # type: ignore[attr-defined]
        report = Store(url).gc()
        assert report.objects_removed == 0 and report.kept_young >= len(files)
        staged.commit()
    s = Store(url)
    assert [m.name for m in s.models()] == ["m"] and s.stats().garbage_objects == 0
    s.restore("m", tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)


def test_two_pulls_and_an_add_at_once(url: str, tmp_path: Path) -> None:
    """Two pulls of other repos and an add into one s3:// store at once: each codes without the
    lease (each waits, mid-way, for the others to have made progress), every model lands whole."""
    import importlib
    pulls = importlib.import_module("tests.test_mirror_pull")
    Store.init(url)
    a = {"config.json": b'{"model_type": "toy"}',
         "data/w.bin": np.random.default_rng(21).standard_normal(100_000).astype(np.float32).tobytes()}
    b = {"config.json": b'{"model_type": "toy"}',
         "data/w.bin": np.random.default_rng(22).standard_normal(100_000).astype(np.float32).tobytes()}
    src = toy(tmp_path / "m", 23)
    barrier = threading.Barrier(3, timeout=120)
    with HubStandin() as hub:
        hub.commit("acme/a", a)
        hub.commit("acme/b", b)
        done = pulls.run_beside(
            lambda: mirror.pull(Store(url), "acme/a", endpoint=hub.url, progress=pulls.meet(barrier)),
            lambda: mirror.pull(Store(url), "acme/b", endpoint=hub.url, progress=pulls.meet(barrier)),
            lambda: Store(url).add(src, "m", progress=pulls.meet(barrier)))
    assert not [d for d in done if isinstance(d, BaseException)], done
    s = Store(url)
    assert sorted(m.name for m in s.models()) == sorted([done[0].model, done[1].model, "m"])
    for name, files in ((done[0].model, a), (done[1].model, b)):
        out = tmp_path / name.replace("/", "_")
        s.restore(name, out)
        assert {p: (out / p).read_bytes() for p in files} == files
    s.restore("m", tmp_path / "out")
    assert tree_hashes(tmp_path / "out") == tree_hashes(src)
    assert s.verify().ok


def test_lease_taken_over_only_after_it_lapses(url: str) -> None:
    Store.init(url)
    a, b = FsspecStorage(url), FsspecStorage(url)
    order: list[str] = []
    held = b.locked()
    with a.locked():
        t = threading.Thread(target=lambda: (held.__enter__(), order.append("b")))
        t.start()
        time.sleep(1.5 * TTL)        # a renews its lease: b waits
        assert order == []
        a.put("models/probe", b"x")  # and a may write
        assert a.lease is not None
        a.lease.stop.set()
        t.join(timeout=30)
        assert order == ["b"]        # a stopped renewing: b took it over
        with pytest.raises(StoreError, match="lost the store's lease"):
            a.put("models/probe", b"y")
    assert b.lease is not None
    b.lease.check()                  # a's release did not touch b's lease
    b.put("models/probe", b"z")
    assert b.read_small("models/probe", "probe", 10) == b"z"
    b.delete("models/probe")
    held.__exit__(None, None, None)
    assert json.loads(b.read_small("lock", "lease", 1000))["state"] == "released"


def test_mirror_pull_into_an_s3_store(url: str, tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "toy"}', "README.md": b"# toy\n",
             "data/w.bin": np.random.default_rng(6).standard_normal(50_000).astype(np.float32).tobytes()}
    store = Store.init(url)
    with HubStandin() as hub:
        commit = hub.commit("acme/toy", files)
        r = mirror.pull(store, "acme/toy", endpoint=hub.url)
        assert r.commit == commit and r.files == 3
        assert mirror.pull(Store(url), "acme/toy", endpoint=hub.url).already
        # several repos on workers: each downloads into this machine's staging, the driver commits
        more = {"config.json": b'{"model_type": "toy"}', "data/w.bin": files["data/w.bin"][::-1]}
        c2 = hub.commit("acme/toy2", more)
        pulled, failed = mirror.pull_many(store, [("acme/toy2", None), ("acme/toy", None)], workers=1,
                                          endpoint=hub.url)
        assert not failed and [(p.commit, p.already) for p in pulled] == [(c2, False), (commit, True)]
    store.restore(r.model, tmp_path / "out")
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files} == files
    store.restore(pulled[0].model, tmp_path / "out2")
    assert {p: (tmp_path / "out2" / p).read_bytes() for p in more} == more


def test_errors_and_ls_name_the_url(url: str, s3: S3, tmp_path: Path) -> None:
    import boto3
    store = Store.init(url)
    store.add(toy(tmp_path / "m", 1), "acme/toy")
    listing = ok("ls", f"{url}/acme/toy", "--files")
    assert listing["source"] == f"{url}/acme/toy" and [f["path"] for f in listing["files"]] == [
        "config.json", "model.safetensors"]
    r = cli("ls", url)
    assert r.returncode == UsageError.exit_code and f"{url}: is a store" in r.stderr
    # an object gone: the error names it by its URL, not a path with one '/' after "s3:"
    prefix = url.split("/", 3)[3]
    client = boto3.client("s3")
    key = next(k for k in s3.keys(f"{prefix}/objects/") if k.endswith(".f32"))
    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(CorruptArchiveError) as e:
        store.restore("acme/toy", tmp_path / "out")
    assert str(e.value).startswith(f"s3://{BUCKET}/{key}: model 'acme/toy'") and "is missing" in str(e.value)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{manifest_at('acme/toy')}", Body=b'{"format": "x"}')
    with pytest.raises(CorruptArchiveError) as e:
        Store(url).manifest("acme/toy")
    assert str(e.value).startswith(f"{url}/{manifest_at('acme/toy')}: ")


def test_restore_errors_name_the_url_unfolded(url: str, s3: S3, tmp_path: Path) -> None:
    """A damaged object, and a delta whose base object is damaged or gone: each restore error
    names the object by its URL (``s3://bucket/...``), never folded to ``s3:/bucket/...``."""
    import boto3
    rng = np.random.default_rng(31)
    w = [rng.standard_normal(1 << 16).astype(np.float32) for _ in range(2)]
    for name, scale in (("base", 0.0), ("ft", 1e-3)):
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", {
            f"layer.{i}.weight": ("F32", x.shape, (x * (1 + scale * rng.standard_normal(x.shape))).astype(
                np.float32).tobytes()) for i, x in enumerate(w)})
    store = Store.init(url)
    store.add(tmp_path / "base", "base")
    assert store.add(tmp_path / "ft", "ft", base="base").delta_objects > 0
    from elves.store.layout import object_at
    from elves.store.objects import StoredObject
    deltas = [seg[0] for f in store.manifest("ft")["files"] for seg in f["segments"] if len(seg) == 2]
    ref = next(r for k in deltas for r in StoredObject(store.storage, k).meta.refs)
    client = boto3.client("s3")
    key = f"{url.split('/', 3)[3]}/{object_at(ref)}"
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=good[:10] + bytes([good[10] ^ 1]) + good[11:])
    folded = f"s3:/{BUCKET}/"
    for name in ("base", "ft"):   # the object itself, then a delta reading it
        with pytest.raises(CorruptArchiveError) as e:
            store.restore(name, tmp_path / f"out-{name}")
        assert str(e.value).startswith(f"s3://{BUCKET}/{url.split('/', 3)[3]}/objects/"), str(e.value)
        assert "checksum" in str(e.value) and folded not in str(e.value)
    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(CorruptArchiveError) as e:
        store.restore("ft", tmp_path / "out-gone")
    assert str(e.value).startswith(f"s3://{BUCKET}/{key}: ") and "is missing" in str(e.value)
    assert folded not in str(e.value)


def test_a_missing_key_costs_one_request(url: str) -> None:
    storage = Store.init(url).storage
    assert isinstance(storage, FsspecStorage)
    calls: list[str] = []
    send = storage.fs._call_s3

    async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return await send(method, *args, **kwargs)

    storage.fs._call_s3 = counted
    assert not storage.exists("models/none.json") and calls == ["head_object"]   # no LIST after the miss
    with pytest.raises(FileNotFoundError):
        storage.read_small("profiles/none.json", "a profile", 100)
    assert calls == ["head_object"] * 2
    assert storage.exists("elves-store.json") and calls == ["head_object"] * 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_wrong_endpoint_or_credentials_fail_clearly(url: str, s3: S3) -> None:
    Store.init(url)
    r = cli("store", "ls", url, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"})
    assert r.returncode == StoreError.exit_code and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"elves: error: {url}/elves-store.json: cannot read") and "127.0.0.1" in r.stderr
    s3.auth("0")
    try:
        r = cli("store", "add", url, "--json", str(Path(__file__)),
                env={"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"})
    finally:
        s3.auth("inf")
    assert r.returncode == StoreError.exit_code and "Traceback" not in r.stderr
    err = json.loads(r.stderr)
    assert err["kind"] == "StoreError" and "check the credentials" in err["error"]
