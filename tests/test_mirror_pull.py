"""``elves mirror pull / update / ls / rm``: Hub repos into a store, from a stand-in of the Hub
(tests/hub_standin.py) that the real huggingface_hub client talks to over HTTP."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import quote
from pathlib import Path
from typing import Any

import pytest

from elves import mirror
from elves.errors import HubAccessError, HubError, HubIntegrityError, HubNotFoundError, UsageError
from elves.mirror.records import read_repo, snapshot
from elves.store import Store
from elves.store.staging import staging_at

from .hub_standin import HubStandin, folder_files

BASE = "sentence-transformers/all-MiniLM-L6-v2"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def small_repo(n: int = 3, size: int = 5000, seed: int = 0) -> dict[str, bytes]:
    import numpy as np
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {"config.json": b'{"model_type": "toy"}', "README.md": b"# toy\n"}
    for i in range(n):
        files[f"data/part{i}.bin"] = rng.standard_normal(size // 4).astype(np.float32).tobytes()
    return files


@pytest.fixture()
def hub():
    with HubStandin() as h:
        yield h


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store.init(tmp_path / "hub.store")


def elves_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elves.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.realdata
def test_pull_base_and_finetune_restore_bit_exact(hub: HubStandin, store: Store, dataset, tmp_path: Path) -> None:
    base_dir, ft_dir = dataset("minilm"), dataset("minilm-family/last-layers")
    c1 = hub.commit(BASE, folder_files(base_dir))
    c2 = hub.commit("acme/minilm-ft", folder_files(ft_dir))
    r1 = mirror.pull(store, BASE, endpoint=hub.url, jobs=3)
    assert (r1.commit, r1.files, r1.downloaded, r1.already) == (c1, 13, 13, False)
    r2 = mirror.pull(store, "acme/minilm-ft", endpoint=hub.url)
    # the fine-tune's card names its base: its tensors are deltas of the base's commit
    assert r2.base == f"{BASE}@{c1}" and r2.commit == c2
    # its tokenizer and other small files are the base's blobs: decoded from the store, not fetched
    assert r2.reused >= 8 and r2.downloaded == r2.files - r2.reused
    assert r2.stored_bytes < r1.stored_bytes / 4
    for r, src in ((r1, base_dir), (r2, ft_dir)):
        store.restore(r.model, tmp_path / r.commit)
        assert tree(tmp_path / r.commit) == tree(src)
    snap = snapshot(store, "model", "acme/minilm-ft", c2)
    blobs = hub.files("acme/minilm-ft")
    assert {f.path: (f.size, f.etag) for f in snap.files} == {p: (b.size, b.etag) for p, b in blobs.items()}
    rec = read_repo(store, "model", BASE)
    assert rec is not None and rec.refs == {"main": c1} and rec.commits == [c1]
    # the same commit again: no download at all
    before = hub.downloads()
    again = mirror.pull(store, "acme/minilm-ft", endpoint=hub.url)
    assert again.already and hub.downloads() == before
    # `mirror ls --json`: the delta costs a fraction of its logical size
    out = elves_cli("mirror", "ls", "--store", str(store.path), "--json")
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    ft = next(r for r in listing["repos"] if r["repo"] == "acme/minilm-ft")["commits"][0]
    assert ft["revisions"] == ["main"] and ft["base"] == f"{BASE}@{c1}"
    assert ft["new_bytes"] * 4 < ft["logical_bytes"] and ft["new_bytes"] < ft["stored_bytes"]
    assert listing["totals"]["stored_bytes"] < listing["totals"]["file_dedup_bytes"] / 2


def test_update_fetches_only_changed_files(hub: HubStandin, store: Store, tmp_path: Path) -> None:
    files = small_repo(4)
    c1 = hub.commit("acme/toy", files)
    hub.tag("acme/toy", "v1", c1)
    mirror.pull(store, "acme/toy", endpoint=hub.url)
    mirror.pull(store, "acme/toy", "v1", endpoint=hub.url)
    changed = small_repo(1, seed=7)["data/part0.bin"]
    c2 = hub.commit("acme/toy", {"data/part0.bin": changed, "new.txt": b"hello"})
    before = hub.downloads()
    u = mirror.update(store, endpoint=hub.url)
    assert [(r.revision, r.commit) for r in u.pulled] == [("main", c2)]
    assert u.unchanged == [("acme/toy", "v1", c1)] and not u.failed
    assert hub.downloads() - before == 2 and u.pulled[0].reused == 5
    rec = read_repo(store, "model", "acme/toy")
    assert rec is not None and rec.refs == {"main": c2, "v1": c1} and rec.commits == [c1, c2]
    store.restore(u.pulled[0].model, tmp_path / "new")
    assert (tmp_path / "new/data/part0.bin").read_bytes() == changed
    assert (tmp_path / "new/data/part1.bin").read_bytes() == files["data/part1.bin"]
    # the old commit stays until it is removed; then gc frees what only it held
    assert mirror.remove(store, "acme/toy", "v1") == [f"acme/toy@{c1}"]
    rec = read_repo(store, "model", "acme/toy")
    assert rec is not None and rec.refs == {"main": c2}
    assert store.gc().objects_removed >= 1
    store.verify(full=True)
    with pytest.raises(UsageError, match="no revision"):
        mirror.remove(store, "acme/toy", "v9")


def test_include_exclude_and_dataset_repos(hub: HubStandin, store: Store) -> None:
    files = small_repo(3)
    c = hub.commit("acme/data", files, repo_type="dataset")
    r = mirror.pull(store, "acme/data", repo_type="dataset", endpoint=hub.url, include=["data/*"],
                    exclude=["*part2*"])
    assert r.files == 2 and r.model == f"dataset+acme/data@{c}"
    assert [f.path for f in snapshot(store, "dataset", "acme/data", c).files] == ["data/part0.bin", "data/part1.bin"]
    # the whole commit later: stored again with every file, the two held ones decoded locally
    full = mirror.pull(store, "acme/data", repo_type="dataset", endpoint=hub.url)
    assert full.files == 5 and full.reused == 2 and full.downloaded == 3
    assert {f.path for f in snapshot(store, "dataset", "acme/data", c).files} == set(files)
    assert read_repo(store, "model", "acme/data") is None


def test_interrupted_pull_resumes_without_downloading_twice(hub: HubStandin, store: Store) -> None:
    files = small_repo(6, size=400_000)
    hub.commit("acme/cut", files)
    path = "data/part3.bin"
    hub.fail_after[path] = 150_000
    with pytest.raises(HubError, match="stopped at|cannot be reached|RemoteProtocolError|peer"):
        mirror.pull(store, "acme/cut", endpoint=hub.url, jobs=1)
    assert not store.models()  # nothing visible: no manifest, no record
    assert read_repo(store, "model", "acme/cut") is None
    r = mirror.pull(store, "acme/cut", endpoint=hub.url, jobs=1)
    assert r.files == 8
    for p in files:
        # no file was fetched from its start twice: the cut one resumed where it stopped (a Range)
        assert hub.fresh_downloads(f"acme/cut/{p}") == 1, p
    assert any(m == "GET" and rng == "bytes=150000-" for m, _, rng in hub.requests)
    assert not store.storage.exists(staging_at(r.model))


def test_kill_9_during_pull_then_rerun(hub: HubStandin, store: Store) -> None:
    files = small_repo(8, size=1_000_000)
    hub.commit("acme/killed", files)
    hub.rate = 4e6  # 8 MB at 4 MB/s: the kill lands mid-pull
    proc = subprocess.Popen([sys.executable, "-m", "elves.cli.main", "mirror", "pull", "acme/killed", "--store",
                             str(store.path), "--endpoint", hub.url, "--jobs", "1", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = store.path / "tmp" / "staged"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and hub.bytes_served() < 3_500_000:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal.exists() and not store.models()
    hub.rate = None
    r = mirror.pull(store, "acme/killed", endpoint=hub.url)
    assert not r.already and r.downloaded < r.files
    for p in files:
        assert hub.fresh_downloads(f"acme/killed/{p}") == 1, p
    out = Path(store.path.parent / "out")
    store.restore(r.model, out)
    assert {p: sha(d) for p, d in files.items()} == tree(out)


def test_errors_are_clear_and_leave_the_store_untouched(hub: HubStandin, store: Store, tmp_path: Path) -> None:
    hub.commit("acme/gated", small_repo(1))
    hub.set_gated("acme/gated")
    hub.commit("acme/private", small_repo(1))
    hub.set_private("acme/private")
    with pytest.raises(HubAccessError, match="gated"):
        mirror.pull(store, "acme/gated", endpoint=hub.url)
    ok = mirror.pull(store, "acme/gated", endpoint=hub.url, token="hf_good")
    assert read_repo(store, "model", "acme/gated").gated and ok.files == 3
    with pytest.raises(HubNotFoundError, match="repo"):
        mirror.pull(store, "acme/private", endpoint=hub.url)
    with pytest.raises(HubNotFoundError, match="repo"):
        mirror.pull(store, "acme/nothing", endpoint=hub.url)
    with pytest.raises(HubNotFoundError, match="revision"):
        mirror.pull(store, "acme/gated", "v404", endpoint=hub.url, token="hf_good")
    with pytest.raises(UsageError):
        mirror.pull(store, "../etc", endpoint=hub.url)
    with pytest.raises(HubError, match="cannot be reached"):
        mirror.pull(store, "acme/gated", endpoint="http://127.0.0.1:9", token="hf_good")
    assert [m.name for m in store.models()] == [ok.model]
    # the CLI: one line, an exit code per kind of failure, JSON errors, no traceback
    tokens = tmp_path / "token"
    tokens.write_text("# the Hub token\nhf_good\n")
    hub.commit("acme/gated2", small_repo(1, seed=5))
    hub.set_gated("acme/gated2")
    cases = [(["acme/nothing"], HubNotFoundError.exit_code), (["acme/gated2"], HubAccessError.exit_code),
             (["acme/gated@v404", "--token-file", str(tokens)], HubNotFoundError.exit_code)]
    for args, code in cases:
        out = elves_cli("mirror", "pull", *args, "--store", str(store.path), "--endpoint", hub.url, "--json")
        assert out.returncode == code, (args, out.stderr)
        err = json.loads(out.stderr)
        assert err["ok"] is False and err["exit_code"] == code and "Traceback" not in out.stderr


def test_integrity_mismatch_stores_nothing(hub: HubStandin, store: Store) -> None:
    files = small_repo(1)
    hub.commit("acme/bad", files)
    blob = hub.files("acme/bad")["data/part0.bin"]
    real = blob.read

    def tampered(start: int, end: int):
        for piece in real(start, end):
            yield bytes([piece[0] ^ 1]) + piece[1:] if start == 0 else piece
    object.__setattr__(blob, "read", tampered)  # the Hub serves bytes that are not the listed ones
    with pytest.raises(HubIntegrityError, match="does not match"):
        mirror.pull(store, "acme/bad", endpoint=hub.url)
    assert not store.models()


def test_pull_list_and_cli_summary(hub: HubStandin, store: Store, tmp_path: Path) -> None:
    a = hub.commit("acme/a", small_repo(1, seed=1))
    b = hub.commit("acme/b", small_repo(1, seed=2))
    hub.tag("acme/b", "v1", b)
    lst = tmp_path / "repos.txt"
    lst.write_text("# repos\nacme/a\nacme/b@v1  # tagged\nacme/missing\n")
    out = elves_cli("mirror", "pull", "--list", str(lst), "--store", str(store.path), "--endpoint", hub.url,
                    "--json")
    assert out.returncode == HubNotFoundError.exit_code, out.stderr
    res = json.loads(out.stdout)
    assert [(p["repo"], p["revision"], p["commit"]) for p in res["pulled"]] == [("acme/a", "main", a),
                                                                                 ("acme/b", "v1", b)]
    assert [f["repo"] for f in res["failed"]] == ["acme/missing@main"]
    out = elves_cli("mirror", "ls", "--store", str(store.path))
    assert out.returncode == 0 and "acme/a" in out.stdout and "v1" in out.stdout
    out = elves_cli("mirror", "rm", "acme/a", "--store", str(store.path), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["removed"] == [f"acme/a@{a}"]


def test_staging_is_bounded_by_bytes(hub: HubStandin, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    pull_module = importlib.import_module("elves.mirror.pull")   # the package's `pull` is the function
    files = small_repo(6, size=400_000)
    hub.commit("acme/big", files)
    monkeypatch.setattr(pull_module, "STAGING_BYTES", 500_000)
    hub.rate = 20e6
    peak = 0
    scratch = store.path / "tmp" / "staged"

    def watch(_: mirror.PullProgress) -> None:
        nonlocal peak
        peak = max(peak, sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file() and "journal" not in p.name))
    r = mirror.pull(store, "acme/big", endpoint=hub.url, jobs=4, progress=watch)
    assert r.downloaded == 8
    # never two of the 400 KB files staged at once (jobs=4 alone would allow five), and one always may be
    assert 400_000 <= peak < 800_000


def test_hostile_records_and_journals_are_refused_or_ignored(hub: HubStandin, store: Store) -> None:
    from elves.errors import CorruptArchiveError
    from elves.mirror.records import record_at
    from elves.store.layout import manifest_at

    c = hub.commit("acme/h", small_repo(1))
    r = mirror.pull(store, "acme/h", endpoint=hub.url)
    rec_path = store.path / record_at("model", "acme/h")
    good = rec_path.read_text()
    for bad in ('{"format": "elves-mirror-repo", "version": 1, "type": "model", "repo": "../../etc", '
                '"refs": {}, "commits": []}',
                good.replace('"main"', '"../main"'), good.replace(c, "not-a-sha"), "[]", "{", "x" * 100):
        rec_path.write_text(bad)
        with pytest.raises(CorruptArchiveError, match="mirror record"):
            read_repo(store, "model", "acme/h")
        out = elves_cli("mirror", "ls", "--store", str(store.path), "--json")
        assert out.returncode == 0 and "acme/h" not in out.stdout  # a damaged record is skipped, not a traceback
    rec_path.write_text(good)
    # a manifest whose origin lies about its files is not served as that commit
    man_path = store.path / manifest_at(r.model)
    good_man = man_path.read_text()
    man = json.loads(good_man)
    man["origin"]["files"][0]["size"] += 1
    man_path.write_text(json.dumps(man))
    with pytest.raises(CorruptArchiveError, match="not a mirrored commit"):
        snapshot(store, "model", "acme/h", c)
    man["origin"] = "no"
    man_path.write_text(json.dumps(man))
    with pytest.raises(CorruptArchiveError):
        snapshot(store, "model", "acme/h", c)
    man["origin"] = json.loads(good_man)["origin"]
    man_path.write_text(json.dumps(man))
    # a forged journal of a staged add (naming objects that are not there) is set aside: the pull starts afresh
    c2 = hub.commit("acme/h", {"extra.bin": b"\x01" * 9000})
    journal = store.path / staging_at(f"acme/h@{c2}") / "journal.json"
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps({"version": 1, "name": f"acme/h@{c2}", "base_arg": "auto", "base": None,
                                   "reasons": [], "decided": True, "profiler": {"profile": {}, "candidates": []},
                                   "files": {"extra.bin": {"path": "../../x", "size": 1, "sha256": "0" * 64,
                                                           "format": "opaque", "segments": [["0" * 32 + ".bytes", 1]],
                                                           "tensors": []}}}))
    r2 = mirror.pull(store, "acme/h", endpoint=hub.url)
    assert r2.commit == c2 and r2.files == 4 and r2.downloaded == 1
    out = store.path.parent / "h2"
    store.restore(r2.model, out)
    assert (out / "extra.bin").read_bytes() == b"\x01" * 9000


def mirrored(s: Store) -> dict[str, Any]:
    """What a store holds, but for the times of its commits: objects and profiles byte for byte,
    manifests less "added" and their origin's "pulled", the repos' revisions and commits."""
    root = Path(s.path)
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        if not p.is_file() or key.startswith("tmp/"):
            continue
        if key.startswith("models/"):
            man = json.loads(p.read_bytes())
            assert man.pop("added") and man["origin"].pop("pulled")
            out[key] = man
        elif key.startswith("mirror/"):
            rec = json.loads(p.read_bytes())
            out[key] = (rec["refs"], rec["commits"])
        else:
            out[key] = p.read_bytes()
    return out


@pytest.mark.realdata
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_pull_list_on_workers_is_the_sequential_pull(executor: str, request: pytest.FixtureRequest, hub: HubStandin,
                                                     dataset, tmp_path: Path) -> None:
    base_dir, ft_dir = dataset("minilm"), dataset("minilm-family/last-layers")
    c1 = hub.commit(BASE, folder_files(base_dir))
    c2 = hub.commit("acme/minilm-ft", folder_files(ft_dir))
    c3 = hub.commit("acme/toy", small_repo(3))
    seq = Store.init(tmp_path / "seq")
    for repo in (BASE, "acme/minilm-ft", "acme/toy"):
        mirror.pull(seq, repo, endpoint=hub.url)
    par = Store.init(tmp_path / "par")
    # the fine-tune before its base: the base is still coded first, and the fine-tune against it
    if executor == "local":
        lst = tmp_path / "repos.txt"
        lst.write_text(f"acme/minilm-ft\n{BASE}  # its base\nacme/toy\nacme/missing\n")
        out = elves_cli("mirror", "pull", "--list", str(lst), "--store", str(par.path), "--endpoint", hub.url,
                        "--executor", "local", "--workers", "2", "--json")
        assert out.returncode == HubNotFoundError.exit_code, out.stderr
        res = json.loads(out.stdout)
        pulled = [(p["repo"], p["commit"], p["base"]) for p in res["pulled"]]
        assert [f["repo"] for f in res["failed"]] == ["acme/missing@main"]
    else:
        request.getfixturevalue("ray_cluster")
        results, failures = mirror.pull_many(par, [("acme/minilm-ft", None), (BASE, None), ("acme/toy", None)],
                                             executor="ray", workers=2, endpoint=hub.url)
        assert not failures
        pulled = [(r.repo_id, r.commit, r.base) for r in results]
    assert pulled == [("acme/minilm-ft", c2, f"{BASE}@{c1}"), (BASE, c1, None), ("acme/toy", c3, None)]
    assert [m.name for m in par.models()] == [m.name for m in seq.models()]   # bases first
    assert mirrored(par) == mirrored(seq)
    for repo, commit, src in ((BASE, c1, base_dir), ("acme/minilm-ft", c2, ft_dir)):
        par.restore(f"{repo}@{commit}", tmp_path / commit)
        assert tree(tmp_path / commit) == tree(src)
    assert not list((tmp_path / "par/tmp").rglob("*.safetensors"))   # the downloads went with the commits
    # pulled again: nothing is downloaded
    before = hub.downloads()
    results, failures = mirror.pull_many(par, [(BASE, None), ("acme/toy", None)], executor="local", workers=1,
                                         endpoint=hub.url)
    assert not failures and all(r.already for r in results) and hub.downloads() == before


def test_pull_list_goes_in_waves(hub: HubStandin, store: Store, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A list larger than a wave: each wave is downloaded, coded and committed before the next
    is downloaded (one repo a wave here), and its downloads are gone once it is committed."""
    pulling = importlib.import_module("elves.mirror.pull")   # the module: the package names its function pull

    repos = {f"acme/w{i}": small_repo(2, seed=10 + i) for i in range(3)}
    commits = {r: hub.commit(r, files) for r, files in repos.items()}
    monkeypatch.setattr(pulling, "WAVE_BYTES", 1)
    staged: list[list[str]] = []
    add = pulling.add_scanned

    def watched(st: Store, run: Any, scanned: Any, *args: Any, **kwargs: Any) -> Any:
        # as each wave's models are coded: the downloads on disk are this wave's only
        staged.append(sorted(p.name for p in (Path(st.path) / "tmp/staged").glob("*")))
        return add(st, run, scanned, *args, **kwargs)

    monkeypatch.setattr(pulling, "add_scanned", watched)
    results, failures = mirror.pull_many(store, [(r, None) for r in repos], workers=1, endpoint=hub.url)
    assert not failures and [(r.repo_id, r.commit) for r in results] == list(commits.items())
    assert staged == [[quote(f"{r}@{c}", safe="")] for r, c in commits.items()]
    assert not list((Path(store.path) / "tmp/staged").glob("*"))
    for r in results:
        store.restore(r.model, tmp_path / r.commit)
        assert {p: (tmp_path / r.commit / p).read_bytes() for p in repos[r.repo_id]} == repos[r.repo_id]


def meet(barrier: threading.Barrier) -> Any:
    """A progress callback that waits, at its first call, until every party of ``barrier`` has
    made progress: the writers it joins must be coding side by side, none waiting for another's
    lock (a barrier not met in its timeout breaks, and the writer waiting on it fails)."""
    lock = threading.Lock()
    met: list[bool] = []

    def once(*_: Any) -> None:
        with lock:
            first = not met
            met.append(True)
        if first:
            barrier.wait()
    return once


def run_beside(*jobs: Any) -> list[Any]:
    """Run ``jobs`` (callables) on threads at once; their results, or the exception each raised."""
    out: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            out[i] = jobs[i]()
        except BaseException as e:  # reported by the caller's asserts
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_two_pulls_and_an_add_into_one_store_run_side_by_side(hub: HubStandin, store: Store, tmp_path: Path) -> None:
    """A pull takes the store's writer lock only to commit: two pulls of other repos and an
    ``add`` download and code at once (each waits, mid-way, for the others to have made progress),
    and every model lands whole."""
    a, b = small_repo(3, size=300_000, seed=11), small_repo(3, size=300_000, seed=12)
    hub.commit("acme/a", a)
    hub.commit("acme/b", b)
    local = tmp_path / "local"
    local.mkdir()
    for p, data in small_repo(2, size=300_000, seed=13).items():
        (local / p).parent.mkdir(parents=True, exist_ok=True)
        (local / p).write_bytes(data)
    barrier = threading.Barrier(3, timeout=120)
    done = run_beside(
        lambda: mirror.pull(Store(store.path), "acme/a", endpoint=hub.url, progress=meet(barrier)),
        lambda: mirror.pull(Store(store.path), "acme/b", endpoint=hub.url, progress=meet(barrier)),
        lambda: Store(store.path).add(local, "local", progress=meet(barrier)))
    assert not [d for d in done if isinstance(d, BaseException)], done
    ra, rb, _ = done
    assert sorted(m.name for m in store.models()) == sorted([ra.model, rb.model, "local"])
    for name, files in ((ra.model, a), (rb.model, b), ("local", None)):
        out = tmp_path / f"out-{name.replace('/', '_')}"
        store.restore(name, out)
        assert tree(out) == (tree(local) if files is None else {p: sha(d) for p, d in files.items()})
    assert read_repo(store, "model", "acme/a") is not None and read_repo(store, "model", "acme/b") is not None
    assert store.verify().ok and not list((store.path / "tmp" / "staged").iterdir())
