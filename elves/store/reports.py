"""What the store's operations return."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AddResult:
    """What :meth:`Store.add` did."""

    name: str
    base: str | None              # the stored model its tensors were coded against, if any
    reasons: list[str]            # why that base (or why none)
    bytes_in: int                 # the model's files, as given
    bytes_added: int              # what the store grew by: new objects, the manifest, the profile,
                                  # less what re-coding models stored before it saved
    objects_new: int
    objects_reused: int           # segments already in the store (this model's own duplicates too)
    delta_objects: int            # new objects coded against the base
    repacked: list[str] = field(default_factory=list)  # stored models re-coded as deltas of this one
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_in / max(self.bytes_added, 1)


@dataclass
class ModelEntry:
    """A stored model, as :meth:`Store.models` lists it."""

    name: str
    source: str                   # "file" or "folder": what restore writes
    files: int
    bytes: int                    # its files' total size
    base: str | None
    reasons: list[str]
    added: str                    # UTC, ISO 8601


@dataclass
class StoreStats:
    """Sizes of a store (:meth:`Store.stats`)."""

    models: int
    logical_bytes: int            # every model's files, counted once per model
    stored_bytes: int             # live objects plus manifests and profiles
    objects: int                  # live objects
    delta_objects: int
    garbage_objects: int          # objects nothing references (``gc`` deletes them)
    garbage_bytes: int

    @property
    def ratio(self) -> float:
        return self.logical_bytes / max(self.stored_bytes, 1)


@dataclass
class GcReport:
    """What :meth:`Store.gc` deleted and kept."""

    objects_removed: int
    bytes_freed: int
    objects_kept: int
    temp_removed: int
    kept_young: int = 0           # unreferenced objects and temporary files kept for the grace period


@dataclass
class RepackReport:
    """What :meth:`Store.repack` re-coded."""

    models: list[tuple[str, str]] = field(default_factory=list)  # (model, base) pairs handled
    objects_rewritten: int = 0
    bytes_before: int = 0         # of the rewritten objects
    bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)             # why some were left as they are

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass
class StoreProblem:
    """One thing :meth:`Store.verify` found wrong: the file concerned and what is wrong with it."""

    path: str
    message: str


@dataclass
class StoreVerifyReport:
    """What :meth:`Store.verify` checked and found, problems listed by kind (``PROBLEMS``)."""

    full: bool = False            # models were decoded and their files' sha256 checked
    models: int = 0               # manifests that parse
    objects: int = 0              # objects that manifests reach, checked whole
    bytes_checked: int = 0        # object bytes read, plus with ``full`` the files decoded
    files_checked: int = 0        # files decoded and matched with their sha256 (``full``)
    bad_manifests: list[StoreProblem] = field(default_factory=list)   # unreadable, malformed, or not
                                                                       # matching its objects; its profile
    missing_objects: list[StoreProblem] = field(default_factory=list)  # named, absent
    damaged_objects: list[StoreProblem] = field(default_factory=list)  # footer, trailer or a payload
    bad_refs: list[StoreProblem] = field(default_factory=list)    # a delta reading a delta or a non-tensor
    orphans: list[StoreProblem] = field(default_factory=list)     # in objects/, reached by nothing: gc frees
    bad_files: list[StoreProblem] = field(default_factory=list)   # decoded bytes not the file's sha256
    orphans_checked: bool = True  # False when a manifest is unreadable: what it names is unknown

    PROBLEMS = ("bad_manifests", "missing_objects", "damaged_objects", "bad_refs", "orphans", "bad_files")

    @property
    def problems(self) -> dict[str, list[StoreProblem]]:
        return {k: getattr(self, k) for k in self.PROBLEMS if getattr(self, k)}

    @property
    def ok(self) -> bool:
        return not self.problems
