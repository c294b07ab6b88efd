"""elves: lossless (and opt-in error-bounded) compression of model weights.

The public API: :func:`compress`, :func:`restore`, :func:`open`, :func:`load_file`, :func:`load_into`,
:func:`info`, :func:`verify`, the listings :class:`FileInfo` and :class:`TensorInfo`, and the
errors under :class:`ElvesError`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ArchiveError,
    BaseMismatchError,
    BaseModelError,
    BaseRequiredError,
    BoundError,
    CodecError,
    CorruptArchiveError,
    ElvesError,
    GpuUnavailableError,
    InputError,
    OutputError,
    OutputExistsError,
    StoreError,
    TruncatedArchiveError,
    UnsafePathError,
    UnsafePickleError,
    UnsupportedFormatError,
    UsageError,
)
from .version import __version__ as __version__

if TYPE_CHECKING:
    from .api import Archive, ArchiveInfo, VerifyReport, info, load_file, load_into, open, verify  # noqa: A004
    from .decoder import RestoreSummary, restore
    from .encoder import CompressSummary, compress
    from .listing import FileInfo, TensorInfo

# The API loads on first use: importing any submodule runs this file (``elves.dtypes`` from
# ``bitx.codec``, say), and must not drag in the pipeline, which imports bitx back.
_LAZY = {name: "api" for name in ("Archive", "ArchiveInfo", "VerifyReport", "info", "load_file", "load_into", "open",
                                   "verify")}
_LAZY.update(RestoreSummary="decoder", restore="decoder", CompressSummary="encoder", compress="encoder",
             FileInfo="listing", TensorInfo="listing")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elves' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Archive", "ArchiveInfo", "CompressSummary", "FileInfo", "RestoreSummary", "TensorInfo", "VerifyReport",
    "compress", "restore", "open", "load_file", "load_into", "info", "verify",
    "ElvesError", "InputError", "UsageError", "UnsafePickleError", "ArchiveError", "TruncatedArchiveError",
    "CorruptArchiveError", "UnsupportedFormatError", "UnsafePathError", "OutputExistsError",
    "OutputError", "CodecError", "BoundError", "BaseModelError", "BaseRequiredError", "BaseMismatchError",
    "StoreError", "GpuUnavailableError",
]
