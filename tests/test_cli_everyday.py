"""The everyday commands and options (issue 16): ls, extract, stdin and stdout, -q, --json errors,
completion, --version and the help pages, through click's CliRunner and a real process."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.numpy import load_file

import elves
from elves.archive import FORMAT_VERSION
from elves.cli.main import main
from elves.store import STORE_VERSION
from tests.conftest import write_safetensors

from .test_codecs import weights_like

NOISE = os.urandom(3000)  # an opaque file nothing shrinks: stored as it is ("raw")


def run(*args: str | Path, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], input=stdin, prog_name="elves")


def process(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "elves.cli.main", *map(str, args)], input=stdin,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("everyday") / "model"
    (src / "extra").mkdir(parents=True)
    rng = np.random.default_rng(16)
    q = np.clip(rng.normal(0, 40, 64 * 32), -400, 400).astype(ml_dtypes.float8_e4m3fn)
    write_safetensors(src / "model.safetensors", {
        "encoder.layer.0.weight": ("BF16", (128, 96), weights_like("BF16", 128 * 96, rng).tobytes()),
        "encoder.layer.1.weight": ("BF16", (128, 96), weights_like("BF16", 128 * 96, rng).tobytes()),
        "encoder.layer.0.bias": ("F32", (96,), weights_like("F32", 96, rng).tobytes()),
        "head.q": ("F8_E4M3", (64, 32), q.tobytes()),
    })
    (src / "config.json").write_text('{"hidden_size": 96, "num_hidden_layers": 2}')
    (src / "extra" / "noise.bin").write_bytes(NOISE)
    return src


@pytest.fixture(scope="module")
def archive(model: Path) -> Path:
    out = model.parent / "model.elves"
    elves.compress(model, out, threads=2)
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in group.commands.items():
        found.append((*prefix, name))
        if isinstance(cmd, click.Group):
            found += commands(cmd, (*prefix, name))
    return found


def test_every_command_has_an_example_and_quiet() -> None:
    every = commands(main)
    assert {("ls",), ("extract",), ("completion",), ("store", "verify"), ("kernels", "compile")} <= set(every)
    for cmd in every:
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.stdout, cmd
        assert "Exit codes:" in r.stdout, cmd
        if not isinstance(main.get_command(None, cmd[0]), click.Group) or len(cmd) > 1:  # a group's commands take -q
            assert "-q, --quiet" in r.stdout, cmd
    top = run("--help").stdout
    assert "-q, --quiet" in top and "_ELVES_COMPLETE" in top and "elves completion bash" in top


def test_version_names_the_formats_it_reads_and_writes() -> None:
    r = run("--version")
    assert r.exit_code == 0
    major, minor = FORMAT_VERSION
    assert r.stdout.splitlines() == [
        f"elves {elves.__version__}",
        f"archive format: reads 1.0 to {major}.{minor}, writes the oldest that holds the archive "
        f"(1.3; 1.4 for casts, references and file formats 1.3 lacks; {major}.{minor} for small tensors "
        "packed together)",
        f"store format: reads and writes {STORE_VERSION[0]}.x ({STORE_VERSION[0]}.{STORE_VERSION[1]})",
    ]


def test_ls_lists_files_and_tensors_with_their_coding(archive: Path, model: Path) -> None:
    r = run("ls", archive, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    files = {f["path"]: f for f in data["files"]}
    assert set(files) == {"model.safetensors", "config.json", "extra/noise.bin"}
    assert files["extra/noise.bin"]["size"] == len(NOISE) and files["model.safetensors"]["tensors"] == 4
    assert sum(f["stored_bytes"] for f in data["files"]) < archive.stat().st_size
    tensors = {t["name"]: t for t in data["tensors"]}
    w = tensors["encoder.layer.0.weight"]
    assert (w["dtype"], w["shape"], w["nbytes"], w["file"]) == ("BF16", [128, 96], 128 * 96 * 2, "model.safetensors")
    assert w["codec"] != "raw" and w["ratio"] == round(w["nbytes"] / w["stored_bytes"], 4) and w["ratio"] > 1.1
    assert tensors["head.q"]["dtype"] == "F8_E4M3" and "reference" in w

    text = run("ls", archive).stdout
    assert "encoder.layer.1.weight" in text and "128x96" in text and w["codec"] in text and "F8_E4M3" in text

    only = json.loads(run("ls", archive, "encoder.layer.0.*", "--json").stdout)
    assert [t["name"] for t in only["tensors"]] == ["encoder.layer.0.weight", "encoder.layer.0.bias"]
    assert only["files"] == []
    files_only = json.loads(run("ls", archive, "--files", "--json", "*.json").stdout)
    assert [f["path"] for f in files_only["files"]] == ["config.json"] and "tensors" not in files_only


def test_ls_a_model_of_a_store(model: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub.store"
    assert run("store", "init", hub, "-q").stdout == ""
    assert run("store", "add", hub, model, "--name", "acme/tiny", "-q").exit_code == 0
    data = json.loads(run("ls", hub / "acme" / "tiny", "--json").stdout)
    assert {t["name"] for t in data["tensors"]} == {"encoder.layer.0.weight", "encoder.layer.1.weight",
                                                     "encoder.layer.0.bias", "head.q"}
    assert {f["path"] for f in data["files"]} == {"model.safetensors", "config.json", "extra/noise.bin"}
    r = run("ls", hub)
    assert r.exit_code == 2 and "is a store" in r.stderr
    r = run("ls", hub / "acme" / "nope", "--json")
    assert r.exit_code == 8 and json.loads(r.stderr)["kind"] == "StoreError"
    r = run("ls", tmp_path / "nowhere" / "model")
    assert r.exit_code == 2 and "neither an archive nor STORE/MODEL" in r.stderr


def test_extract_files_decodes_only_them(archive: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("extract", archive, "config.json", "extra/noise.bin", "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["config.json", "extra/noise.bin"]
    assert (out / "extra" / "noise.bin").read_bytes() == NOISE
    r = run("extract", archive, "config.json", "-o", out)
    assert r.exit_code == 5 and "already exists" in r.stderr
    assert run("extract", archive, "config.json", "-o", out, "--force", "-q").stdout == ""
    r = run("extract", archive, "missing.txt", "-o", out, "--json")
    assert r.exit_code == 2 and json.loads(r.stderr)["kind"] == "UsageError"


def test_extract_one_tensor_as_npy_or_safetensors(archive: Path, model: Path, tmp_path: Path) -> None:
    with safe_open(model / "model.safetensors", framework="numpy") as f:
        bias = f.get_tensor("encoder.layer.0.bias")
    assert run("extract", archive, "--tensor", "encoder.layer.0.bias", "-o", tmp_path / "b.npy").exit_code == 0
    assert same(np.load(tmp_path / "b.npy"), bias)     # bit for bit: the weights hold NaNs
    assert run("extract", archive, "--tensor", "encoder.layer.0.bias", "-o", tmp_path / "b.safetensors").exit_code == 0
    assert same(load_file(tmp_path / "b.safetensors")["encoder.layer.0.bias"], bias)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "b.npy").stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary name's 0600

    with elves.open(archive) as a:
        q = a.get_tensor("head.q")
        w = a.get_tensor("encoder.layer.1.weight")
    for name, want, dtype in [("head.q", q, "F8_E4M3"), ("encoder.layer.1.weight", w, "BF16")]:
        dst = tmp_path / f"{name}.safetensors"
        assert run("extract", archive, "--tensor", name, "-o", dst).exit_code == 0
        with safe_open(dst, framework="numpy") as f:    # the safetensors library reads it back
            s = f.get_slice(name)
            assert (s.get_dtype(), s.get_shape()) == (dtype, list(want.shape))
        raw = dst.read_bytes()
        assert raw[8 + int.from_bytes(raw[:8], "little"):] == want.tobytes()

    r = run("extract", archive, "--tensor", "encoder.layer.1.weight", "-o", tmp_path / "w.npy")
    assert r.exit_code == 0 and ".npy has no BF16" in r.stderr
    assert same(np.load(tmp_path / "w.npy").view(ml_dtypes.bfloat16), w)

    for args, words in [(["--tensor", "nope", "-o", tmp_path / "n.npy"], "no tensor 'nope'"),
                        (["--tensor", "head.q", "-o", tmp_path / "q.txt"], ".npy or .safetensors"),
                        (["-o", tmp_path / "x"], "not both and not neither"),
                        (["config.json", "--tensor", "head.q", "-o", tmp_path / "x"], "not both")]:
        r = run("extract", archive, *args)
        assert r.exit_code == 2 and words in r.stderr, (args, r.output)
    r = run("extract", archive, "--tensor", "head.q", "-o", tmp_path / "b.npy")
    assert r.exit_code == 5 and not (tmp_path / "q.txt").exists()


def test_json_errors_usage_errors_included_are_one_object_on_stderr(archive: Path, model: Path,
                                                                   tmp_path: Path) -> None:
    cases = [
        (["info", tmp_path / "missing.elves", "--json"], 2, "UsageError", "does not exist"),
        (["info", "--json", "--bogus"], 2, "UsageError", "No such option"),
        (["compress", archive, "-o", tmp_path / "x.elves", "--lossy", "elf", "--json"], 2, "UsageError",
         "needs --error-bound"),
        (["compress", archive, "-o", tmp_path / "x.elves", "--error-bound", "oops", "--json"], 2, "UsageError",
         "is not a number"),
        (["compress", model, "-o", archive, "--json"], 5, "OutputExistsError", "already exists"),
        (["restore", archive, "-o", "-", "--json"], 2, "UsageError", "would share standard output"),
    ]
    for args, code, kind, words in cases:
        r = run(*args)
        report = json.loads(r.stderr)
        assert (r.exit_code, r.stdout) == (code, ""), args
        assert set(report) == {"ok", "error", "kind", "exit_code"} and report["ok"] is False, args
        assert (report["exit_code"], words in report["error"]) == (code, True), (args, report)
        assert report["kind"] == kind, (args, report)
    r = run("info", tmp_path / "missing.elves")                     # without --json: click's usage text
    assert r.exit_code == 2 and "Usage:" in r.stderr


def test_quiet_prints_nothing_but_errors(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.elves"
    for args in [("compress", model, "-o", out, "-q"), ("-q", "verify", out), ("restore", out, "-o", tmp_path / "r", "-q"),
                 ("-q", "extract", out, "config.json", "-o", tmp_path / "e")]:
        r = run(*args)
        assert (r.exit_code, r.output) == (0, ""), args
    r = run("compress", model, "-o", out, "-q")
    assert r.exit_code == 5 and "already exists" in r.stderr
    assert "encoder.layer.0.weight" in run("ls", out, "-q").stdout          # an answer, not a summary
    assert json.loads(run("compress", model, "-o", out, "-q", "--force", "--json").stdout)["ok"]


def test_info_names_every_codec_raw_included(archive: Path) -> None:
    codecs = json.loads(run("info", archive, "--json").stdout)["codecs"]
    assert "raw" in codecs and "" not in codecs
    assert "raw x" in run("info", archive).stdout


def test_nothing_to_compress_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "hollow" / "a" / "b").mkdir(parents=True)
    (tmp_path / "links").mkdir()
    (tmp_path / "elsewhere.bin").write_bytes(b"x" * 100)
    (tmp_path / "links" / "w.bin").symlink_to(tmp_path / "elsewhere.bin")
    for name, words in [("empty", "holds no files to compress"), ("hollow", "holds no files to compress"),
                        ("links", "points outside the model folder")]:
        r = run("compress", tmp_path / name, "-o", tmp_path / f"{name}.elves")
        assert r.exit_code == 3 and words in r.stderr, (name, r.output)
        assert not (tmp_path / f"{name}.elves").exists()


def test_completion_scripts_and_click_completion() -> None:
    for shell, words in [("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete --no-files")]:
        r = run("completion", shell)
        assert r.exit_code == 0 and "_ELVES_COMPLETE" in r.stdout and words in r.stdout, shell
    r = CliRunner().invoke(main, [], prog_name="elves",
                           env={"_ELVES_COMPLETE": "bash_complete", "COMP_WORDS": "elves ex", "COMP_CWORD": "1"})
    assert r.exit_code == 0 and "plain,extract" in r.stdout.split()


def test_stdin_and_stdout_through_a_process(model: Path, tmp_path: Path) -> None:
    data = (model / "model.safetensors").read_bytes()
    out = tmp_path / "piped.elves"
    r = process("compress", "-", "--name", "model.safetensors", "-o", out, "-q", stdin=data)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert [p.name for p in tmp_path.iterdir()] == ["piped.elves"]      # the temporary copy is gone
    listed = json.loads(process("ls", out, "--json").stdout)
    assert [f["path"] for f in listed["files"]] == ["model.safetensors"] and len(listed["tensors"]) == 4

    r = process("restore", out, "-o", "-")
    assert r.returncode == 0 and hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()

    r = process("compress", "-", "-o", tmp_path / "named.elves", "--json", stdin=b"plain text\n")
    assert r.returncode == 0 and json.loads(r.stdout)["files"] == 1
    assert process("restore", tmp_path / "named.elves", "-o", "-").stdout == b"plain text\n"
    assert elves.open(tmp_path / "named.elves").files()[0].path == "stdin"

    folder = tmp_path / "folder.elves"
    assert process("compress", model, "-o", folder, "-q").returncode == 0
    r = process("restore", folder, "-o", "-")
    assert r.returncode == 2 and r.stdout == b"" and b"is of a folder (3 files)" in r.stderr
    one = tmp_path / "one-file-folder"
    one.mkdir()
    (one / "notes.txt").write_bytes(b"a folder of one file is still a folder\n")
    assert process("compress", one, "-o", tmp_path / "one.elves", "-q").returncode == 0
    r = process("restore", tmp_path / "one.elves", "-o", "-")
    assert r.returncode == 2 and r.stdout == b"" and b"is of a folder (1 file)" in r.stderr


def test_ls_and_extract_through_a_process(archive: Path, tmp_path: Path) -> None:
    r = process("ls", archive, "*.bias")
    assert r.returncode == 0 and b"encoder.layer.0.bias" in r.stdout and b"layer.0.weight" not in r.stdout
    r = process("extract", archive, "extra/noise.bin", "-o", tmp_path)
    assert r.returncode == 0 and (tmp_path / "extra" / "noise.bin").read_bytes() == NOISE


def test_an_executable_keeps_its_mode_bits_and_other_files_follow_the_umask(tmp_path: Path) -> None:
    """A script shipped with a model (an exec bit) comes back executable, from an archive and from
    a store; everything else gets what the umask gives a new file. Archives of models without such
    a file record no mode (and stay format 1.3)."""
    from elves.archive import ArchiveReader
    from elves.store import Store

    src = tmp_path / "src"
    src.mkdir()
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "notes.txt").write_text("plain\n")
    (src / "notes.txt").chmod(0o600)
    umask = os.umask(0o027)
    try:
        s = elves.compress(src, tmp_path / "m.elves")
        with ArchiveReader(s.archive) as r:
            assert {f.path: f.mode for f in r.files} == {"run.sh": 0o750, "notes.txt": None}
            assert r.version == (1, 4)
        out = elves.restore(s.archive, tmp_path / "out").output
        store = Store.init(tmp_path / "s")
        store.add(src, "m")
        stored = store.restore("m", tmp_path / "from-store").output
        with elves.open(s.archive) as a:
            a.extract(["run.sh"], tmp_path / "some")
        for folder in (out, stored, tmp_path / "some"):
            assert (folder / "run.sh").stat().st_mode & 0o777 == 0o750 & ~0o027
        for folder in (out, stored):
            assert (folder / "notes.txt").stat().st_mode & 0o777 == 0o666 & ~0o027
    finally:
        os.umask(umask)
    (src / "run.sh").chmod(0o640)
    with ArchiveReader(elves.compress(src, tmp_path / "n.elves").archive) as r:
        assert r.version == (1, 3) and all(f.mode is None for f in r.files)
