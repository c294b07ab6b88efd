"""Pulling Hub repos into the store (:func:`pull`), following their revisions (:func:`update`),
and forgetting commits (:func:`remove`).

A pull resolves the revision to its commit and lists the commit's files. A commit already
stored costs no download. Otherwise the files stream into the store one at a time, through a
staged add (``Store.stage``, resumable): ``jobs`` downloads run ahead of the file being stored,
each checked against its sha256 or git blob id before it is stored, then deleted. Disk use
beyond the store is a few files, never a second copy of the repo. A file whose blob the mirror
already holds (from another commit of this repo, or of any other) is not downloaded: it is
decoded from the store instead. The small files come first, so that config.json and README.md
are known when the first weights arrive and the store chooses their base. The repo's record is
written last, after the commit's model.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..errors import ElvesError, HubError, OutputError, UsageError
from ..parallel import ordered_map
from ..readers import walk_key
from ..store import Store
from ..store.layout import manifest_at
from ..store.manifests import manifests
from ..store.staging import StagedAdd
from .hub import Hub
from .records import (
    RemoteFile,
    RepoRecord,
    Snapshot,
    check_repo_id,
    check_revision,
    check_type,
    model_name,
    read_repo,
    record_at,
    repos,
    snapshot,
    utcnow,
    write_repo,
)


STAGING_BYTES = 2 << 30
"""Files are downloaded ahead of the one being stored up to this many bytes (but always one, of any
size): disk use beyond the store stays near the largest file, never a second copy of the repo."""


@dataclass
class PullProgress:
    """What a pull has done so far, handed to the progress callback after every piece."""

    repo: str
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0          # of the files to download
    bytes_done: int = 0
    started: float = field(default_factory=time.perf_counter)


ProgressFn = Callable[[PullProgress], None]


@dataclass
class PullResult:
    """What :func:`pull` did for one repo."""

    repo_type: str
    repo_id: str
    revision: str
    commit: str
    model: str                    # the store model that holds the commit
    files: int                    # in the commit (after --include/--exclude)
    bytes: int                    # their total size
    downloaded: int = 0           # files fetched from the Hub
    downloaded_bytes: int = 0
    reused: int = 0               # files taken from blobs the mirror already held
    already: bool = False         # the commit was stored before: nothing was fetched
    base: str | None = None       # the store model its tensors were coded against
    stored_bytes: int = 0         # what the store grew by
    seconds: float = 0.0


class _Stop(Exception):
    """Ends the downloads running ahead once the pull has failed."""


def _blobs(store: Store) -> dict[str, tuple[str, str]]:
    """Every blob the mirror holds, by git blob id: (store model, path). An LFS file's blob id is
    that of its pointer, which names its sha256 and size."""
    out: dict[str, tuple[str, str]] = {}
    for man in manifests(store.storage):
        origin = man.get("origin")
        if not isinstance(origin, dict) or not isinstance(origin.get("files"), list):
            continue
        sizes = {f["path"]: f["size"] for f in man["files"] if f.get("link") is None}
        for f in origin["files"]:
            try:
                rf = RemoteFile.from_json(f)
            except ValueError:
                continue
            if sizes.get(rf.path) == rf.size:
                out.setdefault(rf.blob_id, (man["name"], rf.path))
    return out


def pull(store: Store, repo_id: str, revision: str | None = None, *, repo_type: str = "model",
         endpoint: str | None = None, token: str | None = None, include: list[str] | None = None,
         exclude: list[str] | None = None, jobs: int = 4, threads: int | None = None,
         progress: ProgressFn | None = None, hub: Hub | None = None) -> PullResult:
    """Pull ``repo_id`` at ``revision`` (a branch, tag or commit sha; None: main) into ``store``
    and track that revision. ``include``/``exclude`` are glob patterns of the files to take.
    ``jobs`` files download at once; ``threads`` code them. Re-running after an interruption
    (kill -9 included) downloads only what is missing."""
    t0 = time.perf_counter()
    check_type(repo_type)
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    hub = hub or Hub(endpoint, token)
    commit, gated, private = hub.resolve(repo_type, repo_id, revision)
    files = sorted(hub.files(repo_type, repo_id, commit, include, exclude), key=lambda f: walk_key(f.path))
    if not files:
        raise HubError(f"{repo_id}@{commit[:12]}: no file to pull"
                       f"{' (--include/--exclude leave none)' if include or exclude else ''}", hub.endpoint)
    name = model_name(repo_type, repo_id, commit)
    rev = revision or "main"
    result = PullResult(repo_type, repo_id, rev, commit, name, len(files), sum(f.size for f in files))
    wanted = {f.path for f in files}
    if store.storage.exists(manifest_at(name)):
        held = snapshot(store, repo_type, repo_id, commit)
        if wanted <= {f.path for f in held.files}:
            result.already = True
            _track(store, repo_type, repo_id, rev, commit, gated, private, include, exclude)
            result.seconds = time.perf_counter() - t0
            return result
        # a pull with other --include patterns: the commit is stored again with all its files
        files = sorted({f.path: f for f in held.files + files}.values(), key=lambda f: walk_key(f.path))
        result.files, result.bytes = len(files), sum(f.size for f in files)
    with store.stage(name, threads=threads, resumable=True, replace=True) as staged:
        _fill(store, staged, hub, repo_type, repo_id, commit, files, jobs, progress, result)
        snap = Snapshot(repo_type, repo_id, commit, name, files, rev, utcnow(), gated)
        added = staged.commit(order=[f.path for f in files], origin=snap.origin())
        result.base, result.stored_bytes = added.base, added.bytes_added
        rec = read_repo(store, repo_type, repo_id) or RepoRecord(repo_type, repo_id)
        _set(rec, rev, commit, gated, private, include, exclude)
        write_repo(store, rec)
    result.seconds = time.perf_counter() - t0
    return result


def _fill(store: Store, staged: StagedAdd, hub: Hub, repo_type: str, repo_id: str, commit: str,
          files: list[RemoteFile], jobs: int, progress: ProgressFn | None, result: PullResult) -> None:
    """Add every file of ``files`` not yet in ``staged``: small files first, each downloaded
    (or decoded from a blob the mirror holds) ahead of its turn, stored, then deleted."""
    todo = [f for f in files if not _done(staged, f)]
    todo = [f for f in todo if f.lfs_sha256 is None] + [f for f in todo if f.lfs_sha256 is not None]
    held = _blobs(store)
    scratch = staged.scratch()
    state = PullProgress(f"{repo_id}@{commit[:12]}", len(files), len(files) - len(todo),
                         sum(f.size for f in todo if f.blob_id not in held))
    lock = threading.Lock()
    stop = threading.Event()

    def moved(n: int) -> None:
        if stop.is_set():
            raise _Stop
        with lock:
            state.bytes_done += n
            if progress:
                progress(state)

    def fetch(f: RemoteFile) -> tuple[RemoteFile, Path, bool]:
        dst = scratch / quote(f.path, safe="")
        if f.blob_id in held:  # the mirror has these bytes: no download
            model, path = held[f.blob_id]
            _copy_out(store, model, path, dst)
            return f, dst, False
        hub.download(repo_type, repo_id, commit, f, dst, moved)
        return f, dst, True

    with ThreadPoolExecutor(jobs) as pool:
        try:
            for f, path, fetched in ordered_map(pool, fetch, todo, jobs + 1, size=lambda f: f.size,
                                                max_size=STAGING_BYTES):
                staged.add(path, f.path)
                path.unlink()
                result.downloaded += fetched
                result.downloaded_bytes += f.size if fetched else 0
                result.reused += not fetched
                with lock:
                    state.files_done += 1
                    if progress:
                        progress(state)
        except BaseException:
            stop.set()
            raise


def _done(staged: StagedAdd, f: RemoteFile) -> bool:
    """Whether a resumed add already holds ``f`` (the same size; its sha256 for an LFS file)."""
    e = staged.entry(f.path)
    return e is not None and e["size"] == f.size and (f.lfs_sha256 is None or e["sha256"] == f.lfs_sha256)


def _copy_out(store: Store, model: str, path: str, dst: Path) -> None:
    """Decode file ``path`` of store model ``model`` to ``dst`` (checked against its sha256)."""
    tmp = dst.with_name(dst.name + ".part")
    try:
        with open(tmp, "wb") as out:
            for piece in store.read_file(model, path):
                out.write(piece)
        tmp.replace(dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot stage {path}: {e.strerror}", tmp) from None


def _set(rec: RepoRecord, revision: str, commit: str, gated: bool, private: bool, include: list[str] | None,
         exclude: list[str] | None) -> None:
    rec.refs[revision] = commit
    if commit not in rec.commits:
        rec.commits.append(commit)
    rec.gated, rec.private = gated, private
    patterns = {k: v for k, v in (("include", include), ("exclude", exclude)) if v}
    if patterns:
        rec.filters[revision] = patterns
    else:
        rec.filters.pop(revision, None)


def _track(store: Store, repo_type: str, repo_id: str, revision: str, commit: str, gated: bool,
           private: bool, include: list[str] | None, exclude: list[str] | None) -> None:
    """Point ``revision`` of a repo at a commit the store holds."""
    with store.locked():
        rec = read_repo(store, repo_type, repo_id) or RepoRecord(repo_type, repo_id)
        _set(rec, revision, commit, gated, private, include, exclude)
        write_repo(store, rec)


@dataclass
class UpdateResult:
    """What :func:`update` did: each tracked revision that moved, and those that failed."""

    pulled: list[PullResult] = field(default_factory=list)
    unchanged: list[tuple[str, str, str]] = field(default_factory=list)   # (repo, revision, commit)
    failed: list[tuple[str, str, ElvesError]] = field(default_factory=list)   # (repo, revision, error)


def update(store: Store, *, endpoint: str | None = None, token: str | None = None, jobs: int = 4,
           threads: int | None = None, progress: ProgressFn | None = None,
           only: Iterable[str] | None = None) -> UpdateResult:
    """Resolve every tracked revision again (of the repos in ``only``, if given) and pull the
    ones that moved: only their changed files are downloaded. A revision given as a commit sha
    never moves. Old commits stay until :func:`remove`. A repo that fails is reported and the
    others go on."""
    hub = Hub(endpoint, token)
    out = UpdateResult()
    wanted = set(only) if only is not None else None
    for rec in repos(store):
        if wanted is not None and rec.repo_id not in wanted:
            continue
        for rev, old in sorted(rec.refs.items()):
            if rev == old:
                continue
            try:
                commit, gated, private = hub.resolve(rec.repo_type, rec.repo_id, rev)
                if commit == old:
                    out.unchanged.append((rec.repo_id, rev, commit))
                    continue
                patterns = rec.filters.get(rev, {})
                out.pulled.append(pull(store, rec.repo_id, rev, repo_type=rec.repo_type, jobs=jobs, threads=threads,
                                       progress=progress, hub=hub, include=patterns.get("include"),
                                       exclude=patterns.get("exclude")))
            except ElvesError as e:
                out.failed.append((rec.repo_id, rev, e))
    return out


def remove(store: Store, repo_id: str, revision: str | None = None, *, repo_type: str = "model") -> list[str]:
    """Forget ``repo_id`` at ``revision`` (a tracked revision or a commit sha; None: the whole
    repo): the revisions pointing at the commit, and the commit's model unless another revision
    still points at it. Returns the store models removed; their bytes go with ``store gc``."""
    check_type(repo_type)
    check_repo_id(repo_id)
    removed: list[str] = []
    with store.locked():
        rec = read_repo(store, repo_type, repo_id)
        if rec is None:
            raise UsageError(f"the mirror holds no {repo_type} repo {repo_id!r}")
        if revision is None:
            gone = set(rec.commits)
        else:
            commit = rec.resolve(revision)
            if commit is None:
                raise UsageError(f"{repo_id} has no revision or commit {revision!r} in the mirror "
                                 f"(tracked: {', '.join(sorted(rec.refs)) or 'none'})")
            gone = {commit}
        rec.refs = {r: c for r, c in rec.refs.items() if c not in gone}
        rec.commits = [c for c in rec.commits if c not in gone]
        for commit in sorted(gone):
            name = model_name(repo_type, repo_id, commit)
            if store.storage.exists(manifest_at(name)):
                store.remove(name, locked=True)
                removed.append(name)
        if rec.commits:
            write_repo(store, rec)
        else:
            store.storage.delete(record_at(repo_type, repo_id))
    return removed
