"""Error bounds of the lossy mode, as a user writes them: ``2^-24``, ``1e-6``, ``abs:1e-6`` (absolute,
``|y - x| <= e``) or ``rel:1e-3`` (relative, ``|y - x| <= r|x|``)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import BoundError


@dataclass(frozen=True)
class ErrorBound:
    """A parsed error bound: ``mode`` "abs" (|y - x| <= value) or "rel" (|y - x| <= value*|x|)."""

    mode: str
    value: float
    spec: str

    def describe(self) -> str:
        return f"{self.spec.split(':', 1)[-1]} {'absolute' if self.mode == 'abs' else 'relative'}"

    def to_index(self) -> dict[str, Any]:
        return {"codec": "elf", "mode": self.mode, "value": self.value, "spec": self.spec}


_NUM = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_POW = re.compile(r"^[+]?(\d+(\.\d*)?)\s*(\^|\*\*)\s*([+-]?\d+)$")


def _number(text: str) -> float:
    m = _POW.match(text)
    if m:
        base, exp = float(m.group(1)), int(m.group(4))
        if abs(exp) > 2000:
            raise ValueError
        return math.ldexp(1.0, exp) if base == 2.0 else base ** exp
    if _NUM.match(text):
        return float(text)
    raise ValueError


def parse_error_bound(spec: "str | float | ErrorBound") -> ErrorBound:
    """``2^-24``, ``1e-6``, ``abs:1e-6`` (absolute) or ``rel:1e-3`` (relative); a number is absolute.

    Raises :class:`BoundError` (an :class:`~elves.errors.ElvesError` and a ``ValueError``).
    """
    if isinstance(spec, ErrorBound):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value, mode, text = float(spec), "abs", repr(float(spec))
    elif isinstance(spec, str):
        text = spec.strip().lower().replace(" ", "")
        mode = "abs"
        if ":" in text:
            mode, _, rest = text.partition(":")
            if mode not in ("abs", "rel"):
                raise BoundError(f"error bound {spec!r}: the prefix must be 'abs:' or 'rel:'")
        else:
            rest = text
        try:
            value = _number(rest)
        except (ValueError, OverflowError):
            raise BoundError(f"error bound {spec!r} is not a number; write it as 2^-24, 1e-6 or rel:1e-3") from None
        text = f"rel:{rest}" if mode == "rel" else rest
    else:
        raise BoundError(f"error bound must be a string or a number, not {type(spec).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise BoundError(f"error bound {spec!r} must be a positive finite number")
    if mode == "rel" and value >= 1:
        raise BoundError(f"relative error bound {spec!r} must be below 1")
    if value < 2.0 ** -1000:
        raise BoundError(f"error bound {spec!r} is too small to be of use (below 2^-1000)")
    return ErrorBound(mode, value, text)
