"""Adding many models at once, spread over workers (:func:`add_many`), and the executors that run
the work (:func:`runner`): a local process pool, or Ray tasks on a cluster.

The store it leaves is the one that adding the models one by one, bases first, leaves: the same
objects byte for byte, the same manifests but for the time each says it was added.

How: the workers read and profile the sources (a task each). The driver then plans alone: it
orders the new models so that a base comes before the models derived from it
(:func:`elves.families.cluster` over the stored and the new profiles), and chooses each one's
base as a sequential add in that order would (:func:`~elves.store.planner.choose_base` over the
stored models and the new ones before it). The workers code the files into objects, a task per
file with tensors (small files together), each opening the store itself and running the code
of the sequential add (:func:`~elves.store.ingest.add_files` with the planner of the chosen
base). The driver commits each model, in that order, through :class:`StagedAdd` like any add.

Only the commits take the writer lock (the lease on object storage), one at a time: objects are
named by their content and written once, so the tasks write them without it, and another writer
may commit between two of the batch's commits. Under the lock a commit first reads the store
again if its manifests changed since (another writer's models are then candidates for the
base; a base that changes from the plan's stops the batch with a clear error: run it again), and
checks that every object its tasks stored or found is still there (a gc, or another writer's
failed add, may have removed one meanwhile). A failed batch removes the objects its tasks
created under the lock too, but for those another writer's manifest names by then.

What a file's coding reads of the store orders the tasks (a DAG):

- a model's files are coded only once its base, if new, is committed: their deltas read it;
- a model whose tensors (by their xxh3-128, from the profiles) another new model before it also
  holds, and that no model stored or committed before it holds, waits for that model's tasks:
  sequentially it would reuse those objects, coded as the first one codes them;
- a model holding such a tensor twice has its files coded one after the other, in one task;
- a commit that may re-code stored models (one stored on its own whose metadata names or
  awaits the new model: ``StagedAdd.commit`` repacks it) ends a round: the models after it are
  planned again from the store as it is then.

Opaque objects (not tensors) are coded the same whoever codes them, so the tasks do not wait for
each other over them; the driver counts each as a sequential add would (written by the first
model that holds it in commit order), and commits a model only once every task started before
its own ended, so that it knows who wrote what it found.

A tensor that a model holds only as a view of a larger storage (some PyTorch pickles) is known
to the profile by the view's hash, not the storage's: two new models sharing such a storage may
both code it, and the store then keeps one of the two codings (both decode to the same bytes).
"""
from __future__ import annotations

import heapq
import importlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

from .. import families
from ..errors import ElvesError, InputError, StoreError, UsageError
from ..families import ModelProfile, model_key
from ..families.naming import names_as_base
from ..model import SourceFile
from ..parallel import default_threads
from ..readers import read_model
from .ingest import Added, ProgressFn, add_files
from .location import open_storage
from .manifests import PACK_BELOW, manifests, profiles
from .objects import ObjectMeta
from .planner import check_fits, choose_base, derived, planner
from .reports import AddResult
from .staging import (
    CHECKS,
    StagedAdd,
    check_name,
    check_present,
    listing,
    remove_unused,
)
from .storage import Storage
from .store import Store, default_name

EXECUTORS = ("local", "ray")
RAY_CONNECT_SECONDS = 10.0        # a Ray client that cannot join retries forever (a missing token)
SMALL_FILES_BYTES = 64 << 20      # files without tensors are coded together, up to this much a task

Location = tuple[str | Path, dict[str, Any] | None]   # what a task opens the store with


# -- executors -------------------------------------------------------------------------------

@dataclass
class _Failed:
    """An ElvesError raised by a task, as a value: an exception pickles as its class and its
    ``args``, which lose ``path`` and ``message`` (and Ray would wrap it in its own traceback)."""

    kind: type[ElvesError]
    args: tuple[Any, ...]
    state: dict[str, Any]

    def error(self) -> ElvesError:
        err = self.kind.__new__(self.kind)
        err.args = self.args
        err.__dict__.update(self.state)
        return err


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a task; an ElvesError comes back as a :class:`_Failed`."""
    try:
        return fn(*args)
    except ElvesError as e:
        return _Failed(type(e), e.args, dict(vars(e)))


def _unwrap(out: Any) -> Any:
    if isinstance(out, _Failed):
        raise out.error()
    return out


class Runner(Protocol):
    """Runs functions as tasks on workers: ``submit`` one, ``wait`` for some to end, take each
    one's ``result`` (an ElvesError a task raised is raised again as it was). ``slots``: how many
    tasks keep the workers busy. The functions and their arguments must pickle (module-level
    functions of an installed package)."""

    slots: int

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def wait(self, handles: Collection[Any]) -> list[Any]:
        """Those of ``handles`` that have ended, at least one."""
        ...

    def result(self, handle: Any) -> Any: ...

    def cancel(self) -> None:
        """Drop the tasks not yet ended (a failed batch)."""
        ...


class _ProcessRunner:
    def __init__(self, workers: int):
        # spawn: a forked child would inherit the driver's threads and locks mid-use
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        self.slots = workers

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self.pool.submit(_call, fn, *args)

    def wait(self, handles: Collection[Future[Any]]) -> list[Future[Any]]:
        return list(wait(handles, return_when=FIRST_COMPLETED).done)

    def result(self, handle: Future[Any]) -> Any:
        try:
            return _unwrap(handle.result())
        except BrokenProcessPool:
            raise StoreError("a worker process died (out of memory, or killed): the add stopped") from None

    def cancel(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RayRunner:
    def __init__(self, ray: Any, slots: int):
        self.ray = ray
        self.remote = ray.remote(num_cpus=1)(_call)
        self.slots = slots
        self.pending: set[Any] = set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        ref = self.remote.remote(fn, *args)
        self.pending.add(ref)
        return ref

    def wait(self, handles: Collection[Any]) -> list[Any]:
        refs = list(handles)
        ready, rest = self.ray.wait(refs, num_returns=1)
        if rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return list(ready)

    def result(self, handle: Any) -> Any:
        self.pending.discard(handle)
        errors = self.ray.exceptions
        try:
            return _unwrap(self.ray.get(handle))
        except errors.RayTaskError:
            raise  # a bug in a task: its traceback is what says where
        except errors.RayError as e:
            raise StoreError(f"the Ray cluster lost a task ({type(e).__name__}): the add stopped") from None

    def cancel(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise UsageError("the Ray executor needs Ray: pip install 'elves[ray]'") from None


def _reachable(address: str) -> None:
    """A clear error at once for an address where nothing listens (Ray itself retries)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _join(ray: Any, address: str) -> None:
    """``ray.init(address=...)``, given up after :data:`RAY_CONNECT_SECONDS`: a client the
    cluster does not let in (Ray 2.60 asks for a token by default) retries forever."""
    _reachable(address)
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except BaseException as e:
            failure.append(e)

    th = threading.Thread(target=connect, name="ray-connect", daemon=True)
    th.start()
    th.join(RAY_CONNECT_SECONDS)
    if th.is_alive():
        raise UsageError(f"the Ray cluster at {address} did not let this machine in within {RAY_CONNECT_SECONDS:.0f} s: "
                         "check the address, and that the cluster's token is here (RAY_AUTH_TOKEN or "
                         "~/.ray/auth_token, which `ray start --head` writes on the head)")
    if failure:
        raise UsageError(f"cannot join the Ray cluster at {address}: {failure[0]}") from None


@contextmanager
def runner(executor: str = "local", workers: int | None = None, ray_address: str | None = None) -> Iterator[Runner]:
    """The executor named ``executor``, for the block: ``"local"``, a pool of ``workers``
    processes (default: one per CPU); ``"ray"``, tasks on the Ray cluster at ``ray_address``
    (given up after :data:`RAY_CONNECT_SECONDS` if it does not let this machine in), or on a
    local one of ``workers`` CPUs started for the block, or on the one this process is already
    connected to. Ray is imported only here. What the block started stops with it."""
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    if executor == "local":
        if ray_address is not None:
            raise UsageError("--ray-address is for --executor ray")
        local = _ProcessRunner(default_threads(workers))
        try:
            yield local
        finally:
            local.pool.shutdown(wait=True, cancel_futures=True)
        return
    ray = _import_ray()
    owned = not ray.is_initialized()
    if not owned and ray_address is not None:
        raise UsageError("this process is already connected to a Ray cluster: leave --ray-address out")
    try:
        if owned and ray_address is not None:
            _join(ray, ray_address)
        elif owned:
            ray.init(address="local", num_cpus=default_threads(workers), include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
        slots = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield _RayRunner(ray, slots)
    finally:
        if owned:
            ray.shutdown()  # a local cluster's processes stop with it; a joined one's are not ours


# -- tasks -----------------------------------------------------------------------------------

@dataclass
class Scanned:
    """A model read and profiled by a task, ready to be planned and coded: its files (in the
    order its manifest lists them), whether it is one file, its profile, and what its manifest
    records of where it came from (``origin``, the mirror's). ``by_file``: stored as a staged
    add without the whole profile stores it (the mirror's pull), whose base is chosen only once
    a file with tensors comes: a model without tensors records no reason for having none."""

    files: list[SourceFile]
    single: bool
    profile: ModelProfile
    origin: dict[str, Any] | None = None
    by_file: bool = False


def _scan(src: Path, name: str, follow_symlinks: bool) -> Scanned:
    """Read and profile a source, as :meth:`Store.add` does first."""
    files, single = read_model(src, follow_symlinks)
    if not files:  # a manifest of no files would be refused by every later read
        raise InputError("the folder holds no files to add", src)
    return Scanned(files, single, families.profile(src, name))


@dataclass
class _FileDone:
    """What a task did with one file: its manifest entry, the objects it put in place (and which
    of them were not there before: ``created``, paths) and its counts (as in :class:`Added`)."""

    entry: dict[str, Any]
    written: list[tuple[str, ObjectMeta]]
    created: list[str]
    reused: int
    nbytes: int


def _encode(location: Location, base: str | None, files: list[SourceFile], threads: int) -> list[_FileDone]:
    """Store ``files`` (one model's) into the store at ``location``, coded against ``base`` as
    a sequential add codes them, without the writer lock; on a failure, remove the objects this
    task created (under the lock, but for any another writer committed meanwhile)."""
    storage = open_storage(*location)
    plan = planner(storage, base) if base is not None else None
    out: list[_FileDone] = []
    created: list[str] = []
    try:
        with ThreadPoolExecutor(threads) as pool:
            for sf in files:
                added = Added([], [], [])
                try:
                    add_files(storage, [sf], None if plan is None else plan[0], pool, threads, None, added)
                finally:
                    created += added.created
                out.append(_FileDone(added.entries[0], list(added.written), added.created,
                                     added.reused, sum(s.length for s in sf.segments)))
    except BaseException:
        _remove_unused(storage, created)
        raise
    finally:
        if plan is not None:
            plan[1].close()
    return out


# -- planning --------------------------------------------------------------------------------

@dataclass
class _Model:
    index: int                     # in the caller's list
    name: str
    files: list[SourceFile]
    single: bool
    profile: ModelProfile
    origin: dict[str, Any] | None = None
    by_file: bool = False


@dataclass
class _Step:
    """A model in the plan: its base, what it waits for, its tasks' files and results."""

    model: _Model
    base: str | None
    after: int | None = None       # the step whose commit its tasks wait for (its base)
    share: set[int] = field(default_factory=set)   # steps whose tasks must have ended first
    groups: list[list[int]] = field(default_factory=list)  # file numbers, a task each
    done: dict[int, _FileDone] = field(default_factory=dict)
    left: int = 0                  # tasks not ended
    submitted: bool = False
    started: float = 0.0
    horizon: int = -1              # the tasks started before its last one ended


def _order(stored: list[ModelProfile], new: list[_Model]) -> list[_Model]:
    """``new`` with every model after the new model :func:`elves.families.cluster` finds its
    base (over the stored and new profiles), otherwise in the caller's order."""
    names = {m.name: i for i, m in enumerate(new)}
    parent: dict[int, int] = {}
    for fam in families.cluster(stored + [m.profile for m in new]):
        for name, match in fam.members:
            if name in names and match.base in names:
                parent[names[name]] = names[match.base]
    children: dict[int, list[int]] = {}
    for child, par in parent.items():
        children.setdefault(par, []).append(child)
    ready = [i for i in range(len(new)) if i not in parent]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(new[i])
        for c in children.get(i, []):
            heapq.heappush(ready, c)
    return out


def _tensor_digests(prof: ModelProfile) -> list[str]:
    """The hashes of a model's tensors that are objects of their own (smaller ones are packed)."""
    return [t.digest for t in prof.tensors if t.nbytes >= PACK_BELOW]


def _plan(now: list[tuple[dict[str, Any], ModelProfile]], todo: list[_Model],
          base: str | None) -> tuple[list[_Step], set[str]]:
    """The next round: the models of ``todo`` (in order) up to the first whose commit may
    re-code stored models, each with the base a sequential add would choose, what its tasks
    wait for, and its tasks; and the objects the stored models (``now``: manifest, profile)
    reference."""
    before = {seg[0] for m, _ in now for f in m["files"] for seg in f["segments"]}
    replaced = {m.name for m in todo}   # as StagedAdd, a model it replaces is no base candidate
    stored = [(m, p) for m, p in now if m["name"] not in replaced]
    held = {d for _, p in stored for d in _tensor_digests(p)}   # objects its tasks find stored
    steps: list[_Step] = []
    at: dict[str, int] = {}
    first: dict[str, int] = {}                                  # tensor hash -> first step holding it
    for m in todo:
        prof = m.profile
        if base == "auto":
            chosen, _ = choose_base(prof, stored, [n for n, _ in derived(prof, stored)])
        else:
            chosen = base
        step = _Step(m, chosen, after=at.get(chosen) if chosen is not None else None)
        ready = set(held)  # and those of its base chain committed in this round
        j = step.after
        while j is not None:
            ready.update(_tensor_digests(steps[j].model.profile))
            j = steps[j].after
        own = [d for d in _tensor_digests(prof) if d not in ready]
        step.share = {first[d] for d in own if d in first}
        for d in own:
            first.setdefault(d, len(steps))
        step.groups = _groups(m.files, chained=any(c > 1 for c in Counter(own).values()))
        step.left = len(step.groups)
        at[m.name] = len(steps)
        steps.append(step)
        present = {model_key(x["name"]) for x, _ in stored} | {model_key(m.name)}
        recodes = any(x.get("base") is None and (names_as_base(p, prof) or families.awaits(p, prof, present))
                      for x, p in stored)
        stored.append(({"name": m.name, "base": chosen}, ModelProfile.from_json(prof.to_json())))
        if recodes:
            break
    return steps, before


def _found(step: _Step) -> Iterator[str]:
    """The objects the tasks of ``step`` found stored."""
    for d in step.done.values():
        mine = {key for key, _ in d.written}
        yield from (seg[0] for seg in d.entry["segments"] if seg[0] not in mine)


def _groups(files: list[SourceFile], chained: bool) -> list[list[int]]:
    """The files of a model, a task each (small files without tensors together): all in one
    task when they must be coded in order."""
    if chained:
        return [list(range(len(files)))]
    out: list[list[int]] = []
    small: list[int] = []
    size = 0
    for i, sf in enumerate(files):
        if any(s.dtype is not None for s in sf.segments):
            out.append([i])
            continue
        small.append(i)
        size += sf.size
        if size >= SMALL_FILES_BYTES:
            out.append(small)
            small, size = [], 0
    if small:
        out.append(small)
    return out


# -- committing ------------------------------------------------------------------------------

def _adopt(staged: StagedAdd, sf: SourceFile, done: _FileDone, claimed: set[str],
           written: dict[str, ObjectMeta]) -> None:
    """Record in ``staged`` a file a task stored, counting its objects as a sequential add
    would have: one that a file before it (in commit order: ``claimed``) also wrote was reused;
    one that it found written by a task of a later model, which ran first, is its own."""
    reused = done.reused
    mine: list[tuple[str, ObjectMeta]] = []
    by_task = {key for key, _ in done.written}
    for key, meta in done.written:
        if key in claimed:
            reused += 1
        else:
            mine.append((key, meta))
    for key in dict.fromkeys(seg[0] for seg in done.entry["segments"]):
        if key not in by_task and key in written and key not in claimed:
            mine.append((key, written[key]))
            reused -= 1
    claimed.update(key for key, _ in mine)
    staged.adopt(sf.relpath, sf.size, done.entry, mine, reused)


def add_many(store: Store, sources: Sequence[tuple[str | os.PathLike[str], str | None]], *, executor: str = "local",
             workers: int | None = None, ray_address: str | None = None, base: str | None = "auto",
             threads: int | None = None, progress: ProgressFn | None = None,
             follow_symlinks: bool = False) -> list[AddResult]:
    """Add the models at ``sources`` ((path, name or None for its file or folder name), each as
    :meth:`Store.add` takes it) to ``store``, the work spread over ``workers`` (the module's
    docstring says how). The store ends up as adding them one by one, bases first, leaves it.

    ``executor``: ``"local"`` (a process pool on this machine) or ``"ray"`` (Ray tasks: on the
    cluster at ``ray_address``, else on a local Ray of ``workers`` CPUs; see :func:`runner`).
    The workers read the sources and the store themselves: on a cluster, both must be where
    every node reaches them (a shared folder; the store on object storage). ``threads``: each
    task's coding threads (default: the CPUs shared among the workers; 1 on a cluster).
    ``base`` is as for :meth:`Store.add`, for every model. ``progress`` is called on this
    machine with the bytes of each file as it is stored.

    An error in one source (an ElvesError, as its add would raise it) stops the batch: the
    models committed before it stay, the rest are not added, and what their tasks wrote is
    removed (what a killed run leaves, :meth:`Store.gc` removes). The results come in the
    order of ``sources``.
    """
    if not sources:
        return []
    named = [(Path(src).absolute(), name or default_name(src)) for src, name in sources]
    seen: set[str] = set()
    for _, name in named:
        check_name(name)
        if name in seen:
            raise StoreError(f"model {name!r} is named twice in one add", store.storage.where(""))
        seen.add(name)
    location = task_location(store)
    with runner(executor, workers, ray_address) as run:
        scans = [run.submit(_scan, src, name, follow_symlinks) for src, name in named]
        scanned = [(name, run.result(h)) for (_, name), h in zip(named, scans)]
        return add_scanned(store, run, scanned, location, base=base, progress=progress,
                           threads=task_threads(run, executor, ray_address, threads))


def task_location(store: Store) -> Location:
    """What a task opens ``store`` with (a memory:// store is refused: its tasks could not reach it)."""
    if str(store.path).startswith("memory://"):
        raise UsageError("a memory:// store lives in this process alone: its workers could not reach it")
    return store.path, store.storage_options


def task_threads(run: Runner, executor: str, ray_address: str | None, threads: int | None) -> int:
    """Each task's coding threads: ``threads``, else the CPUs shared among the workers (1 on a cluster)."""
    if threads is not None:
        return threads
    return 1 if executor == "ray" and ray_address is not None else max(1, default_threads(None) // run.slots)


def add_scanned(store: Store, run: Runner, scanned: Sequence[tuple[str, Scanned]], location: Location, *,
                base: str | None = "auto", threads: int = 1, progress: ProgressFn | None = None,
                replace: bool = False, committed: Callable[[str, AddResult], None] | None = None) -> list[AddResult]:
    """The second half of :func:`add_many`, for models its caller's tasks read (the mirror's
    downloads): plan, code on ``run`` and commit the (name, :class:`Scanned`) of ``scanned``,
    taking the writer lock for each commit. ``replace``: a stored model of the same name is
    replaced. ``committed(name, result)`` is called, still under the lock, after each commit."""
    models = [_Model(i, name, sc.files, sc.single, sc.profile, sc.origin, sc.by_file)
              for i, (name, sc) in enumerate(scanned)]
    return _run(store, models, run, location, base, threads, progress, replace, committed)


def _run(store: Store, models: list[_Model], run: Runner, location: Location, base: str | None,
         threads: int, progress: ProgressFn | None, replace: bool,
         committed: Callable[[str, AddResult], None] | None) -> list[AddResult]:
    """Plan and add ``models``: the tasks code without the writer lock (objects are named by
    their content and written once), each commit takes it."""
    storage = store.storage
    nthreads = default_threads(None)
    results: dict[int, AddResult] = {}
    claimed: set[str] = set()          # objects the models committed or being committed wrote
    kept: set[str] = set()             # objects the committed models reference
    written: dict[str, ObjectMeta] = {}
    created: list[str] = []            # paths of objects tasks created
    seen = listing(storage)
    mans = manifests(storage)
    # the stored models and their profiles, read once, and kept up to date by each commit: read
    # again only when another writer changed the manifests meanwhile, or a commit re-coded models
    stored = list(zip(mans, profiles(storage, mans)))
    with storage.adding(), ThreadPoolExecutor(nthreads) as pool, ThreadPoolExecutor(CHECKS) as checks, \
            ExitStack() as stack:
        staged = {m.name: stack.enter_context(StagedAdd(storage, m.name, base, pool, nthreads, progress, m.profile,
                                                               replace=replace, stored=stored))
                  for m in models}
        if base not in (None, "auto"):  # refused before anything is written, as Store.add does
            fits, opened = planner(storage, base)
            try:
                for m in models:
                    check_fits(fits, m.files, base, storage.where(""))
            finally:
                opened.close()
        todo = _order([p for _, p in stored], models) if base == "auto" else models
        try:
            while todo:
                steps, before = _plan(stored, todo, base)
                todo = todo[len(steps):]
                for step in _execute(steps, run, location, threads, progress, written, created,
                                     lambda s: all(k in claimed or k in written or k in before for k in _found(s))):
                    m = step.model
                    st = staged[m.name]
                    with storage.locked():
                        changed = listing(storage) != seen
                        if changed:  # another writer committed, removed or re-coded models
                            mans = manifests(storage)
                            stored[:] = zip(mans, profiles(storage, mans))
                        check_present(storage, m.name, (seg[0] for d in step.done.values()
                                                        for seg in d.entry["segments"]), checks,
                                      "a gc or another writer's failed add beside the batch: run the batch again")
                        if not m.by_file or any(seg.dtype is not None for sf in m.files for seg in sf.segments):
                            st.decide()  # from the store as it is now (a base given by hand was checked above)
                        if st.base != step.base:
                            raise StoreError(f"model {m.name!r}: the plan chose {step.base!r} as its base, the store "
                                             f"now {st.base!r}" + (": another writer changed the store while the "
                                                                   "batch ran; run it again (what is committed stays)"
                                                                   if changed else " (a bug: add it on its own)"),
                                             storage.where(""))
                        for i, sf in enumerate(m.files):
                            _adopt(st, sf, step.done[i], claimed, written)
                        res = st.commit([sf.relpath for sf in m.files], source="file" if m.single else "folder",
                                        origin=m.origin)
                        res.seconds = time.perf_counter() - step.started
                        results[m.index] = res
                        kept.update(seg[0] for d in step.done.values() for seg in d.entry["segments"])
                        if res.repacked or res.notes:  # re-coded models: their manifests changed
                            mans = manifests(storage)
                            stored[:] = zip(mans, profiles(storage, mans))
                        else:
                            assert st.manifest is not None
                            stored[:] = [x for x in stored if x[0]["name"] != m.name] + [
                                (st.manifest, ModelProfile.from_json(m.profile.to_json()))]
                        if committed is not None:
                            committed(m.name, res)
                        seen = listing(storage)
        except BaseException:
            run.cancel()
            _remove_unused(storage, [at for at in created if at.rsplit("/", 1)[-1] not in kept])
            raise
    return [results[m.index] for m in sorted(models, key=lambda m: m.index)]


def _remove_unused(storage: Storage, places: list[str]) -> None:
    """Remove the objects a failed batch's tasks created, under the writer lock, but for those a
    manifest names by now (another writer that found one there may have committed it)."""
    if not places:
        return
    try:
        with storage.locked():
            remove_unused(storage, places)
    except ElvesError:  # the lock cannot be had: gc does the rest
        pass


def _execute(steps: list[_Step], run: Runner, location: Location, threads: int, progress: ProgressFn | None,
             written: dict[str, ObjectMeta], created: list[str], settled: Callable[[_Step], bool]) -> Iterator[_Step]:
    """Run the tasks of ``steps`` as what they wait for allows, and yield each step, in order,
    once it may be committed: its tasks ended, and it is ``settled`` (who wrote each object it
    found is known) or every task started before its last one ended (so ``written``, what the
    batch's tasks wrote, holds every object it found that the batch wrote)."""
    waiting = list(range(len(steps)))
    queue: list[tuple[int, list[int]]] = []
    inflight: dict[Any, tuple[int, list[int], int]] = {}
    unfinished: set[int] = set()
    seq = 0
    nxt = 0
    while nxt < len(steps):
        for i in list(waiting):
            s = steps[i]
            if (s.after is None or s.after < nxt) and all(steps[j].left == 0 for j in s.share):
                waiting.remove(i)
                s.started = time.perf_counter()
                queue += [(i, g) for g in s.groups]
        while queue and len(inflight) < run.slots:
            i, g = queue.pop(0)
            s = steps[i]
            h = run.submit(_encode, location, s.base, [s.model.files[k] for k in g], threads)
            inflight[h] = (i, g, seq)
            unfinished.add(seq)
            seq += 1
        s = steps[nxt]
        if s.left == 0 and (settled(s) or not unfinished or min(unfinished) > s.horizon):
            yield s
            nxt += 1
            continue
        if not inflight:
            raise StoreError(f"model {s.model.name!r} waits for nothing that runs (a bug in the plan)")
        for h in run.wait(list(inflight)):
            i, g, n = inflight.pop(h)
            done: list[_FileDone] = run.result(h)
            unfinished.discard(n)
            t = steps[i]
            for k, d in zip(g, done):
                t.done[k] = d
                created += d.created
                for key, meta in d.written:
                    written.setdefault(key, meta)
                if progress:
                    progress(d.nbytes)
            t.left -= 1
            if t.left == 0:
                t.horizon = seq - 1
