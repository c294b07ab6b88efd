"""The errors elves raises. Every one is an :class:`ElvesError`, names the file it concerns and
says what is wrong in one sentence, so that the CLI can print it without a traceback.

Each class carries the exit code the CLI ends with when it is raised (``exit_code``); a class
that gives a code a meaning of its own says what it is in ``exit_help``. :func:`exit_codes`
gathers them into the table ``elves --help`` prints: the codes are written down here only.
"""
from __future__ import annotations

import os
from typing import ClassVar


class ElvesError(Exception):
    """Base of every error elves raises on purpose."""

    exit_code: ClassVar[int] = 1
    exit_help: ClassVar[str] = "other error"

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(ElvesError, ValueError):
    """An argument is not one elves accepts (a framework or device it does not know)."""

    exit_code = 2
    exit_help = "bad usage"


class InputError(ElvesError):
    """A model file given to compress is malformed (bad safetensors header, broken checkpoint)."""

    exit_code = 3
    exit_help = "bad input model"


class UnsafePickleError(InputError):
    """A PyTorch checkpoint's pickle asks for something other than tensors and plain containers.

    elves never executes such a pickle. ``compress`` keeps the file as opaque bytes and warns;
    reading its tensors through :func:`elves.readers.torch.read_state_dict` raises this error.
    """


class ArchiveError(ElvesError):
    """An archive cannot be used as it is."""

    exit_code = 4
    exit_help = "damaged, truncated or unsupported archive or store object"


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
    exit_help = "base model missing or not the one the archive was compressed against"


class BaseRequiredError(BaseModelError):
    """The archive was compressed against a base model and none was given."""


class BaseMismatchError(BaseModelError):
    """The base model given is not the one the archive was compressed against: a tensor it needs
    is missing or differs (its xxh3-128 does not match the recorded one)."""


class OutputExistsError(ElvesError):
    """The output path exists and overwriting was not asked for (``--force``)."""

    exit_code = 5
    exit_help = "output exists"


class OutputError(ElvesError):
    """Writing the output failed (disk full, permission denied); nothing was left under the final name."""

    exit_code = 5
    exit_help = "output cannot be written"


class CodecError(ElvesError):
    """A codec was asked to do something it cannot (unknown codec id, unknown dtype)."""

    exit_code = 6
    exit_help = "unknown codec or dtype"


class StoreError(ElvesError):
    """A model store cannot be used as asked: not a store, written by a newer elves, an unknown or
    duplicate model name, or a base model that does not fit."""

    exit_code = 8
    exit_help = "store problem (not a store, unknown or duplicate model name, a base that does not fit)"


class HubError(ElvesError):
    """The Hub (or a mirror's upstream) failed a request: unreachable, or an answer that makes no
    sense. ``path`` names the URL or the repo."""

    exit_code = 9
    exit_help = "the Hub failed a request (unreachable, or an unexpected answer)"


class HubNotFoundError(HubError):
    """The repo, revision or file does not exist on the Hub (or is private and no token opens it);
    ``kind`` says which: ``"repo"``, ``"revision"`` or ``"file"``."""

    exit_code = 10
    exit_help = "no such repo, revision or file on the Hub"

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, kind: str = "repo"):
        super().__init__(message, path)
        self.kind = kind


class HubAccessError(HubError):
    """The Hub refused access: a gated or private repo without a token that opens it, or a
    mirror client without one of the mirror's tokens."""

    exit_code = 11
    exit_help = "the Hub refused access (gated or private repo: give a token)"

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, gated: bool = False):
        super().__init__(message, path)
        self.gated = gated


class HubIntegrityError(HubError):
    """A file from the Hub does not match its listing's sha256 or git blob id: nothing of it is stored."""

    exit_code = 12
    exit_help = "a download did not match its sha256 or blob id"


class BoundError(CodecError, ValueError):
    """An error bound that cannot be used (malformed, not positive, a relative bound >= 1)."""

    exit_code = 2


class GpuUnavailableError(ElvesError):
    """GPU decoding was asked for, but cupy or a CUDA device is missing."""



def exit_codes() -> dict[int, list[str]]:
    """Every exit code an ElvesError ends the CLI with, lowest first, with what it means: the
    ``exit_help`` of each class that gives the code a meaning, base classes first."""
    meanings: dict[int, list[str]] = {}
    pending: list[type[ElvesError]] = [ElvesError]
    while pending:
        cls = pending.pop(0)
        if "exit_help" in vars(cls) and cls.exit_help not in meanings.get(cls.exit_code, []):
            meanings.setdefault(cls.exit_code, []).append(cls.exit_help)
        pending += cls.__subclasses__()
    return dict(sorted(meanings.items()))
