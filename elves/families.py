"""Family clustering: which stored model is a new model's base, and why.

A model is first reduced to a :class:`ModelProfile`: its metadata (config.json ``_name_or_path``,
``architectures`` and ``model_type``, the README front matter's ``base_model``), one entry per
tensor (name, dtype, shape, xxh3-128 of its bytes) and a few KiB of raw bytes sampled from some of
its float tensors. A profile is enough to match models later without reading them again, and it
round-trips through JSON so that a store can keep one per model.

Evidence that a candidate is the model's base, weighed by :func:`rank`:

- metadata: a declared base (``_name_or_path``, ``base_model``) that names the candidate, by its
  name or by its own ``_name_or_path``. Metadata is also what gives the direction between two
  versions; without it the candidate (stored earlier) is taken as the base;
- structure: tensor names that pair up once wrapper prefixes are stripped
  (:func:`bitx.base.normalize`), same dtype and shape, the same architecture;
- identical tensors: the same xxh3-128 in both models (tensors whose elements are all equal are
  left out: an all-zero bias says nothing about where a model came from);
- bitwise similarity: the samples of same-name tensors are XORed. A fine-tune keeps most signs
  and exponents of its base, so the top byte of the XOR is mostly zero and few bits differ. The
  bar is the same statistic for two *unrelated* tensors with the same value distributions, which
  is known exactly from the samples themselves: two independent elements share a top byte with
  probability ``sum_v p_a(v) p_b(v)``, and differ in bit ``i`` with probability
  ``f_a(1 - f_b) + f_b(1 - f_a)``. The excess of zero top bytes over that chance level is a
  binomial z-score. A candidate is related when the pooled z-score passes :data:`Z_RELATED` and
  most compared tensors pass :data:`Z_TENSOR` on their own. Between unrelated N(0, 0.02)
  matrices of the sampled size the z-score has mean 0 and standard deviation 0.85; a fine-tune
  whose changes are as large as the weights themselves still scores 9 per tensor.

A candidate is accepted when the samples show it related, or it shares non-constant tensors with
the model (half of them, when the samples disagree), or metadata names it and its structure
agrees without the samples contradicting it.
Candidates that name the model as *their* base are its fine-tunes, never its base.
"""
from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable
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
Z_RELATED = 6.0               # pooled: one-sided p < 1e-9 that chance alone gives this many equal top bytes
Z_TENSOR = 3.0                # one tensor (p < 1.5e-3); most compared tensors must pass it too, so that
                              # one tensor with the same structure in unrelated models proves nothing
MAX_META_BYTES = 1 << 20      # config.json and README.md are read up to this size

_FRONT_KEY = re.compile(r"^base_model\s*:\s*(.*)$")
_LIST_ITEM = re.compile(r"^\s*-\s*(.+)$")
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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


@dataclass
class BaseMatch:
    """A candidate base for a model, with the evidence for (and against) it."""

    base: str
    score: float                  # 0..1, for ranking: (2 metadata + 2 bitwise similarity + paired names) / 5
    evidence: list[str]           # one human-readable reason per line
    pairs: int                    # tensors of the model that pair up with one of the base by name
    accepted: bool = True         # False: the evidence does not show ``base`` is the model's base
    same_dtype: int = 0           # of ``pairs``, those in the same dtype: the ones a BitX delta can use


@dataclass
class Family:
    """A root model and the models derived from it; each member's ``BaseMatch.base`` is its parent."""

    root: str
    members: list[tuple[str, BaseMatch]] = field(default_factory=list)


# ---------------------------------------------------------------------------- profiling

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

    file: int
    dtype: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]


def _file_tensors(fi: int, sf: SourceFile, prof: ModelProfile, picked: dict[str, _Sampleable]) -> None:
    """Append the tensors of ``sf`` (file number ``fi``) to ``prof``, hashing each segment once,
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
                    picked.setdefault(t.name, _Sampleable(fi, t.dtype, seg.offset + t.offset, size, tuple(t.shape)))
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
                picked.setdefault(name, _Sampleable(fi, seg.dtype, seg.offset, seg.length, shape))
        prof.constant = sorted(constant)
    finally:
        os.close(fd)


def _take_samples(files: list[SourceFile], picked: dict[str, _Sampleable]) -> dict[str, bytes]:
    """The bytes at :func:`sample_positions` of up to :data:`SAMPLED_TENSORS` of the candidates,
    chosen by the smallest hash of their prefix-free name: the choice depends on a tensor's name
    alone, so a model and a truncated or extended copy of it sample mostly the same tensors."""
    rank = sorted(picked, key=lambda n: (xxhash.xxh64_intdigest(normalize(n).encode()), n))[:SAMPLED_TENSORS]
    out: dict[str, bytes] = {}
    fds: dict[int, int] = {}
    try:
        for name in rank:
            s = picked[name]
            if s.file not in fds:
                fds[s.file] = os.open(files[s.file].path, os.O_RDONLY)
            out[name] = b"".join(read_exact(fds[s.file], s.offset + off, length, files[s.file].path)
                                 for off, length in sample_positions(s.dtype, s.shape, s.nbytes))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


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


def _metadata(root: Path, prof: ModelProfile) -> None:
    raw = _read_meta(root / "config.json", prof.warnings)
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
    raw = _read_meta(root / "README.md", prof.warnings)
    if raw is not None:
        prof.base_model = front_matter_base_model(raw.decode("utf-8", errors="replace"))


def profile(path: str | os.PathLike[str], name: str | None = None) -> ModelProfile:
    """Profile the model at ``path`` (a folder, such as a Hugging Face snapshot, or one file).

    Every tensor's bytes are hashed, piece by piece; the samples are read with ``pread`` at
    their fixed positions. Memory stays bounded by :data:`READ_PIECE` whatever the model's size.
    ``name`` defaults to the folder's name or the file's stem. Metadata (config.json, README.md)
    is read from a folder's top level only; a malformed one is noted in ``warnings``.
    """
    root = Path(path)
    files, single = read_model(root)
    prof = ModelProfile(name=name or (root.stem if single else root.name))
    if not single:
        _metadata(root, prof)
    picked: dict[str, _Sampleable] = {}
    for fi, sf in enumerate(files):
        if any(s.dtype is not None for s in sf.segments):
            _file_tensors(fi, sf, prof, picked)
    prof.samples = _take_samples(files, picked)
    return prof


# ---------------------------------------------------------------------------- matching

def model_key(name: str) -> str:
    """A model name as metadata may spell it: last path component, lower case, ``_`` as ``-``."""
    return name.strip().rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower().replace("_", "-")


def _declared(p: ModelProfile) -> list[tuple[str, str]]:
    """The bases ``p``'s metadata names: (key, where it says so)."""
    out = [(model_key(b), f"README base_model = {b!r}") for b in p.base_model]
    if p.name_or_path:
        out.append((model_key(p.name_or_path), f"config _name_or_path = {p.name_or_path!r}"))
    return out


def _own_keys(p: ModelProfile) -> set[str]:
    """The names ``p`` is known by: its own, and its ``_name_or_path`` unless that names its
    base (a fine-tune's config keeps the path it was loaded from)."""
    keys = {model_key(p.name)}
    if p.name_or_path and model_key(p.name_or_path) not in {model_key(b) for b in p.base_model}:
        keys.add(model_key(p.name_or_path))
    return keys


def _names_as_base(model: ModelProfile, cand: ModelProfile) -> list[str]:
    """Where ``model``'s metadata names ``cand`` as its base. Two models whose configs share a
    ``_name_or_path`` (a base saved with its own id, or two fine-tunes of it) say nothing about
    which came from which through it."""
    keys = _own_keys(cand)
    if model.name_or_path and cand.name_or_path and model_key(model.name_or_path) == model_key(cand.name_or_path):
        keys = (keys - {model_key(cand.name_or_path)}) | {model_key(cand.name)}
    return [why for key, why in _declared(model) if key in keys]


def awaits(model: ModelProfile, cand: ModelProfile, present: set[str]) -> bool:
    """Whether ``model`` is waiting for ``cand`` as its base though no name says so: its model
    card names bases, none of which is among ``present`` (the keys of the models known), and
    ``cand``'s names none in common with them (it does not derive from the same base). Then,
    whatever the order of arrival, ``cand`` is taken as ``model``'s base when the weights agree,
    and never the other way round."""
    declared = {model_key(b) for b in model.base_model}
    return bool(declared) and not declared & (present | {model_key(b) for b in cand.base_model})


@dataclass
class _Bits:
    """Bitwise comparison of the samples of same-name tensors."""

    tensors: int = 0              # sample pairs compared
    recast: int = 0               # of which rounded to the coarser of two float precisions first
    related: int = 0              # of which individually past Z_TENSOR
    elements: int = 0
    zero_top: float = 0.0         # observed zero top bytes of the XOR
    zero_top_chance: float = 0.0  # expected if unrelated
    variance: float = 0.0
    hamming: float = 0.0          # summed bits set in the XOR
    hamming_chance: float = 0.0

    @property
    def z(self) -> float:
        sd: float = max(self.variance, 1.0) ** 0.5
        return (self.zero_top - self.zero_top_chance) / sd

    @property
    def similarity(self) -> float:
        """0 for unrelated samples, 1 for identical ones."""
        if not self.hamming_chance:
            return 0.0
        return float(min(1.0, max(0.0, 1.0 - self.hamming / self.hamming_chance)))

    def add(self, a: bytes, b: bytes, width: int) -> None:
        word = _WORDS[width]
        x = np.frombuffer(a, dtype=word)
        y = np.frombuffer(b, dtype=word)
        n = x.shape[0]
        shift = word(8 * width - 8)
        top_x = (x >> shift).astype(np.intp)
        top_y = (y >> shift).astype(np.intp)
        q = float(np.bincount(top_x, minlength=256) @ np.bincount(top_y, minlength=256)) / (n * n)
        k = int(np.count_nonzero(top_x == top_y))
        bits_x = np.unpackbits(np.frombuffer(a, dtype=np.uint8).reshape(n, width), axis=1).mean(axis=0)
        bits_y = np.unpackbits(np.frombuffer(b, dtype=np.uint8).reshape(n, width), axis=1).mean(axis=0)
        var = n * q * (1 - q)
        self.tensors += 1
        self.related += (k - n * q) / max(var, 1.0) ** 0.5 >= Z_TENSOR
        self.elements += n
        self.zero_top += k
        self.zero_top_chance += n * q
        self.variance += var
        self.hamming += int(np.unpackbits((x ^ y).view(np.uint8)).sum())
        self.hamming_chance += n * float((bits_x * (1 - bits_y) + bits_y * (1 - bits_x)).sum())

    def describe(self) -> str:
        n = self.elements
        return (f"sampled XOR of {self.tensors} same-name tensors ({n} elements): "
                f"{self.zero_top / n:.0%} zero top bytes ({self.zero_top_chance / n:.0%} if unrelated, "
                f"z = {self.z:.1f}), mean Hamming {self.hamming / n:.1f} bits "
                f"({self.hamming_chance / n:.1f} if unrelated); {self.related}/{self.tensors} tensors "
                "closer than chance" + (f" ({self.recast} compared in the coarser precision)" if self.recast else ""))


def _comparable(a: str, b: str) -> bool:
    """Whether tensors of dtypes ``a`` and ``b`` can pair up: the same dtype, or two float ones
    (a model cast to another precision)."""
    return a == b or (a in FLOAT_DTYPES and b in FLOAT_DTYPES)


def _in(raw: bytes, dtype: str, target: str) -> bytes:
    """Float elements ``raw`` of ``dtype`` rounded to ``target``, as a cast would."""
    if dtype == target:
        return raw
    with np.errstate(over="ignore"):  # a value too large for F16 becomes inf, as a cast makes it
        return np.frombuffer(raw, dtype=dtypes.numpy_dtype(dtype)).astype(dtypes.numpy_dtype(target)).tobytes()


def _compare_bits(model: ModelProfile, cand: ModelProfile, names: dict[str, TensorInfo]) -> _Bits:
    """XOR the samples of the tensors of ``model`` and ``cand`` (``names``: its tensors by
    prefix-free name) that have the same name and shape; tensors of two float precisions are
    compared in the coarser one, which is what casting the finer one would give."""
    bits = _Bits()
    mine: dict[str, TensorInfo] = {}
    for info in model.tensors:
        mine.setdefault(info.name, info)
    theirs = {normalize(n): s for n, s in cand.samples.items()}
    for name, sample in model.samples.items():
        other = theirs.get(normalize(name))
        t, u = mine.get(name), names.get(normalize(name))
        if other is None or t is None or u is None or t.shape != u.shape or not _comparable(t.dtype, u.dtype):
            continue
        wt, wu = dtypes.get(t.dtype).itemsize, dtypes.get(u.dtype).itemsize
        if len(sample) % wt or len(other) % wu or len(sample) // wt != len(other) // wu:
            continue
        coarse = min(t.dtype, u.dtype, key=FLOAT_DTYPES.index) if t.dtype != u.dtype else t.dtype
        bits.recast += t.dtype != u.dtype
        bits.add(_in(sample, t.dtype, coarse), _in(other, u.dtype, coarse), dtypes.get(coarse).itemsize)
    return bits


def _assess(model: ModelProfile, cand: ModelProfile) -> BaseMatch:
    evidence: list[str] = []
    forward, backward = _names_as_base(model, cand), _names_as_base(cand, model)
    shared_origin = bool(model.name_or_path and cand.name_or_path
                         and model_key(model.name_or_path) == model_key(cand.name_or_path))
    evidence += [f"{why} names {cand.name!r}" for why in forward]
    if shared_origin and not forward and not backward:
        evidence.append(f"both configs have _name_or_path = {model.name_or_path!r} (same origin, no direction)")
    if backward and not forward:
        evidence.append(f"{cand.name!r} has {backward[0]}: it derives from this model, so it is not its base")

    # structure: tensor names without wrapper prefixes, same dtype or both float
    names: dict[str, TensorInfo] = {}
    for t in cand.tensors:
        names.setdefault(normalize(t.name), t)
    own: dict[str, TensorInfo] = {}
    for t in model.tensors:
        own.setdefault(normalize(t.name), t)
    paired = [(t, names[n]) for n, t in own.items() if n in names and _comparable(t.dtype, names[n].dtype)]
    same_shape = sum(t.shape == u.shape for t, u in paired)
    smaller = min(len(own), len(names))
    structure = len(paired) / smaller if smaller else 0.0
    recast = sum(t.dtype != u.dtype for t, u in paired)
    if paired:
        evidence.append(f"{len(paired)}/{smaller} tensor names of the smaller model pair up, {same_shape} with the "
                        "same shape" + (f", {recast} in another float precision" if recast else ""))
    arch = sorted(set(model.architectures) & set(cand.architectures))
    if arch:
        evidence.append(f"same architecture: {', '.join(arch)}")

    # identical content: float tensors whose elements are not all equal
    trivial = set(model.constant) | set(cand.constant)
    theirs = {t.digest for t in cand.tensors if t.dtype in FLOAT_DTYPES}
    floats = [t for t in model.tensors if t.dtype in FLOAT_DTYPES and t.digest not in trivial]
    identical = sum(t.digest in theirs for t in floats)
    if identical:
        evidence.append(f"{identical}/{len(floats)} float tensors identical (xxh3-128)")

    bits = _compare_bits(model, cand, names)
    if bits.tensors:
        evidence.append(bits.describe())
    related = bits.tensors > 0 and bits.z >= Z_RELATED and 2 * bits.related >= bits.tensors
    contradicted = bits.tensors > 0 and not related
    smaller_floats = min(len(floats), sum(t.dtype in FLOAT_DTYPES and t.digest not in trivial for t in cand.tensors))
    meta = 1.0 if forward else 0.5 if shared_origin else 0.0
    sim = bits.similarity if bits.tensors else (identical / len(floats) if floats else 0.0)
    score = round((2 * meta + 2 * sim + structure) / 5, 4)

    if backward and not forward:
        accepted = False
    elif related or (identical and (not contradicted or 2 * identical >= smaller_floats)):
        # shared tensors count unless the samples disagree and few are shared: a common fixed table
        accepted = True
    elif forward and not contradicted and (structure >= 0.5 or arch):
        accepted = True
    else:
        accepted = False
        if forward and contradicted:
            evidence.append("the metadata names it, but the sampled tensors do not look related")
        elif forward:
            evidence.append("the metadata names it, but the tensors do not pair up")
        elif contradicted:
            evidence.append("not related: the sampled tensors differ as much as unrelated ones")
        else:
            evidence.append("nothing shows it is related")
    return BaseMatch(cand.name, score, evidence, len(paired), accepted, len(paired) - recast if paired else 0)


def _ranked(model: ModelProfile, cands: list[ModelProfile]) -> list[tuple[int, BaseMatch]]:
    """(index in ``cands``, match) for every candidate but the model itself: accepted ones
    first, then those with more tensors in the model's own dtype (a delta needs the same dtype,
    so a BF16 copy of the base beats the F32 original for a BF16 fine-tune whatever the metadata
    names), then best score, then earlier candidates (the shallower delta chain)."""
    out = [(i, _assess(model, c)) for i, c in enumerate(cands) if c is not model and c.name != model.name]
    present = set().union(*(_own_keys(c) for c in cands))
    absent = [f"{why} names no stored model" for key, why in _declared(model)
              if key not in present and key not in _own_keys(model)]
    for _, m in out:
        m.evidence[:0] = absent
    out.sort(key=lambda im: (not im[1].accepted, -im[1].same_dtype, -im[1].score, im[0]))
    return out


def rank(model: ModelProfile, candidates: Iterable[ModelProfile]) -> list[BaseMatch]:
    """Every candidate (but the model itself) assessed as the model's base, with its evidence:
    in the order of :func:`_ranked`. A declared base
    that names none of the candidates is said so in every match's evidence."""
    return [m for _, m in _ranked(model, list(candidates))]


def find_base(model: ModelProfile, candidates: Iterable[ModelProfile]) -> BaseMatch | None:
    """The most convincing base of ``model`` among ``candidates`` (the stored models, earliest
    first), or ``None`` when none is convincing. :func:`rank` gives the evidence for each."""
    ranked = rank(model, candidates)
    return ranked[0] if ranked and ranked[0].accepted else None


def cluster(profiles: Iterable[ModelProfile]) -> list[Family]:
    """Group models, given in the order they were added, into families (in the order of their
    roots; members parents first).

    A model's base is looked for among the models added before it, and among later ones that its
    metadata names (a fine-tune stored before its base). Cycles, which only models naming each
    other can make, are cut at their weakest link. Every model is in exactly one family; one
    with no base and nothing derived from it is a family of its own, with no members.
    """
    profs = list(profiles)
    present = {model_key(p.name) for p in profs}
    parent: dict[int, tuple[int, BaseMatch]] = {}
    for i, p in enumerate(profs):
        eligible = [j for j, q in enumerate(profs)
                    if (j < i and not awaits(q, p, present)) or (j > i and (_names_as_base(p, q) or awaits(p, q, present)))]
        ranked = _ranked(p, [profs[j] for j in eligible])
        if ranked and ranked[0][1].accepted:
            parent[i] = (eligible[ranked[0][0]], ranked[0][1])
    for i in range(len(profs)):
        path: list[int] = []
        j = i
        while j in parent and j not in path:
            path.append(j)
            j = parent[j][0]
        if j in path:
            loop = path[path.index(j):]
            del parent[min(loop, key=lambda k: parent[k][1].score)]

    children: dict[int, list[int]] = {}
    for i, (j, _) in sorted(parent.items()):
        children.setdefault(j, []).append(i)
    families = []
    for r in range(len(profs)):
        if r in parent:
            continue
        fam, queue = Family(profs[r].name), list(children.get(r, []))
        while queue:
            i = queue.pop(0)
            fam.members.append((profs[i].name, parent[i][1]))
            queue += children.get(i, [])
        families.append(fam)
    return families
