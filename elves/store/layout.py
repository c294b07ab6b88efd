"""Where things lie in a store, by key: '/'-separated names relative to the store's root.

    elves-store.json        what this store is, and the store version
    lock                    writers (add, rm, gc, repack, verify) take turns on it: a flock on a
                            local disk, a lease object on object storage (elves.store.remote)
    adding                  on a local disk, adds coding objects before their commit hold a shared
                            flock on it; gc and verify an exclusive one
    objects/ab/<key>        one object per unique segment; <key> = xxh3-128 of its raw bytes + dtype
    models/<name>.json      a model's manifest: its files, each a list of object slices tiling it
    profiles/<name>.json    its family profile (elves.families), to match later models against
    tmp/                    files being written; moved into place when complete
"""
from __future__ import annotations

import re
from urllib.parse import quote

from ..index import Fields

STORE_VERSION = (1, 0)
MARKER = "elves-store.json"
LOCK = "lock"
ADDING = "adding"
FOLDERS = ("objects/", "models/", "profiles/", "tmp/")
OBJECTS, MODELS, PROFILES, TMP = FOLDERS
STAGED = f"{TMP}staged/"          # staged adds under way: tmp/staged/<name>/journal.json, files/
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]*(/[A-Za-z0-9][A-Za-z0-9._+@-]*)?")
KEY_RE = re.compile(r"[0-9a-f]{32}\.[a-z0-9_]+")
MAX_JSON_BYTES = 256 << 20        # a manifest or profile larger than this is not one elves wrote


class StoreFields(Fields):
    """Typed reads of one of the store's own records (an object trailer, a manifest)."""

    prefix = ""


def object_key(digest: str, dtype: str | None) -> str:
    """The key of a segment: its raw bytes' xxh3-128 and its dtype (``bytes`` for opaque ones)."""
    return f"{digest}.{dtype.lower() if dtype else 'bytes'}"


def object_at(key: str) -> str:
    """Where object ``key`` lies (``key`` already checked against :data:`KEY_RE`)."""
    return f"{OBJECTS}{key[:2]}/{key}"


def manifest_at(name: str) -> str:
    return f"{MODELS}{quote(name, safe='')}.json"


def profile_at(name: str) -> str:
    return f"{PROFILES}{quote(name, safe='')}.json"
