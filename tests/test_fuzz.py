"""Structure-aware fuzzing: forged archives, store objects, manifests, safetensors and torch
checkpoints, their checksums recomputed, through restore, verify, info, get_tensor, load_file,
store restore and compress. Every operation must end in a clean ElvesError naming the file, or
give back exactly what the unforged input gives. Anything else (a signal, another exception type,
a silent difference, a blown memory, file-size or time limit) fails the test with a reproducer.

The case sequence is seeded (hypothesis, one fixed seed per batch), so a run is deterministic up
to its length: ELVES_FUZZ_SECONDS (default 150) bounds the time spent on cases.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz import corpus
from tests.fuzz.harness import Fuzzer

BUDGET = float(os.environ.get("ELVES_FUZZ_SECONDS", "150"))
BATCH = 25
# How often each kind of forgery is drawn: index fields most, then payloads, then the header.
TARGETS = ["index"] * 6 + ["payload"] * 4 + ["header"] * 2 + ["nest"]
UNFORGED_ONLY = {"zip_bomb"}  # inflating it takes seconds: run once, as it is, and it must be refused

mutation = st.tuples(st.sampled_from(TARGETS), st.integers(0, 1 << 20), st.integers(0, 63),
                     st.integers(0, 1 << 20), st.integers(0, 1 << 20))


def test_forged_inputs_are_refused_cleanly_or_read_exactly(tmp_path: Path) -> None:
    seeds = corpus.build(tmp_path / "seeds")
    fuzzer = Fuzzer(seeds, tmp_path)
    names = sorted(s.name for s in seeds if s.name not in UNFORGED_ONLY)
    try:
        for s in seeds:
            fuzzer.case(s.name, [], refuse=s.name in UNFORGED_ONLY)
        end = time.monotonic() + BUDGET
        batch = 0
        while time.monotonic() < end:
            @seed(batch)
            @settings(max_examples=BATCH, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(name=st.sampled_from(names), muts=st.lists(mutation, min_size=1, max_size=3))
            def run(name: str, muts: list[tuple]) -> None:
                if time.monotonic() < end:
                    fuzzer.case(name, muts)

            run()
            batch += 1
    finally:
        fuzzer.close()
    report = fuzzer.report
    print(report.summary())
    assert report.cases > len(seeds)
    assert not report.failures, report.summary()
