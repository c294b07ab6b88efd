"""An in-test stand-in for the Hugging Face Hub, served for real on 127.0.0.1.

The test machines cannot reach the Hub, so the mirror's tests run the real ``huggingface_hub``
client (``endpoint=hub.url`` or HF_ENDPOINT) against this server. It answers the paths and headers
that huggingface_hub 2.4 uses (read from its file_download.py, hf_api.py, _snapshot_download.py,
utils/_http.py), the way the real Hub does:

- ``GET /api/{models,datasets}/{repo}[/revision/{rev}]``: repo info with ``siblings`` (size, blobId
  and ``lfs.sha256`` with ``?blobs=true``), ``sha``, ``gated``, ``private``; ``?expand=`` filters.
- ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=&cursor=``: ``page_size`` entries
  a page, the next page in a ``Link: <url>; rel="next"`` header. LFS entries carry ``lfs.oid`` and
  ``lfs.pointerSize`` (the client raises KeyError without it).
- ``POST /api/{type}s/{repo}/paths-info/{rev}``: form (what the client sends) or JSON ``paths``.
- ``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``: small files answer 200 with ETag (the git
  blob sha1), Content-Length, Accept-Ranges and X-Repo-Commit; LFS files answer 302 to ``cdn_url``
  (another host, so the client drops its Authorization header, as with the Hub's signed CDN URLs;
  the CDN refuses a request that still carries one, as S3 does) with X-Linked-Etag (the sha256) and X-Linked-Size. Range answers 206, an unsatisfiable one 416.
  Never any Xet header, so the client downloads over plain HTTP.
- Revisions are branches, tags or 40-hex commit shas. The client quotes them with ``safe=""``
  (``refs/pr/1`` -> ``refs%2Fpr%2F1``), so routing splits the RAW path and unquotes each part.
- Errors carry X-Error-Code as the Hub's do. A missing repo, or a private one without an accepted
  token, is ``RepoNotFound``: 401 to an anonymous request and 404 to an authenticated one, as the
  Hub answers (huggingface_hub raises RepositoryNotFoundError for both). ``RevisionNotFound`` and
  ``EntryNotFound`` are 404; on resolve the EntryNotFound carries X-Repo-Commit (the client caches
  it as a known-missing file). A gated repo keeps info and listings public; a download without an
  accepted token is 401 ``GatedRepo``. A token that is not accepted counts as no token.
- Anything else (telemetry, unknown paths) is a plain 404.

Which files are LFS: those the Hub's default ``.gitattributes`` sends to LFS (``LFS_PATTERNS``,
with ``*.safetensors`` and ``*.gguf``), and any file of ``LFS_MIN_SIZE`` (10 MiB) or more, which
the Hub refuses to take as a plain git blob. A commit's own ``.gitattributes`` is not read.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import final
from urllib.parse import parse_qs, quote, unquote, urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

LFS_MIN_SIZE = 10 * 1024 * 1024
# The patterns of the .gitattributes the Hub writes into every new repo.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
    "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tar.*",
    "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
CHUNK = 1 << 20
REPO_TYPES = ("model", "dataset")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class SimulatedNetworkFailure(Exception):
    """Raised inside a response body to make uvicorn drop the connection mid-file (``fail_after``)."""


def is_lfs(path: str, size: int) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_MIN_SIZE or path.startswith("saved_model/") or any(
        fnmatch.fnmatchcase(name, pattern) for pattern in LFS_PATTERNS)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def folder_files(root: Path) -> dict[str, Path]:
    """Every file under ``root`` by its repo path, ready for :meth:`HubStandin.commit`."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Blob:
    """One file's content and the ids the Hub gives it."""
    size: int
    oid: str                    # git blob sha1: of the content, or of the LFS pointer for LFS files
    sha256: str | None          # the LFS oid; None for a plain git file
    pointer_size: int | None
    source: bytes | Path

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid

    def read(self, start: int, end: int) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            for pos in range(start, end, CHUNK):
                yield self.source[pos:min(pos + CHUNK, end)]
            return
        with open(self.source, "rb") as f:
            f.seek(start)
            pos = start
            while pos < end:
                piece = f.read(min(CHUNK, end - pos))
                if not piece:
                    raise SimulatedNetworkFailure(f"{self.source} shrank while being served")
                pos += len(piece)
                yield piece


# Hashing a 200 MB weight file takes a second: do it once per file version, not per stand-in.
_HASHES: dict[tuple[str, int, int, int, bool], str] = {}
_HASHES_LOCK = threading.Lock()


def make_blob(path: str, source: bytes | Path) -> Blob:
    if isinstance(source, bytes):
        size, lfs = len(source), is_lfs(path, len(source))
        digest = hashlib.sha256(source).hexdigest() if lfs else git_blob_sha1(source)
    else:
        st = os.stat(source)
        size, lfs = st.st_size, is_lfs(path, st.st_size)
        key = (str(Path(source).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, lfs)
        with _HASHES_LOCK:
            cached = _HASHES.get(key)
        if cached is None:
            h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
            with open(source, "rb") as f:
                while piece := f.read(CHUNK):
                    h.update(piece)
            cached = h.hexdigest()
            with _HASHES_LOCK:
                _HASHES[key] = cached
        digest = cached
    if not lfs:
        return Blob(size, digest, None, None, source)
    pointer = lfs_pointer(digest, size)
    return Blob(size, git_blob_sha1(pointer), digest, len(pointer), source)


@dataclass(frozen=True)
class LastCommit:
    id: str
    title: str
    date: str

    def json(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "date": self.date}


@dataclass
class Commit:
    sha: str
    title: str
    date: str
    files: dict[str, tuple[Blob, LastCommit]]
    dirs: dict[str, str] = field(default_factory=dict)   # directory path -> tree oid

    def __post_init__(self) -> None:
        children: dict[str, list[str]] = {}
        for path, (blob, _) in self.files.items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                children.setdefault("/".join(parts[:i]), []).append(f"{path} {blob.oid}")
        self.dirs = {d: hashlib.sha1("\n".join(sorted(c)).encode()).hexdigest() for d, c in children.items()}

    def last_commit_of_dir(self, directory: str) -> LastCommit:
        prefix = directory + "/"
        return max((last for p, (_, last) in self.files.items() if p.startswith(prefix)), key=lambda c: c.date)


@dataclass
class Repo:
    type: str
    id: str
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    gated: bool = False
    private: bool = False

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and _COMMIT_RE.fullmatch(revision):
            sha = revision
        return self.commits.get(sha) if sha else None


@dataclass
class Download:
    key: str          # "{repo_id}/{path}", "datasets/" in front for a dataset
    start: int = 0    # the first byte asked for (a Range continuing a cut download starts later)
    bytes_sent: int = 0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def _error(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> Response:
    h = {"X-Error-Message": message, **(headers or {})}
    if code:
        h["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=h)


def _not_found() -> Response:
    return Response("Not Found", status_code=404, media_type="text/plain")


@final
class HubStandin:
    """The stand-in Hub. Use as a context manager: it serves on ``url`` between enter and exit.

    ``requests`` logs (method, raw path without query, Range header) of every request in order;
    ``downloads()`` counts GETs that started sending a file's content (on resolve or on the CDN),
    ``bytes_served()`` what they sent. ``fail_after[path] = n`` cuts the next download of ``path``
    after n body bytes (once), as a network failure mid-file would. ``rate`` (bytes a second)
    slows every download down, so that a test can stop a client halfway.
    """

    def __init__(self) -> None:
        self.url = ""
        self.cdn_url = ""
        self.tokens: set[str] = {"hf_good"}
        self.page_size = 1000
        self.fail_after: dict[str, int] = {}
        self.rate: float | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        self._downloads: list[Download] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self._secret = secrets.token_bytes(16)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(routes=[Route("/{any:path}", self._endpoint, methods=["GET", "HEAD", "POST"])])

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> HubStandin:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cdn_url = f"http://localhost:{port}"
        # log_config=None: leave the process's logging (and the mirror's own uvicorn) alone.
        config = uvicorn.Config(self.app, log_config=None, lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="hub-standin")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Hub stand-in did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)

    # -- test-side API -----------------------------------------------------------------------

    def commit(self, repo_id: str, files: dict[str, bytes | Path], *, repo_type: str = "model",
               branch: str = "main", parent_files: bool = True, delete: Iterable[str] = (),
               message: str | None = None) -> str:
        """A new commit on ``branch`` (created from ``main`` if new; the repo too): the branch's
        previous files (unless ``parent_files=False``) with ``files`` added or replaced and the
        paths in ``delete`` removed. Returns its 40-hex sha."""
        assert repo_type in REPO_TYPES, repo_type
        for path in files:
            parts = path.split("/")
            assert path and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts), path
        blobs = {path: make_blob(path, source) for path, source in files.items()}
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = self._repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, _now())
            parent_sha = repo.branches.get(branch) or repo.branches.get("main")
            parent = repo.commits[parent_sha] if parent_sha else None
            self._counter += 1
            sha = hashlib.sha1(f"{repo_type}/{repo_id}@{branch} #{self._counter} {parent_sha}".encode()).hexdigest()
            title = message or f"Commit {self._counter}"
            last = LastCommit(sha, title, _now())
            tree = dict(parent.files) if parent and parent_files else {}
            for path in delete:
                tree.pop(path, None)
            for path, blob in blobs.items():
                old = tree.get(path)
                tree[path] = (blob, old[1] if old and old[0].oid == blob.oid else last)
            repo.commits[sha] = Commit(sha, title, last.date, dict(sorted(tree.items())))
            repo.branches[branch] = sha
        return sha

    def tag(self, repo_id: str, tag: str, sha: str, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            assert sha in repo.commits, sha
            repo.tags[tag] = sha

    def set_gated(self, repo_id: str, gated: bool = True, repo_type: str = "model") -> None:
        with self._lock:
            self._repos[(repo_type, repo_id)].gated = gated

    def set_private(self, repo_id: str, private: bool = True, repo_type: str = "model") -> None:
        with self._lock:
            self._repos[(repo_type, repo_id)].private = private

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Blob]:
        """The files of ``repo_id`` at ``revision``, by path."""
        with self._lock:
            commit = self._repos[(repo_type, repo_id)].resolve(revision)
        assert commit is not None, revision
        return {path: blob for path, (blob, _) in commit.files.items()}

    def downloads(self, path_suffix: str | None = None) -> int:
        """GET downloads of file content (each counted when it starts), all or those whose
        ``{repo_id}/{path}`` ends with ``path_suffix``."""
        with self._lock:
            return sum(1 for d in self._downloads if path_suffix is None or d.key.endswith(path_suffix))

    def fresh_downloads(self, path_suffix: str | None = None) -> int:
        """:meth:`downloads` that started from the file's first byte (no Range continuing one)."""
        with self._lock:
            return sum(1 for d in self._downloads
                       if d.start == 0 and (path_suffix is None or d.key.endswith(path_suffix)))

    def bytes_served(self, path_suffix: str | None = None) -> int:
        with self._lock:
            return sum(d.bytes_sent for d in self._downloads if path_suffix is None or d.key.endswith(path_suffix))

    # -- HTTP --------------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        raw = request.scope["raw_path"].decode("latin-1")
        with self._lock:
            self.requests.append((request.method, raw, request.headers.get("range")))
        parts = [unquote(p) for p in raw.strip("/").split("/")]
        host = request.headers.get("host", "")
        if host == self.cdn_url.split("//", 1)[1]:
            if parts[0] == "cdn-lfs" and len(parts) == 2 and request.method in ("GET", "HEAD"):
                return self._cdn(request, parts[1])
            return _not_found()
        if parts[0] == "api" and len(parts) >= 3 and parts[1] in ("models", "datasets"):
            return await self._api(request, parts[1][:-1], parts[2:])
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        for n in (1, 2):
            if len(parts) > n + 1 and parts[n] == "resolve" and request.method in ("GET", "HEAD"):
                return self._resolve(request, repo_type, "/".join(parts[:n]), parts[n + 1], "/".join(parts[n + 2:]))
        return _not_found()

    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.tokens

    def _repo(self, request: Request, repo_type: str, repo_id: str) -> Repo | Response:
        repo = self._repos.get((repo_type, repo_id))
        authorized = self._authorized(request)
        if repo is None or (repo.private and not authorized):
            # The Hub does not tell an anonymous caller whether a private repo exists: 401 for both.
            return _error(404 if authorized else 401, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit | Response:
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    async def _api(self, request: Request, repo_type: str, rest: list[str]) -> Response:
        keywords = ("revision", "tree", "paths-info")
        n = 1 if len(rest) >= 2 and rest[1] in keywords else 2
        repo_id, tail = "/".join(rest[:n]), rest[n:]
        if tail and (tail[0] not in keywords or len(tail) < 2):
            return _not_found()
        action = tail[0] if tail else "revision"
        if (action == "paths-info") != (request.method == "POST"):
            return _not_found()
        with self._lock:
            repo = self._repo(request, repo_type, repo_id)
            if isinstance(repo, Response):
                return repo
            revision = "/".join(tail[1:]) if action != "tree" else tail[1]
            commit = self._commit(repo, revision or "main")
            if isinstance(commit, Response):
                return commit
        if action == "revision":
            return self._info(request, repo, commit)
        if action == "tree":
            return self._tree(request, commit, "/".join(tail[2:]))
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            form = json.loads(body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            fields = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = fields.get("paths", []), _truthy(fields.get("expand", [""])[0])
        entries = [e for p in ([paths] if isinstance(paths, str) else paths)
                   if (e := self._entry(commit, p.strip("/"), expand)) is not None]
        return JSONResponse(entries)

    def _info(self, request: Request, repo: Repo, commit: Commit) -> Response:
        blobs = _truthy(request.query_params.get("blobs"))
        siblings = []
        for path, (blob, _) in commit.files.items():
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.sha256:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info: dict[str, object] = {
            "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.id.split("/")[0] if "/" in repo.id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(blob.size for blob, _ in commit.files.values()),
        }
        if repo.type == "model":
            info.update(modelId=repo.id, spaces=[])
        expand = request.query_params.getlist("expand")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id", *expand)}
        return JSONResponse(info)

    def _entry(self, commit: Commit, path: str, expand: bool) -> dict[str, object] | None:
        entry: dict[str, object]
        if path in commit.files:
            blob, last = commit.files[path]
            entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.sha256:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            if expand:
                entry["lastCommit"] = last.json()
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False},
                                               "pickleImportScan": None}
        elif path in commit.dirs:
            entry = {"type": "directory", "oid": commit.dirs[path], "size": 0, "path": path}
            if expand:
                entry["lastCommit"] = commit.last_commit_of_dir(path).json()
        else:
            return None
        return entry

    def _tree(self, request: Request, commit: Commit, path: str) -> Response:
        recursive = _truthy(request.query_params.get("recursive"))
        expand = _truthy(request.query_params.get("expand"))
        if path and path not in commit.dirs:
            return _error(404, "EntryNotFound", f"{path} does not exist on \"{commit.sha}\"")
        prefix = path + "/" if path else ""
        names = [p for p in (*commit.dirs, *commit.files) if p.startswith(prefix)]
        if not recursive:
            names = [p for p in names if "/" not in p[len(prefix):]]
        # Git order: a directory sorts as its path with a trailing "/", and comes before its content.
        names.sort(key=lambda p: p + "/" if p in commit.dirs else p)
        # The Hub gives 50 entries a page when it expands them, 1000 otherwise.
        size = min(self.page_size, 50) if expand else self.page_size
        cursor = request.query_params.get("cursor")
        start = int(base64.urlsafe_b64decode(cursor).decode()) if cursor else 0
        page = [self._entry(commit, name, expand) for name in names[start:start + size]]
        headers = {}
        if start + size < len(names):
            query = urlencode({"recursive": str(recursive).lower(), "expand": str(expand).lower(),
                               "cursor": base64.urlsafe_b64encode(str(start + size).encode()).decode()})
            base = f"{request.url.scheme}://{request.headers['host']}{request.scope['raw_path'].decode('latin-1')}"
            headers["Link"] = f'<{base}?{query}>; rel="next"'
        return JSONResponse(page, headers=headers)

    def _resolve(self, request: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        with self._lock:
            repo = self._repo(request, repo_type, repo_id)
            if isinstance(repo, Response):
                return repo
            commit = self._commit(repo, revision)
            if isinstance(commit, Response):
                return commit
            gated = repo.gated
        if gated and not self._authorized(request):
            return _error(401, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted. You must have access "
                                            "to it and be authenticated to access it. Please log in.")
        if path not in commit.files:
            return _error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        blob = commit.files[path][0]
        key = f"{'datasets/' if repo_type == 'dataset' else ''}{repo_id}/{path}"
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes", "ETag": f'"{blob.etag}"'}
        if blob.sha256 is None:
            return self._content(request, blob, key, path, headers)
        query = {"repo": key[: -len(path) - 1], "path": path, "Expires": str(int(time.time()) + 3600)}
        query["Signature"] = self._sign(blob.sha256, query)
        location = f"{self.cdn_url}/cdn-lfs/{blob.sha256}?{urlencode(query)}"
        body = f"Found. Redirecting to {location}"
        headers.update({"Location": location, "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        return Response(body, status_code=302, headers=headers, media_type="text/plain")

    def _sign(self, sha256: str, query: dict[str, str]) -> str:
        message = f"{sha256}|{query['repo']}|{query['path']}|{query['Expires']}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _cdn(self, request: Request, sha256: str) -> Response:
        """The CDN answers whoever holds a valid signed URL. Like S3 with a presigned URL, it refuses
        a request that also carries an Authorization header: a client must drop its Hub token here."""
        if "authorization" in request.headers:
            return Response("InvalidArgument: Only one auth mechanism allowed", status_code=400,
                            media_type="text/plain")
        query = {k: request.query_params.get(k, "") for k in ("repo", "path", "Expires", "Signature")}
        if not hmac.compare_digest(self._sign(sha256, query), query["Signature"]):
            return Response("AccessDenied", status_code=403, media_type="text/plain")
        repo_type, repo_id = ("dataset", query["repo"][len("datasets/"):]) if query["repo"].startswith(
            "datasets/") else ("model", query["repo"])
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            blob = next((b for c in repo.commits.values() for b, _ in c.files.values() if b.sha256 == sha256),
                        None) if repo else None
        if blob is None:
            return Response("NoSuchKey", status_code=404, media_type="text/plain")
        name = query["path"].rsplit("/", 1)[-1]
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"',
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"}
        return self._content(request, blob, f"{query['repo']}/{query['path']}", query["path"], headers)

    def _content(self, request: Request, blob: Blob, key: str, path: str, headers: dict[str, str]) -> Response:
        start, end, status = 0, blob.size, 200
        header = request.headers.get("range")
        match = _RANGE_RE.fullmatch(header.strip()) if header else None
        # A Range the server cannot parse is ignored (RFC 9110), as CloudFront does.
        if match and (match[1] or match[2]) and not (match[1] and match[2] and int(match[2]) < int(match[1])):
            if not match[1]:
                start = max(0, blob.size - int(match[2]))
                unsatisfiable = int(match[2]) == 0
            else:
                start, end = int(match[1]), min(blob.size, int(match[2]) + 1 if match[2] else blob.size)
                unsatisfiable = start >= blob.size
            if unsatisfiable:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{blob.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        download = Download(key, start)
        with self._lock:
            self._downloads.append(download)
            cut = self.fail_after.pop(path, None)
        return StreamingResponse(self._body(blob, start, end, download, cut), status_code=status, headers=headers,
                                 media_type="application/octet-stream")

    def _body(self, blob: Blob, start: int, end: int, download: Download, cut: int | None) -> Iterator[bytes]:
        for piece in blob.read(start, end):
            if cut is not None and download.bytes_sent + len(piece) >= cut:
                piece = piece[:cut - download.bytes_sent]
                if piece:
                    download.bytes_sent += len(piece)
                    yield piece
                raise SimulatedNetworkFailure(f"{download.key}: connection cut after {cut} bytes")
            if self.rate:  # slowed down in small slices, each counted once it is handed over
                for i in range(0, len(piece), 1 << 16):
                    time.sleep(len(piece[i:i + (1 << 16)]) / self.rate)
                    download.bytes_sent += len(piece[i:i + (1 << 16)])
                    yield piece[i:i + (1 << 16)]
                continue
            download.bytes_sent += len(piece)
            yield piece
