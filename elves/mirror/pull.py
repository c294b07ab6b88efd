"""Pulling Hub repos into the store (:func:`pull`), following their revisions (:func:`update`),
and forgetting commits (:func:`remove`).

A pull resolves the revision to its commit and lists the commit's files. A commit already
stored costs no download. Otherwise the files stream into the store one at a time, through a
staged add (``Store.stage``, resumable, which takes the store's writer lock only to commit:
pulls of other repos, and adds, run beside it): ``jobs`` downloads run ahead of the file being stored,
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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import ElvesError, HubError, OutputError, UsageError
from ..families import Profiler
from ..parallel import ordered_map
from ..readers import read_file, walk_key
from ..store import Store
from ..store.batch import Location, Scanned, add_scanned, runner, task_location, task_threads
from ..store.layout import manifest_at
from ..store.manifests import manifests
from ..store.reports import AddResult
from ..store.staging import StagedAdd, staging_at
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

WAVE_BYTES = 64 << 30
""":func:`pull_many` downloads the repos of a list in waves of up to this many bytes (at least one
repo), each committed before the next is downloaded. Within a wave bases are coded before the
fine-tunes that delta against them; a fine-tune whose base comes in a later wave is stored first
and re-coded as the base's delta when it arrives, as pulling them one by one in that order does."""


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
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    hub = hub or Hub(endpoint, token)
    want = _want(store, hub, repo_id, revision, repo_type, include, exclude)
    result = want.result
    if result.already:
        _track(store, want)
        result.seconds = time.perf_counter() - t0
        return result
    with store.stage(result.model, threads=threads, resumable=True, replace=True) as staged:
        _fill(store, staged, hub, repo_type, repo_id, result.commit, want.files, jobs, progress, result)
        added = staged.commit(order=[f.path for f in want.files], origin=want.origin(),
                              then=lambda: _record(store, want))
        result.base, result.stored_bytes = added.base, added.bytes_added
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class _Wanted:
    """A repo at a revision, resolved: its commit's files to store, and what its record says."""

    result: PullResult
    files: list[RemoteFile]
    gated: bool
    private: bool
    include: list[str] | None
    exclude: list[str] | None

    def origin(self) -> dict[str, Any]:
        r = self.result
        return Snapshot(r.repo_type, r.repo_id, r.commit, r.model, self.files, r.revision, utcnow(), self.gated).origin()


def _want(store: Store, hub: Hub, repo_id: str, revision: str | None, repo_type: str, include: list[str] | None,
          exclude: list[str] | None) -> _Wanted:
    """Resolve ``repo_id`` at ``revision`` and list the files of its commit to store (``already``
    when the store holds them all)."""
    check_type(repo_type)
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    commit, gated, private = hub.resolve(repo_type, repo_id, revision)
    files = sorted(hub.files(repo_type, repo_id, commit, include, exclude), key=lambda f: walk_key(f.path))
    if not files:
        raise HubError(f"{repo_id}@{commit[:12]}: no file to pull"
                       f"{' (--include/--exclude leave none)' if include or exclude else ''}", hub.endpoint)
    name = model_name(repo_type, repo_id, commit)
    result = PullResult(repo_type, repo_id, revision or "main", commit, name, len(files), sum(f.size for f in files))
    wanted = {f.path for f in files}
    if store.storage.exists(manifest_at(name)):
        held = snapshot(store, repo_type, repo_id, commit)
        if wanted <= {f.path for f in held.files}:
            result.already = True
        else:  # a pull with other --include patterns: the commit is stored again with all its files
            files = sorted({f.path: f for f in held.files + files}.values(), key=lambda f: walk_key(f.path))
            result.files, result.bytes = len(files), sum(f.size for f in files)
    return _Wanted(result, files, gated, private, include, exclude)


def _record(store: Store, want: _Wanted) -> None:
    """Point the pulled revision at its commit in the repo's record (the caller holds the lock)."""
    r = want.result
    rec = read_repo(store, r.repo_type, r.repo_id) or RepoRecord(r.repo_type, r.repo_id)
    _set(rec, r.revision, r.commit, want.gated, want.private, want.include, want.exclude)
    write_repo(store, rec)


def pull_many(store: Store, specs: Sequence[tuple[str, str | None]], *, executor: str = "local",
              workers: int | None = None, ray_address: str | None = None, repo_type: str = "model",
              endpoint: str | None = None, token: str | None = None, include: list[str] | None = None,
              exclude: list[str] | None = None, jobs: int = 4,
              threads: int | None = None) -> tuple[list[PullResult], list[tuple[str, ElvesError]]]:
    """Pull the repos of ``specs`` ((repo id, revision or None)) on an executor (as
    :func:`elves.store.batch.add_many`: ``"local"``, a process pool of ``workers``, or ``"ray"``).

    The driver resolves each revision and lists its commit. Each worker then downloads one
    repo's files (``jobs`` at once; a blob the mirror holds is decoded from the store instead),
    into a folder on its machine, and reads and profiles them as a sequential pull would,
    without the store's writer lock: parallel pulls do not wait for each other's downloads.
    Coding and committing go as in ``add_many``, under the lock: bases before the fine-tunes
    that delta against them, each file coded by a task, the driver committing the manifests and
    the repos' records. On a cluster, the download folders (ELVES_STAGING for a store on object
    storage) must be where every node reaches them, as ``add_many``'s sources must. A long list
    goes in waves of :data:`WAVE_BYTES`, so that its downloads never need its whole size on disk.

    A repo that fails to resolve or download is reported and the others go on; a failure in
    coding stops the models not yet committed. Returns the results (in the order of ``specs``)
    and the failures ("repo@revision", error). A pull cut short resumes its downloads."""
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    hub = Hub(endpoint, token)
    results: list[PullResult] = []
    failures: list[tuple[str, ElvesError]] = []
    todo: dict[str, list[_Wanted]] = {}     # store model -> the revisions pointing at it
    for repo_id, revision in specs:
        try:
            want = _want(store, hub, repo_id, revision, repo_type, include, exclude)
        except ElvesError as e:
            failures.append((f"{repo_id}@{revision or 'main'}", e))
            continue
        results.append(want.result)
        if want.result.already:
            _track(store, want)
        else:
            todo.setdefault(want.result.model, []).append(want)
    if not todo:
        return results, failures
    location = task_location(store)
    t0 = time.perf_counter()
    done: set[str] = set()

    def committed(name: str, added: AddResult) -> None:
        done.add(name)
        for w in todo[name]:
            w.result.base, w.result.stored_bytes = added.base, added.bytes_added
            w.result.seconds = time.perf_counter() - t0
            _record(store, w)
        store.storage.delete(staging_at(name))  # its downloads, and any journal a pull cut short left

    # the tasks' downloads lie in the store's tmp/ on a local disk: gc waits for them
    with store.storage.adding(), runner(executor, workers, ray_address) as run:
        threads = task_threads(run, executor, ray_address, threads)
        waves = _waves(todo)
        for i, wave in enumerate(waves):
            handles = {name: run.submit(_fetch, location, hub.endpoint, token, todo[name][0].result,
                                        todo[name][0].files, jobs) for name in wave}
            scanned: list[tuple[str, Scanned]] = []
            for name, h in handles.items():
                wants = todo[name]
                try:
                    fetched: _Fetched = run.result(h)
                except ElvesError as e:
                    failures += [(f"{w.result.repo_id}@{w.result.revision}", e) for w in wants]
                    results = [r for r in results if r.model != name]
                    continue
                for w in wants:
                    w.result.downloaded, w.result.downloaded_bytes = fetched.downloaded, fetched.downloaded_bytes
                    w.result.reused = fetched.reused
                fetched.scanned.origin = wants[0].origin()
                scanned.append((name, fetched.scanned))
            try:
                add_scanned(store, run, scanned, location, base="auto", replace=True, committed=committed,
                            threads=threads)
            except ElvesError as e:  # the models not committed yet, and the waves after, fail with it
                lost = {name for name, _ in scanned if name not in done} | {n for later in waves[i + 1:] for n in later}
                failures += [(f"{w.result.repo_id}@{w.result.revision}", e) for n in lost for w in todo[n]]
                results = [r for r in results if r.model not in lost]
                break
    return results, failures


def _waves(todo: dict[str, list[_Wanted]]) -> list[list[str]]:
    """The models of ``todo`` in the order given, cut into waves of up to :data:`WAVE_BYTES` of
    files (at least one model each): a wave's downloads lie on the workers' disks until its models
    are committed, so a long list never needs its whole size on disk."""
    waves: list[list[str]] = []
    size = 0
    for name, wants in todo.items():
        n = wants[0].result.bytes
        if not waves or size + n > WAVE_BYTES:
            waves.append([])
            size = 0
        waves[-1].append(name)
        size += n
    return waves


def _pulling_at(name: str) -> str:
    """Where a pull task downloads model ``name``'s files: on the task's machine, beside a staged
    add's journal (a sequential pull of the same commit cut short resumes from them, and gc
    removes an abandoned one with the rest of ``tmp/``)."""
    return f"{staging_at(name)}files/"


@dataclass
class _Fetched:
    """What a pull task did with one repo: the files read and profiled, and its counts."""

    scanned: Scanned
    downloaded: int
    downloaded_bytes: int
    reused: int


def _fetch(location: Location, endpoint: str, token: str | None, want: PullResult, files: list[RemoteFile],
           jobs: int) -> _Fetched:
    """A pull task: download ``files`` of a commit (or decode those whose blob the mirror holds)
    into a folder on this machine, ``jobs`` at once, then read and profile them in the order a
    sequential pull adds them (small files first), so that the base is chosen from the same profile."""
    store = Store(*location)
    hub = Hub(endpoint, token)
    held = _blobs(store)
    folder = store.storage.scratch(_pulling_at(want.model))
    order = [f for f in files if f.lfs_sha256 is None] + [f for f in files if f.lfs_sha256 is not None]

    def fetch(f: RemoteFile) -> bool:
        dst = folder / quote(f.path, safe="")
        if f.blob_id in held:  # the mirror has these bytes: no download
            if not dst.exists():  # one there is whole: _copy_out renames it into place when checked
                _copy_out(store, *held[f.blob_id], dst)
            return False
        hub.download(want.repo_type, want.repo_id, want.commit, f, dst)  # resumes what an earlier run left
        return True

    with ThreadPoolExecutor(jobs) as pool:
        fetched = list(pool.map(fetch, order))
    profiler = Profiler(want.model)
    read = {}
    for f in order:
        path = folder / quote(f.path, safe="")
        read[f.path] = sf = read_file(path, f.path)
        profiler.metadata(f.path, path)
        profiler.add(sf)
    got = [f for f, was in zip(order, fetched) if was]
    return _Fetched(Scanned([read[f.path] for f in files], False, profiler.result(), by_file=True), len(got),
                    sum(f.size for f in got), len(order) - len(got))


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


def _track(store: Store, want: _Wanted) -> None:
    """Point a revision of a repo at a commit the store holds."""
    with store.locked():
        _record(store, want)


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
