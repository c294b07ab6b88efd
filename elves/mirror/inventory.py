"""What the mirror holds and what it costs (``elves mirror ls``, the server's pages): per repo and
commit, the logical bytes (what a plain mirror keeps) against the stored bytes, and for the whole
store what full copies and file-level dedup would have cost.

A commit's ``stored_bytes`` are those of the distinct objects its manifest names: a commit coded
against its base counts its deltas, not the base's objects. ``new_bytes`` are those of the
objects no model added before it names: what adding it cost the store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..store import Store
from ..store.maintenance import live
from ..store.manifests import manifests
from .records import model_name, repos


@dataclass
class CommitSummary:
    """One stored commit of a repo."""

    commit: str
    revisions: list[str]          # the tracked revisions that point at it
    model: str                    # the store model that holds it
    files: int
    logical_bytes: int
    stored_bytes: int
    new_bytes: int
    base: str | None              # the store model its tensors are coded against
    pulled: str

    @property
    def ratio(self) -> float:
        """Logical bytes over what adding the commit cost the store (``new_bytes``)."""
        return self.logical_bytes / max(self.new_bytes, 1)


@dataclass
class RepoSummary:
    """One mirrored repo and its stored commits, oldest first."""

    repo_type: str
    repo_id: str
    gated: bool
    private: bool
    commits: list[CommitSummary] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.repo_type, "repo": self.repo_id, "gated": self.gated, "private": self.private,
                "commits": [{**vars(c), "ratio": round(c.ratio, 3)} for c in self.commits]}


@dataclass
class Totals:
    """The whole store against what other ways of keeping the same files would cost."""

    models: int
    logical_bytes: int            # full copies: what a plain mirror keeps
    file_dedup_bytes: int         # each distinct file (by sha256) once
    stored_bytes: int             # the store's live objects

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "ratio": round(self.logical_bytes / max(self.stored_bytes, 1), 3)}


def inventory(store: Store) -> tuple[list[RepoSummary], Totals]:
    """Every mirrored repo with its commits' sizes, and the store's totals. Reads the manifests
    and the objects' trailers, no payload."""
    mans = manifests(store.storage)
    metas = live(store.storage)
    seen: set[str] = set()
    by_name: dict[str, CommitSummary] = {}
    files: dict[str, int] = {}
    for man in mans:  # in the order they were added, so that new_bytes is what each one cost
        keys = {seg[0] for f in man["files"] for seg in f["segments"]}
        fresh = keys - seen
        seen |= keys
        for f in man["files"]:
            if f.get("link") is None:
                files[f["sha256"]] = f["size"]
        raw = man.get("origin")
        origin: dict[str, Any] = raw if isinstance(raw, dict) else {}
        by_name[man["name"]] = CommitSummary(
            str(origin.get("commit", "")), [], man["name"], len(man["files"]), sum(f["size"] for f in man["files"]),
            sum(metas[k].size for k in keys if k in metas), sum(metas[k].size for k in fresh if k in metas),
            man.get("base"), str(origin.get("pulled", man["added"])))
    out = []
    for rec in repos(store):
        summary = RepoSummary(rec.repo_type, rec.repo_id, rec.gated, rec.private)
        for commit in rec.commits:
            c = by_name.get(model_name(rec.repo_type, rec.repo_id, commit))
            if c is not None:
                c.revisions = sorted(r for r, sha in rec.refs.items() if sha == commit)
                summary.commits.append(c)
        out.append(summary)
    totals = Totals(len(mans), sum(c.logical_bytes for c in by_name.values()), sum(files.values()),
                    sum(m.size for m in metas.values()))
    return out, totals

