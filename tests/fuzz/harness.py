"""Drives the fuzz worker: forges a case from a seed, sends it to the worker process, and turns a
crash, a hang or a wrong answer into a failure with its reproducer.

One worker serves many cases (importing elves and warming numba costs seconds); a case that kills
it (a signal, a blown address-space limit) or outlives its time limit is recorded and a fresh
worker is started for the next.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import forge
from .corpus import Seed
from .worker import REPO

ADDRESS_SPACE = 4 << 30
FILE_SIZE = 256 << 20
CASE_SECONDS = 30.0
START_SECONDS = 180.0


class Worker:
    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fuzz.worker", str(ADDRESS_SPACE), str(FILE_SIZE)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        self.buf = b""
        if self._readline(START_SECONDS) is None:
            raise RuntimeError(f"the fuzz worker did not start: see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _readline(self, timeout: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            more = os.read(fd, 1 << 16)
            if not more:
                return None
            self.buf += more
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        """The worker's per-operation results, or a single failure for a crash or a hang."""
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(case).encode() + b"\n")
            self.proc.stdin.flush()
            line = self._readline(CASE_SECONDS)
        except BrokenPipeError:
            line = None
        if line is not None:
            return json.loads(line)
        code = self.proc.poll()
        self.stop()
        if code is None:
            why = f"blown time limit ({CASE_SECONDS:.0f} s)"
        else:
            why = f"worker died: {_signal_name(code)}"
        return {"*": {"outcome": "fail", "why": why, "type": "crash", "where": "-", "message": self._tail()}}

    def _tail(self) -> str:
        try:
            return self.log.read_bytes()[-600:].decode(errors="replace")
        except OSError:
            return ""


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        return signal.Signals(-code).name
    return f"exit status {code}"


@dataclass
class Failure:
    seed: str
    mutations: list[dict[str, Any]]
    op: str
    why: str
    type: str
    where: str
    message: str

    def key(self) -> tuple[str, str, str]:
        return (self.where, self.type, self.why)

    def reproducer(self) -> str:
        return f"seed {self.seed!r}, op {self.op}: {json.dumps(self.mutations)}"


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, limit: int = 100) -> str:
        groups: dict[tuple[str, str, str], list[Failure]] = {}
        for f in self.failures:
            groups.setdefault(f.key(), []).append(f)
        lines = [f"{self.cases} cases in {self.seconds:.0f} s ({1000 * self.seconds / max(self.cases, 1):.0f} ms "
                 f"each); operation outcomes {dict(self.outcomes)}; {len(self.failures)} failing operations "
                 f"at {len(groups)} places"]
        for (where, typ, why), fs in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:limit]:
            f = fs[0]
            lines.append(f"- {where} {typ} ({why}) x{len(fs)}: {f.message[:160]!r}\n    reproducer: {f.reproducer()}")
        return "\n".join(lines)


class Fuzzer:
    """Runs cases against seeds in ``root`` (a scratch folder) through one worker at a time."""

    def __init__(self, seeds: list[Seed], root: Path):
        self.seeds = {s.name: s for s in seeds}
        self.root = root
        self.worker = Worker(root / "worker.log")
        self.report = Report()

    def case(self, seed_name: str, muts: list[tuple], refuse: bool = False) -> None:
        """Forge ``seed`` with ``muts`` (none: the seed as it is, which must come back intact unless
        ``refuse``), run it, record the outcome."""
        seed = self.seeds[seed_name]
        work = self.root / "case"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        path = work / seed.path.name
        (shutil.copytree if seed.path.is_dir() else shutil.copyfile)(seed.path, path)
        started = time.monotonic()
        descs = forge.forge(seed.kind, path, muts) if muts else []
        case = {"kind": seed.kind, "input": str(path), "base": str(seed.base) if seed.base else None,
                "expect": seed.expect, "workdir": str(work),
                "names": [str(work)] + ([str(seed.base)] if seed.base else [])}
        results = self.worker.run(case)
        self.report.seconds += time.monotonic() - started
        self.report.cases += 1
        for op, r in results.items():
            self.report.outcomes[r["outcome"]] += 1
            unforged_refused = not muts and r["outcome"] == "clean" and not refuse
            if r["outcome"] == "fail" or unforged_refused or (refuse and r["outcome"] == "ok"):
                why = r.get("why", "an unforged seed was refused" if unforged_refused else "accepted a bomb")
                self.report.failures.append(Failure(seed.name, descs, op, why, r.get("type", "-"),
                                                    r.get("where", "-"), r.get("message", "")))

    def close(self) -> None:
        self.worker.stop()
