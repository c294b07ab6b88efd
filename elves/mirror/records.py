"""What the mirror knows of each Hub repo, kept in the store beside the models.

A repo's commit is stored as a model of the store (:func:`model_name`: ``org/name@<commit>``;
datasets ``dataset+org/name@<commit>``), whose manifest carries an ``origin``: the repo, the
commit, the revision first asked for, when it was pulled, and per file its Hub metadata (size,
git blob id, LFS sha256), which the server answers with and export writes. Commits of one repo
share their objects like any models of a store do.

A repo's record, ``mirror/<type>s/<quoted repo id>.json``, maps each tracked revision (a branch,
a tag, or a commit asked for by its sha) to the commit it resolved to at the last pull or update,
and says whether the repo was gated or private upstream. Both are read as untrusted input.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..errors import CorruptArchiveError, ElvesError, HubNotFoundError, UsageError
from ..store import Store
from ..store.layout import manifest_at
from ..store.manifests import read_json, write_json

RECORD_VERSION = 1
REPO_TYPES = ("model", "dataset")
# A Hub repo id: an optional namespace and a name, letters, digits and . _ - (no "--" or "..").
REPO_ID_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# A revision: a branch or tag name as git allows it (refs/pr/1 included), or a commit sha.
REVISION_RE = re.compile(r"[A-Za-z0-9._/+-]{1,200}")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid Hub repo id; UsageError otherwise (no path traversal)."""
    if not REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.endswith((".", ".git")):
        raise UsageError(f"not a valid Hub repo id: {repo_id!r:.120}")
    return repo_id


def check_revision(revision: str) -> str:
    if (not REVISION_RE.fullmatch(revision) or ".." in revision or revision.startswith(("/", "-", "."))
            or revision.endswith(("/", ".lock")) or "//" in revision):
        raise UsageError(f"not a valid revision: {revision!r:.120}")
    return revision


def check_type(repo_type: str) -> str:
    if repo_type not in REPO_TYPES:
        raise UsageError(f"unknown repo type {repo_type!r}: model or dataset")
    return repo_type


def model_name(repo_type: str, repo_id: str, commit: str) -> str:
    """The store model that holds ``repo_id`` at ``commit``."""
    return f"{'dataset+' if repo_type == 'dataset' else ''}{repo_id}@{commit}"


def record_at(repo_type: str, repo_id: str) -> str:
    return f"mirror/{repo_type}s/{quote(repo_id, safe='')}.json"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``REPO_ID[@REVISION]`` as the CLI takes it: the repo id and the revision (None: main)."""
    repo_id, _, revision = spec.partition("@")
    return check_repo_id(repo_id), check_revision(revision) if revision else None


def utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit, as the Hub lists it: its size and git blob id, and for a
    file kept in LFS its sha256 and the size of its pointer."""

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None = None
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        """The Hub's ETag of the file (without quotes): the sha256 of an LFS file, else the blob id."""
        return self.lfs_sha256 or self.blob_id

    def hasher(self) -> Any:
        """A fresh hash of the kind :attr:`etag` is: sha256 for an LFS file, else git's blob sha1
        (``sha1("blob <size>\\0" + bytes)``), to be fed the file's bytes."""
        if self.lfs_sha256 is not None:
            return hashlib.sha256()
        h = hashlib.sha1()
        h.update(b"blob %d\0" % self.size)
        return h

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "blob_id": self.blob_id,
                **({} if self.lfs_sha256 is None else {"lfs_sha256": self.lfs_sha256,
                                                       "pointer_size": self.pointer_size})}

    @classmethod
    def from_json(cls, d: Any) -> RemoteFile:
        """Read back what :meth:`to_json` wrote (ValueError if ``d`` is not that)."""
        if not isinstance(d, dict):
            raise ValueError("a file entry is not an object")
        path, size, blob = d.get("path"), d.get("size"), d.get("blob_id")
        sha, pointer = d.get("lfs_sha256"), d.get("pointer_size")
        if not (isinstance(path, str) and type(size) is int and size >= 0 and isinstance(blob, str)
                and re.fullmatch(r"[0-9a-f]{40}", blob)):
            raise ValueError(f"malformed file entry {str(d)[:80]}")
        if sha is not None and not (isinstance(sha, str) and SHA256_RE.fullmatch(sha)
                                    and type(pointer) is int and pointer >= 0):
            raise ValueError(f"malformed LFS fields in {str(d)[:80]}")
        return cls(path, size, blob, sha, pointer)


@dataclass
class Snapshot:
    """A repo at one commit, as the mirror holds it: its files' Hub metadata, in the order of
    the store model's manifest (walk order), and where its bytes are."""

    repo_type: str
    repo_id: str
    commit: str
    model: str                               # the store model
    files: list[RemoteFile]
    revision: str                            # the revision it was first pulled as
    pulled: str                              # UTC, ISO 8601
    gated: bool = False

    def file(self, path: str) -> RemoteFile | None:
        return next((f for f in self.files if f.path == path), None)

    def origin(self) -> dict[str, Any]:
        """What the store model's manifest records of where it came from."""
        return {"hub": RECORD_VERSION, "type": self.repo_type, "repo": self.repo_id, "commit": self.commit,
                "revision": self.revision, "pulled": self.pulled, "gated": self.gated,
                "files": [f.to_json() for f in self.files]}


@dataclass
class RepoRecord:
    """A mirrored repo: its tracked revisions and the commit each resolved to, its commits."""

    repo_type: str
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)       # revision -> commit
    commits: list[str] = field(default_factory=list)         # stored commits, oldest first
    gated: bool = False
    private: bool = False
    updated: str = ""
    # revision -> the --include/--exclude patterns it was pulled with (an update keeps them)
    filters: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def resolve(self, revision: str | None) -> str | None:
        """The commit ``revision`` (None: main) stands for here: a tracked ref, or a stored commit
        given by its sha."""
        revision = revision or "main"
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None

    def to_json(self) -> dict[str, Any]:
        return {"format": "elves-mirror-repo", "version": RECORD_VERSION, "type": self.repo_type,
                "repo": self.repo_id, "refs": dict(sorted(self.refs.items())), "commits": list(self.commits),
                "gated": self.gated, "private": self.private, "updated": self.updated,
                "filters": {r: f for r, f in sorted(self.filters.items()) if r in self.refs}}

    @classmethod
    def from_json(cls, d: Any, where: str) -> RepoRecord:
        """A repo record, every field checked; CorruptArchiveError naming ``where`` if it is not one."""
        try:
            if not isinstance(d, dict) or d.get("format") != "elves-mirror-repo":
                raise ValueError("not a mirror repo record")
            if d.get("version") != RECORD_VERSION:
                raise ValueError(f"unknown version {d.get('version')!r}")
            repo_type, repo_id = check_type(d["type"]), check_repo_id(d["repo"])
            refs, commits = d["refs"], d["commits"]
            if not (isinstance(refs, dict) and all(isinstance(k, str) and check_revision(k)
                                                   and isinstance(v, str) and COMMIT_RE.fullmatch(v)
                                                   for k, v in refs.items())):
                raise ValueError("malformed refs")
            if not (isinstance(commits, list) and all(isinstance(c, str) and COMMIT_RE.fullmatch(c) for c in commits)):
                raise ValueError("malformed commits")
            filters = d.get("filters", {})
            if not (isinstance(filters, dict) and all(
                    isinstance(f, dict) and set(f) <= {"include", "exclude"}
                    and all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in f.values())
                    for f in filters.values())):
                raise ValueError("malformed filters")
            return cls(repo_type, repo_id, dict(refs), list(commits), bool(d.get("gated")), bool(d.get("private")),
                       str(d.get("updated", "")), {str(r): dict(f) for r, f in filters.items()})
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise CorruptArchiveError(f"the mirror record is malformed: {e}", where) from None


def read_repo(store: Store, repo_type: str, repo_id: str) -> RepoRecord | None:
    """The record of a mirrored repo; None if the mirror has never pulled it."""
    key = record_at(check_type(repo_type), check_repo_id(repo_id))
    try:
        raw = read_json(store.storage, key, "the mirror record")
    except FileNotFoundError:
        return None
    rec = RepoRecord.from_json(raw, store.storage.where(key))
    if (rec.repo_type, rec.repo_id) != (repo_type, repo_id):
        raise CorruptArchiveError(f"the mirror record names {rec.repo_type} {rec.repo_id!r}, not the repo its "
                                  "file is named after", store.storage.where(key))
    return rec


def repo(store: Store, repo_type: str, repo_id: str) -> RepoRecord:
    """:func:`read_repo`, or HubNotFoundError if the mirror does not hold the repo."""
    rec = read_repo(store, repo_type, repo_id)
    if rec is None:
        raise HubNotFoundError(f"the mirror holds no {repo_type} repo {repo_id!r}", store.path)
    return rec


def write_repo(store: Store, rec: RepoRecord) -> None:
    """Save ``rec`` (the caller holds the store's writer lock)."""
    rec.updated = utcnow()
    write_json(store.storage, record_at(rec.repo_type, rec.repo_id), rec.to_json())


def repos(store: Store) -> list[RepoRecord]:
    """Every mirrored repo, models first, by id. An unreadable record is skipped."""
    out = []
    for repo_type in REPO_TYPES:
        folder = f"mirror/{repo_type}s/"
        if not store.storage.exists(folder):
            continue
        for entry in store.storage.list(folder):
            if not entry.key.endswith(".json"):
                continue
            try:
                raw = read_json(store.storage, entry.key, "the mirror record")
                out.append(RepoRecord.from_json(raw, store.storage.where(entry.key)))
            except (FileNotFoundError, ElvesError):
                continue
    return sorted(out, key=lambda r: (REPO_TYPES.index(r.repo_type), r.repo_id.lower()))


def snapshot(store: Store, repo_type: str, repo_id: str, commit: str) -> Snapshot:
    """The repo at ``commit`` as stored; HubNotFoundError if it is not. The manifest's origin is
    checked against the manifest itself: the same files, of the same sizes."""
    name = model_name(repo_type, repo_id, commit)
    where = store.storage.where(manifest_at(name))
    if not store.storage.exists(manifest_at(name)):
        raise HubNotFoundError(f"the mirror holds no commit {commit} of {repo_id!r}", store.path, "revision")
    man = store.manifest(name)
    origin = man.get("origin")
    try:
        if not isinstance(origin, dict) or origin.get("hub") != RECORD_VERSION:
            raise ValueError("it records no Hub origin")
        if (origin.get("type"), origin.get("repo"), origin.get("commit")) != (repo_type, repo_id, commit):
            raise ValueError("its origin names another repo or commit")
        files = [RemoteFile.from_json(f) for f in origin["files"]]
        if [(f.path, f.size) for f in files] != [(e["path"], e["size"]) for e in man["files"]]:
            raise ValueError("its origin lists other files than the manifest")
        revision, pulled = origin["revision"], origin["pulled"]
        if not (isinstance(revision, str) and isinstance(pulled, str)):
            raise ValueError("malformed revision or time")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptArchiveError(f"model {name!r} is not a mirrored commit: {e}", where) from None
    return Snapshot(repo_type, repo_id, commit, name, files, revision, pulled, bool(origin.get("gated")))
