"""Export out of the mirror: a plain folder, or a Hugging Face cache laid out as huggingface_hub
itself lays it out, which the real client then reads offline (HF_HUB_OFFLINE=1, in a subprocess,
since huggingface_hub reads it at import). Repos are pulled for real from the Hub stand-in."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import snapshot_download

from elves.errors import (
    ElvesError,
    HubNotFoundError,
    OutputError,
    OutputExistsError,
    UsageError,
)
from elves.mirror.export import export, repo_folder
from elves.mirror.pull import pull
from elves.store import Store
from tests.conftest import tree_hashes, write_safetensors
from tests.hub_standin import HubStandin, folder_files

CONFIG_V1, CONFIG_V2 = b'{"hidden": 8}\n', b'{"hidden": 16}\n'
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

# The real client, offline, asked for each query's snapshot and files; it prints where they lie.
OFFLINE_CLIENT = """
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
args = json.loads(sys.argv[1])
out = []
for q in args["queries"]:
    kw = dict(repo_type=q["type"], revision=q["revision"], cache_dir=args["cache"])
    try:
        snap = snapshot_download(q["repo"], **kw)
        files = {p: hf_hub_download(q["repo"], p, **kw) for p in q["files"]}
        out.append({"snapshot": snap, "files": files})
    except Exception as e:
        out.append({"error": type(e).__name__, "message": str(e)})
print(json.dumps(out))
"""


@dataclass
class Mirror:
    hub: HubStandin
    store: Store
    v1: str                                  # org/tiny's first commit, tagged v1
    main: str                                # its second (config.json changed)
    pr: str                                  # refs/pr/1: main plus extra.txt
    data: str                                # the dataset org/data's commit
    sources: dict[str, dict[str, bytes]]     # each commit's files


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mirror")
    rng = np.random.default_rng(12)
    w = rng.standard_normal(48_000).astype(np.float32).tobytes()
    weights = write_safetensors(tmp / "w.safetensors", {"w": ("F32", [48_000], w)}).read_bytes()
    first = {".gitattributes": GITATTRIBUTES, "config.json": CONFIG_V1, "model.safetensors": weights,
             "sub/dir/notes.txt": b"notes\n"}
    data = {"README.md": b"---\nlicense: mit\n---\n", "data/train.csv": b"a,b\n1,2\n3,4\n",
            "data/part-0.parquet": rng.bytes(6000)}
    with pytest.MonkeyPatch.context() as env, HubStandin() as hub:
        env.delenv("HF_TOKEN", raising=False)   # a developer's own token must not reach the stand-in
        v1 = hub.commit("org/tiny", first)
        hub.tag("org/tiny", "v1", v1)
        main = hub.commit("org/tiny", {"config.json": CONFIG_V2})
        pr = hub.commit("org/tiny", {"extra.txt": b"extra\n"}, branch="refs/pr/1")
        dsha = hub.commit("org/data", data, repo_type="dataset")
        store = Store.init(tmp / "store")
        for revision in ("v1", None, "refs/pr/1"):
            pull(store, "org/tiny", revision, endpoint=hub.url)
        pull(store, "org/data", repo_type="dataset", endpoint=hub.url)
        second = {**first, "config.json": CONFIG_V2}
        yield Mirror(hub, store, v1, main, pr, dsha, {v1: first, main: second,
                                                      pr: {**second, "extra.txt": b"extra\n"}, dsha: data})


def offline_env(home: Path) -> dict[str, str]:
    """The environment of an offline client: none of ours, no token, a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    # offline mode forbids any request; the endpoint would refuse one anyway
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9")
    return env


def offline(cache: Path, queries: list[dict]) -> list[dict]:
    """What the real client, with HF_HUB_OFFLINE=1, makes of ``cache`` for each query."""
    run = subprocess.run([sys.executable, "-c", OFFLINE_CLIENT, json.dumps({"cache": str(cache), "queries": queries})],
                         check=False, env=offline_env(cache.parent / "hf-home"), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def query(repo: str, revision: str | None, files: list[str], repo_type: str = "model") -> dict:
    return {"repo": repo, "type": repo_type, "revision": revision, "files": files}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}


def layout(folder: Path) -> dict[str, tuple]:
    """Everything under ``folder``, links not followed: a link's target, a file's bytes and mode."""
    out: dict[str, tuple] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(folder).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def blob_stats(cache: Path, repo: str = "models--org--tiny") -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / repo / "blobs").iterdir()}


def test_the_cache_is_laid_out_as_the_client_lays_it_out(mirror, tmp_path):
    """The same repo folder, to the byte and the link, as the client's own online downloads leave."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for revision in ("main", "v1", "refs/pr/1"):
        export(mirror.store, "org/tiny", revision, hf_cache=ours)
        snapshot_download("org/tiny", revision=revision, cache_dir=theirs, endpoint=mirror.hub.url, token=False)
    export(mirror.store, "org/data", repo_type="dataset", hf_cache=ours)
    snapshot_download("org/data", repo_type="dataset", cache_dir=theirs, endpoint=mirror.hub.url, token=False)
    for folder in ("models--org--tiny", "datasets--org--data"):
        mine, client = layout(ours / folder), layout(theirs / folder)
        # The client's trees/*.json come out of mkstemp, 0600; ours are readable by every user of
        # a shared cache (the client reading one it cannot open just skips the completeness check).
        for rel in [rel for rel in client if rel.startswith("trees/") and rel.endswith(".json")]:
            assert client[rel][2] == 0o600 and mine[rel][2] == 0o644
            mine[rel], client[rel] = mine[rel][:2], client[rel][:2]
        assert mine == client
    mine = layout(ours / "models--org--tiny")
    assert mine["refs/refs/pr/1"] == ("file", mirror.pr.encode(), 0o644)
    assert mine[f"snapshots/{mirror.v1}/sub/dir/notes.txt"][1].startswith("../../../../blobs/")
    assert (ours / "CACHEDIR.TAG").read_bytes() == (theirs / "CACHEDIR.TAG").read_bytes()
    assert sorted(os.listdir(ours)) == ["CACHEDIR.TAG", "datasets--org--data", "models--org--tiny"]


def test_offline_client_loads_every_revision_bit_exact(mirror, tmp_path):
    cache = tmp_path / "cache"
    results = [export(mirror.store, "org/tiny", rev, hf_cache=cache) for rev in (None, "v1", "refs/pr/1")]
    results.append(export(mirror.store, "org/data", repo_type="dataset", hf_cache=cache))
    assert [r.commit for r in results] == [mirror.main, mirror.v1, mirror.pr, mirror.data]
    first = results[0]
    assert (first.revision, first.files, first.bytes) == ("main", 4, sum(map(len, mirror.sources[mirror.main].values())))
    assert first.where == cache / "models--org--tiny" / "snapshots" / mirror.main

    wanted = ["config.json", "sub/dir/notes.txt", "model.safetensors"]
    queries = [query("org/tiny", "main", wanted), query("org/tiny", "v1", wanted),
               query("org/tiny", mirror.v1, wanted), query("org/tiny", "refs/pr/1", ["extra.txt"]),
               query("org/data", None, ["data/train.csv", "data/part-0.parquet"], "dataset")]
    answers = offline(cache, queries)
    for q, commit, answer in zip(queries, [mirror.main, mirror.v1, mirror.v1, mirror.pr, mirror.data], answers):
        assert "error" not in answer, answer
        source = mirror.sources[commit]
        assert Path(answer["snapshot"]) == cache / repo_folder(q["type"], q["repo"]) / "snapshots" / commit
        assert tree_hashes(Path(answer["snapshot"])) == digests(source)
        for path, where in answer["files"].items():
            assert Path(where).read_bytes() == source[path]
    # A revision the cache does not hold is the client's own error, not a guess.
    missing = offline(cache, [query("org/tiny", "v2", [])])[0]
    assert missing["error"] == "LocalEntryNotFoundError"


def test_export_to_a_folder_is_bit_exact_and_refuses_a_full_one(mirror, tmp_path):
    out = tmp_path / "v1"
    r = export(mirror.store, "org/tiny", "v1", to=out)
    assert tree_hashes(out) == digests(mirror.sources[mirror.v1])
    assert (r.where, r.commit, r.files, r.bytes_written) == (out, mirror.v1, 4, r.bytes)
    with pytest.raises(OutputExistsError):
        export(mirror.store, "org/tiny", "main", to=out)
    export(mirror.store, "org/tiny", "main", to=out, force=True)
    assert tree_hashes(out) == digests(mirror.sources[mirror.main])
    data = export(mirror.store, "org/data", mirror.data, repo_type="dataset", to=tmp_path / "data")
    assert tree_hashes(data.where) == digests(mirror.sources[mirror.data])


def test_exporting_again_reuses_the_blobs_and_revisions_share_them(mirror, tmp_path):
    cache = tmp_path / "cache"
    first = export(mirror.store, "org/tiny", "main", hf_cache=cache)
    assert (first.blobs_reused, first.bytes_written) == (0, first.bytes)
    before = blob_stats(cache)
    seen: list[int] = []
    again = export(mirror.store, "org/tiny", "main", hf_cache=cache, progress=seen.append)
    assert (again.blobs_reused, again.bytes_written) == (4, 0)
    assert sum(seen) == again.bytes          # every reused blob was read through to check it
    assert blob_stats(cache) == before

    beside = export(mirror.store, "org/tiny", "v1", hf_cache=cache)
    assert (beside.blobs_reused, beside.bytes_written) == (3, len(CONFIG_V1))   # only config.json differs
    after = blob_stats(cache)
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == len(before) + 1
    snaps = cache / "models--org--tiny" / "snapshots"
    assert (snaps / mirror.main / "model.safetensors").resolve() == (snaps / mirror.v1 / "model.safetensors").resolve()


def test_a_damaged_blob_is_replaced_and_a_good_one_kept(mirror, tmp_path):
    cache = tmp_path / "cache"
    export(mirror.store, "org/tiny", "v1", hf_cache=cache)
    snap = cache / "models--org--tiny" / "snapshots" / mirror.v1
    weights = (snap / "model.safetensors").resolve()
    flipped = bytearray(weights.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    weights.write_bytes(bytes(flipped))                         # same size, wrong bytes
    notes = (snap / "sub" / "dir" / "notes.txt").resolve()
    notes.write_bytes(b"no")                                    # truncated
    kept = blob_stats(cache)
    r = export(mirror.store, "org/tiny", "v1", hf_cache=cache)
    assert r.blobs_reused == 2 and r.bytes_written == len(flipped) + len(b"notes\n")
    assert tree_hashes(snap) == digests(mirror.sources[mirror.v1])
    now = blob_stats(cache)
    assert all(now[k] == v for k, v in kept.items() if k not in (weights.name, notes.name))
    assert now[weights.name][0] != kept[weights.name][0]       # renamed over, not rewritten in place


def test_a_cut_export_leaves_a_snapshot_the_client_calls_incomplete(mirror, tmp_path):
    cache = tmp_path / "cache"

    pieces: list[int] = []

    def cut(n: int) -> None:          # killed in the weights, after two small files
        pieces.append(n)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(mirror.store, "org/tiny", mirror.main, hf_cache=cache, progress=cut)
    top = cache / "models--org--tiny"
    assert len(list((top / "blobs").iterdir())) == 2           # its temporary blob is gone
    assert len(list((top / "snapshots" / mirror.main).iterdir())) == 2
    # The listing went in first: by its sha, the client looks for every file it names and finds
    # one missing; by a branch, it finds no ref (the ref goes in last).
    by_sha, by_branch = offline(cache, [query("org/tiny", mirror.main, []), query("org/tiny", "main", [])])
    assert by_sha["error"] == by_branch["error"] == "LocalEntryNotFoundError"
    # Without the listing, the client would have taken the partial snapshot for whole.
    listing = top / "trees" / f"{mirror.main}.json"
    saved = listing.read_bytes()
    listing.unlink()
    assert offline(cache, [query("org/tiny", mirror.main, [])])[0]["snapshot"] == str(top / "snapshots" / mirror.main)
    listing.write_bytes(saved)
    export(mirror.store, "org/tiny", mirror.main, hf_cache=cache)
    assert "error" not in offline(cache, [query("org/tiny", mirror.main, [])])[0]
    # A revision given as its commit sha needs no ref.
    assert not (cache / "models--org--tiny" / "refs").exists()


@pytest.mark.parametrize("planted", ["repo", "blobs", "snapshots", "commit", "subfolder", "trees", "refs", "blob"])
def test_a_link_planted_in_the_cache_is_refused_and_nothing_written_outside(mirror, tmp_path, planted):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    top = cache / "models--org--tiny"
    config_blob = hashlib.sha1(b"blob %d\0" % len(CONFIG_V1) + CONFIG_V1).hexdigest()
    where = {"repo": top, "blobs": top / "blobs", "snapshots": top / "snapshots",
             "commit": top / "snapshots" / mirror.v1, "subfolder": top / "snapshots" / mirror.v1 / "sub",
             "trees": top / "trees", "refs": top / "refs", "blob": top / "blobs" / config_blob}[planted]
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(outside / "keep" if planted == "blob" else outside)
    with pytest.raises(OutputError, match="link") as e:
        export(mirror.store, "org/tiny", "v1", hf_cache=cache)
    assert isinstance(e.value, ElvesError) and e.value.path == str(where)
    assert layout(outside) == {"keep": ("file", b"keep", 0o644)}
    assert where.is_symlink()


def test_links_in_place_of_a_ref_or_a_snapshot_file_are_replaced_never_followed(mirror, tmp_path):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    top = cache / "models--org--tiny"
    (top / "refs").mkdir(parents=True)
    (top / "refs" / "v1").symlink_to(outside / "keep")
    (top / "snapshots" / mirror.v1).mkdir(parents=True)
    (top / "snapshots" / mirror.v1 / "config.json").symlink_to(outside / "keep")
    export(mirror.store, "org/tiny", "v1", hf_cache=cache)
    assert layout(outside) == {"keep": ("file", b"keep", 0o644)}
    assert (top / "refs" / "v1").read_bytes() == mirror.v1.encode() and not (top / "refs" / "v1").is_symlink()
    assert (top / "snapshots" / mirror.v1 / "config.json").read_bytes() == CONFIG_V1


def test_unknown_repo_revision_or_destination_is_a_clear_error(mirror, tmp_path):
    with pytest.raises(HubNotFoundError, match="no model repo 'org/nope'"):
        export(mirror.store, "org/nope", hf_cache=tmp_path / "c")
    with pytest.raises(HubNotFoundError, match=r"no revision 'v9'.*tracks main \(.*refs/pr/1 .*v1 ") as e:
        export(mirror.store, "org/tiny", "v9", hf_cache=tmp_path / "c")
    assert e.value.exit_code == 10
    with pytest.raises(HubNotFoundError, match="no model repo 'org/data'"):
        export(mirror.store, "org/data", to=tmp_path / "d")          # it is a dataset
    with pytest.raises(HubNotFoundError):
        export(mirror.store, "org/tiny", "0" * 40, to=tmp_path / "d")
    for bad in ({}, {"to": tmp_path / "a", "hf_cache": tmp_path / "b"}):
        with pytest.raises(UsageError, match="one destination"):
            export(mirror.store, "org/tiny", **bad)
    for revision in ("a/../b", "refs/./x", "-x"):
        with pytest.raises(UsageError, match="not a valid revision"):
            export(mirror.store, "org/tiny", revision, hf_cache=tmp_path / "c")
    with pytest.raises(UsageError, match="repo id"):
        export(mirror.store, "../etc", hf_cache=tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def minilm(mirror, dataset):
    root = dataset("minilm")
    sha = mirror.hub.commit("sentence-transformers/all-MiniLM-L6-v2", folder_files(root))
    pull(mirror.store, "sentence-transformers/all-MiniLM-L6-v2", endpoint=mirror.hub.url)
    return root, sha


@pytest.mark.realdata
def test_real_weights_export_bit_exact_and_load_offline(mirror, minilm, tmp_path):
    root, sha = minilm
    repo_id = "sentence-transformers/all-MiniLM-L6-v2"
    folder = export(mirror.store, repo_id, to=tmp_path / "plain")
    assert tree_hashes(folder.where) == tree_hashes(root)
    cache = tmp_path / "cache"
    r = export(mirror.store, repo_id, hf_cache=cache, threads=2)
    assert (r.commit, r.files, r.bytes_written) == (sha, 13, r.bytes)
    answer = offline(cache, [query(repo_id, None, ["model.safetensors", "1_Pooling/config.json"])])[0]
    assert "error" not in answer, answer
    assert tree_hashes(Path(answer["snapshot"])) == tree_hashes(root)
    for path, where in answer["files"].items():
        assert Path(where).read_bytes() == (root / path).read_bytes()


@pytest.mark.realdata
def test_transformers_loads_the_exported_cache_offline(mirror, minilm, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cache = tmp_path / "cache"
    export(mirror.store, "sentence-transformers/all-MiniLM-L6-v2", hf_cache=cache)
    script = ("import sys, transformers; m = transformers.AutoModel.from_pretrained("
              "'sentence-transformers/all-MiniLM-L6-v2', cache_dir=sys.argv[1]); print(m.config.hidden_size)")
    run = subprocess.run([sys.executable, "-c", script, str(cache)], check=False, env=offline_env(tmp_path / "hf-home"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "384"
