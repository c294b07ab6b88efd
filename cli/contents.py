"""``elves ls`` and ``elves extract``: what an archive (or a stored model) holds, and one file or
one tensor of it, decoded alone (random access)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np

import elves
from elves import dtypes
from elves.archive import public_mode
from elves.errors import OutputExistsError, UsageError
from elves.listing import FileInfo, TensorInfo
from elves.store import Store
from elves.store.layout import MARKER
from elves.store.location import open_storage, parse_location

from ._common import EPILOG, emit, force_option, human, json_option, quiet_option, reported, threads_option, warn
from .store import parse_storage_options, storage_option


class Listing(Protocol):
    """What ``ls`` lists: an open archive, or a model of a store."""

    def files(self, pattern: str | None = None) -> list[FileInfo]: ...

    def tensors(self, pattern: str | None = None) -> list[TensorInfo]: ...


def split_store_path(path: Path) -> tuple[Path, str]:
    """STORE/MODEL as (store, model): the store is the longest folder above ``path`` that holds
    the store's marker; the rest is the model's name, which may hold "/" (acme/llama-ft)."""
    if (path / MARKER).is_file():
        raise UsageError(f"is a store: name one of its models, STORE/MODEL (`elves store ls {path}` lists them)",
                         path)
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if (Path(*parts[:i]) / MARKER).is_file():
            return Path(*parts[:i]), "/".join(parts[i:])
    raise UsageError(f"neither an archive nor STORE/MODEL (no folder above it holds {MARKER})", path)


def split_store_url(url: str, storage_options: dict[str, Any] | None) -> tuple[str, str]:
    """:func:`split_store_path` for a store at a URL (``s3://bucket/hub/acme/llama-ft``): the
    longest prefix that holds the marker, asked of the storage of the URL's first part (its bucket)."""
    scheme, _, rest = url.partition("://")
    parts = rest.split("/")
    top = f"{scheme}://{parts[0]}"
    storage = open_storage(top, storage_options)
    if storage.exists("/".join([*parts[1:], MARKER])):
        raise UsageError(f"is a store: name one of its models, STORE/MODEL (`elves store ls {url}` lists them)", url)
    for i in range(len(parts) - 1, 0, -1):
        if storage.exists("/".join([*parts[1:i], MARKER])):
            return "/".join([top, *parts[1:i]]), "/".join(parts[i:])
    raise UsageError(f"no STORE/MODEL (no prefix of it holds {MARKER})", url)


def _table(header: Sequence[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [list(header), *rows]) for i in range(len(header))]
    return ["  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [list(header), *rows]]


def _record(info: FileInfo | TensorInfo) -> dict[str, Any]:
    return {**asdict(info), "ratio": round(info.ratio, 4)}


@click.command("ls", epilog=EPILOG)
@click.argument("target", metavar="ARCHIVE|STORE/MODEL")
@click.argument("glob", required=False)
@click.option("--files", "files_only", is_flag=True, help="List the files only, not the tensors.")
@storage_option
@json_option
@quiet_option
def ls(target: str, glob: str | None, files_only: bool, storage_options: tuple[str, ...], as_json: bool) -> None:
    """List the files and tensors of an archive, or of a model in a store, without decoding:
    name, dtype, shape, codec, what a tensor is coded against, stored bytes and ratio.

    GLOB keeps the files whose path and the tensors whose name (or FILE:NAME) match it; quote
    it for the shell. A stored model is named STORE/MODEL, the store being the longest folder
    of the path that holds elves-store.json; a store may be at a URL (s3://bucket/hub/MODEL).

    \b
    Examples:
      elves ls minilm.elves
      elves ls minilm.elves 'encoder.layer.0.*'
      elves ls minilm.elves --files --json
      elves ls hub.store/acme/llama-ft 'model.layers.1.*'
      elves ls s3://models/hub/acme/llama-ft --files
    """
    with reported(as_json):
        where = parse_location(target)
        options = parse_storage_options(storage_options)
        if isinstance(where, str):
            url, model = split_store_url(where, options)
            _list(target, Store(url, options).model(model), glob, files_only, as_json)
        elif where.is_file():
            with elves.open(where) as archive:
                _list(target, archive, glob, files_only, as_json)
        else:
            root, model = split_store_path(where)
            _list(target, Store(root, options).model(model), glob, files_only, as_json)


def _list(source: str, listing: Listing, glob: str | None, files_only: bool, as_json: bool) -> None:
    files = listing.files(glob)
    tensors = [] if files_only else listing.tensors(glob)
    data: dict[str, Any] = {"ok": True, "source": source, "files": [_record(f) for f in files]}
    if not files_only:
        data["tensors"] = [_record(t) for t in tensors]
    lines = []
    if files:
        lines += _table(["FILE", "SIZE", "STORED", "RATIO", "FORMAT", "TENSORS"],
                        [[f.path + (f" -> {f.link}" if f.link is not None else ""), human(f.size),
                          human(f.stored_bytes), f"{f.ratio:.3f}x", f.format + (" LOSSY" if f.lossy else ""),
                          str(f.tensors)] for f in files], {1, 2, 3, 5})
    if tensors:
        several = len({t.file for t in tensors}) > 1
        lines += ([""] if lines else []) + _table(
            ["TENSOR", *(["FILE"] if several else []), "DTYPE", "SHAPE", "CODEC", "STORED", "RATIO", "REFERENCE"],
            [[t.name, *([t.file] if several else []), t.dtype, "x".join(map(str, t.shape)) or "scalar", t.codec,
              human(t.stored_bytes), f"{t.ratio:.3f}x", t.reference or "-"] for t in tensors],
            {5, 6} if several else {4, 5})
    emit(as_json, data, "\n".join(lines) or f"(nothing matches {glob!r})")


@click.command(epilog=EPILOG)
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("paths", metavar="[PATH]...", nargs=-1)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="The folder the files go into (at their paths in the archive), or with --tensor the "
                   "file to write: .npy or .safetensors.")
@click.option("--tensor", "tensor", metavar="NAME", default=None, help="Write this one tensor instead of files.")
@click.option("--base", "base", type=click.Path(exists=True, path_type=Path), default=None,
              help="The base model, for files or a tensor coded against it.")
@threads_option
@force_option
@json_option
@quiet_option
def extract(archive: Path, paths: tuple[str, ...], out: Path, tensor: str | None, base: Path | None,
            threads: int | None, force: bool, as_json: bool) -> None:
    """Write some files of an archive, or one tensor, decoding only what they need (every file
    checked against its sha256, every stream against its hash).

    A tensor goes to OUT as .npy or .safetensors (by its extension). .npy has no bfloat16 or
    float8: those are written as raw elements (dtype V2, V1) that
    np.load(p).view(ml_dtypes.bfloat16) reads; .safetensors keeps every dtype.

    \b
    Examples:
      elves extract minilm.elves config.json tokenizer.json -o ./out
      elves extract llama.elves model-00001-of-00004.safetensors -o ./part --force
      elves extract minilm.elves --tensor embeddings.word_embeddings.weight -o emb.npy
      elves extract llama.elves --tensor lm_head.weight -o head.safetensors
    """
    if (tensor is None) == (not paths):
        raise click.UsageError("name files (PATH...) or one --tensor NAME, not both and not neither")
    with reported(as_json), elves.open(archive, threads=threads, base=base) as a:
        if tensor is not None:
            nbytes = _save_tensor(a, tensor, out, force)
            emit(as_json, {"ok": True, "tensor": tensor, "output": str(out), "bytes": nbytes},
                 f"{tensor} -> {out}: {human(nbytes)}", summary=True)
            return
        written = a.extract(list(paths), out, force=force)
        emit(as_json, {"ok": True, "output": str(out), "files": [str(p) for p in written]},
             f"{archive} -> {out}: {len(written)} files", summary=True)


def _save_tensor(a: elves.Archive, name: str, out: Path, force: bool) -> int:
    """Write the tensor ``name`` to ``out`` (.npy or .safetensors) under a temporary name, renamed
    into place once complete; return its byte count."""
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        raise click.BadParameter(f"{out.name}: a tensor is written as .npy or .safetensors", param_hint="-o")
    if name not in a:
        raise UsageError(f"no tensor {name!r} in the archive (`elves ls` lists them)", a.path)
    if os.path.lexists(out) and not force:
        raise OutputExistsError("already exists (use --force to overwrite)", out)
    info, arr = a.tensor_info(name), a.get_tensor(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".npy":
                if arr.dtype.kind == "V" or info.dtype in dtypes.PACKED:
                    warn(f"{out}: .npy has no {info.dtype}: it holds the raw elements ({arr.dtype.str}); "
                         ".safetensors keeps the dtype")
                np.save(f, arr, allow_pickle=False)
            else:
                _write_safetensors(f, name, info, arr)
            os.fchmod(f.fileno(), public_mode(0o666))  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return info.nbytes


def _write_safetensors(f: Any, name: str, info: TensorInfo, arr: np.ndarray) -> None:
    """One tensor as a safetensors file. Written here, not by safetensors.numpy, which knows
    neither float8 nor the packed sub-byte kinds: the archive's dtype name is the file's."""
    header = json.dumps({name: {"dtype": info.dtype, "shape": list(info.shape),
                                "data_offsets": [0, info.nbytes]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-aligned, as the format recommends
    f.write(len(header).to_bytes(8, "little") + header)
    f.write(np.ascontiguousarray(arr).tobytes()[:info.nbytes])
