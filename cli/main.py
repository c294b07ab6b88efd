"""The ``elves`` command (installed from the repository's cli/ folder as ``elves.cli``): archives
here, the model store in cli/store.py; the exit codes are the error classes' (``elves --help``).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.shell_completion import get_completion_class

import elves
from elves.archive import FORMAT_VERSION
from elves.bounds import ErrorBound, parse_error_bound
from elves.errors import BoundError, OutputExistsError
from elves.store import STORE_VERSION

from ._common import (
    EPILOG,
    PROBLEMS_FOUND,
    ElvesGroup,
    emit,
    emit_restored,
    epilog,
    force_option,
    human,
    json_option,
    progress,
    quiet_option,
    reported,
    source_size,
    threads_option,
    warn,
)
from .contents import extract, ls
from .kernels import kernels
from .mirror import mirror
from .store import store

base_option = click.option("--base", "base", type=click.Path(exists=True, path_type=Path), default=None,
                           help="The base model (file, folder or .elves archive) the archive is "
                                "compressed against (BitX delta of a fine-tune).")


class ErrorBoundType(click.ParamType[ErrorBound]):
    """``--error-bound``: 2^-24, 1e-6 (absolute) or rel:1e-3 (relative); bad ones are usage errors."""

    name = "BOUND"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> ErrorBound:
        if isinstance(value, ErrorBound):
            return value
        try:
            return parse_error_bound(value)
        except BoundError as e:
            self.fail(e.message, param, ctx)
        except (ValueError, OverflowError, TypeError):
            self.fail(f"{value!r} is not a bound: use 2^-24, 1e-6 or rel:1e-3", param, ctx)


lossy_option = click.option("--lossy", type=click.Choice(["elf"]), default=None,
                            help="Opt in to lossy coding of float tensors (F16, BF16, F32, F64) within "
                                 "--error-bound; everything else stays lossless.")
bound_option = click.option("--error-bound", "error_bound", type=ErrorBoundType(), default=None,
                            help="With --lossy elf: the largest error allowed per element, absolute "
                                 "(2^-24, 1e-6) or relative to the element (rel:1e-3).")


def _bound_text(bound: dict[str, Any] | None) -> str:
    if not bound:
        return ""
    spec = str(bound.get("spec", bound.get("value")))
    kind = "relative" if bound.get("mode") == "rel" else "absolute"
    return f"{bound.get('codec', 'elf')}, error bound {spec.split(':', 1)[-1]} {kind}"


VERSION = ("%(prog)s %(version)s\n"
           f"archive format: reads 1.0 to {FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}, writes the oldest that "
           "holds the archive (1.3; 1.4 for casts, references and file formats 1.3 lacks; "
           f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]} for small tensors packed together)\n"
           f"store format: reads and writes {STORE_VERSION[0]}.x ({STORE_VERSION[0]}.{STORE_VERSION[1]})")
COMPLETION = ("\b\nShell completion (bash, zsh, fish):\n"
              "  eval \"$(elves completion bash)\"             # in ~/.bashrc\n"
              "  eval \"$(_ELVES_COMPLETE=zsh_source elves)\"  # click's own variable, in ~/.zshrc")


@click.group(cls=ElvesGroup, epilog=epilog(COMPLETION), context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(elves.__version__, "-V", "--version", prog_name="elves", message=VERSION)
@click.option("--debug", is_flag=True, help="On an error, show its traceback too.")
@quiet_option
def main(debug: bool) -> None:
    """Shrink model weights losslessly, and load them back fast.

    \b
    Examples:
      elves compress ./all-MiniLM-L6-v2 -o minilm.elves
      elves info minilm.elves
      elves ls minilm.elves 'encoder.layer.0.*'
      elves extract minilm.elves config.json -o ./out
      elves verify minilm.elves --against ./all-MiniLM-L6-v2
      elves restore minilm.elves -o ./restored
      curl -sL https://host/model.safetensors | elves compress - --name model.safetensors -o m.elves
      elves restore m.elves -o - | sha256sum
    """


@contextmanager
def _stdin_file(out: Path, name: str, force: bool) -> Iterator[Path]:
    """Standard input as the file ``name``, in a temporary folder beside ``out`` (the same disk,
    which must hold it anyway), removed afterwards."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise click.BadParameter(f"{name!r} is not a file name", param_hint="--name")
    if out.exists() and not force:  # before reading what may be gigabytes of input
        raise OutputExistsError("already exists (use --force to overwrite)", out)
    folder = Path(tempfile.mkdtemp(prefix=".elves-stdin-", dir=out.parent))
    try:
        with open(folder / name, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        yield folder / name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@main.command(epilog=EPILOG)
@click.argument("src", type=click.Path(exists=True, allow_dash=True, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="The archive to write (.elves).")
@click.option("--name", default="stdin", show_default=True,
              help="With SRC '-' (standard input): the file name the archive records (its extension "
                   "tells the format, e.g. model.safetensors).")
@threads_option
@force_option
@base_option
@lossy_option
@bound_option
@click.option("--follow-symlinks", is_flag=True,
              help="Store the content of links that point outside the model folder (refused otherwise); "
                   "links inside it are stored as links either way.")
@json_option
@quiet_option
def compress(src: Path, out: Path, name: str, threads: int | None, force: bool, base: Path | None,
             lossy: str | None, error_bound: ErrorBound | None, follow_symlinks: bool, as_json: bool) -> None:
    """Compress a model (a file or a folder) into one archive, losslessly. SRC '-' reads one file
    from standard input (named by --name).

    With --base, tensors that match the base model's are coded as a BitX delta against it
    (where that is smaller); restoring then needs the same base.

    With --lossy elf --error-bound B, float tensors restore within B of the original, element
    by element (NaN, infinities and the sign of zero exactly): B is absolute (2^-24, 1e-6) or
    relative (rel:1e-3). Each chunk keeps whichever of the quantised and the exact coding is
    smaller; other tensors and files stay lossless.

    \b
    Examples:
      elves compress model.safetensors -o model.elves
      elves compress ./llama-3-8b/ -o llama.elves --threads 8
      elves compress ./my-finetune/ -o ft.elves --base ./llama-3-8b/
      elves compress ./all-MiniLM-L6-v2 -o minilm.elves --lossy elf --error-bound 2^-24
      cat model.safetensors | elves compress - --name model.safetensors -o model.elves
    """
    if lossy is not None and error_bound is None:
        raise click.UsageError("--lossy elf needs --error-bound (e.g. 2^-24, 1e-6 or rel:1e-3)")
    if lossy is None and error_bound is not None:
        raise click.UsageError("--error-bound needs --lossy elf")
    with reported(as_json):
        t0 = time.perf_counter()

        def run(path: Path) -> elves.CompressSummary:
            with progress(source_size(path), "compress", not as_json) as bar:
                return elves.compress(path, out, threads=threads, force=force, progress=bar, base=base, lossy=lossy,
                                      error_bound=error_bound, follow_symlinks=follow_symlinks)

        if str(src) == "-":
            with _stdin_file(out, name, force) as path:
                s = run(path)
        else:
            s = run(src)
        dt = time.perf_counter() - t0
        for w in s.warnings:
            warn(w)
        emit(as_json, {
            "ok": True, "archive": str(s.archive), "files": s.files, "tensors": s.tensors,
            "original_bytes": s.original_bytes, "archive_bytes": s.archive_bytes,
            "ratio": round(s.ratio, 4), "seconds": round(dt, 3), "warnings": s.warnings,
            "base": str(base) if base is not None else None, "base_streams": s.base_streams,
            "lossy": lossy, "error_bound": s.error_bound, "lossy_streams": s.lossy_streams,
            "ref_streams": s.ref_streams,
        }, f"{'standard input' if str(src) == '-' else src} -> {s.archive}: {human(s.original_bytes)} -> {human(s.archive_bytes)} "
           f"({s.ratio:.3f}x), {s.files} files, {s.tensors} tensors, "
           f"{s.original_bytes / max(dt, 1e-9) / 1e6:.0f} MB/s"
           + (f", {s.base_streams} tensors coded against the base" if base is not None else "")
           + (f"\n  LOSSY ({_bound_text(error_bound.to_index())}): {s.lossy_streams} tensors within the bound, "
              "the rest exact" if error_bound is not None else "")
           + (f"; {s.ref_streams} coded against a tensor of an earlier file" if s.ref_streams else ""),
           summary=True)


@main.command(epilog=EPILOG)
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(allow_dash=True, path_type=Path), required=True,
              help="Folder to restore into, or a file path for a single-file model; '-' writes a "
                   "single-file model to standard output.")
@threads_option
@force_option
@base_option
@click.option("--no-verify", "no_verify", is_flag=True,
              help="Skip the sha256 of each restored file (chunk checksums and content hashes are "
                   "still checked): a little faster.")
@json_option
@quiet_option
def restore(archive: Path, out: Path, threads: int | None, force: bool, base: Path | None, no_verify: bool,
            as_json: bool) -> None:
    """Restore the original files, byte for byte (checked against their sha256 as they are written).

    An archive compressed with --base needs the same base model again (checked first).

    \b
    Examples:
      elves restore minilm.elves -o ./all-MiniLM-L6-v2
      elves restore model.elves -o model.safetensors
      elves restore ft.elves -o ./my-finetune --base ./llama-3-8b/
      elves restore model.elves -o - | sha256sum
    """
    if str(out) == "-":
        if as_json:
            raise click.UsageError("--json and -o - would share standard output: use one")
        with reported(as_json):
            _restore_to_stdout(archive, threads, base)
        return
    with reported(as_json):
        t0 = time.perf_counter()
        total = elves.info(archive).original_bytes
        with progress(total, "restore", not as_json) as bar:
            r = elves.restore(archive, out, threads=threads, force=force, progress=bar, base=base,
                              verify=not no_verify)
        emit_restored(as_json, str(archive), r, time.perf_counter() - t0)


def _restore_to_stdout(archive: Path, threads: int | None, base: Path | None) -> None:
    with elves.open(archive, threads=threads, base=base) as a:
        files = a.files()
        if not a.single_file:
            n = len(files)
            raise click.UsageError(f"{archive} is of a folder ({n} file{'s' * (n != 1)}): -o - writes a single-file "
                                   "model (`elves extract ARCHIVE PATH -o DIR` writes chosen files)")
        out = sys.stdout.buffer
        for piece in a.iter_file(files[0].path):  # streamed: any size, memory bounded
            out.write(piece)
        out.flush()


@main.command(epilog=EPILOG)
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--files/--no-files", default=True, help="List the files.")
@json_option
@quiet_option
def info(archive: Path, files: bool, as_json: bool) -> None:
    """Show what an archive holds: files, tensors, codecs and ratio per dtype.

    \b
    Example:
      elves info minilm.elves --json
    """
    with reported(as_json):
        i = elves.info(archive)
        data = {
            "ok": True, "archive": str(i.path), "format": ".".join(map(str, i.format)), "writer": i.writer,
            "lossy": i.lossy, "original_bytes": i.original_bytes, "archive_bytes": i.archive_bytes,
            "ratio": round(i.ratio, 4), "tensors": i.tensors, "codecs": i.codecs,
            "by_dtype": {k: {"original_bytes": v.original_bytes, "stored_bytes": v.stored_bytes,
                             "ratio": round(v.ratio, 4)} for k, v in i.by_dtype.items()},
            "files": i.files,
            "base": i.base,
            "error_bound": i.error_bound, "lossy_streams": i.lossy_streams, "ref_streams": i.ref_streams,
        }
        kind = f"LOSSY ({_bound_text(i.error_bound)})" if i.lossy and i.error_bound else (
            "LOSSY" if i.lossy else "lossless")
        lines = [
            f"{i.path}: format {data['format']}, {kind}, written by {i.writer}",
            f"  {human(i.original_bytes)} -> {human(i.archive_bytes)} ({i.ratio:.3f}x), {i.tensors} tensors",
        ]
        if i.lossy:
            lines.append(f"  {i.lossy_streams} tensors restore within the error bound, the rest exactly; "
                         "restored files differ from the originals (their sha256 are the originals')")
        if i.ref_streams:
            lines.append(f"  {i.ref_streams} tensors coded against a tensor of an earlier file in the archive")
        if i.base:
            lines.append(f"  needs a base model (--base): {len(i.base.get('tensors', []))} base tensors referenced; "
                         "base files:")
            lines += [f"    {f['path']}  {human(f['size'])}  sha256 {f['sha256']}"
                      for f in i.base.get("model", {}).get("files", [])]
        lines += [
            "  by dtype (unique data):",
        ]
        for k, v in sorted(i.by_dtype.items(), key=lambda kv: -kv[1].original_bytes):
            lines.append(f"    {k:8} {human(v.original_bytes):>10} -> {human(v.stored_bytes):>10}  {v.ratio:.3f}x")
        lines.append("  codecs: " + ", ".join(f"{k} x{n}" for k, n in i.codecs.items()))
        if files:
            lines.append("  files:")
            lines += [f"    {f['path']}  {human(f['size'])}  {f['format']}, {f['tensors']} tensors" for f in i.files]
        emit(as_json, data, "\n".join(lines))


@main.command(epilog=epilog(f"verify ends with {PROBLEMS_FOUND} when a check fails."))
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--against", type=click.Path(exists=True, path_type=Path),
              help="The original model: also check that restore would reproduce it exactly.")
@threads_option
@base_option
@json_option
@quiet_option
def verify(archive: Path, against: Path | None, threads: int | None, base: Path | None, as_json: bool) -> None:
    """Decode everything and check every checksum; any mismatch is reported and fails.

    For a lossy archive, --against (the original model) also compares every restored element
    with the original: it prints the largest errors and fails if one is over the bound.

    \b
    Examples:
      elves verify minilm.elves
      elves verify minilm.elves --against ./all-MiniLM-L6-v2
    """
    with reported(as_json):
        rep = elves.verify(archive, against=against, threads=threads, base=base)
        lossy_line = ""
        if rep.error_bound:
            lossy_line = f"\n  LOSSY ({_bound_text(rep.error_bound)})"
            if rep.max_abs_error is not None:
                lossy_line += (f": largest error against the original {rep.max_abs_error:.3g} absolute, "
                               f"{rep.max_rel_error:.3g} relative; {rep.over_bound} elements over the bound")
        emit(as_json, {"ok": rep.ok, "files": rep.files, "bytes_checked": rep.bytes_checked,
                        "problems": rep.problems, "error_bound": rep.error_bound,
                        "max_abs_error": rep.max_abs_error, "max_rel_error": rep.max_rel_error,
                        "over_bound": rep.over_bound},
              f"{archive}: " + ("OK" if rep.ok else "FAILED") +
              f", {rep.files} files, {human(rep.bytes_checked)} checked" + lossy_line +
              "".join(f"\n  {p}" for p in rep.problems), summary=rep.ok)
        if not rep.ok:
            sys.exit(PROBLEMS_FOUND)


@main.command(epilog=EPILOG)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), required=False)
@quiet_option
@click.pass_context
def completion(ctx: click.Context, shell: str | None) -> None:
    """Print the shell completion script for SHELL (default: the one $SHELL names).

    The script runs elves with _ELVES_COMPLETE set (click's completion) to complete commands,
    options and paths.

    \b
    Examples:
      eval "$(elves completion bash)"                     # in ~/.bashrc
      elves completion zsh > ~/.zfunc/_elves
      elves completion fish > ~/.config/fish/completions/elves.fish
    """
    shell = shell or Path(os.environ.get("SHELL", "bash")).name
    complete = get_completion_class(shell)
    if complete is None:
        raise click.UsageError(f"$SHELL is {shell}, which click does not complete: name bash, zsh or fish")
    click.echo(complete(ctx.find_root().command, {}, "elves", "_ELVES_COMPLETE").source())


main.add_command(ls)
main.add_command(extract)
main.add_command(store)
main.add_command(mirror)
main.add_command(kernels)

if __name__ == "__main__":
    main()
