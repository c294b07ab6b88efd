"""Which stored model a new one is coded against, and in which direction: the glue between the
store, the families (:mod:`elves.families`: metadata first, then the weights) and BitX
(:class:`bitx.delta.DeltaPlanner`, over :class:`StoreBase`)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np

from bitx.base import BaseModel, BaseSegment, BaseTensor
from bitx.delta import Delta, DeltaPlanner

from .. import dtypes
from ..codecs import Pipeline
from ..errors import CorruptArchiveError, StoreError
from ..families import BaseMatch, ModelProfile, awaits, find_base, model_key, rank
from ..model import SourceFile
from .layout import manifest_at, object_key
from .manifests import manifest
from .objects import StoredObject, checked_at
from .storage import Storage

BASE_CHAIN = 4                    # a delta may reference the base, its base, ... this many models


class StoreBase(BaseModel):
    """A base model whose tensors are store objects, for BitX: planning deltas against stored
    models (``models``) and decoding deltas (``keys``). Only objects that are not deltas
    themselves are offered, so references stay one level deep."""

    kind = "store"

    def __init__(self, storage: Storage, models: Iterable[str] = (), keys: Iterable[str] = ()):
        super().__init__(storage.where(""))
        self.storage = storage
        self.objects: dict[str, StoredObject] = {}
        self._pipelines: dict[str, Pipeline] = {}
        self._starts: dict[str, np.ndarray] = {}
        segs: dict[str, BaseSegment] = {}
        try:
            for key in keys:
                if self._open(key, strict=True):
                    segs[key] = self._segment(key, "")
            for name in models:
                man = manifest(storage, name)
                for f in man["files"]:
                    for t_name, t_dtype, shape, pos, offset, strides in f["tensors"]:
                        if pos < 0:  # an empty tensor: no bytes to code against
                            continue
                        entry = f["segments"][pos]
                        if len(entry) != 2 or not self._open(entry[0], strict=False):
                            continue
                        key = entry[0]
                        if key not in segs:
                            segs[key] = self._segment(key, f["path"])
                        seg = segs[key]
                        size = int(np.prod(shape, dtype=np.int64)) * dtypes.get(t_dtype).itemsize \
                            if t_dtype in dtypes.DTYPES else -1
                        seg.names.append(t_name)
                        self.tensors.append(BaseTensor(t_name, t_dtype, tuple(shape), seg,
                                                       offset == 0 and strides is None and size == seg.nbytes))
        except BaseException:
            self.close()
            raise

    def _open(self, key: str, strict: bool) -> bool:
        """Open ``key`` if it is a tensor object that is not a delta: ``strict`` makes anything
        else an error (a delta's reference must be such an object)."""
        if key in self.objects:
            return True
        obj = StoredObject(self.storage, key)
        if obj.meta.refs or obj.meta.kind != "tensor":
            obj.close()
            if strict:
                raise CorruptArchiveError(f"object {key} is referenced by a delta but is not a plain tensor object",
                                          self.storage.where(checked_at(self.storage, key)))
            return False
        self.objects[key] = obj
        self._pipelines[key] = Pipeline.from_config(obj.meta.pipeline)
        self._starts[key] = np.array([0] + [c.decoded_length for c in obj.meta.chunks], dtype=np.int64).cumsum()
        return True

    def _segment(self, key: str, file: str) -> BaseSegment:
        m = self.objects[key].meta
        seg = BaseSegment(m.dtype, m.nbytes, file, (key, 0), m.hash)  # type: ignore[arg-type]
        self.segments.append(seg)
        return seg

    def _hash(self, wanted: Callable[[BaseSegment], bool], with_sha256: bool) -> None:
        pass  # an object's hash is its key

    def _read_segment(self, seg: BaseSegment, offset: int, length: int) -> np.ndarray:
        key = cast(str, seg.loc[0])  # where a store segment is: (its object's key, 0)
        obj, pipeline, starts = self.objects[key], self._pipelines[key], self._starts[key]
        if offset < 0 or length < 0 or offset + length > obj.meta.nbytes:  # a delta's reference read
            raise CorruptArchiveError(f"object {key}: a delta reads bytes {offset}..{offset + length} of its "
                                      f"{obj.meta.nbytes}", obj.path)
        first = int(np.searchsorted(starts, offset, side="right")) - 1
        end = int(np.searchsorted(starts, offset + length, side="left"))
        decoded = np.empty(int(starts[end] - starts[first]), dtype=np.uint8)
        for i in range(first, end):  # the chunks that overlap the range, decoded side by side
            lo = int(starts[i] - starts[first])
            pipeline.decode(np.frombuffer(obj.read_payload(obj.meta, i), dtype=np.uint8),
                            decoded[lo:lo + obj.meta.chunks[i].decoded_length])
        start = offset - int(starts[first])
        return decoded[start:start + length]

    def close(self) -> None:
        for obj in self.objects.values():
            obj.close()
        self.objects.clear()


def chain(storage: Storage, base: str, exclude: str | None = None) -> list[str]:
    """``base``, its base, ...: the models a delta may reference (stopping at a cycle)."""
    out: list[str] = []
    name: str | None = base
    while name is not None and name not in out and name != exclude and len(out) < BASE_CHAIN:
        if not storage.exists(manifest_at(name)):
            break
        out.append(name)
        name = manifest(storage, name).get("base")
    return out


def planner(storage: Storage, base: str, exclude: str | None = None) -> tuple[DeltaPlanner, StoreBase]:
    """A delta planner over ``base`` and its own bases (``exclude`` left out), and those models
    opened (to close once planned)."""
    models = StoreBase(storage, models=chain(storage, base, exclude))
    return DeltaPlanner(models), models


def ref_key(delta: Delta) -> str:
    """The key of the object a planned delta reads."""
    ref = delta.ref
    assert ref is not None and ref.hash is not None  # a planned delta always names a hashed reference
    return object_key(ref.hash, ref.dtype)


def check_fits(planner: DeltaPlanner, files: list[SourceFile], base: str, where: str) -> None:
    """A base given by hand must have a tensor that one of the model's can be coded against: the
    same name (wrapper prefixes aside) and dtype, and the same or a smaller shape."""
    for sf in files:
        for index, seg in enumerate(sf.segments):
            if seg.dtype is not None and planner.candidates(sf, index, seg, "", None):
                return
    raise StoreError(f"{base!r} cannot be this model's base: no tensor matches one of its by name, "
                     "dtype and size", where)


def derived(new: ModelProfile, stored: list[tuple[dict[str, Any], ModelProfile]]) -> list[tuple[str, BaseMatch]]:
    """The stored models that ``new`` is the base of though no name may say so, each with the
    evidence for ``new`` as its base. A model stored on its own whose model card names a base
    that is not in the store is waiting for that base: a model related to it by its weights that
    does not derive from the same base (the cards name none in common) is taken to be it,
    whatever the order of arrival. Without this, the later model, the base, would be coded as a
    delta of its own fine-tune."""
    present = {model_key(m["name"]) for m, _ in stored}
    out = []
    for man, prof in stored:
        if man.get("base") is not None or not awaits(prof, new, present):
            continue
        match = rank(prof, [new])[0]
        if match.accepted:
            absent = ", ".join(repr(b) for b in prof.base_model)
            match.evidence.append(f"its README base_model ({absent}) names no model stored before "
                                  f"{new.name!r}, which names none in common: taken as that base")
            out.append((man["name"], match))
    return out


def choose_base(new: ModelProfile, stored: list[tuple[dict[str, Any], ModelProfile]],
                below: Iterable[str]) -> tuple[str | None, list[str]]:
    """The stored model ``new`` is coded against, found by :func:`elves.families.find_base`
    among those not ``below`` it, and why; or ``None`` and why not."""
    skip = set(below)
    match = find_base(new, [p for m, p in stored if m["name"] not in skip])
    if match is None:
        return None, ["no stored model looks like its base"]
    return match.base, list(match.evidence)
