"""The mirror's server answers the real huggingface_hub client as the Hub does: snapshots and
single files come out bit-exact (a fine-tune stored as its delta included), Range works, eight
clients at once all get the same bytes, a pull-through fetches a new repo once however many ask,
and tokens, gating, privacy, traversal and missing repos/revisions/files get the Hub's answers.
The store is filled by pulling from the Hub stand-in; nothing of huggingface_hub is mocked."""
from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import uvicorn
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from starlette.applications import Starlette
from starlette.routing import Mount

from elves.errors import UsageError
from elves.mirror.pull import pull
from elves.mirror.hub import read_tokens
from elves.mirror.server import app
from elves.store import Store
from tests.conftest import tree_hashes
from tests.hub_standin import HubStandin, folder_files, git_blob_sha1

pytestmark = pytest.mark.realdata

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TOKEN = "mirror-secret"
SMALL = {"config.json": b'{"hidden": 8}\n', "sub/dir/notes.txt": b"notes\n", "sub/top.txt": b"top\n",
         "weights.bin": bytes(range(256)) * 64}


@contextmanager
def running(application: Starlette) -> Iterator[str]:
    """``application`` served by uvicorn on a free port of 127.0.0.1, in a thread; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(application, log_config=None, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the mirror did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def raw(url: str, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request sent as written (no client-side normalisation of ``..`` or quoting)."""
    conn = http.client.HTTPConnection(urlparse(url).netloc, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def mirror(dataset, tmp_path_factory):
    """A store pulled from the stand-in (minilm, a fine-tune of it, a dataset, small repos:
    gated, private, with a refs/pr/1 branch), served twice: open, and behind a token."""
    roots = {"minilm": dataset("minilm"), "ft": dataset("minilm-family/last-layers"), "data": dataset("silero")}
    with HubStandin() as hub:
        shas = {"minilm": hub.commit(MINILM, folder_files(roots["minilm"])),
                "ft": hub.commit("me/ft", folder_files(roots["ft"])),
                "data": hub.commit("org/vad", folder_files(roots["data"]), repo_type="dataset"),
                "small": hub.commit("org/small", SMALL),
                "pr": hub.commit("org/small", {"config.json": b"pr\n"}, branch="refs/pr/1")}
        for name in ("org/gated", "org/private"):
            hub.commit(name, SMALL)
        hub.set_gated("org/gated")
        hub.set_private("org/private")
        store = Store.init(tmp_path_factory.mktemp("mirror") / "store")
        pulled = {"minilm": pull(store, MINILM, endpoint=hub.url), "ft": pull(store, "me/ft", endpoint=hub.url)}
        pull(store, "org/vad", repo_type="dataset", endpoint=hub.url)
        pull(store, "org/small", endpoint=hub.url)
        pull(store, "org/small", "refs/pr/1", endpoint=hub.url)
        for name in ("org/gated", "org/private"):
            pull(store, name, endpoint=hub.url, token="hf_good")
        with running(app(store, page_size=4)) as url, running(app(store, tokens=[TOKEN])) as token_url:
            yield SimpleNamespace(hub=hub, store=store, url=url, token_url=token_url, roots=roots, shas=shas,
                                  pulled=pulled)


def test_snapshots_through_the_mirror_are_bit_exact(mirror, tmp_path):
    assert mirror.pulled["ft"].base == mirror.pulled["minilm"].model     # the fine-tune is a delta
    for repo_id, key, repo_type in ((MINILM, "minilm", "model"), ("me/ft", "ft", "model"),
                                    ("org/vad", "data", "dataset")):
        path = snapshot_download(repo_id, repo_type=repo_type, cache_dir=tmp_path / key, endpoint=mirror.url,
                                 token=False)
        assert Path(path).name == mirror.shas[key]
        assert tree_hashes(Path(path)) == tree_hashes(mirror.roots[key])
    one = hf_hub_download("me/ft", "model.safetensors", cache_dir=tmp_path / "one", endpoint=mirror.url, token=False)
    assert sha256(Path(one).read_bytes()) == sha256((mirror.roots["ft"] / "model.safetensors").read_bytes())


def test_info_listing_and_headers_match_the_hubs(mirror):
    api, hub_api = HfApi(endpoint=mirror.url, token=False), HfApi(endpoint=mirror.hub.url, token=False)

    def files(a: HfApi, **kw):
        return {f.path: (type(f).__name__, getattr(f, "size", None), getattr(f, "blob_id", None),
                         getattr(f, "lfs", None)) for f in a.list_repo_tree(MINILM, **kw)}

    # page_size=4: the 13 files and a folder come in four pages, through the Link header.
    assert files(api, recursive=True) == files(hub_api, recursive=True)
    assert len(files(api, recursive=True)) == 14
    assert files(api) == files(hub_api)
    assert [f.path for f in api.list_repo_tree(MINILM, path_in_repo="1_Pooling")] == ["1_Pooling/config.json"]
    info, hub_info = (a.model_info(MINILM, files_metadata=True) for a in (api, hub_api))
    assert info.sha == hub_info.sha and info.siblings is not None and hub_info.siblings is not None
    assert sorted(info.siblings, key=lambda s: s.rfilename) == sorted(hub_info.siblings, key=lambda s: s.rfilename)
    assert api.dataset_info("org/vad").sha == mirror.shas["data"]
    paths = api.get_paths_info(MINILM, ["config.json", "1_Pooling", "absent", "../config.json"])
    assert [(type(p).__name__, p.path) for p in paths] == [("RepoFile", "config.json"), ("RepoFolder", "1_Pooling")]

    weights = (mirror.roots["minilm"] / "model.safetensors").read_bytes()
    meta = get_hf_file_metadata(hf_hub_url(MINILM, "model.safetensors", endpoint=mirror.url), token=False)
    assert (meta.etag, meta.size, meta.commit_hash) == (sha256(weights), len(weights), mirror.shas["minilm"])
    status, headers, body = raw(mirror.url, "HEAD", f"/{MINILM}/resolve/main/model.safetensors")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(weights))
    assert headers["accept-ranges"] == "bytes" and headers["x-linked-size"] == str(len(weights))
    assert not any(k.startswith("x-xet") for k in headers)
    status, headers, _ = raw(mirror.url, "HEAD", f"/{MINILM}/resolve/main/config.json")
    config = (mirror.roots["minilm"] / "config.json").read_bytes()
    assert status == 200 and headers["etag"] == f'"{git_blob_sha1(config)}"' and "x-linked-etag" not in headers


def test_ranges(mirror):
    weights = (mirror.roots["minilm"] / "model.safetensors").read_bytes()
    size, path = len(weights), f"/{MINILM}/resolve/{mirror.shas['minilm']}/model.safetensors"
    for header, (start, stop) in ((f"bytes=1000-{1 << 22}", (1000, (1 << 22) + 1)),
                                  (f"bytes={size - 100}-", (size - 100, size)),
                                  ("bytes=-7", (size - 7, size)),
                                  (f"bytes=5-{size + 50}", (5, size))):
        status, headers, body = raw(mirror.url, "GET", path, {"Range": header})
        assert status == 206 and body == weights[start:stop], header
        assert headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
        assert headers["content-length"] == str(stop - start)
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        status, headers, _ = raw(mirror.url, "GET", path, {"Range": header})
        assert status == 416 and headers["content-range"] == f"bytes */{size}", header
    status, _, body = raw(mirror.url, "GET", path, {"Range": "bytes=9-3"})     # malformed: ignored
    assert status == 200 and sha256(body) == sha256(weights)


def test_eight_concurrent_clients_are_all_bit_exact(mirror, tmp_path):
    expected = sha256((mirror.roots["ft"] / "model.safetensors").read_bytes())
    results: dict[int, str] = {}

    def client(i: int) -> None:
        path = hf_hub_download("me/ft", "model.safetensors", cache_dir=tmp_path / str(i), endpoint=mirror.url,
                               token=False)
        results[i] = sha256(Path(path).read_bytes())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: expected for i in range(8)}


def test_revisions_and_missing_repo_revision_file(mirror, tmp_path):
    def get(name: str, repo_id: str = "org/small", **kw) -> bytes:
        return Path(hf_hub_download(repo_id, name, cache_dir=tmp_path, endpoint=mirror.url, token=False,
                                    **kw)).read_bytes()

    assert get("config.json", revision="refs/pr/1") == b"pr\n"
    assert get("config.json") == get("config.json", revision=mirror.shas["small"]) == SMALL["config.json"]
    assert HfApi(endpoint=mirror.url).model_info("org/small", revision="refs/pr/1").sha == mirror.shas["pr"]
    with pytest.raises(RepositoryNotFoundError):
        get("config.json", "org/absent")
    with pytest.raises(RevisionNotFoundError):
        get("config.json", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        get("config.json", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        get("absent.txt")
    status, headers, _ = raw(mirror.url, "HEAD", "/org/small/resolve/main/absent.txt")
    assert (status, headers["x-error-code"], headers["x-repo-commit"]) == (404, "EntryNotFound", mirror.shas["small"])
    status, headers, _ = raw(mirror.url, "GET", "/api/models/org/small/tree/main/absent")
    assert (status, headers["x-error-code"]) == (404, "EntryNotFound")
    status, headers, _ = raw(mirror.url, "POST", "/api/telemetry/org/small")       # unknown: a plain 404
    assert status == 404 and "x-error-code" not in headers


@pytest.mark.parametrize("path", [
    "/org/small/resolve/main/../../../etc/passwd",
    "/org/small/resolve/main/%2e%2e/%2e%2e/etc/passwd",
    "/org/small/resolve/main/sub/%2E%2E/config.json",
    "/org/small/resolve/main//etc/passwd",
    "/org/small/resolve/main/%2Fetc%2Fpasswd",
    "/org/small/resolve/main/config.json%00",
    "/org/small/resolve/..%2F..%2Fmain/config.json",
    "/%2e%2e/small/resolve/main/config.json",
    "/api/models/org/%2e%2e/tree/main",
    "/api/models/org/small/tree/main/%2e%2e",
])
def test_traversal_is_refused(mirror, path):
    status, _, body = raw(mirror.url, "GET", path)
    assert status == 400 and b"etc" not in body.replace(b"etc/passwd", b"") and b"root:" not in body


def test_tokens_gated_and_private(mirror, tmp_path):
    def get(url: str, repo_id: str, token: str | bool = False) -> bytes:
        return Path(hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / str(token), endpoint=url,
                                    token=token)).read_bytes()

    for token in (False, "wrong"):
        with pytest.raises(HfHubHTTPError) as raised:
            get(mirror.token_url, "org/small", token)
        assert raised.value.response.status_code == 401
        status, _, _ = raw(mirror.token_url, "GET", "/api/models/org/small",
                           {"Authorization": f"Bearer {token}"} if token else {})
        assert status == 401
    assert get(mirror.token_url, "org/small", TOKEN) == SMALL["config.json"]

    open_api = HfApi(endpoint=mirror.url, token=False)
    assert open_api.model_info("org/gated").gated == "auto"              # info and listing stay public
    assert len(list(open_api.list_repo_tree("org/gated", recursive=True))) == 6
    with pytest.raises(GatedRepoError) as raised:
        get(mirror.url, "org/gated")
    assert raised.value.response.status_code == 401
    with pytest.raises(GatedRepoError):
        get(mirror.url, "org/gated", TOKEN)                              # no token list: no gated download
    assert get(mirror.token_url, "org/gated", TOKEN) == SMALL["config.json"]

    for url, token in ((mirror.url, False), (mirror.url, TOKEN)):
        with pytest.raises(RepositoryNotFoundError) as raised:
            get(url, "org/private", token)
        assert raised.value.response.status_code == 404
    assert get(mirror.token_url, "org/private", TOKEN) == SMALL["config.json"]
    assert HfApi(endpoint=mirror.token_url, token=TOKEN).model_info("org/private").private


def test_pull_through_fetches_a_new_repo_once(mirror, tmp_path):
    repo = {"config.json": b'{"fresh": 1}\n', "silero_vad.onnx": mirror.roots["data"] / "silero_vad.onnx"}
    sha = mirror.hub.commit("org/fresh", repo)
    store = Store.init(tmp_path / "cache-store")
    before = mirror.hub.downloads()
    with running(Starlette(routes=[Mount("/hub", app(store, upstream=mirror.hub.url))])) as url:
        results: list[str] = []

        def client(i: int) -> None:
            results.append(snapshot_download("org/fresh", cache_dir=tmp_path / str(i), endpoint=url + "/hub",
                                             token=False))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 3 and all(Path(p).name == sha for p in results)
        assert all(tree_hashes(Path(p)) == {"config.json": sha256(repo["config.json"]),
                                            "silero_vad.onnx": sha256(Path(repo["silero_vad.onnx"]).read_bytes())}
                   for p in results)
        assert mirror.hub.downloads() - before == 2                      # each file fetched once upstream
        # The three clients asked at once; the one pull resolved the revision upstream once.
        assert [r for r in mirror.hub.requests if r[1] == "/api/models/org/fresh/revision/main"] == [
            ("GET", "/api/models/org/fresh/revision/main", None)]
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=url + "/hub", token=False).model_info("org/nowhere")
        with pytest.raises(RevisionNotFoundError):
            HfApi(endpoint=url + "/hub", token=False).model_info("org/fresh", revision="v404")
        with pytest.raises(GatedRepoError):                               # no upstream token for it
            HfApi(endpoint=url + "/hub", token=False).model_info("org/gated")
    assert mirror.hub.downloads() - before == 2


def test_token_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# the team's tokens\n\n  alpha  \nbeta\n")
    assert read_tokens(f) == ["alpha", "beta"]
    f.write_text("# none yet\n\n")
    with pytest.raises(UsageError, match="lists no token"):
        read_tokens(f)
    with pytest.raises(UsageError, match="cannot read"):
        read_tokens(tmp_path / "absent")
