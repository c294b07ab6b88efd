"""The mirror's server: the Hugging Face Hub's download API, answered from the store.

:func:`app` is the ASGI application (starlette), for mounting in a server of one's own;
:func:`serve` runs it with uvicorn, as ``elves mirror serve`` does. The unchanged
``huggingface_hub`` client (``HF_ENDPOINT=http://host:port``) downloads from it. It answers
what huggingface_hub 2.4 calls (read from its ``file_download.py``, ``_snapshot_download.py``
and ``hf_api.py``), for models and, under ``/datasets/`` and ``/api/datasets/``, datasets:

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo info (``sha``, ``siblings``, with size,
  ``blobId`` and ``lfs`` when ``?blobs=true``, ``gated``, ``private``; ``?expand=`` keeps only
  the keys named).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=``: the listing, a page at a
  time with the next page in a ``Link`` header. LFS entries carry ``lfs.pointerSize`` (the
  client needs it); folders carry their git tree id.
- ``POST /api/models/{repo}/paths-info/{rev}``: the entries of the ``paths`` asked for, in the
  form body the client sends (or JSON).
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``ETag``, ``X-Linked-Etag`` and
  ``X-Linked-Size`` (LFS files), ``X-Repo-Commit``, ``Content-Length`` and ``Accept-Ranges``.
  A ``Range`` answers 206 with ``Content-Range``; one past the end answers 416. The body is
  decoded from the store as it is sent (a Range decodes only the chunks it overlaps, a HEAD
  nothing), on one pool of threads shared by all requests: memory stays at a few chunks a
  request.

Errors carry ``X-Error-Code`` as the Hub's do (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), so that the client raises its own errors; an EntryNotFound
on resolve carries ``X-Repo-Commit`` (the client caches it as a known-missing file). Any other
path (the client's telemetry) is a plain 404. No Xet header or field is ever sent, so the
client downloads over plain HTTP.

Revisions are tracked refs (branches, tags, ``refs/pr/1``) or stored commit shas; the client
quotes them with no safe character (``refs%2Fpr%2F1``), so routing splits the raw path and
unquotes each part. Repo ids, revisions and paths are checked: a path must be one of the
commit's files, and ``..``, an empty part or a NUL is refused (400).

Access: with ``tokens``, a request without ``Authorization: Bearer <one of them>`` is refused
(401). A repo that was gated upstream stays gated: info and listings are public, as on the Hub,
but its downloads need a listed token (401 ``GatedRepo`` without one; with no token list, they
are always refused). A private repo is ``RepoNotFound`` (404) without a listed token.

``upstream`` makes the server a pull-through cache: a repo, or a revision of it, that the store
lacks is pulled from there (:func:`~elves.mirror.pull.pull`) before it is answered; concurrent
requests for it wait for the one pull. A revision the store tracks is answered from the store
without asking upstream: ``elves mirror update`` (:func:`~elves.mirror.pull.update`) moves the
tracked branches to their new commits. The request that finds a repo missing waits for its whole
pull; huggingface_hub gives up on a metadata request after 10 s (``HF_HUB_ETAG_TIMEOUT``), so a
client's first request for a large repo may fail while its pull goes on, and the next one,
after the pull, succeeds. Pulling large repos ahead (``elves mirror pull``) avoids the wait.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ElvesError, HubAccessError, HubError, HubNotFoundError, UsageError
from ..parallel import default_threads, runs
from ..store import Store
from . import pages
from .hub import read_tokens
from .pull import PullResult, pull
from .records import RemoteFile, RepoRecord, Snapshot, check_repo_id, check_revision, read_repo, snapshot

# Bytes handed to the server a send: the store's 256 KiB chunks one by one cost a hop between
# threads each, which halved the speed of one client.
SEND_BYTES = 4 << 20
PAGE_SIZE = 1000                   # tree entries a page, as the Hub gives without expand
API_ACTIONS = ("revision", "tree", "paths-info")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# What huggingface_hub takes for a bad token rather than a missing repo (utils/_http.py).
_BAD_CREDENTIALS = "Invalid credentials in Authorization header"


class _Refusal(Exception):
    """An error answer, raised from wherever a request turns out to be one."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.response = _error(status, code, message, headers)


def _error(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> Response:
    h = {"X-Error-Message": message, **(headers or {})}
    if code:
        h["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=h)


def _raw_path(request: Request) -> str:
    """The request's path as sent, still quoted: ``refs%2Fpr%2F1`` stays one part."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    return raw.decode("latin-1")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def _check_path(path: str) -> str:
    """``path`` if it can name a file of a repo: relative, no empty, ``.`` or ``..`` part, no NUL."""
    if not path or "\0" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise _Refusal(400, None, f"not a valid path in a repo: {path!r:.200}")
    return path


def _checked(check: Any, value: str) -> str:
    try:
        return str(check(value))
    except UsageError as e:
        raise _Refusal(400, None, e.message) from None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, stop)`` a Range header asks of ``size`` bytes; None for the whole file (no
    Range, or one this server does not parse: RFC 9110 lets it be ignored). 416 if it lies
    past the end."""
    match = _RANGE_RE.fullmatch(header.strip()) if header else None
    if not match or not (match[1] or match[2]) or (match[1] and match[2] and int(match[2]) < int(match[1])):
        return None
    if match[1]:
        start, stop = int(match[1]), min(size, int(match[2]) + 1 if match[2] else size)
    else:  # the last n bytes
        start, stop = max(0, size - int(match[2])), size
    if start >= size or start == stop:
        raise _Refusal(416, None, f"range {header} lies outside the file's {size} bytes",
                       {"Content-Range": f"bytes */{size}"})
    return start, stop


def _batched(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """``pieces`` joined into runs of about :data:`SEND_BYTES`."""
    return (b"".join(run) for run, _ in runs(pieces, len, SEND_BYTES))


@dataclass(frozen=True)
class _Listing:
    """A commit's files and folders as the Hub's tree lists them: by path, in git order (a
    folder sorts as its path with a trailing ``/``, before what it holds)."""

    entries: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, snap: Snapshot) -> _Listing:
        files = {f.path: f for f in snap.files}
        folders = sorted({f.path.rsplit("/", i)[0] for f in snap.files for i in range(1, f.path.count("/") + 1)},
                         key=lambda p: -p.count("/"))
        tree_ids: dict[str, str] = {}
        for folder in folders:  # deepest first: a folder's id needs its subfolders'
            tree_ids[folder] = _tree_id(folder, files, tree_ids)
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted([*files, *(f + "/" for f in tree_ids)]):
            if path.endswith("/"):
                entries[path[:-1]] = {"type": "directory", "oid": tree_ids[path[:-1]], "size": 0, "path": path[:-1]}
            else:
                entries[path] = _file_entry(files[path])
        return cls(entries)

    def children(self, folder: str, recursive: bool) -> list[str]:
        prefix = folder + "/" if folder else ""
        return [p for p in self.entries
                if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]


def _file_entry(f: RemoteFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
    if f.lfs_sha256 is not None:
        entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": f.pointer_size}
    return entry


def _tree_id(folder: str, files: dict[str, RemoteFile], done: dict[str, str]) -> str:
    """The git tree id of ``folder`` (its subfolders' in ``done``), files taken as mode 100644:
    the Hub keeps no executable weights."""
    prefix = folder + "/"
    items: list[tuple[bytes, bytes]] = []
    for path, f in files.items():
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            items.append((path[len(prefix):].encode(), b"100644 %s\0" % path[len(prefix):].encode()
                          + bytes.fromhex(f.blob_id)))
    for sub, tree in done.items():
        if sub.startswith(prefix) and "/" not in sub[len(prefix):]:
            name = sub[len(prefix):].encode()
            items.append((name + b"/", b"40000 %s\0" % name + bytes.fromhex(tree)))
    body = b"".join(item for _, item in sorted(items))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


class _Mirror:
    """The state the application's requests share: the store, the pools, the pulls under way."""

    def __init__(self, store: Store, upstream: str | None, upstream_token: str | None,
                 tokens: Collection[str] | None, jobs: int, page_size: int, threads: int | None):
        if page_size < 1:
            raise UsageError("the page size must be at least 1")
        if tokens is not None and not tokens:
            raise UsageError("an empty token list would refuse every request")
        self.store = store
        self.upstream = upstream
        self.upstream_token = upstream_token
        self.tokens = None if tokens is None else [t.encode() for t in tokens]
        self.jobs = jobs
        self.page_size = page_size
        self.decoders = ThreadPoolExecutor(default_threads(threads), thread_name_prefix="elves-serve")
        self.pullers = ThreadPoolExecutor(2, thread_name_prefix="elves-serve-pull")
        self.pulls: dict[tuple[str, str, str], Future[PullResult]] = {}
        self.lock = threading.Lock()

    def close(self) -> None:
        self.pullers.shutdown(cancel_futures=True)
        self.decoders.shutdown()

    # -- routing ------------------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        body = await request.body() if request.method == "POST" else b""
        return await run_in_threadpool(self.answer, request, body)

    def answer(self, request: Request, body: bytes) -> Response:
        try:
            if self.tokens is not None and not self.authorized(request):
                # a browser cannot send a bearer token: it asks for one as a Basic password
                raise _Refusal(401, None, _BAD_CREDENTIALS, {"WWW-Authenticate": 'Basic realm="elves mirror"'})
            return self.route(request, body)
        except _Refusal as r:
            return r.response
        except ElvesError as e:
            return _error(500, None, e.message)

    def route(self, request: Request, body: bytes) -> Response:
        raw_path = _raw_path(request)
        prefix = quote(request.scope.get("root_path", ""))
        if prefix and raw_path.startswith(prefix + "/"):
            raw_path = raw_path[len(prefix):]
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        if len(parts) >= 3 and parts[0] == "api" and parts[1] in ("models", "datasets"):
            return self.api(request, body, parts[1][:-1], parts[2:])
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        for n in (1, 2):
            if len(parts) > n + 2 and parts[n] == "resolve" and request.method in ("GET", "HEAD"):
                return self.resolve(request, repo_type, "/".join(parts[:n]), parts[n + 1], "/".join(parts[n + 2:]))
        # What the Hub API does not answer goes to the web page (a plain 404 for any other path).
        return pages.answer(self.store, request, self.authorized(request))

    def api(self, request: Request, body: bytes, repo_type: str, rest: list[str]) -> Response:
        n = 1 if len(rest) >= 2 and rest[1] in API_ACTIONS else 2
        repo_id, tail = "/".join(rest[:n]), rest[n:]
        action = tail[0] if tail else "revision"
        if ((tail and (action not in API_ACTIONS or len(tail) < 2))
                or request.method != ("POST" if action == "paths-info" else "GET")):
            return Response("Not Found", status_code=404, media_type="text/plain")
        revision = tail[1] if action == "tree" else "/".join(tail[1:]) or None
        rec, snap = self.locate(request, repo_type, repo_id, revision)
        if action == "revision":
            return self.info(request, rec, snap)
        listing = _Listing.of(snap)
        if action == "tree":
            return self.tree(request, listing, snap, "/".join(tail[2:]))
        return JSONResponse([listing.entries[p] for p in dict.fromkeys(self.asked_paths(request, body))
                             if p in listing.entries])

    # -- access -------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """Whether the request carries one of the listed tokens: as a bearer token (the Hub's
        clients), or as the password of Basic credentials (a browser on the web page)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        return self.tokens is not None and any(hmac.compare_digest(given, t) for t in self.tokens)

    def locate(self, request: Request, repo_type: str, repo_id: str, revision: str | None) -> tuple[RepoRecord, Snapshot]:
        """The repo's record and its snapshot at ``revision`` (None: main), pulled from upstream
        first if the store lacks it; the Hub's error answer if there is none for this caller."""
        _checked(check_repo_id, repo_id)
        if revision is not None:
            _checked(check_revision, revision)
        rec = read_repo(self.store, repo_type, repo_id)
        commit = rec.resolve(revision) if rec is not None else None
        hidden = rec is not None and rec.private and not self.authorized(request)
        if commit is None and self.upstream is not None and not hidden:
            self.pull(repo_type, repo_id, revision)
            rec = read_repo(self.store, repo_type, repo_id)
            commit = rec.resolve(revision) if rec is not None else None
        if rec is None or (rec.private and not self.authorized(request)):
            raise _Refusal(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if commit is None:
            raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision or 'main'}")
        try:
            return rec, snapshot(self.store, repo_type, repo_id, commit)
        except HubNotFoundError:  # the revision points at a commit removed since
            raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision or 'main'}") from None

    def pull(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        """Pull ``repo_id`` at ``revision`` from upstream, once for all the requests that ask at
        the same time; the upstream's refusal as the Hub's error answer."""
        key = (repo_type, repo_id, revision or "main")
        with self.lock:
            future = self.pulls.get(key)
            if future is None:
                future = self.pulls[key] = self.pullers.submit(
                    pull, self.store, repo_id, revision, repo_type=repo_type, endpoint=self.upstream,
                    token=self.upstream_token, jobs=self.jobs)
                future.add_done_callback(lambda _: self.forget(key))
        try:
            future.result()
        except HubNotFoundError as e:
            if e.kind == "revision":
                raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision or 'main'}") from None
            raise _Refusal(404, "RepoNotFound", f"Repository not found: {repo_id}") from None
        except HubAccessError as e:
            if e.gated:
                raise _Refusal(401, "GatedRepo", f"Access to {repo_id} is restricted upstream") from None
            raise _Refusal(403, None, f"the upstream refused access to {repo_id}") from None
        except HubError as e:
            raise _Refusal(502, None, f"the upstream failed: {e.message}") from None

    def forget(self, key: tuple[str, str, str]) -> None:
        with self.lock:
            self.pulls.pop(key, None)

    # -- answers ------------------------------------------------------------------------------

    def info(self, request: Request, rec: RepoRecord, snap: Snapshot) -> Response:
        blobs = _truthy(request.query_params.get("blobs"))
        siblings = []
        for f in snap.files:
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.lfs_sha256 is not None:
                    sibling["lfs"] = {"sha256": f.lfs_sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        # The mirror does not know the commit's date: when it was pulled stands in for it.
        modified = snap.pulled[:-1] + ".000Z" if re.fullmatch(r"[0-9T:-]+Z", snap.pulled) else snap.pulled
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{rec.repo_type}/{rec.repo_id}".encode()).hexdigest()[:24],
            "id": rec.repo_id,
            "author": rec.repo_id.split("/")[0] if "/" in rec.repo_id else None,
            "sha": snap.commit,
            "lastModified": modified,
            "private": rec.private,
            "gated": "auto" if rec.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in snap.files),
        }
        if rec.repo_type == "model":
            info["modelId"] = rec.repo_id
        expand = request.query_params.getlist("expand")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id", *expand)}
        return JSONResponse(info)

    def tree(self, request: Request, listing: _Listing, snap: Snapshot, folder: str) -> Response:
        if folder and listing.entries.get(_check_path(folder), {}).get("type") != "directory":
            raise _Refusal(404, "EntryNotFound", f"{folder} does not exist on \"{snap.commit}\"")
        recursive = _truthy(request.query_params.get("recursive"))
        names = listing.children(folder, recursive)
        cursor = request.query_params.get("cursor", "0")
        if not cursor.isdigit():
            raise _Refusal(400, None, f"not a valid cursor: {cursor!r:.40}")
        start = int(cursor)
        headers = {}
        if start + self.page_size < len(names):
            query = urlencode({"recursive": str(recursive).lower(),
                               "expand": str(_truthy(request.query_params.get("expand"))).lower(),
                               "cursor": str(start + self.page_size)})
            headers["Link"] = f'<{request.url.scheme}://{request.url.netloc}{_raw_path(request)}?{query}>; rel="next"'
        return JSONResponse([listing.entries[p] for p in names[start:start + self.page_size]], headers=headers)

    @staticmethod
    def asked_paths(request: Request, body: bytes) -> list[str]:
        """The ``paths`` of a paths-info request: form-encoded, as the client sends them, or JSON."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                paths = json.loads(body or b"{}").get("paths", [])
            except (ValueError, AttributeError):
                raise _Refusal(400, None, "the body is not a JSON object") from None
        else:
            paths = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise _Refusal(400, None, "paths must be a list of strings")
        return [p.strip("/") for p in paths]

    def resolve(self, request: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        rec, snap = self.locate(request, repo_type, repo_id, revision)
        _check_path(path)
        if rec.gated and not self.authorized(request):
            raise _Refusal(401, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted: "
                                             "a token of this mirror is needed")
        f = snap.file(path)
        if f is None:
            raise _Refusal(404, "EntryNotFound", f"{path} does not exist on \"{snap.commit}\"",
                           {"X-Repo-Commit": snap.commit})
        headers = {"X-Repo-Commit": snap.commit, "Accept-Ranges": "bytes", "ETag": f'"{f.etag}"'}
        if f.lfs_sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{f.lfs_sha256}"', "X-Linked-Size": str(f.size)})
        span = _byte_range(request.headers.get("range"), f.size)
        start, stop = span or (0, f.size)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{f.size}"
        headers["Content-Length"] = str(stop - start)
        status = 200 if span is None else 206
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        pieces = self.store.read_file(snap.model, path, start, stop, pool=self.decoders)
        # The first piece is decoded before the answer starts, so that a damaged store answers 500
        # rather than a cut connection.
        first = next(pieces, None)
        body = _batched(chain([first] if first is not None else [], pieces))
        return StreamingResponse(body, status_code=status, headers=headers, media_type="application/octet-stream")


def app(store: Store, *, upstream: str | None = None, upstream_token: str | None = None,
        tokens: Collection[str] | None = None, jobs: int = 4, page_size: int = PAGE_SIZE,
        threads: int | None = None) -> Starlette:
    """The mirror's ASGI application over ``store``: the Hub's download API (see the module's
    docstring), for ``uvicorn`` or any ASGI server, or to mount in an application of one's own.

    ``upstream``: a Hub URL to pull what the store lacks from (``upstream_token`` opens its
    gated and private repos; ``jobs`` files download at once). ``tokens``: the bearer tokens a
    request must carry (None: anyone may ask; gated repos then serve no downloads).
    ``page_size``: tree entries a page. ``threads``: the threads that decode, shared by every
    request (default: one per CPU)."""
    mirror = _Mirror(store, upstream, upstream_token, tokens, jobs, page_size, threads)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            mirror.close()

    return Starlette(routes=[Route("/{any:path}", mirror.endpoint, methods=["GET", "HEAD", "POST"])],
                     lifespan=lifespan)


def serve(store: Store, *, host: str = "127.0.0.1", port: int = 8080, upstream: str | None = None,
          upstream_token: str | None = None, token_file: Path | None = None, jobs: int = 4,
          log_level: str = "warning") -> None:
    """Serve :func:`app` over ``store`` with uvicorn on ``host:port`` until interrupted.
    ``token_file``: the bearer tokens clients must give (:func:`~elves.mirror.hub.read_tokens`)."""
    import uvicorn
    tokens = frozenset(read_tokens(token_file)) if token_file is not None else None
    application = app(store, upstream=upstream, upstream_token=upstream_token, tokens=tokens, jobs=jobs)
    uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=5)).run()
