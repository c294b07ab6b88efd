"""What every ``elves`` command shares: the exit-code epilog, error reporting, output and options.

Exceptions become exit codes here and nowhere else: an :class:`~elves.errors.ElvesError` ends the
command with its class's ``exit_code``, and the help's table of codes is built from those classes.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn

import click

from elves.errors import CorruptArchiveError, ElvesError, exit_codes

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from elves.decoder import RestoreSummary

# What a verify ends with when it finds a problem: what reading the damage would have raised.
PROBLEMS_FOUND = CorruptArchiveError.exit_code
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def epilog(note: str = "") -> str:
    """The help's closing paragraph: every exit code and what it means (``note`` follows it)."""
    rows = [f"  {code}  {'; '.join(meanings)}" for code, meanings in {0: ["ok"], **exit_codes()}.items()]
    return "\b\nExit codes:\n" + "\n".join(rows) + ("\n\n" + note if note else "") + "\n"


EPILOG = epilog()


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


@contextmanager
def progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for long work; nothing when output is for scripts or not a tty."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bar: ProgressBar[int]
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True,
                           item_show_func=lambda _: None) as bar:
        yield bar.update


def emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def emit_restored(as_json: bool, source: str, r: RestoreSummary, seconds: float) -> None:
    """The report of a restore (from an archive or a store): where it went, how much, how fast."""
    emit(as_json, {"ok": True, "output": str(r.output), "files": r.files, "bytes": r.bytes_written,
                   "seconds": round(seconds, 3)},
         f"{source} -> {r.output}: {r.files} files, {human(r.bytes_written)}, "
         f"{r.bytes_written / max(seconds, 1e-9) / 1e6:.0f} MB/s")


def _debug() -> bool:
    """Whether ``elves --debug`` was given: errors then show their traceback too."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def fail(e: BaseException, as_json: bool) -> NoReturn:
    """End the command for ``e``: one line (or a JSON object), and the exit code of its class."""
    code = e.exit_code if isinstance(e, ElvesError) else ElvesError.exit_code
    if _debug():
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, ElvesError):
        text, kind = str(e), type(e).__name__
    elif isinstance(e, OSError):
        text, kind = f"{e.filename}: {e.strerror}" if e.filename else str(e), "OSError"
    else:  # a bug in elves, not in the input: say so, and how to see where
        text, kind = f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", "InternalError"
    if as_json:
        click.echo(json.dumps({"ok": False, "error": text, "kind": kind, "exit_code": code}))
    else:
        click.echo(f"elves: error: {text}", err=True)
    sys.exit(code)


@contextmanager
def reported(as_json: bool) -> Iterator[None]:
    """Turn any error into a one-line message and its exit code: users never see a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("elves: interrupted; nothing was left under the output name", err=True)
        sys.exit(INTERRUPTED)
    except Exception as e:  # noqa: BLE001 (a bug too: reported in one line, with --debug for its traceback)
        fail(e, as_json)


def source_size(path: Path) -> int:
    """What the progress bar counts: the bytes of the model's files, links not followed."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, names in os.walk(path) for f in names)


threads_option = click.option("--threads", "-t", type=click.IntRange(min=1), default=None,
                              help="Worker threads (default: all cores).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
force_option = click.option("--force", "-f", is_flag=True, help="Overwrite the output if it exists.")
