"""Metadata evidence: the names a model is known by, and the bases its metadata declares.

A declared base (config.json ``_name_or_path``, the README's ``base_model``) names a candidate by
its name or by the candidate's own ``_name_or_path``. Metadata is also what gives the direction
between two versions; without it the candidate (stored earlier) is taken as the base.
"""
from __future__ import annotations

from .profiling import ModelProfile


def model_key(name: str) -> str:
    """A model name as metadata may spell it: last path component, lower case, ``_`` as ``-``;
    a revision after ``@`` (``org/name@<commit>``, as the mirror names what it stores) is not part
    of it."""
    return name.strip().rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].split("@", 1)[0].lower().replace("_", "-")


def declared_bases(p: ModelProfile) -> list[tuple[str, str]]:
    """The bases ``p``'s metadata names: (key, where it says so)."""
    out = [(model_key(b), f"README base_model = {b!r}") for b in p.base_model]
    if p.name_or_path:
        out.append((model_key(p.name_or_path), f"config _name_or_path = {p.name_or_path!r}"))
    return out


def own_keys(p: ModelProfile) -> set[str]:
    """The names ``p`` is known by: its own, and its ``_name_or_path`` unless that names its
    base (a fine-tune's config keeps the path it was loaded from)."""
    keys = {model_key(p.name)}
    if p.name_or_path and model_key(p.name_or_path) not in {model_key(b) for b in p.base_model}:
        keys.add(model_key(p.name_or_path))
    return keys


def names_as_base(model: ModelProfile, cand: ModelProfile) -> list[str]:
    """Where ``model``'s metadata names ``cand`` as its base. Two models whose configs share a
    ``_name_or_path`` (a base saved with its own id, or two fine-tunes of it) say nothing about
    which came from which through it."""
    keys = own_keys(cand)
    if model.name_or_path and cand.name_or_path and model_key(model.name_or_path) == model_key(cand.name_or_path):
        keys = (keys - {model_key(cand.name_or_path)}) | {model_key(cand.name)}
    return [why for key, why in declared_bases(model) if key in keys]


def awaits(model: ModelProfile, cand: ModelProfile, present: set[str]) -> bool:
    """Whether ``model`` is waiting for ``cand`` as its base though no name says so: its model
    card names bases, none of which is among ``present`` (the keys of the models known), and
    ``cand``'s names none in common with them (it does not derive from the same base). Then,
    whatever the order of arrival, ``cand`` is taken as ``model``'s base when the weights agree,
    and never the other way round."""
    declared = {model_key(b) for b in model.base_model}
    return bool(declared) and not declared & (present | {model_key(b) for b in cand.base_model})
