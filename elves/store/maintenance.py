"""Keeping a store lean: what is live, garbage collection, sizes, and re-coding models stored on
their own as deltas of a base that arrived after them (repack)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from ..encoder import pipeline_for
from ..errors import ElvesError
from ..families import BaseMatch, ModelProfile, cluster
from ..model import Segment, SourceFile, TensorView
from .ingest import new_object, write_objects
from .layout import (
    KEY_RE,
    MODELS,
    OBJECTS,
    PROFILES,
    STAGED,
    TMP,
    manifest_at,
    object_at,
    profile_at,
)
from .manifests import manifest, manifests, names, profiles, read_json, write_json
from .objects import ObjectMeta, StoredObject
from .planner import StoreBase, chain, planner, ref_key
from .reading import iter_object
from .reports import GcReport, RepackReport, StoreStats
from .storage import Entry, Storage

ProgressFn = Callable[[int], None]


def live(storage: Storage, also: Iterable[str] = ()) -> dict[str, ObjectMeta]:
    """Every object a manifest uses (or ``also`` names), and every object those reference, with
    its metadata."""
    metas: dict[str, ObjectMeta] = {}
    todo = [seg[0] for m in manifests(storage) for f in m["files"] for seg in f["segments"]] + list(also)
    while todo:
        key = todo.pop()
        if key in metas:
            continue
        try:
            with StoredObject(storage, key) as obj:
                metas[key] = obj.meta
        except ElvesError:
            metas[key] = ObjectMeta("bytes", None, 0, "", [], 0, [])  # missing or damaged: kept
            continue
        todo.extend(metas[key].refs)
    return metas


def all_objects(storage: Storage) -> Iterator[Entry]:
    """Everything in ``objects/``: the entries of its folders, and whatever else lies in it
    (a link to a folder is an entry, never walked into)."""
    for top in storage.list(OBJECTS):
        if top.key.endswith("/"):
            yield from storage.list(top.key)
        else:
            yield top


def is_object(entry: Entry, keys: Iterable[str]) -> bool:
    """Whether ``entry`` is where a key of ``keys`` is stored."""
    name = entry.key.rsplit("/", 1)[-1]
    return name in keys and entry.key == object_at(name)


def walk(storage: Storage, prefix: str) -> Iterator[Entry]:
    """The files under folder ``prefix``, at any depth."""
    for e in storage.list(prefix):
        if e.key.endswith("/"):
            yield from walk(storage, e.key)
        else:
            yield e


def gc(storage: Storage, grace: float = 0.0) -> GcReport:
    """Delete the objects nothing references, files left in ``tmp/`` by killed writers, and
    profiles of removed models. Never deletes an object a manifest or a live delta uses.

    With a ``grace`` (seconds), unreferenced objects and files in ``tmp/`` written less than
    that long ago are kept, and the objects (and their references) a kept journal of a staged
    add names: an add codes its files before it takes the lock to commit them, and a writer that
    lost the lock unknown to it (an expired lease) may still name them in its manifest. On a
    local disk gc first waits for the adds under way (``Storage.adding``)."""
    with storage.adding(exclusive=True), storage.locked():
        young_after = time.time() - grace
        temps = list(walk(storage, TMP) if grace else storage.list(TMP))
        kept = {e.key for e in temps if grace and e.mtime > young_after}
        keep = live(storage, (seg[0] for key in kept if _is_journal(key) for seg in _journal_segments(storage, key)))
        removed = freed = young = 0
        for e in list(all_objects(storage)):
            if is_object(e, keep):
                continue
            if grace and e.mtime > young_after:
                young += 1
                continue
            freed += e.size
            storage.delete(e.key)
            removed += 1
        temp = 0
        for e in temps:
            if e.key in kept:
                young += 1
                continue
            storage.delete(e.key)
            temp += 1
        wanted = {profile_at(n) for n in names(storage)}
        for e in list(storage.list(PROFILES)):
            if e.key.endswith(".json") and not e.key[len(PROFILES):].startswith(".") and e.key not in wanted:
                storage.delete(e.key)
        return GcReport(removed, freed, len(keep), temp, young)


def _is_journal(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 4 and key.startswith(STAGED) and parts[-1] == "journal.json"


def _journal_segments(storage: Storage, key: str) -> Iterator[list[Any]]:
    """The segments a journal's entries name: checked only as far as gc needs (keys it keeps)."""
    try:
        files = read_json(storage, key, "the journal of a staged add").get("files")
    except (FileNotFoundError, ElvesError, AttributeError):
        return
    for entry in files.values() if isinstance(files, dict) else ():
        for seg in entry.get("segments", []) if isinstance(entry, dict) else ():
            if isinstance(seg, list) and seg and isinstance(seg[0], str) and KEY_RE.fullmatch(seg[0]):
                yield seg


def stats(storage: Storage) -> StoreStats:
    """Model count, logical and stored bytes, objects and garbage."""
    mans = manifests(storage)
    keep = live(storage)
    stored = sum(m.size for m in keep.values())
    stored += sum(e.size for sub in (MODELS, PROFILES) for e in storage.list(sub)
                  if e.key.endswith(".json") and not e.key[len(sub):].startswith("."))
    garbage = [e for e in all_objects(storage) if not is_object(e, keep)]
    return StoreStats(
        models=len(mans),
        logical_bytes=sum(f["size"] for m in mans for f in m["files"]),
        stored_bytes=stored,
        objects=len(keep),
        delta_objects=sum(1 for m in keep.values() if m.refs),
        garbage_objects=len(garbage),
        garbage_bytes=sum(e.size for e in garbage),
    )


def repack(storage: Storage, pool: Executor, nthreads: int, only_base: str | None = None,
           below: Iterable[tuple[str, BaseMatch]] = (), progress: ProgressFn | None = None,
           stored: list[tuple[dict[str, Any], ModelProfile]] | None = None) -> RepackReport:
    """Re-code models stored on their own as deltas of the base :func:`elves.families.cluster`
    finds them (only those of ``only_base``, if given), and those in ``below`` (model, its base)
    as deltas of theirs. A model is never re-coded against one of its own derivatives.
    ``stored``: every stored model's (manifest, profile), if the caller has them (a commit)."""
    report = RepackReport()
    if stored is None:
        mans = manifests(storage)
        stored = list(zip(mans, profiles(storage, mans)))
    alone = {m["name"] for m, _ in stored if m.get("base") is None}
    if not alone or len(stored) < 2:
        return report
    todo: dict[str, BaseMatch] = {}
    for fam in cluster([p for _, p in stored]):
        for name, match in fam.members:
            if only_base is None or match.base == only_base:
                todo.setdefault(name, match)
    for name, match in below:
        todo.setdefault(name, match)
    todo = {name: match for name, match in todo.items()
            if name in alone and name not in chain(storage, match.base)}
    if not todo:
        return report
    referenced: set[str] = set()   # objects some delta reads: they must stay plain
    delta: set[str] = set()
    for e in all_objects(storage):
        key = e.key.rsplit("/", 1)[-1]
        try:
            with StoredObject(storage, key, e.key) as obj:
                referenced.update(obj.meta.refs)
                if obj.meta.refs:
                    delta.add(key)
        except ElvesError:
            continue
    for name, match in todo.items():
        _repack_model(storage, name, match.base, list(match.evidence), pool, nthreads, referenced, delta,
                      report, progress)
    return report


def _repack_model(storage: Storage, name: str, base: str, reasons: list[str], pool: Executor, nthreads: int,
                  referenced: set[str], delta: set[str], report: RepackReport,
                  progress: ProgressFn | None) -> None:
    man = manifest(storage, name)
    window = 2 * nthreads + 2
    plan, models = planner(storage, base, exclude=name)
    base_keys = {s.loc[0] for s in models.segments}
    rewritten = 0
    try:
        for f in man["files"]:
            views: dict[int, list[TensorView]] = {}
            for t in f["tensors"]:
                views.setdefault(t[3], []).append(TensorView(t[0], t[1], tuple(t[2]), t[3], t[4],
                                                             tuple(t[5]) if t[5] is not None else None))
            sf = SourceFile(Path(storage.where("")), f["path"], f["format"], f["size"], [])
            for index, seg_entry in enumerate(f["segments"]):
                key = seg_entry[0]
                if len(seg_entry) != 2 or key.endswith(".bytes") or key in base_keys:
                    continue
                if key in referenced:
                    report.skipped.append(f"{name}: object {key} stays plain: another model's deltas read it")
                    continue
                if key in delta:
                    continue
                own = StoreBase(storage, keys=[key])
                try:
                    meta = own.objects[key].meta
                    seg = Segment(0, meta.nbytes, meta.dtype)
                    cands = plan.candidates(sf, index, seg, meta.hash, views.get(index, []))
                    pipeline, chunk_elems = pipeline_for(seg)

                    def raw(off: int, n: int, own: StoreBase = own, h: str = meta.hash) -> bytes:
                        return own.read(h, off, n).tobytes()

                    d = plan.choose(seg, pipeline, chunk_elems, cands, raw)
                    if d is None:
                        continue
                    reads = ref_key(d)

                    def chunks(key: str = key) -> Iterator[bytes]:
                        return (c.tobytes() for c in iter_object(storage, key, pool, window))

                    obj = new_object(key, meta.kind, meta.dtype, meta.nbytes, meta.hash, pipeline,
                                     chunk_elems, chunks, d, reads)
                    ((_, tmp),) = write_objects(storage, [obj], pool, nthreads, progress, commit=False)
                finally:
                    own.close()
                if obj.meta.size >= meta.size or not obj.meta.refs:
                    storage.delete(tmp)
                    continue
                try:
                    for _ in iter_object(storage, key, pool, window, at=tmp):  # decodes to the same hash
                        pass
                except BaseException:
                    storage.delete(tmp)
                    raise
                storage.commit(tmp, object_at(key))
                storage.sync([object_at(key).rsplit("/", 1)[0] + "/"])
                report.objects_rewritten += 1
                report.bytes_before += meta.size
                report.bytes_after += obj.meta.size
                referenced.add(reads)
                delta.add(key)
                rewritten += 1
    finally:
        models.close()
    man["base"], man["reasons"] = base, reasons + ([] if rewritten else
                                                    [f"no tensor was smaller coded against {base!r}"])
    write_json(storage, manifest_at(name), man)
    report.models.append((name, base))
