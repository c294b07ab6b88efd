"""elves: lossless (and opt-in error-bounded) compression of model weights.

The public API: :func:`compress`, :func:`restore`, :func:`open`, :func:`load_file`,
:func:`info`, :func:`verify`, and the errors under :class:`ElvesError`.
"""
from __future__ import annotations

from .version import __version__ as __version__

from .api import Archive, ArchiveInfo, TensorInfo, VerifyReport, info, load_file, open, verify  # noqa: A004
from .decoder import RestoreSummary, restore
from .encoder import CompressSummary, compress
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

__all__ = [
    "Archive", "ArchiveInfo", "CompressSummary", "RestoreSummary", "TensorInfo", "VerifyReport",
    "compress", "restore", "open", "load_file", "info", "verify",
    "ElvesError", "InputError", "UsageError", "UnsafePickleError", "ArchiveError", "TruncatedArchiveError",
    "CorruptArchiveError", "UnsupportedFormatError", "UnsafePathError", "OutputExistsError",
    "OutputError", "CodecError", "BoundError", "BaseModelError", "BaseRequiredError", "BaseMismatchError",
    "StoreError", "GpuUnavailableError",
]
