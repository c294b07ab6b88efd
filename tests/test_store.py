"""The model store: every model restores bit-exactly whatever the order of adds and removes, gc
frees only what nothing uses, a killed or concurrent add leaves it valid, a fine-tune costs its
delta (also when it arrives before its base), and damage or a wrong base is a clear error."""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from elves.errors import CorruptArchiveError, InputError, StoreError
from elves.readers import read_model
from elves.store import Store
from elves.store.layout import manifest_at, object_at, profile_at
from elves.store.manifests import manifest
from elves.store.objects import StoredObject
from tests.conftest import tree_hashes, write_safetensors

OPENFF = ["0.0.1-alpha.1", "0.1.0-rc.1", "0.1.0-rc.2", "0.1.0-rc.3", "1.0.0"]


# ---------------------------------------------------------------------------- helpers

def make_model(root: Path, seed: int, *, base: np.ndarray | None = None, noise: float = 0.0,
               declares: str | None = None) -> Path:
    """A small HF-style folder: four BF16 weight matrices and an F32 bias in model.safetensors,
    config.json, README.md. With ``base``, the weights are ``base`` plus relative noise (a
    fine-tune), and ``declares`` is what README's ``base_model`` says."""
    rng = np.random.default_rng(seed)
    w = base if base is not None else rng.normal(0, 0.02, (4, 256, 384)).astype(np.float32)
    if noise:
        w = w * (1 + rng.normal(0, noise, w.shape)).astype(np.float32)
    root.mkdir(parents=True)
    tensors = {f"layer.{i}.weight": ("BF16", (256, 384), w[i].astype(ml_dtypes.bfloat16).tobytes()) for i in range(4)}
    tensors["layer.0.bias"] = ("F32", (384,), rng.normal(0, 0.1, 384).astype(np.float32).tobytes())
    write_safetensors(root / "model.safetensors", tensors)
    (root / "config.json").write_text(json.dumps({"_name_or_path": declares or f"acme/{root.name}",
                                                  "architectures": ["TinyModel"], "model_type": "tiny"}))
    (root / "README.md").write_text(f"---\nbase_model: {declares}\n---\n# {root.name}\n" if declares
                                    else f"# {root.name}\n")
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base, two fine-tunes of it that say so in their README, and an unrelated model."""
    root = tmp_path_factory.mktemp("family")
    w = np.random.default_rng(0).normal(0, 0.02, (4, 256, 384)).astype(np.float32)
    return {
        "tiny-base": make_model(root / "tiny-base", 1, base=w),
        "tiny-ft-a": make_model(root / "tiny-ft-a", 2, base=w, noise=0.01, declares="acme/tiny-base"),
        "tiny-ft-b": make_model(root / "tiny-ft-b", 3, base=w, noise=0.003, declares="acme/tiny-base"),
        "other": make_model(root / "other", 4),
    }


def check_store(s: Store, expected: dict[str, Path], tmp: Path) -> None:
    """The store lists exactly ``expected``, each restores bit-exactly, and every delta reads
    only plain objects that exist (references one level deep)."""
    assert sorted(m.name for m in s.models()) == sorted(expected)
    for i, (name, src) in enumerate(expected.items()):
        out = tmp / f"check-{time.monotonic_ns()}-{i}"
        r = s.restore(name, out)
        assert tree_hashes(r.output) == tree_hashes(src), name
    for p in (s.path / "objects").glob("*/*"):
        with StoredObject(s.storage, p.name) as obj:
            for ref in obj.meta.refs:
                with StoredObject(s.storage, ref) as r:
                    assert not r.meta.refs and r.meta.kind == "tensor"


def at(s: Store, key: str) -> Path:
    """Where object ``key`` lies in store ``s``."""
    return s.path / object_at(key)


def manifest_path(s: Store, name: str) -> Path:
    return s.path / manifest_at(name)


def profile_path(s: Store, name: str) -> Path:
    return s.path / profile_at(name)


def objects_bytes(s: Store, name: str) -> int:
    """The size of the objects a model's manifest names."""
    keys = {seg[0] for f in manifest(s.storage, name)["files"] for seg in f["segments"]}
    return sum(at(s, k).stat().st_size for k in keys)


def openff(dataset) -> dict[str, Path]:
    root = dataset("openff")
    return {v: root / f"openff-gnn-am1bcc-{v}.pt" for v in OPENFF}


# ---------------------------------------------------------------------------- basics

def test_init_and_open_refuse_what_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StoreError, match="not an empty folder"):
        Store.init(tmp_path / "full")
    with pytest.raises(StoreError, match="not an elves store"):
        Store(tmp_path / "full")
    s = Store.init(tmp_path / "s")
    with pytest.raises(StoreError, match="not an empty folder"):
        Store.init(tmp_path / "s")
    (s.path / "elves-store.json").write_text(json.dumps({"format": "elves-store", "version": [2, 0]}))
    with pytest.raises(StoreError, match="newer elves"):
        Store(s.path)


def test_family_deltas_dedup_and_readding_costs_nothing(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    base = s.add(family["tiny-base"])
    assert base.base is None and base.delta_objects == 0
    ft = s.add(family["tiny-ft-a"])
    assert ft.base == "tiny-base" and ft.delta_objects >= 4
    assert any("README base_model" in r for r in ft.reasons)
    assert ft.bytes_added < 0.8 * base.bytes_added  # a fine-tune costs its delta
    other = s.add(family["other"], base="auto")
    assert other.base is None
    again = s.add(family["tiny-ft-a"], name="acme/tiny-ft-a-copy")
    assert again.objects_new == 0 and again.bytes_added < 0.02 * again.bytes_in  # a manifest and a profile
    with pytest.raises(StoreError, match="already in the store"):
        s.add(family["tiny-ft-a"])
    st = s.stats()
    assert st.models == 4 and st.delta_objects >= 4 and st.garbage_objects == 0
    assert st.logical_bytes == sum(m.bytes for m in s.models()) and st.ratio > 2
    check_store(s, {"tiny-base": family["tiny-base"], "tiny-ft-a": family["tiny-ft-a"],
                    "other": family["other"], "acme/tiny-ft-a-copy": family["tiny-ft-a"]}, tmp_path)
    fams = {f.root: {n for n, _ in f.members} for f in s.families()}
    assert fams["tiny-base"] >= {"tiny-ft-a", "acme/tiny-ft-a-copy"} and fams["other"] == set()


def test_single_file_models_restore_to_a_file(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"] / "model.safetensors", name="w")
    out = s.restore("w", tmp_path)  # a folder: the file goes inside, under its own name
    assert out.output == tmp_path / "model.safetensors"
    assert tree_hashes(out.output) == tree_hashes(family["tiny-base"] / "model.safetensors")
    with pytest.raises(Exception, match="already exists"):
        s.restore("w", out.output)


# ---------------------------------------------------------------------------- removing data

def test_gc_keeps_what_deltas_reference_and_frees_the_rest(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"])
    ft = s.add(family["tiny-ft-b"])
    assert ft.base == "tiny-base" and ft.delta_objects >= 4
    s.add(family["other"])
    s.remove("tiny-base")
    with pytest.raises(StoreError, match="no model named"):
        s.restore("tiny-base", tmp_path / "x")
    r = s.gc()
    assert r.objects_removed >= 1 and r.bytes_freed > 0  # the base's files that no delta reads
    check_store(s, {"tiny-ft-b": family["tiny-ft-b"], "other": family["other"]}, tmp_path)
    s.remove("other")
    assert s.gc().bytes_freed > 0.5 * sum(p.stat().st_size for p in family["other"].iterdir()) / 2
    check_store(s, {"tiny-ft-b": family["tiny-ft-b"]}, tmp_path)
    s.remove("tiny-ft-b")
    assert s.gc().objects_kept == 0
    assert not list((s.path / "objects").glob("*/*")) and s.stats().stored_bytes == 0


@pytest.mark.realdata
def test_openff_every_order_of_adds_and_removes_restores_bit_exact(dataset, tmp_path: Path) -> None:
    models = openff(dataset)
    rng = random.Random(7)
    for trial in range(2):
        s = Store.init(tmp_path / f"s{trial}")
        order = list(models)
        rng.shuffle(order)
        present: dict[str, Path] = {}
        for i, name in enumerate(order):
            s.add(models[name], name=name, threads=2)
            present[name] = models[name]
            if i in (2, 3):  # remove one of the stored models, maybe a base of others
                victim = rng.choice(sorted(present))
                s.remove(victim)
                del present[victim]
                s.gc()
            check_store(s, present, tmp_path)
        assert s.stats().ratio > 1.3  # each one alone compresses about 1.18x


# ---------------------------------------------------------------------------- order of arrival

def test_a_finetune_added_before_its_base_becomes_a_delta(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    ft = s.add(family["tiny-ft-a"])
    assert ft.base is None
    before = objects_bytes(s, "tiny-ft-a")
    base = s.add(family["tiny-base"])
    assert base.base is None  # the fine-tune says it derives from this one
    assert base.repacked == ["tiny-ft-a"]
    entry = next(m for m in s.models() if m.name == "tiny-ft-a")
    assert entry.base == "tiny-base"
    assert s.stats().delta_objects >= 4
    assert objects_bytes(s, "tiny-ft-a") < 0.8 * before  # the same keys, re-coded smaller
    assert s.repack().objects_rewritten == 0  # nothing left to do
    check_store(s, {"tiny-ft-a": family["tiny-ft-a"], "tiny-base": family["tiny-base"]}, tmp_path)


def test_repack_recodes_models_stored_alone(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"], base=None)
    s.add(family["tiny-ft-b"], base=None)
    before = s.stats()
    assert before.delta_objects == 0
    r = s.repack()
    assert r.models == [("tiny-ft-b", "tiny-base")] and r.objects_rewritten >= 4
    after = s.stats()
    assert after.stored_bytes < before.stored_bytes - 0.5 * r.bytes_before  # keys kept, objects replaced
    assert after.objects == before.objects
    check_store(s, {"tiny-base": family["tiny-base"], "tiny-ft-b": family["tiny-ft-b"]}, tmp_path)


# ---------------------------------------------------------------------------- wrong base, damage

def test_a_wrong_base_given_by_hand_is_an_error_or_still_exact(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"])
    with pytest.raises(StoreError, match="no model named 'nope'"):
        s.add(family["tiny-ft-a"], base="nope")
    (tmp_path / "shape").mkdir()
    write_safetensors(tmp_path / "shape" / "m.safetensors",
                      {"layer.0.weight": ("BF16", (100, 100), bytes(100 * 100 * 2))})
    with pytest.raises(StoreError, match="cannot be this model's base"):
        s.add(tmp_path / "shape", base="tiny-base")
    assert [m.name for m in s.models()] == ["tiny-base"]
    # same structure, unrelated weights: a poor base, but never wrong bytes
    r = s.add(family["other"], base="tiny-base")
    assert r.base == "tiny-base"
    check_store(s, {"tiny-base": family["tiny-base"], "other": family["other"]}, tmp_path)


def test_a_corrupted_object_is_an_error_naming_the_model_and_file(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"])
    s.add(family["tiny-ft-a"])
    man = json.loads(next((s.path / "models").glob("tiny-ft-a*")).read_text())
    f = next(f for f in man["files"] if f["path"] == "model.safetensors")
    key = next(seg[0] for seg in f["segments"] if seg[0].endswith(".bf16"))
    with StoredObject(s.storage, key) as obj:
        assert obj.meta.refs  # a delta: its base object is damaged below instead
        ref = obj.meta.refs[0]
    p = at(s, key)
    whole = p.read_bytes()
    p.write_bytes(whole[:-10])  # truncated
    with pytest.raises(CorruptArchiveError, match=r"model 'tiny-ft-a', file model.safetensors: .*not a complete object"):
        s.restore("tiny-ft-a", tmp_path / "out")
    p.write_bytes(whole)
    p = at(s, ref)  # the delta's base object: found when decoding the delta
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError, match=rf"model 'tiny-ft-a', file model.safetensors: .*object {ref}: .*corrupted"):
        s.restore("tiny-ft-a", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    at(s, ref).unlink()
    with pytest.raises(CorruptArchiveError, match="missing"):
        s.restore("tiny-base", tmp_path / "out")


# ---------------------------------------------------------------------------- crashes and concurrency

def _add_in_subprocess(store: Path, src: Path, name: str) -> subprocess.Popen:
    code = "import sys; from elves.store import Store; Store(sys.argv[1]).add(sys.argv[2], sys.argv[3], threads=1)"
    return subprocess.Popen([sys.executable, "-c", code, str(store), str(src), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.realdata
def test_kill_9_during_add_leaves_the_store_valid(dataset, tmp_path: Path) -> None:
    models = openff(dataset)
    s = Store.init(tmp_path / "s")
    s.add(models["0.1.0-rc.1"], name="rc1", threads=1)
    stored = {"rc1": models["0.1.0-rc.1"]}
    rng = random.Random(3)
    def files() -> int:
        return sum(1 for _ in (s.path / "objects").glob("*/*")) + sum(1 for _ in (s.path / "tmp").iterdir())

    for attempt, v in enumerate(["0.1.0-rc.2", "0.1.0-rc.3", "1.0.0", "0.0.1-alpha.1"]):
        before = files()
        proc = _add_in_subprocess(s.path, models[v], v)
        if attempt % 2:  # at a random time: importing, profiling, hashing or writing
            time.sleep(rng.uniform(0.3, 3.0))
        else:  # while it writes objects
            deadline = time.monotonic() + 60
            while files() == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == 0 or v in {m.name for m in Store(s.path).models()}:  # it committed first
            stored[v] = models[v]
        check_store(Store(s.path), stored, tmp_path)
    for v in ["0.1.0-rc.2", "1.0.0"]:  # with the killed adds' orphans still there, reused
        if v not in stored:
            s.add(models[v], name=v, threads=1)
            stored[v] = models[v]
    check_store(s, stored, tmp_path)
    s.gc()
    check_store(s, stored, tmp_path)
    assert s.stats().garbage_objects == 0 and not list((s.path / "tmp").iterdir())


def test_two_concurrent_adds_both_land(family: dict[str, Path], tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"])
    procs = [_add_in_subprocess(s.path, family[n], n) for n in ("tiny-ft-a", "tiny-ft-b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    check_store(s, {n: family[n] for n in ("tiny-base", "tiny-ft-a", "tiny-ft-b")}, tmp_path)
    assert all(m.base == "tiny-base" for m in s.models()[1:])


def test_gc_waits_for_an_add_under_way_and_a_base_removed_meanwhile_is_refused(family: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """An add codes its files without the writer lock: a gc beside it waits for it on a local
    disk (whose gc keeps no young object); another writer that removes its base before it
    commits makes the commit refuse, and the add's objects go with it."""
    s = Store.init(tmp_path / "s")
    s.add(family["tiny-base"])
    files, _ = read_model(family["tiny-ft-a"], False)
    report: list[object] = []
    gc = threading.Thread(target=lambda: report.append(Store(s.path).gc()))
    with s.stage("tiny-ft-a") as staged:
        for sf in files:
            staged.add_source(sf)
        assert staged.base == "tiny-base" and staged.out.delta > 0
        gc.start()
        gc.join(timeout=2)
        assert gc.is_alive()   # it waits for the add, whose objects no manifest names yet
        staged.commit()
    gc.join(timeout=120)
    assert report and report[0].objects_removed == 0   # type: ignore[attr-defined]
    check_store(s, {n: family[n] for n in ("tiny-base", "tiny-ft-a")}, tmp_path)

    before = {p for p in (s.path / "objects").rglob("*") if p.is_file()}
    files, _ = read_model(family["tiny-ft-b"], False)
    with pytest.raises(StoreError, match="its base 'tiny-base' was removed by another writer while this add ran"):
        with s.stage("tiny-ft-b") as staged:
            for sf in files:
                staged.add_source(sf)
            assert staged.base == "tiny-base" and staged.out.created
            Store(s.path).remove("tiny-base")
            staged.commit()
    assert [m.name for m in s.models()] == ["tiny-ft-a"]
    assert {p for p in (s.path / "objects").rglob("*") if p.is_file()} == before   # its objects removed
    check_store(s, {"tiny-ft-a": family["tiny-ft-a"]}, tmp_path)


def test_gc_keeps_the_objects_a_young_journal_names(family: dict[str, Path], tmp_path: Path) -> None:
    """With a grace period (object storage's default), gc keeps the objects a staged add's young
    journal names however old they are, so a long pull's first files stay; once the journal is
    as old, they go."""
    s = Store.init(tmp_path / "s")
    files, _ = read_model(family["other"], False)
    with pytest.raises(RuntimeError):
        with s.stage("other", resumable=True) as staged:
            for sf in files[:-1]:
                staged.add_source(sf)
            raise RuntimeError("cut short")
    old = time.time() - 7200
    objects = [p for p in (s.path / "objects").rglob("*") if p.is_file()]
    assert objects
    for p in objects:
        os.utime(p, (old, old))
    kept = s.gc(grace=3600)
    assert kept.objects_removed == 0 and all(p.exists() for p in objects)
    with s.stage("other", resumable=True) as staged:
        assert staged.resumed and len(staged.entries) == len(files) - 1
    for p in (s.path / "tmp").rglob("*"):
        os.utime(p, (old, old))
    assert s.gc(grace=3600).objects_removed == len(objects) and not any(p.exists() for p in objects)


# ---------------------------------------------------------------------------- CLI

def cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from elves.cli.main import main; main()", "store", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_cli_commands_json_and_exit_codes(family: dict[str, Path], tmp_path: Path) -> None:
    st = tmp_path / "s"
    assert cli("init", st, "--json").returncode == 0
    r = cli("add", st, family["tiny-ft-a"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["base"] is None
    r = cli("add", st, family["tiny-base"], "--json")
    assert json.loads(r.stdout)["repacked"] == ["tiny-ft-a"]
    r = cli("add", st, family["other"], "--name", "x", "--base", "none")
    assert r.returncode == 0 and "base: none" in r.stdout
    models = json.loads(cli("ls", st, "--json").stdout)["models"]
    assert [m["name"] for m in models] == ["tiny-ft-a", "tiny-base", "x"] and models[0]["base"] == "tiny-base"
    fams = json.loads(cli("families", st, "--json").stdout)["families"]
    assert {f["root"] for f in fams} == {"tiny-base", "x"}
    assert "tiny-ft-a  <- tiny-base" in cli("families", st).stdout
    stats = json.loads(cli("stats", st, "--json").stdout)
    assert stats["models"] == 3 and stats["ratio"] > 1
    r = cli("restore", st, "tiny-ft-a", "-o", tmp_path / "out", "--json")
    assert r.returncode == 0 and tree_hashes(tmp_path / "out") == tree_hashes(family["tiny-ft-a"])
    r = cli("restore", st, "tiny-ft-a", "-o", tmp_path / "out")
    assert r.returncode == 5 and "Traceback" not in r.stderr
    assert cli("rm", st, "x", "--json").returncode == 0
    gc = json.loads(cli("gc", st, "--json").stdout)
    assert gc["objects_removed"] >= 1 and gc["bytes_freed"] > 0
    assert json.loads(cli("repack", st, "--json").stdout)["objects_rewritten"] == 0
    for args, code in [(("rm", st, "nope"), 8), (("ls", tmp_path), 8), (("add", st, family["other"], "--base", "nope"), 8),
                       (("init", st), 8)]:
        r = cli(*args)
        assert r.returncode == code and "Traceback" not in r.stderr and "elves: error:" in r.stderr, (args, r.stderr)
    r = cli("ls", tmp_path, "--json")  # an error as JSON on stderr, nothing on stdout
    assert json.loads(r.stderr)["kind"] == "StoreError" and r.stdout == ""


def test_adding_an_empty_folder_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    s = Store.init(tmp_path / "s")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no files"):
        s.add(tmp_path / "empty")
    assert s.models() == [] and s.verify().ok


@pytest.mark.parametrize("threads", [1, 2])
def test_a_wrong_sha256_of_any_stored_file_fails_restore(tmp_path: Path, threads: int) -> None:
    """A stored file's sha256 finishes beside the next file's decode, as in an archive's restore:
    a manifest whose sha256 of any file is wrong fails the restore, naming the model and file,
    before anything moves into place, and no hashing thread outlives it."""
    import threading

    src = make_model(tmp_path / "m", 11)
    s = Store.init(tmp_path / "store")
    s.add(src, "acme/m", base=None)
    path = manifest_path(s, "acme/m")
    good = json.loads(path.read_text())
    assert len(good["files"]) == 3
    for k, f in enumerate(good["files"]):
        forged = json.loads(json.dumps(good))
        forged["files"][k]["sha256"] = "0" * 64
        path.write_text(json.dumps(forged))
        out = tmp_path / f"out{k}"
        before = set(threading.enumerate())
        with pytest.raises(CorruptArchiveError,
                           match=f"model 'acme/m', file {f['path']}: restored bytes do not match the file's sha256"):
            Store(tmp_path / "store").restore("acme/m", out, threads=threads)
        assert not out.exists() and not list(tmp_path.glob(f".out{k}.*"))
        assert not [t for t in threading.enumerate() if t not in before]  # no thread of ours left
    path.write_text(json.dumps(good))
    assert tree_hashes(Store(tmp_path / "store").restore("acme/m", tmp_path / "ok", threads=threads).output) \
        == tree_hashes(src)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_file_of_many_objects_is_decoded_in_runs_with_few_open(dataset, tmp_path: Path, monkeypatch,
                                                                  threads: int) -> None:
    """A file's objects (silero's ONNX files: dozens of tensors, pack slices between them) are
    decoded in one window per run of ``OPEN_OBJECTS``: the file comes back exact, never more than
    that many objects are open at once (each holds a descriptor), and a damaged object inside a
    run fails the restore, naming it, with every object closed and no thread left."""
    from elves.store import reading

    s = Store.init(tmp_path / "store")
    s.add(dataset("silero"), "silero", base=None)
    live, most = set(), [0]

    class Counted(StoredObject):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(id(self))
            most[0] = max(most[0], len(live))

        def close(self) -> None:
            live.discard(id(self))
            super().close()

    monkeypatch.setattr(reading, "StoredObject", Counted)
    monkeypatch.setattr(reading, "OPEN_OBJECTS", 3)
    out = s.restore("silero", tmp_path / "out", threads=threads).output
    assert tree_hashes(out) == tree_hashes(dataset("silero"))
    assert most[0] == 3 and not live
    entry = max(manifest(s.storage, "silero")["files"], key=lambda f: len(f["segments"]))
    plain = [seg[0] for seg in entry["segments"] if len(seg) == 2]
    assert len(plain) > 9
    key = plain[len(plain) // 2]
    p = at(s, key)
    data = bytearray(p.read_bytes())
    data[len(data) // 4] ^= 0x10
    p.write_bytes(bytes(data))
    before = set(threading.enumerate())
    with pytest.raises(CorruptArchiveError, match="model 'silero', file .*: .*corrupted") as err:  # the first file holding it
        s.restore("silero", tmp_path / "bad", threads=threads)
    assert key in str(err.value)
    assert not live and not (tmp_path / "bad").exists()
    assert not [t for t in threading.enumerate() if t not in before]


def test_a_model_of_more_objects_than_descriptors_is_read_whole(tmp_path: Path, monkeypatch) -> None:
    """A GPU load opens every object of a model at once (elves.store.reading.ModelObjects), more
    than a process may hold descriptors for: the blobs no thread reads give theirs up past
    ``LIMIT`` and open the file again at their next read, and every object still decodes to
    its hash. A file that changed or went away meanwhile is an error, never other bytes."""
    from elves.decoder import iter_stream
    from elves.store import storage
    from elves.store.reading import ModelObjects

    monkeypatch.setattr(storage._DESCRIPTORS, "LIMIT", 8)
    rng = np.random.default_rng(18)
    (tmp_path / "m").mkdir()
    write_safetensors(tmp_path / "m" / "model.safetensors",
                      {f"t{i}": ("F32", (2048,), rng.standard_normal(2048).astype(np.float32).tobytes())
                       for i in range(60)})
    s = Store.init(tmp_path / "s")
    s.add(tmp_path / "m", "m", base=None)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    with ModelObjects(s.storage, "m", s.manifest("m")) as objects, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert len(objects.streams) > 60 and fds() <= before + 8
        for i in range(len(objects.streams)):  # each stream's hash checked at its end
            assert sum(len(c) for c in iter_stream(objects, i, pool, 4)) == objects.streams[i].nbytes
        assert fds() <= before + 8
    assert fds() == before

    key = manifest(s.storage, "m")["files"][0]["segments"][-1][0]
    monkeypatch.setattr(storage._DESCRIPTORS, "LIMIT", 0)  # every blob gives its descriptor up at once
    blob = s.storage.open(object_at(key), "object")
    whole = blob.read(0, blob.size)
    at(s, key).unlink()
    at(s, key).write_bytes(whole)  # the same bytes, but another file
    with pytest.raises(StoreError, match="changed while it was being read"):
        blob.read(0, 10)
    at(s, key).unlink()
    with pytest.raises(StoreError, match="removed while it was being read"):
        blob.read(0, 10)
    blob.close()
