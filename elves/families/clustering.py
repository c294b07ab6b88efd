"""Families: stored models grouped by which one each derives from."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .naming import awaits, model_key, names_as_base
from .profiling import ModelProfile
from .ranking import BaseMatch, rank_indexed


@dataclass
class Family:
    """A root model and the models derived from it; each member's ``BaseMatch.base`` is its parent."""

    root: str
    members: list[tuple[str, BaseMatch]] = field(default_factory=list)


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
                    if (j < i and not awaits(q, p, present)) or (j > i and (names_as_base(p, q) or awaits(p, q, present)))]
        ranked = rank_indexed(p, [profs[j] for j in eligible])
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
