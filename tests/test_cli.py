"""The installed ``elves`` command, run as a user would: output, --json, exit codes, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tree_hashes, write_safetensors

from .test_codecs import weights_like


def elves(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from elves.cli.main import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    rng = np.random.default_rng(3)
    write_safetensors(src / "model.safetensors", {
        "w": ("BF16", (256, 300), weights_like("BF16", 256 * 300, rng).tobytes()),
        "b": ("F32", (300,), weights_like("F32", 300, rng).tobytes()),
    })
    (src / "config.json").write_text('{"hidden_size": 300}')
    return src


def test_help_shows_examples_and_exit_codes() -> None:
    r = elves("--help")
    assert r.returncode == 0
    assert "elves compress ./all-MiniLM-L6-v2 -o minilm.elves" in r.stdout and "Exit codes" in r.stdout
    for cmd in ["compress", "restore", "info", "verify"]:
        sub = elves(cmd, "--help")
        assert sub.returncode == 0 and "Example" in sub.stdout, cmd


def test_help_lists_every_exit_code_of_the_error_classes() -> None:
    """The table in every help is built from the error classes; each class's code is in it."""
    from elves import errors

    table = errors.exit_codes()
    classes, pending = [], [errors.ElvesError]
    while pending:
        classes.append(pending.pop())
        pending += classes[-1].__subclasses__()
    assert {cls.exit_code for cls in classes} == set(table)
    assert table[5] == ["output exists", "output cannot be written"]
    for args in [("--help",), ("store", "--help"), ("verify", "--help"), ("store", "add", "--help")]:
        text = elves(*args).stdout
        rows = text[text.index("Exit codes:"):].splitlines()[1:]
        assert [r.split(maxsplit=1)[0] for r in rows[:len(table) + 1]] == ["0", *map(str, table)], args
        assert f"{errors.BaseMismatchError.exit_code}  base model missing" in text, args


def test_every_error_class_lives_in_errors() -> None:
    """Every ElvesError subclass that elves defines, the CLI's and the GPU loader's included, is
    one of elves.errors."""
    code = ("import elves, elves.gpu, elves.store, elves.cli.main, elves.errors as E\n"
            "seen, todo = [], [E.ElvesError]\n"
            "while todo:\n"
            "    seen.append(todo.pop()); todo += seen[-1].__subclasses__()\n"
            "print(sorted({c.__module__ for c in seen}), set(seen) == {v for v in vars(E).values()\n"
            "      if isinstance(v, type) and issubclass(v, E.ElvesError)})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["['elves.errors']", "True"]


def test_the_store_commands_import_without_the_main_command() -> None:
    """cli/store.py and cli/main.py share cli/_common.py; neither imports the other back."""
    code = "import sys, elves.cli.store; print('elves.cli.main' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_full_cycle_with_json(model: Path, tmp_path: Path) -> None:
    archive = tmp_path / "m.elves"
    r = elves("compress", model, "-o", archive, "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["ok"] and c["files"] == 2 and c["tensors"] == 2 and c["ratio"] > 1.2

    i = json.loads(elves("info", archive, "--json").stdout)
    assert i["lossy"] is False and i["by_dtype"]["BF16"]["original_bytes"] == 256 * 300 * 2
    assert {f["path"] for f in i["files"]} == {"model.safetensors", "config.json"}

    v = elves("verify", archive, "--against", model, "--json")
    assert v.returncode == 0 and json.loads(v.stdout)["ok"]

    out = tmp_path / "restored"
    r = elves("restore", archive, "-o", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["files"] == 2
    assert tree_hashes(out) == tree_hashes(model)

    text = elves("info", archive)
    assert "lossless" in text.stdout and "BF16" in text.stdout


def test_exit_codes_and_no_tracebacks(model: Path, tmp_path: Path) -> None:
    archive = tmp_path / "m.elves"
    assert elves("compress", model, "-o", archive).returncode == 0

    r = elves("compress", model, "-o", archive)                  # output exists
    assert r.returncode == 5 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert elves("compress", model, "-o", archive, "--force").returncode == 0

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    r = elves("compress", bad, "-o", tmp_path / "x.elves")         # bad input model
    assert r.returncode == 3 and str(bad) in r.stderr and "Traceback" not in r.stderr

    data = bytearray(archive.read_bytes())
    data[5000] ^= 0xFF
    damaged = tmp_path / "damaged.elves"
    damaged.write_bytes(bytes(data))
    r = elves("verify", damaged)                                   # damaged archive
    assert r.returncode == 4 and "FAILED" in r.stdout
    r = elves("restore", damaged, "-o", tmp_path / "out")
    assert r.returncode == 4 and "checksum" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()

    cut = tmp_path / "cut.elves"
    cut.write_bytes(bytes(data[:3000]))
    r = elves("info", cut, "--json")                               # errors under --json: on stderr
    report = json.loads(r.stderr)
    assert r.stdout == ""
    assert r.returncode == 4 and report.pop("error").startswith(str(cut))
    assert report == {"ok": False, "kind": "TruncatedArchiveError", "exit_code": 4}

    assert elves("restore", tmp_path / "missing.elves", "-o", tmp_path / "o").returncode == 2  # usage


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_the_command_starts_no_idle_blas_threads() -> None:
    """numpy's OpenBLAS starts a busy-waiting thread per further CPU when it loads, and elves
    gives it no work: the command's process keeps to its own threads, unless the user asked
    OpenBLAS for more."""
    import os

    code = ("import elves.cli, numpy, os; "
            "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS', 'unset'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["1", "1"]
    run = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                         capture_output=True, text=True, check=True)
    assert run.stdout.split()[1] == "2"
