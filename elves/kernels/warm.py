"""``python -m elves.kernels.warm encode|decode``: compile the lossless codecs' kernels into
numba's cache, that direction's first.

The CLI starts it in the background the first time a command finds a kernel missing from the
cache (a first run after an install or an upgrade): while the command compiles the kernels it
needs, this process compiles the other direction's on the other core, so the next ``restore``
after a first ``compress`` (or the reverse) finds them ready. The two processes never compile a
kernel twice: one that the other is building is waited for, then loaded from the cache
(elves/jit.py).
"""
from __future__ import annotations

import sys

from ..jit import warm
from . import planes_rans as k

# split() is Python, a kernel per word size under it: those of 16- and 32-bit floats.
ENCODE = (k._split2, k._split4, k.max_encoded_size, k.encode_planes)
DECODE = (k.container_shape, k.decode_words, k.decode_planes, k.merge)


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
