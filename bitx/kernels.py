"""numba kernels for the ``xor`` codec's ranked byte (``remap``): one pass per chunk, GIL released.

numpy needs five temporaries and a gather for it; this loop does it in registers.
"""
from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def xor_ranked(a, r, mask, shift, table, out):
    """``out[i] = a[i] ^ (r[i] & mask)``, with the byte at ``shift`` replaced by
    ``table[that byte of r[i], that byte of a[i]]`` (``mask`` has that byte clear)."""
    field = a.dtype.type(0xFF) << a.dtype.type(shift)
    s = a.dtype.type(shift)
    m = a.dtype.type(mask)
    keep = ~field
    ff = a.dtype.type(0xFF)
    for i in range(a.shape[0]):
        av = a[i]
        rv = r[i]
        o = (av ^ (rv & m)) & keep
        e = (rv >> s) & ff
        v = (av >> s) & ff
        out[i] = o | (a.dtype.type(table[e, v]) << s)
