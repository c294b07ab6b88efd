"""``elves kernels``: elves' numba kernels compiled ahead of a first run (at install time).

A command compiles the kernels it needs the first time it needs them, seconds of CPU that a new
user waits for; ``elves kernels compile`` pays that once, where a container image is built or
after an upgrade, and the machine code waits in numba's cache for every later command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ._common import EPILOG, Eta, emit, epilog, json_option, quiet, quiet_option, reported

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

WHERE = ("numba keeps the machine code in the first of these folders that it can write to: "
         "$NUMBA_CACHE_DIR, the __pycache__ folders beside elves' modules, ~/.cache/numba; every later "
         "command looks there by the same rule. In an image, compile as the user who runs elves, or give "
         "both a NUMBA_CACHE_DIR that user can write to. An upgrade of elves or numba compiles again.")


@click.group(epilog=EPILOG)
def kernels() -> None:
    """elves' numba kernels: build their machine code ahead of a first run.

    \b
    Examples:
      elves kernels compile                 # once, after pip install or an upgrade
      elves kernels compile --background    # the same, in a detached process
    """


def _kernels(everything: bool) -> list[Any]:
    """What a lossless compress, restore or store command can run (the planes and rANS codecs,
    the torch checkpoint scanner, the ONNX walk, BitX deltas, precision casts), and with
    ``everything`` the ELF lossy codec's."""
    import bitx.kernels
    from elves.kernels import casts, elf, onnx_walk, warm
    from elves.readers.torch import pickle_scan

    found = [*warm.ENCODE, *warm.DECODE, *warm.entry_points(pickle_scan), *warm.entry_points(onnx_walk),
             *warm.entry_points(bitx.kernels), *warm.entry_points(casts)]
    return found + warm.entry_points(elf) if everything else found


def _compile(found: list[Any], show: bool) -> int:
    """Compile (or load from numba's cache) each kernel of ``found``, in order; how many of them
    numba compiled, whether on their own or as the callee of another."""
    from numba.core import event

    from elves.jit import warm

    built: set[Any] = set()  # the Python functions of the kernels numba compiled

    class Compiled(event.Listener):
        def on_start(self, ev: Any) -> None:
            built.add(ev.data["dispatcher"].py_func)

        def on_end(self, ev: Any) -> None:
            pass

    eta = Eta(len(found), time.monotonic())
    bar: ProgressBar[Any]
    with event.install_listener("numba:compile", Compiled()), click.progressbar(
            found, label="compiling kernels", file=sys.stderr, show_eta=False, show_pos=True, hidden=not show,
            item_show_func=lambda fn: fn and "  ".join(filter(None, [fn.__name__, eta.text(time.monotonic())]))
    ) as bar:
        for fn in bar:
            warm(fn)
            eta.pos += 1
    return sum(fn.py_func in built for fn in found)


def _this_command(everything: bool, *flags: str) -> list[str]:
    """``elves kernels compile`` run as another process, with ``flags`` (and ``--all``)."""
    return [sys.executable, "-m", "elves.cli.main", "kernels", "compile", *flags, *(["--all"] * everything)]


def _second_process(everything: bool) -> subprocess.Popen[str] | None:
    """Another process that compiles the same kernels from the other end of the list, on another
    core: each kernel is built under a lock file (elves/jit.py), so the two never compile one
    twice, and the one that finds a kernel taken waits for it and loads it from the cache. Its
    report (``--json``) says how many it compiled."""
    if (os.cpu_count() or 1) < 2:
        return None
    return subprocess.Popen(_this_command(everything, "--json", "--from-end", "--alone"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _compiled_by(other: subprocess.Popen[str]) -> int:
    """How many kernels the second process compiled; 0 if it failed (this process then built or
    loaded every kernel itself, so the cache is whole either way)."""
    out, _ = other.communicate()
    try:
        return int(json.loads(out)["compiled"]) if other.returncode == 0 else 0
    except (ValueError, KeyError, TypeError):
        return 0


@kernels.command("compile", epilog=epilog(WHERE))
@click.option("--all", "everything", is_flag=True,
              help="Also the kernels of --lossy elf (about two minutes of CPU more).")
@click.option("--background", is_flag=True,
              help="Compile in a detached process and return at once.")
@click.option("--from-end", "from_end", is_flag=True, hidden=True,
              help="Walk the kernels from the last (the second process of a compile).")
@click.option("--alone", is_flag=True, hidden=True, help="Start no second process.")
@json_option
@quiet_option
def compile_kernels(everything: bool, background: bool, from_end: bool, alone: bool, as_json: bool) -> None:
    """Compile the kernels that compress, restore and the store run, into numba's cache.

    Without it the first command after an install or an upgrade compiles the kernels it needs
    (seconds of CPU, "compiling kernels (first run only)"); run it where an image is built, or
    after pip install. Kernels already in the cache are loaded, not compiled again; a command
    that needs a kernel this is compiling waits for it instead of compiling it too. With two
    cores or more, a second process compiles the list from its other end.

    \b
    Examples:
      elves kernels compile
      elves kernels compile --all --json
      pip install -U elves && elves kernels compile --background
      NUMBA_CACHE_DIR=/opt/numba elves kernels compile   # an image: set it where elves runs too
    """
    with reported(as_json):
        if background:
            proc = subprocess.Popen(_this_command(everything, "-q"), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            emit(as_json, {"ok": True, "background": True, "pid": proc.pid},
                 f"compiling kernels in the background (process {proc.pid})", summary=True)
            return
        from elves.kernels.warm import cache_folder

        t0 = time.perf_counter()
        found = _kernels(everything)
        other = None if alone else _second_process(everything)
        try:
            compiled = _compile(found[::-1] if from_end else found,
                                not as_json and not quiet() and sys.stderr.isatty())
        except BaseException:
            if other is not None:
                other.kill()
                other.wait()
            raise
        if other is not None:
            compiled += _compiled_by(other)
        seconds = time.perf_counter() - t0
        folders = sorted({cache_folder(fn) for fn in found})
        emit(as_json, {"ok": True, "kernels": len(found), "compiled": compiled, "seconds": round(seconds, 3),
                       "cache": folders},
             f"{len(found)} kernels ready ({compiled} compiled, {len(found) - compiled} from the cache) in "
             f"{seconds:.1f} s; numba's cache:" + "".join(f"\n  {f}" for f in folders), summary=True)
