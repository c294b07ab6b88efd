"""Model profiles: what is needed to match a model against others later without reading it again.

A model is reduced to a :class:`ModelProfile`: its metadata (config.json ``_name_or_path``,
``architectures`` and ``model_type``, the README front matter's ``base_model``), one entry per
tensor (name, dtype, shape, xxh3-128 of its bytes) and a few KiB of raw bytes sampled from some of
its float tensors. It round-trips through JSON so that a store can keep one per model.
"""
from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash

from bitx.base import normalize
from elves import dtypes
from elves.errors import ArchiveError
from elves.model import READ_PIECE, SourceFile, read_exact
from elves.readers import read_model

PROFILE_VERSION = 1
# The top byte holds the sign and (most of) the exponent. Ordered by mantissa bits: a model cast
# to another precision is compared in the coarser of the two.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
SAMPLED_TENSORS = 48          # tensors sampled per model...
MIN_SAMPLED_ELEMENTS = 256    # ...among float tensors at least this large (a short bias says little)
SAMPLE_WINDOWS = 4            # windows spread evenly over the tensor...
WINDOW_ELEMENTS = 128         # ...of this many elements each: 2 KiB of F32 a tensor, under 100 KiB a model
MAX_META_BYTES = 1 << 20      # config.json and README.md are read up to this size

_FRONT_KEY = re.compile(r"^base_model\s*:\s*(.*)$")
_LIST_ITEM = re.compile(r"^\s*-\s*(.+)$")


class TensorInfo(NamedTuple):
    """One tensor of a profiled model. ``digest`` is the xxh3-128 (hex) of its bytes; for a
    strided view, of its whole storage. Storages that no name points at (pickled modules,
    TorchScript) are listed as ``storage <key>``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int


@dataclass
class ModelProfile:
    """What is needed to match a model against others later without reading it again."""

    name: str
    name_or_path: str | None = None          # config.json _name_or_path
    base_model: list[str] = field(default_factory=list)     # README front matter base_model
    architectures: list[str] = field(default_factory=list)  # config.json architectures + model_type
    tensors: list[TensorInfo] = field(default_factory=list)
    samples: dict[str, bytes] = field(default_factory=dict)  # tensor name -> bytes at sample_positions()
    constant: list[str] = field(default_factory=list)        # digests of tensors whose elements are all equal
    warnings: list[str] = field(default_factory=list)        # metadata that could not be read

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_json` reads it back."""
        return {
            "version": PROFILE_VERSION,
            "name": self.name,
            "name_or_path": self.name_or_path,
            "base_model": list(self.base_model),
            "architectures": list(self.architectures),
            "tensors": [[t.name, t.dtype, list(t.shape), t.digest, t.nbytes] for t in self.tensors],
            "samples": {k: base64.b64encode(v).decode("ascii") for k, v in self.samples.items()},
            "constant": list(self.constant),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelProfile:
        """The profile that :meth:`to_json` wrote; :class:`ArchiveError` if ``d`` is not one."""
        try:
            if d.get("version") != PROFILE_VERSION:
                raise ValueError(f"unknown profile version {d.get('version')!r}")
            return cls(
                name=str(d["name"]),
                name_or_path=None if d.get("name_or_path") is None else str(d["name_or_path"]),
                base_model=[str(b) for b in d.get("base_model", [])],
                architectures=[str(a) for a in d.get("architectures", [])],
                tensors=[TensorInfo(str(n), str(dt), tuple(int(s) for s in shape), str(h), int(nb))
                         for n, dt, shape, h, nb in d.get("tensors", [])],
                samples={str(k): base64.b64decode(v, validate=True) for k, v in d.get("samples", {}).items()},
                constant=[str(h) for h in d.get("constant", [])],
                warnings=[str(w) for w in d.get("warnings", [])],
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ArchiveError(f"malformed model profile: {e}") from None


def sample_positions(dtype: str, shape: tuple[int, ...], nbytes: int) -> list[tuple[int, int]]:
    """The (byte offset, length) windows sampled from a tensor. The elements they cover depend on
    its element count alone, so two tensors of the same shape are sampled at the same elements,
    whatever their precision."""
    width = dtypes.get(dtype).itemsize
    count = nbytes // width
    if count <= SAMPLE_WINDOWS * WINDOW_ELEMENTS:
        return [(0, count * width)]
    starts = np.linspace(0, count - WINDOW_ELEMENTS, SAMPLE_WINDOWS).astype(np.int64)
    return [(int(s) * width, WINDOW_ELEMENTS * width) for s in starts]


def _hash_range(fd: int, offset: int, length: int, width: int, path: Path) -> tuple[str, bool]:
    """xxh3-128 of a byte range, and whether its elements (``width`` bytes each) are all equal;
    read in pieces, so memory stays bounded whatever the tensor's size."""
    h = xxhash.xxh3_128()
    first: np.ndarray | None = None
    constant = length % width == 0
    for off in range(offset, offset + length, READ_PIECE):
        piece = read_exact(fd, off, min(READ_PIECE, offset + length - off), path)
        h.update(piece)
        if constant:
            elems = np.frombuffer(piece, dtype=np.uint8).reshape(-1, width)
            if first is None:
                first = elems[0].copy()
            # most tensors differ within their first elements: check those before the whole piece
            constant = bool((elems[:64] == first).all()) and bool((elems == first).all())
    return h.hexdigest(), constant and length > 0


class _Sampleable(NamedTuple):
    """A float tensor that may be sampled: where its bytes are."""

    dtype: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]


def _file_tensors(sf: SourceFile, prof: ModelProfile, picked: dict[str, _Sampleable]) -> None:
    """Append the tensors of ``sf`` to ``prof``, hashing each segment once,
    and note in ``picked`` the float tensors that may be sampled (the first of each name)."""
    fd = os.open(sf.path, os.O_RDONLY)
    try:
        seg_hash: dict[int, tuple[str, bool]] = {}
        constant = set(prof.constant)

        def digest(si: int, offset: int, length: int, width: int) -> str:
            seg = sf.segments[si]
            if offset == 0 and length == seg.length:
                if si not in seg_hash:
                    seg_hash[si] = _hash_range(fd, seg.offset, seg.length, width, sf.path)
                d, const = seg_hash[si]
            else:
                d, const = _hash_range(fd, seg.offset + offset, length, width, sf.path)
            if const:
                constant.add(d)
            return d

        named: set[int] = set()
        for t in sf.tensors:
            seg = sf.segments[t.segment]
            known = t.dtype in dtypes.DTYPES
            width = dtypes.get(t.dtype).itemsize if known else 1
            count = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
            size = count * width
            named.add(t.segment)
            if known and t.strides is None and t.offset + size <= seg.length:
                d = digest(t.segment, t.offset, size, width)
                nbytes = size
                if t.dtype in FLOAT_DTYPES and count >= MIN_SAMPLED_ELEMENTS:
                    picked.setdefault(t.name, _Sampleable(t.dtype, seg.offset + t.offset, size, tuple(t.shape)))
            else:
                d, nbytes = digest(t.segment, 0, seg.length, 1), seg.length
            prof.tensors.append(TensorInfo(t.name, t.dtype, tuple(t.shape), d, nbytes))
        for si, seg in enumerate(sf.segments):
            if seg.dtype is None or not seg.length or si in named:
                continue
            known = seg.dtype in dtypes.DTYPES
            width = dtypes.get(seg.dtype).itemsize if known else 1
            name = f"storage {seg.name}"
            shape = (seg.length // width,) if known and seg.length % width == 0 else (seg.length,)
            prof.tensors.append(TensorInfo(name, seg.dtype, shape, digest(si, 0, seg.length, width), seg.length))
            if seg.dtype in FLOAT_DTYPES and seg.length >= MIN_SAMPLED_ELEMENTS * width and seg.length % width == 0:
                picked.setdefault(name, _Sampleable(seg.dtype, seg.offset, seg.length, shape))
        prof.constant = sorted(constant)
    finally:
        os.close(fd)


def _read_meta(path: Path, warnings: list[str]) -> bytes | None:
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_META_BYTES:
            warnings.append(f"{path.name}: larger than {MAX_META_BYTES} bytes, not read for metadata")
            return None
        return path.read_bytes()
    except OSError as e:
        warnings.append(f"{path.name}: cannot be read ({e.strerror})")
        return None


def front_matter_base_model(text: str) -> list[str]:
    """``base_model`` of a model card's YAML front matter: a string, a flow list ``[a, b]`` or a
    block list. Only that key is read; the card is not otherwise parsed."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return []
    out: list[str] = []
    for i, line in enumerate(lines[1:], 1):
        if line.strip() in ("---", "..."):
            break
        m = _FRONT_KEY.match(line)
        if not m:
            continue
        value = m.group(1).split(" #")[0].strip()
        if value.startswith("["):
            out = [v.strip().strip("'\"") for v in value.strip("[]").split(",")]
        elif value:
            out = [value.strip("'\"")]
        else:
            for item in lines[i + 1:]:
                im = _LIST_ITEM.match(item)
                if not im:
                    break
                out.append(im.group(1).split(" #")[0].strip().strip("'\""))
        break
    return [v for v in out if v]


def _metadata(root: Path, prof: ModelProfile, only: str) -> None:
    raw = _read_meta(root / "config.json", prof.warnings) if only == "config.json" else None
    if raw is not None:
        try:
            config = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            prof.warnings.append(f"config.json: not valid JSON ({e}), metadata ignored")
            config = None
        if isinstance(config, dict):
            if isinstance(config.get("_name_or_path"), str) and config["_name_or_path"]:
                prof.name_or_path = config["_name_or_path"]
            archs = config.get("architectures")
            if isinstance(archs, list):
                prof.architectures += [a for a in archs if isinstance(a, str)]
            if isinstance(config.get("model_type"), str):
                prof.architectures.append(config["model_type"])
    raw = _read_meta(root / "README.md", prof.warnings) if only == "README.md" else None
    if raw is not None:
        prof.base_model = front_matter_base_model(raw.decode("utf-8", errors="replace"))


class Profiler:
    """Builds a model's profile file by file, for an add that sees one file at a time (the
    mirror's pull). Fed a folder's files in walk order, each while it is on disk, it gives what
    :func:`profile` gives for the folder. Its state round-trips through JSON
    (:meth:`to_json`), so that an add resumed after a crash goes on where it stopped."""

    def __init__(self, name: str):
        self.prof = ModelProfile(name=name)
        self._candidates: list[str] = []    # names of the float tensors that may be sampled, ranked

    def metadata(self, relpath: str, path: Path) -> None:
        """Read the metadata of the model's top-level config.json or README.md at ``path``."""
        if relpath in ("config.json", "README.md"):
            _metadata(path.parent, self.prof, only=relpath)

    def add(self, sf: SourceFile) -> None:
        """Profile the tensors of ``sf``, and sample those that rank among the
        :data:`SAMPLED_TENSORS` kept: the choice depends on a tensor's name alone, so the ranks
        over the files seen so far contain those over the whole model."""
        if not any(s.dtype is not None for s in sf.segments):
            return
        picked: dict[str, _Sampleable] = {}
        _file_tensors(sf, self.prof, picked)
        fresh = [n for n in picked if n not in self.prof.samples and n not in self._candidates]
        self._candidates = sorted(self._candidates + fresh, key=_rank)[:SAMPLED_TENSORS]
        kept = set(self._candidates)
        self.prof.samples = {n: v for n, v in self.prof.samples.items() if n in kept}
        wanted = [n for n in fresh if n in kept]
        if wanted:
            fd = os.open(sf.path, os.O_RDONLY)
            try:
                for n in wanted:
                    s = picked[n]
                    self.prof.samples[n] = b"".join(read_exact(fd, s.offset + off, length, sf.path)
                                                    for off, length in sample_positions(s.dtype, s.shape, s.nbytes))
            finally:
                os.close(fd)

    def result(self) -> ModelProfile:
        """The profile, its samples in rank order."""
        self.prof.samples = {n: self.prof.samples[n] for n in self._candidates if n in self.prof.samples}
        return self.prof

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.prof.to_json(), "candidates": list(self._candidates)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profiler:
        """The profiler :meth:`to_json` saved; :class:`ArchiveError` if ``d`` is not one."""
        if not isinstance(d, dict) or not isinstance(d.get("profile"), dict) or not isinstance(d.get("candidates"), list):
            raise ArchiveError("malformed profiler state")
        out = cls("")
        out.prof = ModelProfile.from_json(d["profile"])
        out._candidates = [str(n) for n in d["candidates"]][:SAMPLED_TENSORS]
        return out


def _rank(name: str) -> tuple[int, str]:
    """Tensors are sampled by the smallest hash of their prefix-free name, so that a model and a
    truncated or extended copy of it sample mostly the same tensors."""
    return xxhash.xxh64_intdigest(normalize(name).encode()), name


def profile(path: str | os.PathLike[str], name: str | None = None) -> ModelProfile:
    """Profile the model at ``path`` (a folder, such as a Hugging Face snapshot, or one file).

    Every tensor's bytes are hashed, piece by piece; the samples are read with ``pread`` at
    their fixed positions. Memory stays bounded by :data:`READ_PIECE` whatever the model's size.
    ``name`` defaults to the folder's name or the file's stem. Metadata (config.json, README.md)
    is read from a folder's top level only; a malformed one is noted in ``warnings``.
    """
    root = Path(path)
    files, single = read_model(root)
    profiler = Profiler(name or (root.stem if single else root.name))
    for sf in files:
        if not single:
            profiler.metadata(sf.relpath, sf.path)
        profiler.add(sf)
    return profiler.result()
