"""The import structure of docs/ARCHITECTURE.md: the contracts in pyproject.toml (imports run
CLI -> API -> pipeline -> codecs -> kernels) hold, and no module reaches itself through imports,
those inside functions included (an import deferred into a function still makes a cycle, only a
later one)."""
from __future__ import annotations

from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
# The CLI is installed as elves.cli, but a graph is built from folders: its folder is `cli`.
PACKAGES = ("elves", "bitx", "cli")


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative:
    a chain of imports may be longer than the recursion limit likes)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in order:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                order[node] = low[node] = len(order)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in order:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], order[nxt])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == order[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_import_cycles_are_found() -> None:
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e"), ("p.e", "p.d")]:
        graph.add_import(importer=a, imported=b)
    graph.add_module("p.alone")
    assert sorted(import_cycles(graph)) == [["p.a", "p.b", "p.c"], ["p.d", "p.e"]]


def test_no_import_cycles(at_root: None) -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert {"elves.encoder", "bitx.codec", "cli.main"} <= graph.modules
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{', '.join(c)}; e.g. {' -> '.join(_loop(graph, c[0], c[1]))}" for c in cycles)


def _loop(graph: grimp.ImportGraph, a: str, b: str) -> list[str]:
    """A shortest way from ``a`` to ``b`` and back (both exist: they share a cycle)."""
    there = graph.find_shortest_chain(a, b) or (a, b)
    back = graph.find_shortest_chain(b, a) or (b, a)
    return list(there) + list(back)[1:]


def test_import_contracts_hold(at_root: None) -> None:
    """lint-imports, as CI runs it; its report (printed, shown on failure) names each broken arrow."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
