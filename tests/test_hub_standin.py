"""The Hub stand-in answers the real huggingface_hub client the way the Hub does: snapshots come
out bit-exact (LFS through a redirect to another host), revisions by tag, sha and refs/pr branch
resolve, listings paginate, gated/private/missing give the client's own errors, Range works and a
connection cut mid-file is resumed. Nothing of huggingface_hub is mocked."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.conftest import tree_hashes
from tests.hub_standin import HubStandin, folder_files, git_blob_sha1, is_lfs

WEIGHTS = bytes(range(256)) * 64 + b"tail"            # 16 KiB + 4: LFS by its suffix, not its size
CONFIG_V1, CONFIG_V2 = b'{"hidden": 8}\n', b'{"hidden": 16}\n'


@pytest.fixture
def hub():
    with HubStandin() as standin:
        yield standin


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch):
    """A developer's own HF_TOKEN must not turn an anonymous case into an authenticated one."""
    monkeypatch.delenv("HF_TOKEN", raising=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def small_repo(hub: HubStandin, repo_id: str = "org/small", repo_type: str = "model") -> str:
    return hub.commit(repo_id, {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS,
                                "sub/dir/notes.txt": b"notes\n", "sub/top.txt": b"top\n"}, repo_type=repo_type)


def download(hub: HubStandin, tmp_path: Path, filename: str, repo_id: str = "org/small", **kw) -> bytes:
    kw.setdefault("token", False)
    return Path(hf_hub_download(repo_id, filename, cache_dir=tmp_path / "cache", endpoint=hub.url, **kw)).read_bytes()


@pytest.mark.realdata
def test_snapshot_of_real_weights_is_bit_exact_and_takes_the_hub_route(hub, dataset, tmp_path):
    root = dataset("minilm")
    sha = hub.commit("sentence-transformers/all-MiniLM-L6-v2", folder_files(root))
    path = snapshot_download("sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path, endpoint=hub.url)
    assert Path(path).name == sha
    assert tree_hashes(Path(path)) == tree_hashes(root)
    assert len(tree_hashes(root)) == 13

    # The client's route: info at /revision/main, the listing and every file at the commit sha;
    # the LFS weights are fetched from the CDN host, the small files straight from resolve.
    repo = "/sentence-transformers/all-MiniLM-L6-v2"
    paths = [(method, p) for method, p, _ in hub.requests]
    assert paths[0] == ("GET", f"/api/models{repo}/revision/main")
    assert ("GET", f"/api/models{repo}/tree/{sha}") in paths
    assert ("HEAD", f"{repo}/resolve/{sha}/1_Pooling/config.json") in paths
    assert ("GET", f"/cdn-lfs/{sha256((root / 'model.safetensors').read_bytes())}") in paths
    assert hub.downloads() == 13 and hub.downloads("model.safetensors") == 1
    assert hub.bytes_served() == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    info = HfApi(endpoint=hub.url).model_info("sentence-transformers/all-MiniLM-L6-v2", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == sha256((root / "model.safetensors").read_bytes())
    assert weights.size == weights.lfs.size == 90868376
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_sha1((root / "config.json").read_bytes())


def test_lfs_rule_follows_the_hub_gitattributes_and_size():
    assert is_lfs("model.safetensors", 10) and is_lfs("a/b/pytorch_model.bin", 10) and is_lfs("x.gguf", 1)
    assert not is_lfs("tokenizer.json", 466247) and is_lfs("tokenizer.json", 10 * 1024 * 1024)


def test_listing_and_paths_info_give_what_the_client_parses(hub):
    sha = small_repo(hub)
    api = HfApi(endpoint=hub.url)
    files = {f.path: f for f in api.list_repo_tree("org/small", recursive=True, revision=sha)}
    assert sorted(files) == ["config.json", "model.safetensors", "sub", "sub/dir", "sub/dir/notes.txt", "sub/top.txt"]
    weights = files["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == sha256(WEIGHTS) and weights.size == len(WEIGHTS)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(WEIGHTS)}\nsize {len(WEIGHTS)}\n"
    assert weights.lfs.pointer_size == len(pointer) and weights.blob_id == git_blob_sha1(pointer.encode())
    assert files["config.json"].lfs is None and files["config.json"].blob_id == git_blob_sha1(CONFIG_V1)

    top = [f.path for f in api.list_repo_tree("org/small")]
    assert top == ["config.json", "model.safetensors", "sub"]
    # A folder path goes out quoted as one segment (sub%2Fdir).
    assert [f.path for f in api.list_repo_tree("org/small", path_in_repo="sub/dir")] == ["sub/dir/notes.txt"]
    assert ("GET", "/api/models/org/small/tree/main/sub%2Fdir", None) in hub.requests
    expanded = [f for f in api.list_repo_tree("org/small", expand=True, recursive=True) if f.path == "sub/top.txt"]
    assert expanded[0].last_commit is not None and expanded[0].last_commit.oid == sha

    info = api.get_paths_info("org/small", ["config.json", "sub", "nope.txt"], revision=sha)
    assert [(type(i).__name__, i.path) for i in info] == [("RepoFile", "config.json"), ("RepoFolder", "sub")]
    expanded_info = api.get_paths_info("org/small", "model.safetensors", expand=True)
    assert expanded_info[0].last_commit.oid == sha and expanded_info[0].lfs.sha256 == sha256(WEIGHTS)


def test_tree_pagination_returns_every_file_through_link_headers(hub):
    files = {f"shard-{i:02d}.txt": b"%d" % i for i in range(7)}
    hub.commit("org/paged", files)
    hub.page_size = 2
    listed = [f.path for f in HfApi(endpoint=hub.url).list_repo_tree("org/paged", recursive=True)]
    assert listed == sorted(files)
    pages = [p for m, p, _ in hub.requests if p == "/api/models/org/paged/tree/main"]
    assert len(pages) == 4


def test_revisions_by_branch_tag_sha_and_pr_ref(hub, tmp_path):
    first = small_repo(hub)
    hub.tag("org/small", "v1.0", first)
    pr = hub.commit("org/small", {"config.json": b"pr\n"}, branch="refs/pr/1")
    second = hub.commit("org/small", {"config.json": CONFIG_V2}, delete=["sub/top.txt"])
    assert len({first, pr, second}) == 3 and all(len(s) == 40 for s in (first, pr, second))

    assert download(hub, tmp_path, "config.json") == CONFIG_V2
    assert download(hub, tmp_path, "config.json", revision="v1.0") == CONFIG_V1
    assert download(hub, tmp_path, "config.json", revision=first) == CONFIG_V1
    assert download(hub, tmp_path, "config.json", revision="refs/pr/1") == b"pr\n"
    assert ("HEAD", "/org/small/resolve/refs%2Fpr%2F1/config.json", None) in hub.requests
    # The PR branch started from main's files, the second commit kept its parent's other files.
    assert download(hub, tmp_path, "model.safetensors", revision="refs/pr/1") == WEIGHTS
    assert sorted(hub.files("org/small")) == ["config.json", "model.safetensors", "sub/dir/notes.txt"]

    api = HfApi(endpoint=hub.url)
    assert api.model_info("org/small").sha == second
    assert api.model_info("org/small", revision="v1.0").sha == first
    assert api.model_info("org/small", revision="refs/pr/1").sha == pr
    unchanged = [f for f in api.list_repo_tree("org/small", expand=True) if f.path == "model.safetensors"]
    assert unchanged[0].last_commit.oid == first

    fresh = hub.commit("org/small", {"only.txt": b"x"}, parent_files=False)
    snapshot = snapshot_download("org/small", cache_dir=tmp_path / "snap", endpoint=hub.url)
    assert Path(snapshot).name == fresh and tree_hashes(Path(snapshot)) == {"only.txt": sha256(b"x")}


def test_gated_repo_lists_publicly_and_downloads_only_with_a_token(hub, tmp_path):
    small_repo(hub, "org/gated")
    hub.set_gated("org/gated")
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info("org/gated").gated == "auto"
    assert len(list(api.list_repo_tree("org/gated", recursive=True))) == 6
    for token in (False, "hf_wrong"):
        for name in ("config.json", "model.safetensors"):
            with pytest.raises(GatedRepoError):
                download(hub, tmp_path, name, "org/gated", token=token)
    with pytest.raises(GatedRepoError):
        download(hub, tmp_path, "absent.txt", "org/gated")  # gating answers first: no hint of what exists
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", cache_dir=tmp_path / "snap", endpoint=hub.url, token=False)
    assert hub.downloads() == 0
    # With a token the LFS file comes from the CDN, which the client reaches without the token.
    assert download(hub, tmp_path, "model.safetensors", "org/gated", token="hf_good") == WEIGHTS
    assert download(hub, tmp_path, "config.json", "org/gated", token="hf_good") == CONFIG_V1


def test_private_missing_repo_revision_and_file_raise_the_clients_errors(hub, tmp_path):
    sha = small_repo(hub, "org/private")
    hub.set_private("org/private")
    small_repo(hub, "solo")                                  # a repo id without a namespace
    api = HfApi(endpoint=hub.url, token=False)
    for repo_id in ("org/private", "org/absent"):
        with pytest.raises(RepositoryNotFoundError) as raised:
            api.model_info(repo_id)
        assert type(raised.value) is RepositoryNotFoundError and raised.value.response.status_code == 401
        with pytest.raises(RepositoryNotFoundError) as raised:
            download(hub, tmp_path, "config.json", repo_id)
        assert type(raised.value) is RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError) as raised:
        HfApi(endpoint=hub.url, token="hf_good").model_info("org/absent")
    assert raised.value.response.status_code == 404
    assert HfApi(endpoint=hub.url, token="hf_good").model_info("org/private").sha == sha
    assert download(hub, tmp_path, "config.json", "solo") == CONFIG_V1

    with pytest.raises(RevisionNotFoundError):
        api.model_info("solo", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "config.json", "solo", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("solo", revision="v9", cache_dir=tmp_path / "snap", endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        download(hub, tmp_path, "absent.txt", "solo")
    with pytest.raises(EntryNotFoundError):
        download(hub, tmp_path, "sub", "solo")               # a folder is not a file
    # The EntryNotFound answer carries the commit: the client remembers the file as missing there.
    solo_sha = api.model_info("solo").sha
    assert (tmp_path / "cache" / "models--solo" / ".no_exist" / solo_sha / "absent.txt").exists()


def test_lfs_redirects_to_a_cdn_that_serves_ranges(hub):
    sha = small_repo(hub)
    with httpx2.Client(follow_redirects=False) as client:
        head = client.head(f"{hub.url}/org/small/resolve/main/model.safetensors")
        assert head.status_code == 302
        assert head.headers["X-Linked-Etag"] == f'"{sha256(WEIGHTS)}"' and head.headers["ETag"] == head.headers["X-Linked-Etag"]
        assert head.headers["X-Linked-Size"] == str(len(WEIGHTS)) and head.headers["X-Repo-Commit"] == sha
        assert not any(h.lower().startswith("x-xet") for h in head.headers)
        cdn = head.headers["Location"]
        assert cdn.startswith(hub.cdn_url + "/")

        whole = client.get(cdn)
        assert whole.status_code == 200 and whole.content == WEIGHTS
        assert whole.headers["Content-Length"] == str(len(WEIGHTS)) and whole.headers["Accept-Ranges"] == "bytes"
        part = client.get(cdn, headers={"Range": "bytes=100-1123"})
        assert part.status_code == 206 and part.content == WEIGHTS[100:1124]
        assert part.headers["Content-Range"] == f"bytes 100-1123/{len(WEIGHTS)}"
        assert client.get(cdn, headers={"Range": "bytes=-4"}).content == b"tail"
        assert client.get(cdn, headers={"Range": "bytes=16000-"}).content == WEIGHTS[16000:]
        bad = client.get(cdn, headers={"Range": f"bytes={len(WEIGHTS)}-"})
        assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(WEIGHTS)}"
        assert client.get(cdn.replace("Signature=", "Signature=0")).status_code == 403
        assert client.get(cdn, headers={"Authorization": "Bearer hf_good"}).status_code == 400
        # The CDN host serves no API, the Hub host no CDN path.
        assert client.get(f"{hub.cdn_url}/api/models/org/small").status_code == 404
        assert client.get(hub.url + cdn[len(hub.cdn_url):]).status_code == 404

        small = client.get(f"{hub.url}/org/small/resolve/{sha}/config.json", headers={"Range": "bytes=2-7"})
        assert small.status_code == 206 and small.content == CONFIG_V1[2:8]
        head = client.head(f"{hub.url}/org/small/resolve/{sha}/config.json")
        assert head.headers["ETag"] == f'"{git_blob_sha1(CONFIG_V1)}"'
        assert head.headers["Content-Length"] == str(len(CONFIG_V1)) and head.content == b""
        for unknown in ("/api/telemetry/hf_hub/download", "/org/small/blob/main/config.json", "/"):
            assert client.get(hub.url + unknown).status_code == 404
    assert hub.downloads("org/small/model.safetensors") == 4 and hub.downloads("config.json") == 1


def test_a_connection_cut_mid_file_is_resumed_by_the_client(hub, tmp_path):
    # The client writes what it receives in 10 MiB pieces, so it can only resume after a cut past the first one.
    big = bytes(range(251)) * (60 * 1024 * 1024 // 251 // 4)          # ~15 MB of plain bytes: LFS by its size
    hub.commit("org/big", {"weights.dat": big})
    hub.fail_after["weights.dat"] = 12_000_000
    assert download(hub, tmp_path, "weights.dat", "org/big") == big
    cdn_gets = [r for m, p, r in hub.requests if m == "GET" and p.startswith("/cdn-lfs/")]
    piece = 10 * 1024 * 1024
    assert cdn_gets == [None, f"bytes={piece}-"]
    assert hub.downloads("weights.dat") == 2 and hub.bytes_served() == 12_000_000 + len(big) - piece
    assert hub.fail_after == {}


def test_dataset_repos_live_apart_from_models(hub, tmp_path):
    sha = small_repo(hub, "org/data", repo_type="dataset")
    api = HfApi(endpoint=hub.url)
    info = api.dataset_info("org/data", files_metadata=True)
    assert info.sha == sha and {s.rfilename for s in info.siblings} == set(hub.files("org/data", repo_type="dataset"))
    snapshot = snapshot_download("org/data", repo_type="dataset", cache_dir=tmp_path, endpoint=hub.url)
    assert tree_hashes(Path(snapshot))["model.safetensors"] == sha256(WEIGHTS)
    assert os.path.basename(os.path.dirname(os.path.dirname(snapshot))) == "datasets--org--data"
    assert hub.downloads("datasets/org/data/model.safetensors") == 1
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/data")
