"""The ``elves`` command-line interface, installed as ``elves.cli`` (see pyproject.toml).

The repository keeps it in a top-level ``cli/`` folder, but ``cli`` must never be importable as a
top-level package (it would shadow any other ``cli`` on sys.path), hence the guard.
"""
if __name__ != "elves.cli":
    raise ImportError("the cli/ folder is installed as elves.cli; import elves.cli instead")

import os

# numpy's and scipy's OpenBLAS (scipy comes in with numba) each start a thread per further CPU
# when loaded, which busy-waits for work: elves never gives them any (no float linear algebra),
# and in a short command they spin for most of its life. Measured: `elves restore` of a 91 MB
# model, 0.87 s of CPU -> 0.68, the same wall time on an idle machine, less work stolen from the
# decode on a busy one. The command sets it before numpy is first imported (``import elves``
# does not import it); a value the user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
