"""The errors elves raises. Every one is an :class:`ElvesError`, names the file it concerns and
says what is wrong in one sentence, so that the CLI can print it without a traceback.

Each class carries the CLI exit code that stands for it (see ``elves --help``).
"""
from __future__ import annotations

import os


class ElvesError(Exception):
    """Base of every error elves raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(ElvesError, ValueError):
    """An argument is not one elves accepts (a framework or device it does not know)."""

    exit_code = 2


class InputError(ElvesError):
    """A model file given to compress is malformed (bad safetensors header, broken checkpoint)."""

    exit_code = 3


class UnsafePickleError(InputError):
    """A PyTorch checkpoint's pickle asks for something other than tensors and plain containers.

    elves never executes such a pickle. ``compress`` keeps the file as opaque bytes and warns;
    reading its tensors through :func:`elves.readers.torch.read_state_dict` raises this error.
    """


class ArchiveError(ElvesError):
    """An archive cannot be used as it is."""

    exit_code = 4


class TruncatedArchiveError(ArchiveError):
    """The archive ends before the data its header or index points at."""


class CorruptArchiveError(ArchiveError):
    """A checksum does not match: a chunk, the index or a restored tensor differs from what was written."""


class UnsupportedFormatError(ArchiveError):
    """The archive was written by a newer elves (a format major version this one cannot read)."""


class UnsafePathError(ArchiveError):
    """A file name inside an archive is absolute or climbs out of the output folder with '..'."""


class BaseModelError(ArchiveError):
    """An archive compressed against a base model (``--base``) cannot be used with the base given."""

    exit_code = 7


class BaseRequiredError(BaseModelError):
    """The archive was compressed against a base model and none was given."""


class BaseMismatchError(BaseModelError):
    """The base model given is not the one the archive was compressed against: a tensor it needs
    is missing or differs (its xxh3-128 does not match the recorded one)."""


class OutputExistsError(ElvesError):
    """The output path exists and overwriting was not asked for (``--force``)."""

    exit_code = 5


class OutputError(ElvesError):
    """Writing the output failed (disk full, permission denied); nothing was left under the final name."""

    exit_code = 5


class CodecError(ElvesError):
    """A codec was asked to do something it cannot (unknown codec id, unknown dtype)."""

    exit_code = 6


class StoreError(ElvesError):
    """A model store cannot be used as asked: not a store, written by a newer elves, an unknown or
    duplicate model name, or a base model that does not fit."""

    exit_code = 8


class BoundError(CodecError, ValueError):
    """An error bound that cannot be used (malformed, not positive, a relative bound >= 1)."""

    exit_code = 2


class GpuUnavailableError(ElvesError):
    """GPU decoding was asked for, but cupy or a CUDA device is missing."""

