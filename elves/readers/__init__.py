"""Readers: turn a model (a file, or a folder such as a Hugging Face snapshot) into
:class:`~elves.model.SourceFile` objects. safetensors, PyTorch checkpoints and ONNX files are
parsed so their tensors reach the float codecs; every other file is kept as opaque bytes."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..model import SourceFile, opaque_segments
from . import onnx, safetensors, torch


def read_model(src: str | os.PathLike[str]) -> tuple[list[SourceFile], bool]:
    """The files of the model at ``src``, sorted by path, and whether ``src`` was a single file."""
    root = Path(src)
    if root.is_file():
        return [read_file(root, root.name)], True
    if not root.is_dir():
        raise InputError("no such file or folder", root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() and not path.is_file():
                raise InputError("broken symbolic link", path)
            files.append(read_file(path, path.relative_to(root).as_posix()))
    return files, False


def read_file(path: Path, relpath: str) -> SourceFile:
    if safetensors.looks_like(path):
        f = safetensors.parse(path, relpath)
    elif onnx.looks_like(path) and (parsed := onnx.parse(path, relpath)) is not None:
        f = parsed
    else:
        f = torch.parse(path, relpath) or SourceFile(
            path, relpath, "opaque", path.stat().st_size, opaque_segments(path.stat().st_size)
        )
    f.check()
    return f
