"""``elves kernels compile`` (issue 14, a fast first run): the kernels compiled at install time,
into numba's cache, so that a first compress, restore and delta compile nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from elves.kernels import warm
from tests.conftest import tree_hashes, write_safetensors
from tests.test_startup import run_child
from tests.test_startup import test_cli_without_kernels_does_not_import_numba as check_no_numba


def elves(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from elves.cli.main import main; main()", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, Any]]:
    """An empty numba cache, then `elves kernels compile --json` into it (the one cold compile of
    this module): the environment that points at that cache, and the command's report."""
    folder = tmp_path_factory.mktemp("numba-cache")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(folder)}
    r = elves(env, "kernels", "compile", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return env, json.loads(r.stdout)


def test_compile_fills_the_cache_and_reports_it(compiled: tuple[dict[str, str], dict[str, Any]]) -> None:
    env, report = compiled
    folder = Path(env["NUMBA_CACHE_DIR"])
    assert set(report) == {"ok", "kernels", "compiled", "seconds", "cache"}
    assert report["ok"] is True and report["seconds"] > 0
    assert report["kernels"] >= len(warm.ENCODE) + len(warm.DECODE)
    assert report["compiled"] == report["kernels"]  # the cache was empty
    assert report["cache"] and all(Path(f).parent == folder for f in report["cache"])
    for f in report["cache"]:
        assert list(Path(f).glob("*.nbi")) and list(Path(f).glob("*.nbc"))
    again = elves(env, "kernels", "compile", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout) | {"seconds": 0} == report | {"compiled": 0, "seconds": 0}


def test_quiet_prints_nothing(compiled: tuple[dict[str, str], dict[str, Any]]) -> None:
    r = elves(compiled[0], "kernels", "compile", "-q")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def real_model(dataset: Any, path: Path, scale: float = 0.0) -> Path:
    """A model folder of real tensors: minilm's (F32, and its I64 position ids) and astra's (BF16),
    about 2.5 MB, and an F16 copy of the F32 ones (coded against their cast); ``scale`` > 0 makes
    a fine-tune of it (small updates of half the elements)."""
    rng = np.random.default_rng(5)
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for name, budget in (("minilm", 1_500_000), ("astra-st", 1_000_000)):
        src = next(dataset(name).glob("*.safetensors"))
        raw = src.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        for key, v in sorted(header.items()):
            lo, hi = v["data_offsets"]
            if v["dtype"] in ("F32", "BF16", "I64") and hi - lo <= budget:
                budget -= hi - lo
                data = raw[8 + n + lo:8 + n + hi]
                if scale and v["dtype"] == "F32":
                    a = np.frombuffer(data, dtype=np.float32)
                    step = (rng.standard_normal(a.size) * scale * np.abs(a)).astype(np.float32)
                    step[rng.random(a.size) < 0.5] = 0
                    data = (a + step).tobytes()
                tensors[f"{name}.{key}"] = (v["dtype"], v["shape"], data)
    assert {dt for dt, _, _ in tensors.values()} == {"F32", "BF16", "I64"}
    path.mkdir()
    write_safetensors(path / "model.safetensors", tensors)
    write_safetensors(path / "model.fp16.safetensors", {
        key: ("F16", shape, np.frombuffer(data, dtype=np.float32).astype(np.float16).tobytes())
        for key, (dt, shape, data) in tensors.items() if dt == "F32"})
    (path / "config.json").write_text('{"model_type": "bert"}')
    return path


def test_a_first_compress_restore_and_delta_compile_nothing(
        compiled: tuple[dict[str, str], dict[str, Any]], dataset: Any, tmp_path: Path) -> None:
    base = real_model(dataset, tmp_path / "base")
    ft = real_model(dataset, tmp_path / "ft", scale=1e-3)
    code = f"""
        import json
        from pathlib import Path
        import elves
        from elves.jit import compiling

        tmp, base, ft = Path({str(tmp_path)!r}), Path({str(base)!r}), Path({str(ft)!r})
        compiles = []
        with compiling(lambda: compiles.append(1), lambda: None):
            elves.compress(base, tmp / "base.elves", threads=2)
            elves.restore(tmp / "base.elves", tmp / "out-base")
            elves.compress(ft, tmp / "ft.elves", base=base, threads=2)
            elves.restore(tmp / "ft.elves", tmp / "out-ft", base=base)
        print(json.dumps({{"compiles": len(compiles), "codecs": list(elves.info(tmp / "ft.elves").codecs),
                          "casts": elves.info(tmp / "base.elves").ref_streams}}))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=compiled[0], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    assert any("xor" in c for c in seen["codecs"]), seen  # the delta ran BitX's kernels
    assert seen["casts"] > 0  # the F16 copy was coded against the cast of the F32 tensors
    assert seen["compiles"] == 0
    assert tree_hashes(tmp_path / "out-base") == tree_hashes(base)
    assert tree_hashes(tmp_path / "out-ft") == tree_hashes(ft)


@pytest.mark.parametrize("args", [["kernels", "--help"], ["kernels", "compile", "--help"]])
def test_kernels_help_does_not_import_numba(args: list[str]) -> None:
    check_no_numba(args)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (not ours to wait for: a detached process's parent is init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_background_returns_at_once_and_the_detached_process_compiles(
        compiled: tuple[dict[str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(compiled[0]["NUMBA_CACHE_DIR"])
    gone = list(folder.rglob("pickle_scan.*"))  # one kernel's machine code, for the detached process to rebuild
    assert gone
    for p in gone:
        p.unlink()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(folder))
    out = run_child("""
        import sys
        from elves.cli.main import main
        sys.argv = ["elves", "kernels", "compile", "--background", "--json"]
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("numba imported:", any(m == "numba" or m.startswith("numba.") for m in sys.modules))
    """).splitlines()
    assert out[-1] == "numba imported: False"  # it compiled nothing itself
    report = json.loads("\n".join(out[:-1]))
    assert set(report) == {"ok", "background", "pid"} and report["ok"] and report["background"]
    deadline = time.monotonic() + 300
    while _running(report["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(report["pid"])
    assert sorted(p.name for p in folder.rglob("pickle_scan.*")) == sorted(p.name for p in gone)
