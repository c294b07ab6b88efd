"""Adding a model file by file (:class:`StagedAdd`): what ``Store.add`` does for a folder, and what
the mirror's pull does as files arrive from the Hub, one at a time.

Each file is coded into objects as it comes and forgotten; the manifest is written last, by
:meth:`StagedAdd.commit`. Only the commit takes the store's writer lock (the lease on object
storage): objects are named by their content and written once, so the files are coded without
it, and two adds (two pulls, a pull and an ``add``) code side by side. Under the lock the commit
checks what another writer may have changed meanwhile (:meth:`StagedAdd.commit`). A resumable add keeps a journal under ``tmp/staged/<name>/``: the
manifest entry of every file already stored, the base it chose and the profile so far. A run
killed at any point (kill -9 included) leaves a journal whose entries name only durable objects,
and the next run for the same name takes up from there; ``gc`` deletes an abandoned one with
the rest of ``tmp/``, and with it the claim on its objects.

The base is chosen when the first file with tensors arrives, from the metadata files seen
before it (config.json and README.md come first) and that file's weights; given the model's
whole profile up front (``Store.add``), it is chosen from all of it.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from ..errors import ElvesError, OutputError, StoreError
from ..families import ModelProfile, Profiler
from ..model import SourceFile
from ..readers import read_file
from . import maintenance
from .ingest import Added, ProgressFn, add_files
from .objects import ObjectMeta, StoredObject
from .layout import MODELS, NAME_RE, OBJECTS, STAGED, STORE_VERSION, manifest_at, object_at, profile_at
from .manifests import check_manifest, manifest, manifests, profiles, read_json, write_json
from .planner import StoreBase, check_fits, choose_base, derived, planner
from .reports import AddResult, RepackReport
from .storage import Storage

JOURNAL_VERSION = 1
CHECKS = 32          # existence checks at a commit run side by side (HEADs on object storage)


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or len(name) > 200 or name in ("auto", "none"):
        raise StoreError(f"invalid model name {name!r}: use letters, digits and . _ + @ -, "
                         "with at most one / (org/model)")


def staging_at(name: str) -> str:
    """The folder of model ``name``'s staged add (its journal, and whatever its caller stages)."""
    return f"{STAGED}{quote(name, safe='')}/"


def listing(storage: Storage) -> dict[str, tuple[int, float]]:
    """The manifests' keys, sizes and times: what tells a writer that another changed them."""
    return {e.key: (e.size, e.mtime) for e in storage.list(MODELS)}


def check_present(storage: Storage, name: str, keys: Iterable[str], pool: Executor, why: str) -> None:
    """Refuse to commit model ``name`` if an object of ``keys`` is gone (``why``: who may have
    deleted it, and what to do). The checks run on ``pool``, side by side (HEADs on object storage)."""
    todo = list(dict.fromkeys(keys))
    for key, there in zip(todo, pool.map(lambda k: storage.exists(object_at(k)), todo)):
        if not there:
            raise StoreError(f"model {name!r}: object {key}, which its files were stored as, is gone ({why})",
                             storage.where(object_at(key)))


def remove_unused(storage: Storage, places: list[str]) -> None:
    """Remove the files at ``places`` (objects a failed add created) but for the objects a
    manifest names by now (another writer that found one there may have committed it). The
    caller holds the writer lock."""
    if not places:
        return
    try:
        named = {seg[0] for m in manifests(storage) for f in m["files"] for seg in f["segments"]}
        for at in places:
            if at.rsplit("/", 1)[-1] not in named:
                storage.delete(at)
    except ElvesError:  # a failing storage keeps them: gc does the rest
        pass


def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StagedAdd:
    """Model ``name``, added to the store file by file. Open it with ``Store.stage``, :meth:`add`
    each file in the order the manifest lists them, then :meth:`commit`.

    ``base`` is ``"auto"`` (found by :mod:`elves.families`), ``None`` (stored on its own) or a
    stored model's name. ``profile``, when the caller has the whole model's, chooses the base
    from all of it. With ``resumable``, what is added is journaled and stays when the add fails
    (a later add of the same name resumes it); without, a failure removes what it wrote. With
    ``replace``, a model of that name already stored is replaced by this one when it commits.
    ``stored``: the stored models' (manifest, profile), if the caller has them. With ``own_lock``,
    the files are coded without the writer lock, and :meth:`commit` takes it (``Store.stage``);
    without, the caller holds it for the commit and keeps ``stored`` up to date (``add_many``).
    """

    def __init__(self, storage: Storage, name: str, base: str | None, pool: Executor, nthreads: int,
                 progress: ProgressFn | None = None, profile: ModelProfile | None = None,
                 resumable: bool = False, replace: bool = False,
                 stored: list[tuple[dict[str, Any], ModelProfile]] | None = None, own_lock: bool = False):
        check_name(name)
        self.storage, self.name, self.pool, self.nthreads, self.progress = storage, name, pool, nthreads, progress
        self.resumable, self.replace, self.own_lock = resumable, replace, own_lock
        self.journal = f"{staging_at(name)}journal.json"
        self.whole = profile
        self.profiler = Profiler(name)
        self.base_arg = base
        self.base: str | None = None
        self.reasons: list[str] = []
        self.decided = False
        self.entries: dict[str, dict[str, Any]] = {}
        self.out = Added([], [], [])
        self.bytes_in = 0
        self._plan: tuple[Any, StoreBase] | None = None
        self._committed = False
        # the stored models with their profiles: given by a caller that commits several models
        # under one lock (add_many), which keeps it up to date; else read when first needed
        self._stored = stored
        self._seen: dict[str, tuple[int, float]] | None = None   # the manifests when _stored was read
        self._claim: int | None = None
        self.manifest: dict[str, Any] | None = None   # the one commit wrote
        self.resumed = False
        if storage.exists(manifest_at(name)) and not replace:
            raise StoreError(f"a model named {name!r} is already in the store: `rm` it first or add under "
                             "another name", storage.where(""))
        if base not in (None, "auto"):
            manifest(storage, base)  # a clear error for an unknown name
        if resumable:
            self._take_claim()
            self._load_journal()

    # -- the journal ------------------------------------------------------------------------

    def _take_claim(self) -> None:
        """One resumable add of a name at a time on this machine: two would share the journal and
        the files in flight (a flock on a file among them, released when the add ends or dies)."""
        at = self.scratch().parent / ".claim"   # beside files/, whose names are the repo's
        try:
            fd = os.open(at, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise OutputError(f"cannot claim the staged add: {e.strerror}", at) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"another add of {self.name!r} is under way on this machine: let it finish",
                             self.storage.where(staging_at(self.name))) from None
        self._claim = fd

    def _load_journal(self) -> None:
        """Take up a journal left by an earlier run, if it is this add's and every object its
        entries name is still there; otherwise start afresh."""
        try:
            raw = read_json(self.storage, self.journal, "the journal of a staged add")
        except FileNotFoundError:
            return
        except ElvesError:
            raw = None
        try:
            if not (isinstance(raw, dict) and raw.get("version") == JOURNAL_VERSION and raw.get("name") == self.name
                    and raw.get("base_arg") == self.base_arg and isinstance(raw.get("files"), dict)):
                return
            files = raw["files"]
            # a journal is untrusted like a manifest: its entries are checked as one
            check_manifest({"format": "elves-store-model", "version": list(STORE_VERSION), "name": self.name,
                            "seq": 0, "added": "", "source": "folder", "base": raw.get("base"), "reasons": [],
                            "files": list(files.values()) or [{}]}, manifest_at(self.name),
                           self.storage.where(self.journal))
            profiler = Profiler.from_json(raw["profiler"])
        except (ElvesError, KeyError, TypeError, ValueError):
            return
        if not all(self.storage.exists(object_at(seg[0])) for e in files.values() for seg in e["segments"]):
            return  # a gc in between took its objects: start afresh
        self.entries = {str(p): e for p, e in files.items()}
        self.profiler = profiler
        self.base, self.reasons = raw.get("base"), [str(r) for r in raw.get("reasons", [])]
        self.decided, self.resumed = bool(raw.get("decided")), True
        self.bytes_in = sum(e["size"] for e in self.entries.values())

    def _save_journal(self) -> None:
        write_json(self.storage, self.journal, {
            "version": JOURNAL_VERSION, "name": self.name, "base_arg": self.base_arg, "base": self.base,
            "reasons": self.reasons, "decided": self.decided, "files": self.entries,
            "profiler": self.profiler.to_json(),
        })

    # -- adding files ---------------------------------------------------------------------------

    def entry(self, relpath: str) -> dict[str, Any] | None:
        """The manifest entry of ``relpath`` if it is already stored by this add (resumed)."""
        return self.entries.get(relpath)

    def scratch(self) -> Path:
        """A local folder for the caller's files in flight (the mirror's downloads): under the
        store's ``tmp/`` on a local disk, in a staging folder on this machine for a store on
        object storage (``Storage.scratch``). Kept with the journal for a resumed add, removed
        with it by commit."""
        return self.storage.scratch(f"{staging_at(self.name)}files/")

    def add(self, path: Path, relpath: str) -> dict[str, Any]:
        """Store the file at ``path`` as ``relpath`` of the model; its manifest entry. The file
        may be deleted once this returns."""
        return self.add_source(read_file(path, relpath))

    def add_source(self, sf: SourceFile) -> dict[str, Any]:
        """:meth:`add` for a file already read (``readers.read_model``); links are stored as links."""
        if sf.relpath in self.entries:
            raise StoreError(f"{sf.relpath} was added twice to model {self.name!r}", self.storage.where(""))
        if self.whole is None and sf.link is None:
            self.profiler.metadata(sf.relpath, sf.path)
            self.profiler.add(sf)
        if not self.decided and (self.whole is not None or any(s.dtype is not None for s in sf.segments)):
            self._decide(self.whole or self.profiler.prof)
        plan = self._planner()
        before = len(self.out.entries)
        add_files(self.storage, [sf], plan, self.pool, self.nthreads, self.progress, self.out)
        entry: dict[str, Any] = self.out.entries[before]
        self.entries[sf.relpath] = entry
        self.bytes_in += sf.size
        if self.resumable:
            # what the journal names must outlive a crash: the objects' renames first
            self.storage.sync({object_at(seg[0]).rsplit("/", 1)[0] + "/" for seg in entry["segments"]} | {OBJECTS})
            self._save_journal()
        return entry

    def decide(self) -> None:
        """Choose the base now, from the whole profile (``add_many``'s driver, whose workers code
        the files, decides so without opening the base's planner)."""
        if self.whole is not None and not self.decided:
            self._decide(self.whole)

    def check_fits(self, files: list[SourceFile]) -> None:
        """Refuse a base given by hand that none of ``files``' tensors can be coded against,
        before anything is written."""
        self.decide()
        plan = self._planner()
        if plan is not None and self.base_arg not in (None, "auto"):
            check_fits(plan, files, self.base_arg, self.storage.where(""))

    def adopt(self, relpath: str, size: int, entry: dict[str, Any], objects: list[tuple[str, ObjectMeta]],
              reused: int) -> None:
        """Record a file whose objects someone else stored (a worker of ``add_many``, which
        removes them itself if the batch fails): its manifest entry, the objects that count as
        this add's, and how many of its segments were already stored."""
        if relpath in self.entries:
            raise StoreError(f"{relpath} was added twice to model {self.name!r}", self.storage.where(""))
        for key, meta in objects:
            self.out.written.append((key, meta))
            self.out.new += 1
            self.out.delta += bool(meta.refs)
            self.out.tensors += meta.kind == "tensor"
        self.out.reused += reused
        self.out.entries.append(entry)
        self.entries[relpath] = entry
        self.bytes_in += size

    def _decide(self, prof: ModelProfile) -> None:
        self.decided = True
        if self.base_arg is None:
            return
        if self.base_arg != "auto":
            self.base, self.reasons = self.base_arg, ["given by hand"]
            return
        stored = self._others()
        self.base, self.reasons = choose_base(prof, stored, [n for n, _ in derived(prof, stored)])

    def _others(self) -> list[tuple[dict[str, Any], ModelProfile]]:
        """The stored models with their profiles, but for the one this add replaces: read once
        (and again by a commit that finds that another writer changed them)."""
        if self._stored is None:
            self._seen = listing(self.storage)
            mans = manifests(self.storage)
            self._stored = list(zip(mans, profiles(self.storage, mans)))
        return [(m, p) for m, p in self._stored if m["name"] != self.name]

    def _planner(self) -> Any:
        if self.base is None:
            return None
        if self._plan is None:
            self._plan = planner(self.storage, self.base)
        return self._plan[0]

    # -- finishing ----------------------------------------------------------------------------

    def commit(self, order: Iterable[str] | None = None, source: str = "folder",
               origin: dict[str, Any] | None = None, then: Callable[[], None] | None = None) -> AddResult:
        """Write the manifest (its files in ``order``, by default as added) and the profile; then
        re-code the stored models this one turns out to be the base of. ``origin`` is recorded in
        the manifest as it is (where the model came from: the mirror's repo, revision, commit).
        With ``own_lock``, under the writer lock, taken here (``then`` is called under it last,
        the mirror's record of the repo), after :meth:`_recheck`."""
        paths = list(order) if order is not None else list(self.entries)
        if sorted(paths) != sorted(self.entries) or not paths:
            raise StoreError(f"model {self.name!r}: the files to commit ({len(paths)}) are not those added "
                             f"({len(self.entries)})", self.storage.where(""))
        with self.storage.locked() if self.own_lock else nullcontext():
            if self.own_lock:
                self._recheck()
            result = self._commit(paths, source, origin)
            if then is not None:
                then()
        return result

    def _recheck(self) -> None:
        """What another writer may have changed while the files were coded without the lock: a
        model of this name committed (refused unless ``replace``); the chosen base removed (refused:
        the deltas were coded against it); a base object this add's deltas read re-coded as a delta
        itself by a repack, or gone (refused: references stay one level deep); an object the files
        were stored as deleted (by a gc beside the add, or another writer's failed add: refused).
        The stored models are read again if their manifests changed, so that the commit's seq,
        and the models it may re-code as its deltas, are those of the store as it is now."""
        st = self.storage
        again = "run the add again: what it stored is reused" if self.resumable else "run the add again"
        if not self.replace and st.exists(manifest_at(self.name)):
            raise StoreError(f"a model named {self.name!r} was added by another writer while this add ran: `rm` it "
                             "first or add under another name", st.where(""))
        if listing(st) != self._seen:   # None: never read in this run (a resumed add)
            self._stored = None
            if self.base is not None and not st.exists(manifest_at(self.base)):
                raise StoreError(f"model {self.name!r}: its base {self.base!r} was removed by another writer while "
                                 f"this add ran: {again}", st.where(manifest_at(self.base)))
            for ref in sorted({r for _, meta in self.out.written for r in meta.refs}):
                try:
                    with StoredObject(st, ref) as obj:
                        plain = not obj.meta.refs
                except (FileNotFoundError, ElvesError):
                    plain = False
                if not plain:
                    raise StoreError(f"model {self.name!r}: object {ref} of its base {self.base!r}, which its deltas "
                                     f"read, was re-coded or removed by another writer while this add ran: {again}",
                                     st.where(object_at(ref)))
        with ThreadPoolExecutor(CHECKS) as checks:
            check_present(st, self.name, (seg[0] for e in self.entries.values() for seg in e["segments"]), checks,
                          f"a gc beside the add, or another writer's failed add: {again}")

    def _commit(self, paths: list[str], source: str, origin: dict[str, Any] | None) -> AddResult:
        t0 = time.perf_counter()
        st = self.storage
        if self._plan is not None:
            self._plan[1].close()
            self._plan = None
        if self.base is not None and self.out.tensors and self.out.delta == 0 and not self.resumed:
            self.reasons.append(f"no tensor was smaller coded against {self.base!r}")
        prof = self.whole or self.profiler.result()
        stored = self._others()
        mans = [m for m, _ in stored]
        below = derived(prof, stored)
        st.sync({f"{OBJECTS}{key[:2]}/" for key, _ in self.out.written} | {OBJECTS})
        added = sum(meta.size for _, meta in self.out.written)
        added += write_json(st, profile_at(self.name), prof.to_json())
        self.manifest = {
            "format": "elves-store-model", "version": list(STORE_VERSION), "name": self.name,
            "seq": max((m["seq"] for m in mans), default=0) + 1, "added": _utcnow(),
            "source": source, "base": self.base, "reasons": self.reasons,
            "files": [self.entries[p] for p in paths],
            **({} if origin is None else {"origin": origin}),
        }
        added += write_json(st, manifest_at(self.name), self.manifest)
        self._committed = True
        if self.resumable:
            st.delete(staging_at(self.name))
        result = AddResult(self.name, self.base, self.reasons, self.bytes_in, added, self.out.new,
                           self.out.reused, self.out.delta)
        try:
            report = maintenance.repack(st, self.pool, self.nthreads, only_base=self.name, below=below,
                                        stored=stored + [(self.manifest, ModelProfile.from_json(prof.to_json()))])
        except OutputError as e:  # the model is in; re-coding others can wait for `repack`
            report = RepackReport(skipped=[f"re-coding models stored before it as its deltas stopped: {e}"])
        result.repacked = [m for m, _ in report.models]
        result.notes = report.skipped
        result.bytes_added -= report.bytes_saved
        result.seconds = time.perf_counter() - t0
        return result

    def close(self, failed: bool) -> None:
        if self._plan is not None:
            self._plan[1].close()
            self._plan = None
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None
        if failed and not self._committed and not self.resumable:
            try:
                with self.storage.locked() if self.own_lock else nullcontext():
                    remove_unused(self.storage, self.out.created)
                    if not self.storage.exists(manifest_at(self.name)):
                        self.storage.delete(profile_at(self.name))   # a commit cut short wrote it
            except ElvesError:  # the lock cannot be had, or the storage fails: gc does the rest
                pass

    def __enter__(self) -> StagedAdd:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close(et is not None)


def abandon(storage: Storage, name: str) -> None:
    """Forget a staged add of ``name`` (its objects become garbage for ``gc``)."""
    storage.delete(staging_at(name))

