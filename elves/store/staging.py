"""Adding a model file by file (:class:`StagedAdd`): what ``Store.add`` does for a folder, and what
the mirror's pull does as files arrive from the Hub, one at a time.

Each file is coded into objects as it comes and forgotten; the manifest is written last, by
:meth:`StagedAdd.commit`. A resumable add keeps a journal under ``tmp/staged/<name>/``: the
manifest entry of every file already stored, the base it chose and the profile so far. A run
killed at any point (kill -9 included) leaves a journal whose entries name only durable objects,
and the next run for the same name takes up from there; ``gc`` deletes an abandoned one with
the rest of ``tmp/``, and with it the claim on its objects.

The base is chosen when the first file with tensors arrives, from the metadata files seen
before it (config.json and README.md come first) and that file's weights; given the model's
whole profile up front (``Store.add``), it is chosen from all of it.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import Executor
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
from .objects import ObjectMeta
from .layout import NAME_RE, OBJECTS, STORE_VERSION, TMP, manifest_at, object_at, profile_at
from .manifests import check_manifest, manifest, manifests, profiles, read_json, write_json
from .planner import StoreBase, check_fits, choose_base, derived, planner
from .reports import AddResult, RepackReport
from .storage import Storage

STAGED = f"{TMP}staged/"
JOURNAL_VERSION = 1


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or len(name) > 200 or name in ("auto", "none"):
        raise StoreError(f"invalid model name {name!r}: use letters, digits and . _ + @ -, "
                         "with at most one / (org/model)")


def staging_at(name: str) -> str:
    """The folder of model ``name``'s staged add (its journal, and whatever its caller stages)."""
    return f"{STAGED}{quote(name, safe='')}/"


def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StagedAdd:
    """Model ``name``, added to the store file by file. Open it with ``Store.stage`` (it holds the
    store's writer lock until closed), :meth:`add` each file in the order the manifest lists
    them, then :meth:`commit`.

    ``base`` is ``"auto"`` (found by :mod:`elves.families`), ``None`` (stored on its own) or a
    stored model's name. ``profile``, when the caller has the whole model's, chooses the base
    from all of it. With ``resumable``, what is added is journaled and stays when the add fails
    (a later add of the same name resumes it); without, a failure removes what it wrote. With
    ``replace``, a model of that name already stored is replaced by this one when it commits.
    ``stored``: the stored models' (manifest, profile), if the caller has them.
    """

    def __init__(self, storage: Storage, name: str, base: str | None, pool: Executor, nthreads: int,
                 progress: ProgressFn | None = None, profile: ModelProfile | None = None,
                 resumable: bool = False, replace: bool = False,
                 stored: list[tuple[dict[str, Any], ModelProfile]] | None = None):
        check_name(name)
        self.storage, self.name, self.pool, self.nthreads, self.progress = storage, name, pool, nthreads, progress
        self.resumable = resumable
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
        self.manifest: dict[str, Any] | None = None   # the one commit wrote
        self.resumed = False
        if storage.exists(manifest_at(name)) and not replace:
            raise StoreError(f"a model named {name!r} is already in the store: `rm` it first or add under "
                             "another name", storage.where(""))
        if base not in (None, "auto"):
            manifest(storage, base)  # a clear error for an unknown name
        if resumable:
            self._load_journal()

    # -- the journal ------------------------------------------------------------------------

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
        """The stored models with their profiles, but for the one this add replaces: read once,
        since no other writer changes them while this add holds the lock."""
        if self._stored is None:
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
               origin: dict[str, Any] | None = None) -> AddResult:
        """Write the manifest (its files in ``order``, by default as added) and the profile; then
        re-code the stored models this one turns out to be the base of. ``origin`` is recorded in
        the manifest as it is (where the model came from: the mirror's repo, revision, commit)."""
        t0 = time.perf_counter()
        st = self.storage
        paths = list(order) if order is not None else list(self.entries)
        if sorted(paths) != sorted(self.entries) or not paths:
            raise StoreError(f"model {self.name!r}: the files to commit ({len(paths)}) are not those added "
                             f"({len(self.entries)})", st.where(""))
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
        if failed and not self._committed and not self.resumable and not self.storage.exists(manifest_at(self.name)):
            for key in self.out.created + [profile_at(self.name)]:  # nothing names what it wrote
                try:
                    self.storage.delete(key)
                except ElvesError:  # the failing disk keeps it: gc does the rest
                    pass

    def __enter__(self) -> StagedAdd:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close(et is not None)


def abandon(storage: Storage, name: str) -> None:
    """Forget a staged add of ``name`` (its objects become garbage for ``gc``)."""
    storage.delete(staging_at(name))

