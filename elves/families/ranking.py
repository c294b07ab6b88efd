"""Ranking candidate bases of a model, with the evidence for (and against) each.

Evidence that a candidate is the model's base, weighed by :func:`rank`:

- metadata: a declared base that names the candidate (:mod:`.naming`);
- structure: tensor names that pair up once wrapper prefixes are stripped
  (:func:`bitx.base.normalize`), same dtype and shape, the same architecture;
- identical tensors: the same xxh3-128 in both models (tensors whose elements are all equal are
  left out: an all-zero bias says nothing about where a model came from);
- bitwise similarity of sampled same-name tensors (:mod:`.similarity`).

A candidate is accepted when the samples show it related, or it shares non-constant tensors with
the model (half of them, when the samples disagree), or metadata names it and its structure
agrees without the samples contradicting it.
Candidates that name the model as *their* base are its fine-tunes, never its base.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bitx.base import normalize

from .naming import declared_bases, model_key, names_as_base, own_keys
from .profiling import FLOAT_DTYPES, ModelProfile, TensorInfo
from .similarity import Z_RELATED, comparable, compare_bits


@dataclass
class BaseMatch:
    """A candidate base for a model, with the evidence for (and against) it."""

    base: str
    score: float                  # 0..1, for ranking: (2 metadata + 2 bitwise similarity + paired names) / 5
    evidence: list[str]           # one human-readable reason per line
    pairs: int                    # tensors of the model that pair up with one of the base by name
    accepted: bool = True         # False: the evidence does not show ``base`` is the model's base
    same_dtype: int = 0           # of ``pairs``, those in the same dtype: the ones a BitX delta can use


def _assess(model: ModelProfile, cand: ModelProfile) -> BaseMatch:
    evidence: list[str] = []
    forward, backward = names_as_base(model, cand), names_as_base(cand, model)
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
    paired = [(t, names[n]) for n, t in own.items() if n in names and comparable(t.dtype, names[n].dtype)]
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

    bits = compare_bits(model, cand, names)
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


def rank_indexed(model: ModelProfile, cands: list[ModelProfile]) -> list[tuple[int, BaseMatch]]:
    """(index in ``cands``, match) for every candidate but the model itself: accepted ones
    first, then those with more tensors in the model's own dtype (a delta needs the same dtype,
    so a BF16 copy of the base beats the F32 original for a BF16 fine-tune whatever the metadata
    names), then best score, then earlier candidates (the shallower delta chain)."""
    out = [(i, _assess(model, c)) for i, c in enumerate(cands) if c is not model and c.name != model.name]
    present = set().union(*(own_keys(c) for c in cands))
    absent = [f"{why} names no stored model" for key, why in declared_bases(model)
              if key not in present and key not in own_keys(model)]
    for _, m in out:
        m.evidence[:0] = absent
    out.sort(key=lambda im: (not im[1].accepted, -im[1].same_dtype, -im[1].score, im[0]))
    return out


def rank(model: ModelProfile, candidates: Iterable[ModelProfile]) -> list[BaseMatch]:
    """Every candidate (but the model itself) assessed as the model's base, with its evidence:
    in the order of :func:`rank_indexed`. A declared base
    that names none of the candidates is said so in every match's evidence."""
    return [m for _, m in rank_indexed(model, list(candidates))]


def find_base(model: ModelProfile, candidates: Iterable[ModelProfile]) -> BaseMatch | None:
    """The most convincing base of ``model`` among ``candidates`` (the stored models, earliest
    first), or ``None`` when none is convincing. :func:`rank` gives the evidence for each."""
    ranked = rank(model, candidates)
    return ranked[0] if ranked and ranked[0].accepted else None
