"""bench/RESULTS.md: each benchmark script owns one section, between ``<!-- KEY:begin -->`` and
``<!-- KEY:end -->``, and ``--write`` replaces only that section, so scripts run at different
times (or on different machines) keep each other's tables."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by the scripts in bench/; edit outside the markers.\n"


def write_section(key: str, title: str, text: str, path: Path = RESULTS) -> None:
    """Replace section ``key`` of ``path`` with ``text``; a new section goes at the end under ``## title``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    old = path.read_text() if path.exists() else HEADER
    section = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + f"\n\n## {title}\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)  # a reader never sees half a file
