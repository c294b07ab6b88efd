"""The ``elves`` command-line interface, installed as ``elves.cli`` (see pyproject.toml).

The repository keeps it in a top-level ``cli/`` folder, but ``cli`` must never be importable as a
top-level package (it would shadow any other ``cli`` on sys.path), hence the guard.
"""
if __name__ != "elves.cli":
    raise ImportError("the cli/ folder is installed as elves.cli; import elves.cli instead")
