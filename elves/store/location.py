"""Where a store lies: a local folder (the default, with a flock for its writers), or an fsspec
URL such as ``s3://bucket/prefix`` (:mod:`elves.store.remote`). ``file://`` URLs are local folders."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .storage import LocalStorage, Storage

URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def parse_location(location: str | os.PathLike[str]) -> Path | str:
    """A local store's folder as a Path; a URL as it is (a Path would fold its '//')."""
    if isinstance(location, str) and URL_RE.match(location):
        return Path(location[len("file://"):]) if location.lower().startswith("file://") else location.rstrip("/")
    return Path(location)


def open_storage(location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage of the store at ``location``: :class:`LocalStorage` for a folder,
    :class:`~elves.store.remote.FsspecStorage` for a URL (``storage_options`` go to fsspec)."""
    where = parse_location(location)
    if isinstance(where, Path):
        _no_options(storage_options)
        return LocalStorage(where)
    from .remote import FsspecStorage  # fsspec is an optional extra: imported only for a URL
    return FsspecStorage(where, storage_options)


def create_storage(location: str | os.PathLike[str], folders: Iterable[str],
                   storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage of a new, empty store at ``location``."""
    where = parse_location(location)
    if isinstance(where, Path):
        _no_options(storage_options)
        return LocalStorage.create(where, folders)
    from .remote import FsspecStorage
    return FsspecStorage.create(where, storage_options)


def _no_options(storage_options: dict[str, Any] | None) -> None:
    if storage_options:
        raise UsageError("storage options are for a store at a URL (s3://...), not a local folder")
