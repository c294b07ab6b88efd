"""``elves store verify`` and hostile stores: a real store (a base and its fine-tune, stored as
BitX deltas) damaged one way at a time is reported as exactly that problem, by kind and path, by
the API and the CLI (exit code, --json); forged trailers and manifests (checksums recomputed) are
clear errors naming the file and the field, never a traceback or wrong bytes; a write that fails
(a full disk, a file-size limit) leaves the store as it was."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import xxhash

from elves.errors import ArchiveError, CorruptArchiveError, ElvesError, OutputError
from elves.store import Store, StoreVerifyReport
from elves.store.manifests import manifest
from elves.store.objects import FOOTER, OBJECT_MAGIC, StoredObject
from tests.conftest import tree_hashes
from tests.test_store import at, family, manifest_path, profile_path  # noqa: F401 (family: a fixture)

# ---------------------------------------------------------------------------- a real store


@pytest.fixture(scope="module")
def pristine(family: dict[str, Path], tmp_path_factory) -> Path:
    s = Store.init(tmp_path_factory.mktemp("pristine") / "s")
    s.add(family["tiny-base"])
    assert s.add(family["tiny-ft-a"]).delta_objects >= 4
    return s.path


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Store:
    """A copy of the pristine store, to damage."""
    return Store(shutil.copytree(pristine, tmp_path / "s"))


def keys_of(s: Store, name: str) -> list[str]:
    return [seg[0] for f in manifest(s.storage, name)["files"] for seg in f["segments"]]


def a_delta(s: Store) -> tuple[str, str]:
    """A delta object of the fine-tune and the base object it reads."""
    for key in keys_of(s, "tiny-ft-a"):
        with StoredObject(s.storage, key) as obj:
            if obj.meta.refs:
                return key, obj.meta.refs[0]
    raise AssertionError("the fine-tune has no delta")


def found(r: StoreVerifyReport) -> dict[str, list[str]]:
    return {kind: sorted(p.path for p in problems) for kind, problems in r.problems.items()}


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from elves.cli.main import main; main()", "store", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def check_verify(s: Store, expected: dict[str, list[Path]], full: bool = False) -> StoreVerifyReport:
    """verify (and --full) report exactly ``expected``, and the CLI says the same with its exit code."""
    want = {k: sorted(map(str, v)) for k, v in expected.items()}
    r = s.verify(full=full, threads=2)
    assert found(r) == want and r.ok == (not want)
    if not full:
        assert found(s.verify(full=True, threads=2)) == want  # decoding finds nothing more
    p = cli("verify", s.path, "--json", *(["--full"] if full else []))
    assert p.returncode == (4 if want else 0) and "Traceback" not in p.stderr, p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] == (not want)
    assert {k: sorted(e["path"] for e in out[k]) for k in StoreVerifyReport.PROBLEMS if out[k]} == want
    return r


def forge_trailer(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite an object's trailer as a forger would: ``change`` it, recompute the checksum."""
    data = path.read_bytes()
    tlen, _, magic = FOOTER.unpack(data[-FOOTER.size:])
    start = len(data) - FOOTER.size - tlen
    t = msgpack.unpackb(data[start:start + tlen], raw=False)
    change(t)
    blob = msgpack.packb(t, use_bin_type=True)
    path.write_bytes(data[:start] + blob + FOOTER.pack(len(blob), xxhash.xxh3_64_intdigest(blob), magic))


def write_manifest(s: Store, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    p = manifest_path(s, name)
    man = json.loads(p.read_text())
    change(man)
    p.write_text(json.dumps(man))
    return p


# ---------------------------------------------------------------------------- verify

def test_a_clean_store_verifies(store: Store, family: dict[str, Path]) -> None:
    r = check_verify(store, {})
    assert r.models == 2 and r.objects >= 10 and r.orphans_checked
    assert r.bytes_checked == sum(p.stat().st_size for p in (store.path / "objects").glob("*/*"))
    full = check_verify(store, {}, full=True)
    assert full.files_checked == 6
    assert full.bytes_checked == r.bytes_checked + sum(m.bytes for m in store.models())
    p = cli("verify", store.path)
    assert p.returncode == 0 and "OK, 2 models" in p.stdout


def test_a_missing_object(store: Store, tmp_path: Path) -> None:
    delta, ref = a_delta(store)
    at(store, ref).unlink()  # the base object the delta reads
    r = check_verify(store, {"missing_objects": [at(store, ref)]})
    assert f"object {ref} is missing" in r.missing_objects[0].message
    p = cli("verify", store.path)
    assert p.returncode == 4 and "missing objects: 1" in p.stdout and str(at(store, ref)) in p.stdout


def test_a_flipped_payload_byte(store: Store, tmp_path: Path) -> None:
    delta, _ = a_delta(store)
    p = at(store, delta)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))
    r = check_verify(store, {"damaged_objects": [p]})
    assert "checksum mismatch" in r.damaged_objects[0].message
    with pytest.raises(CorruptArchiveError, match="model 'tiny-ft-a', file model.safetensors: .*checksum"):
        store.restore("tiny-ft-a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _halve_a_chunk(t: dict[str, Any]) -> None:
    t["chunks"][0][1] //= 2


def _huge_nbytes(t: dict[str, Any]) -> None:
    t["nbytes"] = 1 << 50
    t["chunks"][-1][1] = (1 << 50) - sum(c[1] for c in t["chunks"][:-1])


def _huge_chunks(t: dict[str, Any]) -> None:  # a consistent lie: one chunk of 2^40 bytes
    t["chunk_elems"] = 1 << 39
    t["nbytes"] = 1 << 40
    t["chunks"] = [[sum(c[0] for c in t["chunks"]), 1 << 40, t["chunks"][0][2]]]


def _wider_filter(t: dict[str, Any]) -> None:
    t["pipeline"][0]["dtype"] = "F32"


def _drop_refs(t: dict[str, Any]) -> None:
    t["refs"] = []


def _no_codec(t: dict[str, Any]) -> None:
    t["pipeline"][0]["id"] = "nope"


def _negative(t: dict[str, Any]) -> None:
    t["chunks"][0][0] = -1


def _strings(t: dict[str, Any]) -> None:
    t["chunks"] = "many"


@pytest.mark.parametrize("forge, says", [
    (_halve_a_chunk, "chunk 0 decodes to"), (_huge_nbytes, "chunks cannot hold"),
    (_huge_chunks, "exceed the"), (_wider_filter, "codes F32 elements"), (_drop_refs, "'refs'"),
    (_no_codec, "unknown codec"), (_negative, "malformed chunk"), (_strings, "'chunks'"),
])
def test_a_forged_trailer_with_its_checksum_recomputed(store: Store, tmp_path: Path, forge: Callable,
                                                       says: str) -> None:
    delta, _ = a_delta(store)
    p = at(store, delta)
    forge_trailer(p, forge)
    r = check_verify(store, {"damaged_objects": [p]})
    assert says in r.damaged_objects[0].message and delta in r.damaged_objects[0].message
    with pytest.raises(ElvesError, match=says) as e:  # CodecError for the unknown codec
        store.restore("tiny-ft-a", tmp_path / "out")
    assert e.value.path == str(p) and not (tmp_path / "out").exists()


def test_a_delta_whose_reference_is_a_delta(store: Store) -> None:
    first, _ = a_delta(store)
    deltas = []
    for key in keys_of(store, "tiny-ft-a"):
        with StoredObject(store.storage, key) as obj:
            if obj.meta.refs and key != first:
                deltas.append(obj.meta)
    other = deltas[0]  # as long as ``first``: the same shape of the fine-tune

    def read_the_other_delta(t: dict[str, Any]) -> None:
        xor = t["pipeline"][0]
        xor["ref_hash"], xor["ref_nbytes"] = other.hash, other.nbytes
        t["refs"] = [f"{other.hash}.bf16"]

    forge_trailer(at(store, first), read_the_other_delta)
    r = check_verify(store, {"bad_refs": [at(store, first)]})
    assert "a delta itself" in r.bad_refs[0].message


def test_orphans_are_reported_and_gc_frees_them(store: Store, family: dict[str, Path]) -> None:
    before = set(keys_of(store, "tiny-base")) | set(keys_of(store, "tiny-ft-a"))
    store.add(family["other"], base=None)
    only_other = [at(store, k) for k in set(keys_of(store, "other")) - before]
    assert only_other
    store.remove("other")
    r = check_verify(store, {"orphans": only_other})
    assert all("gc" in p.message for p in r.orphans)
    (store.path / "tmp" / "obj.killed").write_bytes(b"half an object")  # tmp/ is not looked at
    (store.path / "tmp" / "staging.killed").mkdir()                      # nor a writer's folder there
    (store.path / "tmp" / "staging.killed" / "part").write_bytes(b"x")
    report = store.gc()
    assert report.objects_removed == len(only_other) and not any((store.path / "tmp").iterdir())
    check_verify(store, {})


@pytest.mark.parametrize("change, says", [
    (lambda m: m["files"][0]["segments"][0].__setitem__(1, -5), "malformed segment"),
    (lambda m: m["files"][0].__setitem__("path", "../../outside"), "outside the output folder"),
    (lambda m: m["files"][0].__setitem__("sha256", "xyz"), "'sha256'"),
    (lambda m: m.__setitem__("name", "someone-else"), "not the one its file is named after"),
    (lambda m: m["files"][0]["segments"][0].__setitem__(0, "../../../etc/passwd"), "malformed segment"),
    (lambda m: m["files"].append(dict(m["files"][0])), "same path"),
    (lambda m: m["files"][0]["segments"].pop(), "do not add up to its size"),
    (lambda m: m.__setitem__("files", []), "lists 0 files"),
])
def test_a_malformed_manifest(store: Store, tmp_path: Path, change: Callable, says: str) -> None:
    p = write_manifest(store, "tiny-ft-a", change)
    r = check_verify(store, {"bad_manifests": [p]})
    assert says in r.bad_manifests[0].message and not r.orphans_checked  # what it names is unknown
    with pytest.raises(ArchiveError, match=says) as e:
        store.restore("tiny-ft-a", tmp_path / "out")
    assert e.value.path == str(p)
    store.restore("tiny-base", tmp_path / "base")  # the other model is unaffected


def test_a_manifest_that_is_not_json(store: Store) -> None:
    p = manifest_path(store, "tiny-ft-a")
    p.write_text("[" * 100_000)
    r = check_verify(store, {"bad_manifests": [p]})
    assert "not valid JSON" in r.bad_manifests[0].message
    p.write_bytes(b"\xff\xfe garbage")
    check_verify(store, {"bad_manifests": [p]})


def test_a_segment_that_does_not_fit_its_object(store: Store) -> None:
    def tell_a_lie(m: dict[str, Any]) -> None:  # one weight's length moved to the next: sizes still add up
        segs = next(f for f in m["files"] if f["path"] == "model.safetensors")["segments"]
        i = next(i for i, s in enumerate(segs) if s[0].endswith(".bf16") and segs[i + 1][0].endswith(".bf16"))
        segs[i][1] -= 2
        segs[i + 1][1] += 2
        next(f for f in m["files"] if f["path"] == "model.safetensors")["tensors"] = []

    p = write_manifest(store, "tiny-base", tell_a_lie)
    r = check_verify(store, {"bad_manifests": [p]})
    assert "does not fit object" in r.bad_manifests[0].message


def test_content_swapped_in_a_manifest_is_found_by_full_only(store: Store, tmp_path: Path) -> None:
    def swap(m: dict[str, Any]) -> None:  # two weights of the same size trade places
        segs = next(f for f in m["files"] if f["path"] == "model.safetensors")["segments"]
        i, j = [i for i, s in enumerate(segs) if s[0].endswith(".bf16")][:2]
        segs[i], segs[j] = segs[j], segs[i]

    p = write_manifest(store, "tiny-base", swap)
    assert store.verify().ok
    assert cli("verify", store.path).returncode == 0
    r = store.verify(full=True)
    assert found(r) == {"bad_files": [str(p)]} and r.files_checked == 5
    assert "model 'tiny-base', file model.safetensors: restored bytes do not match" in r.bad_files[0].message
    out = cli("verify", store.path, "--full", "--json")
    assert out.returncode == 4 and json.loads(out.stdout)["bad_files"][0]["path"] == str(p)
    with pytest.raises(CorruptArchiveError, match="sha256"):  # restore checks it as it writes
        store.restore("tiny-base", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_links_inside_the_store_are_not_followed(store: Store, tmp_path: Path) -> None:
    delta, _ = a_delta(store)
    p = at(store, delta)
    outside = tmp_path / "outside"
    shutil.move(p, outside)
    p.symlink_to(outside)  # the same bytes, through a link
    r = check_verify(store, {"damaged_objects": [p]})
    assert "symbolic link" in r.damaged_objects[0].message
    with pytest.raises(CorruptArchiveError, match="symbolic link"):
        store.restore("tiny-ft-a", tmp_path / "out")
    p.unlink()
    shutil.move(outside, p)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("not the store's")
    (store.path / "objects" / "zz").symlink_to(elsewhere)  # a linked folder: an orphan entry, not walked
    check_verify(store, {"orphans": [store.path / "objects" / "zz"]})
    store.gc()
    assert (elsewhere / "precious").exists() and not (store.path / "objects" / "zz").exists()
    check_verify(store, {})


# ---------------------------------------------------------------------------- failing writes

def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_a_file_size_limit_during_add_is_a_clean_error_and_leaves_nothing(store: Store,
                                                                         family: dict[str, Path]) -> None:
    before = sorted((store.path / "objects").glob("*/*"))
    cmd = [sys.executable, "-c", "from elves.cli.main import main; main()",
           "store", "add", store.path, family["other"], "--base", "none"]
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size, check=False)
    assert p.returncode == 5 and "Traceback" not in p.stderr, p.stderr
    assert "cannot write to the store: File too large" in p.stderr and str(store.path / "objects") in p.stderr
    assert sorted((store.path / "objects").glob("*/*")) == before and not list((store.path / "tmp").iterdir())
    assert [m.name for m in store.models()] == ["tiny-base", "tiny-ft-a"]
    check_verify(store, {})
    assert store.add(family["other"]).name == "other"  # and it works once there is room


def test_a_full_disk_at_the_manifest_removes_what_the_add_wrote(store: Store, family: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted((store.path / "objects").glob("*/*"))
    target = manifest_path(store, "other")
    real = os.replace

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        if Path(dst) == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="No space left on device") as e:
        store.add(family["other"])
    assert e.value.path == str(target)
    monkeypatch.undo()
    assert sorted((store.path / "objects").glob("*/*")) == before
    assert not list((store.path / "tmp").iterdir()) and not profile_path(store, "other").exists()
    check_verify(store, {})


def test_restore_of_a_store_with_links_in_the_model(tmp_path: Path, family: dict[str, Path]) -> None:
    src = shutil.copytree(family["tiny-base"], tmp_path / "linked")
    (src / "sub").mkdir()
    (src / "sub" / "config.json").symlink_to("../config.json")
    s = Store.init(tmp_path / "s")
    s.add(src)
    out = s.restore("linked", tmp_path / "out").output
    assert (out / "sub" / "config.json").is_symlink() and os.readlink(out / "sub" / "config.json") == "../config.json"
    assert tree_hashes(out) == tree_hashes(src)
    check_verify(s, {}, full=True)


def test_the_trailer_footer_itself(store: Store) -> None:
    """A footer whose trailer length reaches before the file, and one that claims 2^63 bytes."""
    delta, _ = a_delta(store)
    p = at(store, delta)
    data = p.read_bytes()
    for tlen in (len(data), 1 << 63):
        body = data[:-FOOTER.size]
        p.write_bytes(body + struct.pack("<QQ8s", tlen, 0, OBJECT_MAGIC))
        check_verify(store, {"damaged_objects": [p]})
