"""Compiling kernels ahead of their first call, into numba's cache.

``python -m elves.kernels.warm encode|decode`` compiles the lossless codecs' kernels, that
direction's first. The CLI starts it in the background the first time a command finds a kernel
missing from the cache (a first run after an install or an upgrade): while the command compiles
the kernels it needs, this process compiles the other direction's on the other core, so the next
``restore`` after a first ``compress`` (or the reverse) finds them ready. The two processes never
compile a kernel twice: one that the other is building is waited for, then loaded from the cache
(elves/jit.py).

``elves kernels compile`` (cli/kernels.py) compiles the same lists, and the public kernels of
other modules (:func:`entry_points`), at install time.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from ..jit import Kernel, warm
from . import planes_rans as k

# split() is Python, a kernel per word size under it: 16-bit, 32-bit, and any other.
ENCODE = (k._split2, k._split4, k._split_bytes, k.max_encoded_size, k.encode_planes)
DECODE = (k.container_shape, k.decode_words, k.decode_planes, k.merge)


def entry_points(module: ModuleType) -> list[Kernel]:
    """The kernels of ``module`` that Python calls, each with its callees: compiling these
    compiles all of the module's. Call it before any of them is built (a built kernel's module
    global names numba's dispatcher from then on)."""
    return [v for v in vars(module).values()
            if type(v) is Kernel and not v.internal and not v.inline]


def cache_folder(fn: Any) -> str:
    """Where numba keeps the machine code of ``fn``, a kernel built by :func:`~elves.jit.warm`:
    the first of ``$NUMBA_CACHE_DIR``, the module's ``__pycache__`` and the user's cache folder
    (~/.cache/numba) that numba can write to, as its cache locators chose."""
    if not isinstance(fn, Kernel):
        raise TypeError(f"{fn!r} is not a kernel")
    return str(fn.dispatcher()._cache.cache_path)


def main(argv: list[str]) -> int:
    if argv not in (["encode"], ["decode"]):
        print("usage: python -m elves.kernels.warm encode|decode", file=sys.stderr)
        return 2
    first, then = (ENCODE, DECODE) if argv == ["encode"] else (DECODE, ENCODE)
    for fn in (*first, *then):
        warm(fn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
