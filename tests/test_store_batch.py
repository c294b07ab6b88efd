"""Many models added at once on workers (elves.store.batch.add_many), on a local process pool and
on Ray: the store is the one adding them one by one, bases first, leaves, byte for byte; a
fine-tune listed before its base is still coded against it; an error in one source comes back
as the ElvesError its add raises; a Ray address that does not answer fails within seconds.

One local Ray cluster (2 CPUs) serves every test of the module: starting one takes ~10 s."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from elves.errors import InputError
from elves.store import AddResult, Store, add_many

OPENFF = [f"openff-gnn-am1bcc-{v}" for v in ("0.0.1-alpha.1", "0.1.0-rc.1", "0.1.0-rc.2", "0.1.0-rc.3", "1.0.0")]
# the caller's order, but for a model whose base comes later: the family's metadata says minilm
# is last-layers' base; the openff versions, which have none, go in the order given
DAG_ORDER = [*OPENFF, "minilm", "last-layers"]


@pytest.fixture(scope="module")
def sources(dataset) -> list[tuple[Path, str]]:
    """The fine-tune before its base, the openff versions in between."""
    openff = dataset("openff")
    return ([(dataset("minilm-family/last-layers"), "last-layers")]
            + [(openff / f"{n}.pt", n) for n in OPENFF] + [(dataset("minilm"), "minilm")])


@pytest.fixture(scope="module")
def sequential(sources, tmp_path_factory) -> tuple[Store, list[AddResult]]:
    """The same models added one by one with Store.add, in DAG_ORDER."""
    s = Store.init(tmp_path_factory.mktemp("seq") / "s")
    src = {name: path for path, name in sources}
    return s, [s.add(src[name], name, threads=2) for name in DAG_ORDER]


def store_files(s: Store) -> dict[str, bytes]:
    root = Path(s.path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(batch: Store, seq: Store) -> None:
    """Objects and profiles byte for byte (an object's bytes are its coding: the base and the
    delta the sequential add chose); manifests equal but for "added", the time of the commit
    ("seq", the order of the adds, included); nothing left in tmp/."""
    got, want = store_files(batch), store_files(seq)
    assert sorted(got) == sorted(want)
    assert not [k for k in got if k.startswith("tmp/")]
    objects = [k for k in want if k.startswith("objects/")]
    assert len(objects) > 100
    for key, data in want.items():
        if key.startswith("models/"):
            a, b = json.loads(got[key]), json.loads(data)
            assert a.pop("added") and b.pop("added")
            assert a == b, key
        else:
            assert got[key] == data, key


def same_results(got: list[AddResult], want: list[AddResult]) -> None:
    """What each add did, as the sequential add counts it (the time aside)."""
    for g, w in zip(got, want, strict=True):
        g.seconds = w.seconds = 0.0
        assert g == w


@pytest.fixture(params=["ray", "local"])
def executor(request) -> str:
    """Each executor; Ray on the module's cluster."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return str(request.param)


@pytest.mark.realdata
def test_a_family_added_at_once_is_the_store_added_one_by_one(executor: str, sources, sequential,
                                                               tmp_path: Path) -> None:
    seq, seq_results = sequential
    s = Store.init(tmp_path / "s")
    seen: list[int] = []
    results = add_many(s, sources, executor=executor, workers=2, progress=seen.append)
    assert [r.name for r in results] == [name for _, name in sources]  # the caller's order
    assert [m.name for m in s.models()] == DAG_ORDER                   # committed in DAG order
    by_name = {r.name: r for r in results}
    assert by_name["last-layers"].base == "minilm" and by_name["last-layers"].delta_objects > 0
    assert by_name[OPENFF[4]].base == OPENFF[2]
    same_results([by_name[n] for n in DAG_ORDER], seq_results)
    assert_same_store(s, seq)
    assert sum(seen) >= sum(r.bytes_in for r in results) * 0.99  # every file's bytes, less headers
    assert s.verify().ok


@pytest.mark.realdata
def test_an_error_in_a_task_is_its_elves_error(executor: str, dataset, tmp_path: Path) -> None:
    """A file cut short after it was read: its task fails as an add fails on it (an InputError
    naming it); the model committed before it stays, and nothing the failing task wrote does."""
    openff = dataset("openff")
    victim = Path(shutil.copyfile(openff / f"{OPENFF[0]}.pt", tmp_path / "victim.pt"))
    size = victim.stat().st_size
    s = Store.init(tmp_path / "s")

    def cut(_: int) -> None:  # called as the first model's files are stored: the victim's come next
        with open(victim, "r+b") as f:
            f.truncate(size // 2)

    with pytest.raises(InputError) as got:
        add_many(s, [(openff / f"{OPENFF[1]}.pt", "first"), (victim, "victim")], executor=executor, workers=1,
                 base=None, progress=cut)
    err = got.value
    assert (err.path, err.message, err.exit_code) == (str(victim), "the file changed or shrank while it was being read", 3)
    assert [m.name for m in s.models()] == ["first"]
    report = s.gc()
    assert report.objects_removed == 0 and report.objects_kept == 15, report
    assert s.verify().ok


@pytest.mark.realdata
def test_another_writer_commits_while_the_batch_codes(dataset, tmp_path: Path) -> None:
    """The tasks code without the writer lock: an add by another writer, made as the batch's first
    file is coded, commits at once; the batch reads the store again at its next commit and
    commits its models after it."""
    openff = dataset("openff")
    s = Store.init(tmp_path / "s")
    other: list[AddResult] = []

    def add_beside(_: int) -> None:
        if other:
            return
        th = threading.Thread(target=lambda: other.append(Store(s.path).add(dataset("minilm"), "other")), daemon=True)
        th.start()
        th.join(120)
        assert other, "the other writer waited for the batch's lock"

    srcs = [(openff / f"{OPENFF[1]}.pt", OPENFF[1]), (openff / f"{OPENFF[2]}.pt", OPENFF[2])]
    results = add_many(s, srcs, executor="local", workers=1, progress=add_beside)
    assert [m.name for m in s.models()] == ["other", OPENFF[1], OPENFF[2]]
    assert results[1].base == OPENFF[1] and results[1].delta_objects > 0 and s.verify().ok
    for path, name in srcs:
        s.restore(name, tmp_path / f"{name}.pt")
        assert (tmp_path / f"{name}.pt").read_bytes() == path.read_bytes()


@pytest.mark.realdata
def test_an_unreadable_source_is_its_elves_error(ray_cluster, dataset, tmp_path: Path) -> None:
    """A source its reader refuses, read by a task: the InputError its add raises, and nothing
    written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(InputError) as alone:
        Store.init(tmp_path / "one").add(bad)
    s = Store.init(tmp_path / "s")
    with pytest.raises(InputError) as got:
        add_many(s, [(dataset("minilm"), None), (bad, None)], executor="ray")
    assert (got.value.path, got.value.message, got.value.exit_code) == (alone.value.path, alone.value.message, 3)
    assert s.models() == [] and not any((tmp_path / "s" / "objects").rglob("*"))


def ray_processes() -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes() if p.name.isdigit() else b""
            if b"/ray/" in cmd or cmd.startswith(b"ray::"):
                out.add(int(p.name))
        except OSError:
            continue
    return out


def test_a_ray_address_that_does_not_answer_fails_fast(tmp_path: Path) -> None:
    """Nothing listening, and a port that takes the connection and never answers (as a cluster
    that refuses a client without its token does): a clear UsageError within seconds, and no Ray
    process left behind."""
    pytest.importorskip("ray")
    Store.init(tmp_path / "s")
    (tmp_path / "m.bin").write_bytes(b"x" * 100)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    script = textwrap.dedent("""
        import sys
        from elves.errors import UsageError
        from elves.store import Store, add_many
        try:
            add_many(Store(sys.argv[1]), [(sys.argv[2], None)], executor="ray", ray_address=sys.argv[3])
        except UsageError as e:
            print("UsageError:", e.message, file=sys.stderr)
            sys.exit(e.exit_code)
    """)
    before = ray_processes()
    t0 = time.monotonic()
    runs = {addr: subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s"), str(tmp_path / "m.bin"), addr],
                                   stderr=subprocess.PIPE, text=True)
            for addr in (f"127.0.0.1:{silent.getsockname()[1]}", f"127.0.0.1:{closed.getsockname()[1]}")}
    errors = {addr: p.communicate(timeout=60)[1] for addr, p in runs.items()}
    elapsed = time.monotonic() - t0
    silent.close()
    closed.close()
    assert elapsed < 20, elapsed
    assert all(p.returncode == 2 for p in runs.values()), errors
    silent_err, closed_err = errors.values()
    assert "did not let this machine in within 10 s" in silent_err and "token" in silent_err, silent_err
    assert "cannot reach the Ray cluster at 127.0.0.1:" in closed_err, closed_err
    assert ray_processes() <= before
