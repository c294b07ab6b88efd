"""``store verify``: the whole store checked, as ``git fsck`` checks a repository."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from ..errors import ElvesError
from ..parallel import default_threads
from .layout import object_at
from .maintenance import all_objects, is_object
from .manifests import PACK_MAX, load_manifest, manifest_keys, profile
from .objects import ObjectMeta, StoredObject
from .reading import file_parts
from .reports import StoreProblem, StoreVerifyReport
from .storage import Storage

ProgressFn = Callable[[int], None]
Manifests = list[tuple[str, dict[str, Any]]]   # (where it lies, the manifest)


def verify(storage: Storage, full: bool = False, threads: int | None = None,
           progress: ProgressFn | None = None) -> StoreVerifyReport:
    """Check the whole store; nothing is changed (:meth:`elves.store.Store.verify`)."""
    report = StoreVerifyReport(full=full)
    nthreads = default_threads(threads)
    with storage.adding(exclusive=True), storage.locked(), ThreadPoolExecutor(nthreads) as pool:
        manifests = _manifests(storage, report)
        users: dict[str, str] = {}   # key -> what names it first, for messages
        for _, man in manifests:
            for f in man["files"]:
                for seg in f["segments"]:
                    users.setdefault(seg[0], f"model {man['name']!r}, file {f['path']}")
        metas, unusable = _objects(storage, users, report, pool, progress)
        mismatched = _segments(storage, manifests, metas, report)
        if report.orphans_checked:
            for e in sorted(all_objects(storage)):
                if not is_object(e, users):
                    report.orphans.append(StoreProblem(storage.where(e.key), "no model reaches it (`elves store gc` "
                                                                             "deletes it)"))
                    if progress:
                        progress(e.size)
        if full:
            _files(storage, [m for m in manifests if m[0] not in mismatched], metas, unusable, report,
                   pool, 2 * nthreads + 2, progress)
    return report


def verify_bytes(storage: Storage, full: bool = False) -> int:
    """What :func:`verify` reads, in bytes (a progress bar's length): every object file, plus
    with ``full`` every model's files."""
    total = sum(e.size for e in all_objects(storage))
    if full:
        for key in manifest_keys(storage):
            try:
                total += sum(f["size"] for f in load_manifest(storage, key)["files"])
            except (OSError, ElvesError):
                continue
    return total


def _manifests(storage: Storage, report: StoreVerifyReport) -> Manifests:
    """The manifests that pass their checks; the others, and bad profiles, go to the report."""
    out = []
    for key in manifest_keys(storage):
        try:
            man = load_manifest(storage, key)
        except FileNotFoundError:  # removed since the listing
            continue
        except ElvesError as e:
            report.bad_manifests.append(StoreProblem(e.path or storage.where(key), e.message))
            report.orphans_checked = False
            continue
        try:
            profile(storage, man["name"])
        except ElvesError as e:
            report.bad_manifests.append(StoreProblem(e.path or storage.where(key), e.message))
        out.append((storage.where(key), man))
    report.models = len(out)
    return out


def _objects(storage: Storage, users: dict[str, str], report: StoreVerifyReport, pool: Executor,
             progress: ProgressFn | None) -> tuple[dict[str, ObjectMeta], set[str]]:
    """Check every object in ``users`` and those they reference, whole, on ``pool``: the
    metadata of the sound ones, and the keys of those that cannot be restored."""
    metas: dict[str, ObjectMeta] = {}
    unusable: set[str] = set()
    todo = list(users)

    def check(key: str) -> tuple[ObjectMeta | None, str, str]:
        """An object checked whole (trailer and every payload): its metadata, or the kind of
        problem and what it is."""
        if not storage.exists(object_at(key)):
            return None, "missing_objects", f"object {key} is missing"
        try:
            with StoredObject(storage, key) as obj:
                for i in range(len(obj.meta.chunks)):
                    obj.read_payload(obj.meta, i)
                return obj.meta, "", ""
        except ElvesError as e:
            return None, "damaged_objects", e.message

    while todo:
        batch = [k for k in dict.fromkeys(todo) if k not in metas and k not in unusable]
        todo = []
        for key, (meta, kind, message) in zip(batch, pool.map(check, batch)):
            if meta is None:
                getattr(report, kind).append(StoreProblem(storage.where(object_at(key)), message))
                unusable.add(key)
                continue
            metas[key] = meta
            report.bytes_checked += meta.size
            if progress:
                progress(meta.size)
            for r in meta.refs:
                users.setdefault(r, f"object {key}")
                todo.append(r)
    report.objects = len(metas)
    for key, meta in metas.items():
        for r in meta.refs:
            ref = metas.get(r)
            if ref is not None and (ref.refs or ref.kind != "tensor"):
                report.bad_refs.append(StoreProblem(
                    storage.where(object_at(key)), f"object {key} is a delta of object {r}, which is "
                    + ("a delta itself" if ref.refs else "not a tensor") + ": references are one level deep"))
                unusable.add(key)
    return metas, unusable


def _segments(storage: Storage, manifests: Manifests, metas: dict[str, ObjectMeta],
              report: StoreVerifyReport) -> set[str]:
    """Each segment must fit its object: a whole object of the segment's length, or a slice
    inside a pack. The manifests where one does not."""
    bad = set()
    for p, man in manifests:
        for f in man["files"]:
            for key, length, *at in f["segments"]:
                m = metas.get(key)
                if m is None or (m.nbytes == length if not at else
                                 m.kind == "bytes" and m.nbytes <= PACK_MAX and at[0] + length <= m.nbytes):
                    continue
                report.bad_manifests.append(StoreProblem(
                    p, f"file {f['path']}: a segment of {length} bytes" + (f" at {at[0]}" if at else "")
                    + f" does not fit object {key} ({m.kind}, {m.nbytes} bytes)"))
                bad.add(p)
                break
    return bad


def _files(storage: Storage, manifests: Manifests, metas: dict[str, ObjectMeta], unusable: set[str],
           report: StoreVerifyReport, pool: Executor, window: int, progress: ProgressFn | None) -> None:
    """Decode every file whose objects passed and match it with its sha256 (``verify --full``)."""
    seen = {p.path for p in report.damaged_objects}
    for p, man in manifests:
        for f in man["files"]:
            keys = {seg[0] for seg in f["segments"]}
            if any(k not in metas or k in unusable or unusable.intersection(metas[k].refs) for k in keys):
                continue  # already reported
            try:
                for part in file_parts(storage, man["name"], f, pool, window):
                    report.bytes_checked += len(part)
                    if progress:
                        progress(len(part))
                report.files_checked += 1
            except ElvesError as e:
                where = e.path or p
                if where == p:
                    report.bad_files.append(StoreProblem(where, f"model {man['name']!r}, file {f['path']}: "
                                                                f"{e.message}"))
                elif where not in seen:  # found only by decoding: the stored hash does not match
                    seen.add(where)
                    report.damaged_objects.append(StoreProblem(where, e.message))
