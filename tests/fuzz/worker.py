"""The fuzz worker: runs forged inputs through elves in a process of its own, under an
address-space and a file-size limit, and says how each operation ended.

It reads one JSON case per line on stdin and answers one JSON line on stdout per case. A crash
(a signal), a blown limit or a hang ends or stalls this process, never the test's: the harness
(tests/fuzz/harness.py) sees it, records the case, and starts a fresh worker.

Run as ``python -m tests.fuzz.worker ADDRESS_SPACE_BYTES FILE_SIZE_BYTES`` from the repo root.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
LIBRARY = tuple(str(REPO / d) + os.sep for d in ("elves", "bitx", "cli"))


def file_digests(root: Path) -> list[str]:
    """The sha256 of every file under ``root`` (or of ``root``), sorted: what restore produced,
    whatever the files are called (a forged path that stays inside the output is a valid archive
    of the same content, not a finding)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)


def tensor_digest(a: Any) -> list[Any]:
    a = np.ascontiguousarray(np.asarray(a))
    return [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]


def raising_frame(tb: Any) -> str:
    """file:line of the innermost frame in the library (elves/, bitx/, cli/), else the innermost."""
    frames = traceback.extract_tb(tb)
    inside = [f for f in frames if f.filename.startswith(LIBRARY)] or frames
    f = inside[-1]
    return f"{os.path.relpath(f.filename, REPO)}:{f.lineno}"


class Silent(Exception):
    """An operation finished but its result differs from the original's."""


def check_tensors(got: dict[str, list[Any]], want: dict[str, list[Any]]) -> None:
    """Every tensor read equals the original of the same name; a renamed one (a forged name is a
    valid archive of the same content) must equal some original tensor."""
    values = [tuple(map(str, v)) for v in want.values()]
    for key, d in got.items():
        if key in want:
            if d != want[key]:
                raise Silent(f"tensor {key!r}: got {d[:2]}, want {want[key][:2]} (or other bytes)")
        elif tuple(map(str, d)) not in values:
            raise Silent(f"tensor {key!r} (not in the original) matches no original tensor: {d[:2]}")


def run_archive(case: dict[str, Any], out: Path) -> dict[str, Callable[[], None]]:
    import elves

    path, expect = case["input"], case["expect"]
    base = {"base": case["base"]} if case.get("base") else {}

    def restore() -> None:
        elves.restore(path, out / "restored", threads=2, **base)
        got = file_digests(out / "restored")
        if got != expect["files"]:
            raise Silent(f"restored files differ: {len(got)} files, want {len(expect['files'])}")

    def verify() -> None:
        rep = elves.verify(path, threads=2, **base)
        if rep.ok and case.get("restore_differs"):
            raise Silent("verify says ok, but restore wrote other bytes")

    def info() -> None:
        elves.info(path)

    def get_tensor() -> None:
        with elves.open(path, threads=2, **base) as a:
            check_tensors({k: tensor_digest(a.get_tensor(k)) for k in a.keys()}, expect["tensors"])

    def load_file() -> None:
        check_tensors({k: tensor_digest(v) for k, v in elves.load_file(path, threads=2, **base).items()},
                      expect["tensors"])

    return {"restore": restore, "verify": verify, "info": info, "get_tensor": get_tensor, "load_file": load_file}


def run_store(case: dict[str, Any], out: Path) -> dict[str, Callable[[], None]]:
    from elves.store import Store

    def restore(name: str, want: list[str]) -> Callable[[], None]:
        def op() -> None:
            dst = out / f"store-{len(list(out.iterdir()))}"
            Store(case["input"]).restore(name, dst, threads=2)
            if file_digests(dst) != want:
                raise Silent(f"store restore of {name!r} wrote other bytes")
        return op

    return {f"store_restore[{n}]": restore(n, want) for n, want in case["expect"]["models"].items()}


def run_input(case: dict[str, Any], out: Path) -> dict[str, Callable[[], None]]:
    """A forged model file: compress must refuse it cleanly or keep it byte for byte."""
    import elves

    def roundtrip() -> None:
        elves.compress(case["input"], out / "m.elves", threads=2)
        elves.restore(out / "m.elves", out / "restored", threads=2)
        if file_digests(out / "restored") != file_digests(Path(case["input"])):
            raise Silent("compress + restore of the forged input changed its bytes")

    return {"compress_restore": roundtrip}


RUNNERS = {"archive": run_archive, "store": run_store, "input": run_input}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Each operation's outcome: "ok" (output identical), "clean" (an ElvesError naming the file),
    or a failure with where it was raised."""
    from elves.errors import ElvesError

    out = Path(case["workdir"]) / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results = {}
    ops = RUNNERS[case["kind"]](case, out)
    for name in ops:
        try:
            ops[name]()
            results[name] = {"outcome": "ok"}
            continue
        except ElvesError as e:
            if case["names"] and not any(n in str(e) for n in case["names"]):
                results[name] = {"outcome": "fail", "why": "error does not name the file", "type": type(e).__name__,
                                 "where": raising_frame(e.__traceback__), "message": str(e)[:300]}
            else:
                results[name] = {"outcome": "clean", "type": type(e).__name__}
        except Silent as e:
            results[name] = {"outcome": "fail", "why": "silent difference", "type": "Silent", "where": "-",
                             "message": str(e)[:300]}
        except MemoryError as e:
            results[name] = {"outcome": "fail", "why": "blown memory limit", "type": "MemoryError",
                             "where": raising_frame(e.__traceback__), "message": str(e)[:300]}
        except Exception as e:  # noqa: BLE001 (any other type is exactly what the fuzzer reports)
            why = "blown file-size limit" if isinstance(e, OSError) and e.errno == errno.EFBIG else "raw exception"
            results[name] = {"outcome": "fail", "why": why, "type": type(e).__name__,
                             "where": raising_frame(e.__traceback__), "message": str(e)[:300]}
        if name == "restore" and results[name].get("why") == "silent difference":
            case["restore_differs"] = True
    shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    address_space, file_size = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead
    import elves  # noqa: F401 (imported once, before the first case's clock starts)

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run_case(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
