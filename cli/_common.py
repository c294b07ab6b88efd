"""What every ``elves`` command shares: the exit-code epilog, error reporting, output and options.

Exceptions become exit codes here and nowhere else: an :class:`~elves.errors.ElvesError` ends the
command with its class's ``exit_code``, and the help's table of codes is built from those classes.
Under ``--json`` every error, click's usage errors included, is one JSON object on stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence

import click

from elves.errors import CorruptArchiveError, ElvesError, UsageError, exit_codes
from elves.jit import compiling

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from elves.decoder import RestoreSummary

# What a verify ends with when it finds a problem: what reading the damage would have raised.
PROBLEMS_FOUND = CorruptArchiveError.exit_code
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
_QUIET = "elves.quiet"  # the key of -q in click's context meta, which every nested context shares


def epilog(note: str = "") -> str:
    """The help's closing paragraph: every exit code and what it means (``note`` follows it)."""
    rows = [f"  {code:>2}  {'; '.join(meanings)}" for code, meanings in {0: ["ok"], **exit_codes()}.items()]
    return "\b\nExit codes:\n" + "\n".join(rows) + ("\n\n" + note if note else "") + "\n"


EPILOG = epilog()


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


COMPILING = "compiling kernels (first run only)"


class Eta:
    """A progress bar's time left, from the rate since the last :meth:`restart` (the start, or
    the end of a compile stage, whose seconds say nothing about the work's rate). None until the
    rate is known: ``after`` seconds and ``fraction`` of the work since then."""

    def __init__(self, total: int, now: float, after: float = 2.0, fraction: float = 0.01):
        self.total, self.after, self.fraction = total, after, fraction
        self.pos = 0
        self.restart(now)

    def restart(self, now: float) -> None:
        self._t0, self._p0 = now, self.pos

    def text(self, now: float) -> str | None:
        seconds, done = now - self._t0, self.pos - self._p0
        if seconds < self.after or done <= 0 or done < self.fraction * self.total or self.pos >= self.total:
            return None
        left = int((self.total - self.pos) * seconds / done)
        days, left = divmod(left, 86400)
        clock = f"{left // 3600:02}:{left // 60 % 60:02}:{left % 60:02}"
        return f"eta {days}d {clock}" if days else f"eta {clock}"


def _compile_in_background(label: str) -> None:
    """Numba is compiling (a first run): compile the rest of the lossless kernels in another
    process, the direction this command does not run first (elves/kernels/warm.py)."""
    if _BACKGROUND:
        return
    first = "encode" if label in ("restore", "verify") else "decode"
    _BACKGROUND.append(subprocess.Popen(
        [sys.executable, "-m", "elves.kernels.warm", first], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))


_BACKGROUND: list[subprocess.Popen[bytes]] = []


@contextmanager
def progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for long work; nothing under -q, for scripts, or off a tty.

    While numba compiles kernels (a first run) the bar says so and another process compiles the
    rest; the ETA shows once a rate is known, measured after any compile stage."""
    if not enabled or quiet() or not sys.stderr.isatty():
        with compiling(lambda: _compile_in_background(label), lambda: None):
            yield None
        return
    eta = Eta(total, time.monotonic())
    lock = threading.Lock()  # compile events come from the worker threads
    bar: ProgressBar[int]
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=False,
                           item_show_func=lambda _: eta.text(time.monotonic())) as bar:
        compiled = [False]  # a compile stage ended: the label goes back with the next step

        def start() -> None:
            _compile_in_background(label)
            with lock:
                compiled[0] = False
                bar.label = COMPILING
                bar.render_progress()

        def end() -> None:
            with lock:
                compiled[0] = True

        def update(n: int) -> None:
            with lock:
                eta.pos += n
                if compiled[0]:  # the chunks that waited for the compile say nothing of the rate
                    compiled[0] = False
                    bar.label = label
                    eta.restart(time.monotonic())
                bar.update(n)

        with compiling(start, end):
            yield update


def emit(as_json: bool, data: dict[str, Any], text: str, *, summary: bool = False) -> None:
    """Print a command's result; a ``summary`` (of work done, not an answer asked for) is left
    out under -q. JSON is printed either way: a script asked for it."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not (summary and quiet()):
        click.echo(text)


def warn(text: str) -> None:
    if not quiet():
        click.echo(f"elves: warning: {text}", err=True)


def emit_restored(as_json: bool, source: str, r: RestoreSummary, seconds: float) -> None:
    """The report of a restore (from an archive or a store): where it went, how much, how fast."""
    emit(as_json, {"ok": True, "output": str(r.output), "files": r.files, "bytes": r.bytes_written,
                   "seconds": round(seconds, 3)},
         f"{source} -> {r.output}: {r.files} files, {human(r.bytes_written)}, "
         f"{r.bytes_written / max(seconds, 1e-9) / 1e6:.0f} MB/s", summary=True)


def _debug() -> bool:
    """Whether ``elves --debug`` was given: errors then show their traceback too."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def quiet() -> bool:
    """Whether -q was given, to ``elves`` or to the command (contexts share ``meta``)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_QUIET))


def _error(text: str, kind: str, code: int, as_json: bool) -> None:
    """One error, the one shape for every error: a line, or under --json an object, on stderr."""
    if as_json:
        click.echo(json.dumps({"ok": False, "error": text, "kind": kind, "exit_code": code}), err=True)
    else:
        click.echo(f"elves: error: {text}", err=True)


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
    _error(text, kind, code, as_json)
    sys.exit(code)


@contextmanager
def reported(as_json: bool) -> Iterator[None]:
    """Turn any error into a one-line message and its exit code: users never see a traceback."""
    try:
        yield
    except click.ClickException:  # a usage error: click (ElvesGroup under --json) reports it
        raise
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


class ElvesGroup(click.Group):
    """The ``elves`` group: under --json, click's own errors (a usage error, a missing argument)
    become the JSON object every other error is, with the same exit code."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except click.ClickException as e:
            kind = UsageError.__name__ if isinstance(e, click.UsageError) else type(e).__name__
            _error(e.format_message(), kind, e.exit_code, True)
            sys.exit(e.exit_code)
        except click.Abort:
            _error("aborted", "Aborted", 1, True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # what click returns for --help and --version


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_QUIET] = True


quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                            help="No progress bar and no summary (errors are still printed; so is --json).")
threads_option = click.option("--threads", "-t", type=click.IntRange(min=1), default=None,
                              help="Worker threads (default: all cores).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
force_option = click.option("--force", "-f", is_flag=True, help="Overwrite the output if it exists.")
