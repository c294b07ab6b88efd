"""Readers: turn a model (a file, or a folder such as a Hugging Face snapshot) into
:class:`~elves.model.SourceFile` objects. safetensors, PyTorch checkpoints, ONNX, GGUF and
CTranslate2 files are parsed so their tensors reach the float codecs; every other file is kept as
opaque bytes, except the runs of floats found in it (:mod:`.float_runs`).

A model folder is untrusted like its files: a symbolic link in it that points outside it would
put another file's content (``~/.ssh/id_rsa``) into the archive, so it is refused unless the
caller asks for links to be followed. A link that stays inside is recorded as a link.
"""
from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from ..errors import InputError
from ..model import SourceFile, open_source
from . import ctranslate2, gguf, onnx, safetensors, torch
from .float_runs import segments as float_run_segments


def read_model(src: str | os.PathLike[str], follow_symlinks: bool = False) -> tuple[list[SourceFile], bool]:
    """The files of the model at ``src``, in walk order (each folder's files and links by name,
    then its subfolders by name), and whether ``src`` was a single file.

    ``src`` itself may be a link: the user named it. Inside a folder, a link whose target lies
    inside the folder becomes a ``"symlink"`` entry (never read through, never descended into);
    one whose target lies outside raises :class:`InputError` unless ``follow_symlinks``, which
    reads the target (a file, or a folder walked in turn) as if it stood where the link is.
    """
    root = Path(src)
    if root.is_file():
        return [read_file(Path(os.path.realpath(root)) if root.is_symlink() else root, root.name)], True
    if not root.is_dir():
        raise InputError("no such file or folder" if not os.path.lexists(root) else "is not a file or a folder", root)
    real_root = os.path.realpath(root)
    files: list[SourceFile] = []
    # Iterative, so that a deep folder tree cannot exhaust Python's recursion limit. Each folder
    # carries the real paths of the folders above it: a followed link back to one is a loop.
    stack: list[tuple[Path, str, frozenset[str]]] = [(root, "", frozenset([real_root]))]
    while stack:
        folder, prefix, above = stack.pop()
        subfolders = []
        for entry, mode in _entries(folder):
            path, rel = Path(entry.path), prefix + entry.name
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    raise InputError("broken symbolic link (its target is missing or it loops)", path)
                if _inside(target, real_root):
                    files.append(SourceFile(path, rel, "symlink", 0, [], link=_link_text(target, real_root, rel)))
                    continue
                if not follow_symlinks:
                    raise InputError(f"is a symbolic link to {target}, which points outside the model folder; "
                                     "use --follow-symlinks to store the target's content", path)
                path, mode = Path(target), os.stat(target).st_mode
            if stat.S_ISDIR(mode):
                subfolders.append((path, rel))
            elif stat.S_ISREG(mode):
                files.append(read_file(path, rel))
            else:
                raise InputError("is not a regular file, a folder or a symbolic link", path)
        for path, rel in reversed(subfolders):
            real = os.path.realpath(path)
            if real in above:
                raise InputError(f"the symbolic links followed lead back to {real}: a loop", path)
            stack.append((path, rel + "/", above | {real}))
    return files, False


def walk_key(relpath: str) -> tuple[tuple[int, str], ...]:
    """Sorts the relative paths of a model's files as :func:`read_model` walks them: each
    folder's files by name, then its subfolders by name."""
    *folders, name = relpath.split("/")
    return (*((1, f) for f in folders), (0, name))


def _entries(folder: Path) -> list[tuple[os.DirEntry[str], int]]:
    """The folder's entries by name, each with its own mode (a link's, not its target's)."""
    try:
        with os.scandir(folder) as it:
            return [(e, e.stat(follow_symlinks=False).st_mode) for e in sorted(it, key=lambda e: e.name)]
    except OSError as e:
        raise InputError(f"cannot list the folder: {e.strerror}", folder) from None


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _link_text(target: str, root: str, rel: str) -> str:
    """The link's text as restore will write it: from the link's folder in the model to the
    target's place in the model, relative and POSIX (the source text may be absolute, or climb
    out and back in)."""
    inside = Path(os.path.relpath(target, root)).as_posix()
    return posixpath.relpath(inside, posixpath.dirname(rel) or ".")


def read_file(path: Path, relpath: str) -> SourceFile:
    if safetensors.looks_like(path):
        f = safetensors.parse(path, relpath)
    elif onnx.looks_like(path) and (parsed := onnx.parse(path, relpath)) is not None:
        f = parsed
    elif gguf.looks_like(path) and (parsed := gguf.parse(path, relpath)) is not None:
        f = parsed
    elif ctranslate2.looks_like(path) and (parsed := ctranslate2.parse(path, relpath)) is not None:
        f = parsed
    else:
        f = torch.parse(path, relpath) or _opaque(path, relpath)
    f.check()
    return f


def _opaque(path: Path, relpath: str) -> SourceFile:
    with open_source(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        segments = float_run_segments(fh.fileno(), size, path)
    return SourceFile(path, relpath, "opaque", size, segments)
