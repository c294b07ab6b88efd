"""Manifests (``models/<name>.json``: a model's files, each a list of object slices tiling it) and
profiles (``profiles/<name>.json``: what :mod:`elves.families` matches later models against):
read, checked as untrusted input, and written."""
from __future__ import annotations

import json
from typing import Any

from .. import dtypes
from ..errors import CorruptArchiveError, ElvesError, StoreError
from ..families import ModelProfile
from ..index import FileEntry, Stream, Where, check_paths, ints, parse_file
from .layout import (
    KEY_RE,
    MAX_JSON_BYTES,
    MODELS,
    NAME_RE,
    STORE_VERSION,
    StoreFields,
    manifest_at,
    profile_at,
)
from .storage import Storage

PACK_BELOW = 4096                 # segments shorter than this are packed, one object per file
PACK_MAX = 4 << 20                # ...up to this many bytes an object


def read_json(storage: Storage, key: str, what: str) -> Any:
    """A JSON file of the store, refused past MAX_JSON_BYTES (FileNotFoundError when it is missing)."""
    blob = storage.read_small(key, what, MAX_JSON_BYTES)
    try:
        return json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise CorruptArchiveError(f"{what} is not valid JSON: {str(e)[:100]}", storage.where(key)) from None


def write_json(storage: Storage, key: str, data: Any) -> int:
    """Write ``data`` at ``key``, whole or not at all; its size."""
    blob = json.dumps(data, separators=(",", ":")).encode()
    storage.put(key, blob)
    return len(blob)


def load_manifest(storage: Storage, key: str) -> dict[str, Any]:
    """The manifest at ``key``, every field typed and checked (FileNotFoundError if absent)."""
    return check_manifest(read_json(storage, key, "the manifest"), key, storage.where(key))


def check_manifest(raw: Any, key: str, path: Where) -> dict[str, Any]:
    """A manifest is untrusted like an archive's index: its name must be the one its file is
    named after; its files' paths stay inside the model and are unique; their segments are
    object keys (pack slices inside a pack) that add up to each file's size; their tensors lie
    inside their segments, in the segment's dtype (:func:`elves.index.parse_file`)."""
    f = StoreFields(raw, "the manifest", path)
    version = f.list("version")
    if not ints(version, 2):
        f.fail("has no valid 'version' (two integers expected)")
    if version[0] > STORE_VERSION[0]:
        raise StoreError(f"model {raw.get('name')!r:.80} was added by a newer elves: upgrade elves", path)
    f.choice("format", ("elves-store-model",))
    name = f.str("name")
    if not NAME_RE.fullmatch(name) or manifest_at(name) != key:
        f.fail(f"names model {name!r:.80}, not the one its file is named after")
    f.int("seq")
    f.str("added")
    source = f.choice("source", ("file", "folder"))
    base = f.str("base", None, None)
    if base is not None and not NAME_RE.fullmatch(base):
        f.fail(f"has an invalid 'base' {base!r:.80}")
    if not all(isinstance(r, str) for r in f.list("reasons", [])):
        f.fail("has a malformed 'reasons' (strings expected)")
    if not isinstance(raw.get("origin", {}), dict):
        f.fail("has a malformed 'origin' (an object expected)")
    files = [_check_file(e, path) for e in f.list("files")]
    if not files or (source == "file" and len(files) != 1):
        f.fail(f"lists {len(files)} files for a model added as a {source}")
    check_paths(files, path)
    return dict(raw)


def _check_file(raw: Any, path: Where) -> FileEntry:
    """One file entry of a manifest: its segments are checked here, the rest as an archive's file
    entry, each segment standing for a stream of its key's dtype and its length. A pack slice
    has no dtype of its own: it stands for one of the dtype of the tensor it holds, if any."""
    f = StoreFields(raw, "a file entry of the manifest", path)
    tensors = f.list("tensors")
    packed = {t[3]: t[1] for t in tensors if isinstance(t, list) and len(t) == 6 and type(t[3]) is int
              and isinstance(t[1], str) and t[1] in dtypes.DTYPES}
    streams = []
    for i, seg in enumerate(f.list("segments")):
        if not (isinstance(seg, list) and len(seg) in (2, 3) and isinstance(seg[0], str)
                and KEY_RE.fullmatch(seg[0]) and ints(seg[1:])):
            f.fail(f"has a malformed segment {str(seg)[:80]} ([key, length] or [key, length, offset])")
        digest, kind = seg[0].split(".")
        if len(seg) == 3 and (kind != "bytes" or seg[1] + seg[2] > PACK_MAX):
            f.fail(f"has a pack slice {str(seg)[:80]} that lies outside any pack")
        dtype = packed.get(i) if len(seg) == 3 else None if kind == "bytes" else kind.upper()
        if dtype is not None and dtype not in dtypes.DTYPES:
            f.fail(f"has a segment of unknown dtype {kind!r}")
        streams.append(Stream("bytes" if dtype is None else "tensor", dtype, seg[1], digest, [], 1, []))
    return parse_file({**raw, "segments": list(range(len(streams)))}, streams, path)


def manifest_keys(storage: Storage) -> list[str]:
    """Where the manifests lie, sorted."""
    return sorted(e.key.rstrip("/") for e in storage.list(MODELS)
                  if e.key.rstrip("/").endswith(".json") and not e.key[len(MODELS):].startswith("."))


def names(storage: Storage) -> list[str]:
    """The stored models' names, for messages and gc: unreadable manifests are skipped."""
    out = []
    for key in manifest_keys(storage):
        try:
            out.append(load_manifest(storage, key)["name"])
        except (OSError, ElvesError):
            continue
    return out


def manifest(storage: Storage, name: str) -> dict[str, Any]:
    """Model ``name``'s manifest; StoreError naming the stored models if there is none."""
    try:
        return load_manifest(storage, manifest_at(name))
    except FileNotFoundError:
        known = ", ".join(sorted(names(storage))[:8]) or "none"
        raise StoreError(f"no model named {name!r} in the store (stored: {known})", storage.where("")) from None


def manifests(storage: Storage) -> list[dict[str, Any]]:
    """Every manifest, in the order the models were added."""
    out = []
    for key in manifest_keys(storage):
        try:
            out.append(load_manifest(storage, key))
        except FileNotFoundError:  # removed since the listing
            continue
    return sorted(out, key=lambda m: (m["seq"], m["name"]))


def profile(storage: Storage, name: str) -> ModelProfile:
    key = profile_at(name)
    try:
        return ModelProfile.from_json(read_json(storage, key, f"the profile of {name!r}"))
    except FileNotFoundError:
        raise CorruptArchiveError(f"the profile of {name!r} is missing", storage.where(key)) from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CorruptArchiveError(f"the profile of {name!r} is malformed: {str(e)[:100]}",
                                  storage.where(key)) from None


def profiles(storage: Storage, mans: list[dict[str, Any]]) -> list[ModelProfile]:
    return [profile(storage, m["name"]) for m in mans]
