"""A stored model's files and tensors as ``elves ls`` lists them (:class:`StoredModel`), from its
manifest and the trailers of the objects it names: no payload is read or decoded."""
from __future__ import annotations

from typing import Any

from ..index import FileEntry, TensorEntry
from ..listing import (
    FileInfo,
    SegmentFacts,
    TensorInfo,
    codec_name,
    describe_reference,
    list_files,
    list_tensors,
    matching_files,
    matching_tensors,
    share,
)
from ..references import Reference
from .manifests import manifest
from .objects import ObjectMeta, StoredObject
from .storage import Storage


class StoredModel:
    """Model ``name`` of a store, listed (``Store.model(name)``). A segment is an object: its
    codec and stored bytes come from the object's trailer, and a delta's reference names the
    object it is coded against ("object <key>"). The slices of a pack object (small segments
    stored together) get its stored bytes in proportion to their length."""

    def __init__(self, storage: Storage, name: str):
        self.name = name
        self._storage = storage
        self._manifest = manifest(storage, name)  # StoreError naming the stored models if unknown
        self._listed: tuple[list[FileInfo], list[TensorInfo]] | None = None

    def files(self, pattern: str | None = None) -> list[FileInfo]:
        """The model's files, in order (each object's stored bytes counted for the first file that
        uses it); with ``pattern``, those whose path matches that glob."""
        return matching_files(self._listing()[0], pattern)

    def tensors(self, pattern: str | None = None) -> list[TensorInfo]:
        """The model's tensors, in file order; with ``pattern``, those whose name, or
        "file:name", matches that glob."""
        return matching_tensors(self._listing()[1], pattern)

    def _listing(self) -> tuple[list[FileInfo], list[TensorInfo]]:
        if self._listed is None:
            segments: dict[tuple[Any, ...], int] = {}   # a manifest segment -> its facts' index
            entries = [self._entry(raw, segments) for raw in self._manifest["files"]]
            metas: dict[str, ObjectMeta] = {}
            facts = [self._facts(seg, metas) for seg in segments]
            self._listed = list_files(facts, entries), list_tensors(facts, entries)
        return self._listed

    @staticmethod
    def _entry(raw: dict[str, Any], segments: dict[tuple[Any, ...], int]) -> FileEntry:
        """A manifest's file entry (checked when the manifest was read) as an index's, its
        segments numbered by ``segments``."""
        numbers = [segments.setdefault(tuple(seg), len(segments)) for seg in raw["segments"]]
        tensors = [TensorEntry(n, dt, tuple(shape), seg, off, tuple(strides) if strides is not None else None)
                   for n, dt, shape, seg, off, strides in raw["tensors"]]
        return FileEntry(raw["path"], raw["size"], raw["sha256"], raw["format"], numbers, tensors,
                         link=raw.get("link"))

    def _facts(self, seg: tuple[Any, ...], metas: dict[str, ObjectMeta]) -> SegmentFacts:
        key, length, *at = seg
        if key not in metas:
            with StoredObject(self._storage, key) as obj:  # reads the trailer only
                metas[key] = obj.meta
        meta = metas[key]
        if at:  # a slice of a pack, which has no reference
            return SegmentFacts(length, share(meta.stored_bytes, meta.nbytes, at[0], length),
                                codec_name(meta.pipeline), None)
        return SegmentFacts(length, meta.stored_bytes, codec_name(meta.pipeline),
                            describe_reference(Reference.of(meta), lambda _: f"object {meta.refs[0]}"))
