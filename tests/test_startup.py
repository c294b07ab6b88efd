"""A fast first run (issue 14): commands that run no kernel never import numba, kernels compile
for their declared signatures only, and a progress bar shows no ETA until it knows a rate."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
from elves.cli._common import Eta

from elves.jit import compiling, intrinsic, kernel
from elves.kernels import warm


def run_child(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["compress", "--help"], ["store", "--help"]])
def test_cli_without_kernels_does_not_import_numba(args: list[str]) -> None:
    out = run_child(f"""
        import sys
        from elves.cli.main import main
        sys.argv = ["elves", *{args!r}]
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print("numba imported:", any(m == "numba" or m.startswith("numba.") for m in sys.modules))
    """)
    assert out.splitlines()[-1] == "numba imported: False"


def test_importing_the_kernels_does_not_import_numba() -> None:
    out = run_child("""
        import sys
        import elves.kernels.planes_rans, elves.kernels.elf, bitx.kernels, elves.readers.torch.pickle_scan
        import elves, elves.api, elves.encoder, elves.decoder
        print(sorted(m for m in sys.modules if m.split(".")[0] == "numba"))
    """)
    assert out.splitlines()[-1] == "[]"


@kernel("(ro(int64[::1]), int64)")
def _scaled_sum(a: np.ndarray, k: int) -> int:
    s = 0
    for v in a:
        s += v * k
    return s


@kernel("(ro(W[::1]),)", words=("uint16", "uint32"))
def _top(a: np.ndarray) -> int:
    m = 0
    for v in a:
        m = max(m, int(v))
    return m


def test_a_kernel_compiles_its_signature_once_and_converts_arguments() -> None:
    a = np.arange(10, dtype=np.int64)
    assert _scaled_sum(a, 3) == 135
    assert _scaled_sum(a, np.int32(2)) == 90  # converted, as a C call's argument: no new specialisation
    ro = a.copy()
    ro.flags.writeable = False
    assert _scaled_sum(ro, True) == 45
    dispatcher = globals()["_scaled_sum"]  # the module global now names the numba dispatcher
    assert len(dispatcher.signatures) == 1
    with pytest.raises(TypeError):
        dispatcher(a.astype(np.float64), 1)


def test_a_kernel_with_several_word_types_compiles_only_those_it_meets() -> None:
    top = _top
    assert top(np.array([3, 9, 2], dtype=np.uint16)) == 9
    assert len(top.dispatcher().signatures) == 1
    assert top(np.array([70000, 5], dtype=np.uint32)) == 70000
    assert len(top.dispatcher().signatures) == 2
    with pytest.raises(TypeError, match="no signature"):
        top(np.array([1], dtype=np.uint64))


def test_a_kernel_of_several_signatures_converts_while_another_compiles() -> None:
    """While a thread compiles a further signature, numba's dispatcher takes only exact argument
    types and would compile a specialisation for the rest (or fail, "compilation disabled", once
    that thread is done): a read-only signature called with a writable array, meanwhile, must
    run the compiled signature as it is."""
    top = _top
    ro = np.array([4, 8, 1], dtype=np.uint16)
    ro.flags.writeable = False
    assert top(ro) == 8
    d = top.dispatcher()
    compiled = set(d.overloads)
    d.disable_compile(False)  # what another thread's compile does for its duration
    try:
        assert top(np.array([5, 11], dtype=np.uint16)) == 11  # writable: converted, as before
    finally:
        d.disable_compile()
    assert set(d.overloads) == compiled


@kernel("(int64,)", cache=False)  # never cached: every run compiles it
def _twice(v: int) -> int:
    return 2 * v


@kernel("(int64,)", cache=False)
def _twice_plus_one(v: int) -> int:
    return _twice(v) + 1


def test_one_compile_stage_for_a_kernel_and_its_callees() -> None:
    events: list[str] = []
    with compiling(lambda: events.append("start"), lambda: events.append("end")):
        assert _twice_plus_one(20) == 41  # compiles _twice, then _twice_plus_one
        assert events == ["start", "end"]
        assert _twice_plus_one(1) == 3  # compiled: no stage
    assert events == ["start", "end"]


_BUILT: list[str] = []


@intrinsic
def _add_one() -> Any:
    """``v + 1`` for an int64, written in LLVM IR."""
    from numba.core import types
    from numba.extending import intrinsic as numba_intrinsic

    _BUILT.append("add_one")

    @numba_intrinsic
    def add_one(typingctx: Any, v: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.add(args[0], context.get_constant(types.int64, 1))
        return types.int64(types.int64), codegen
    return add_one


_ADD_ONE = _add_one  # the module global names numba's intrinsic once a caller is built


@kernel("(int64,)", cache=False)
def _plus_two(v: int) -> int:
    return _add_one(v) + 1


def test_an_intrinsic_is_built_with_its_first_caller_and_python_cannot_call_it() -> None:
    assert _BUILT == []
    assert _plus_two(40) == 42
    assert _plus_two(-1) == 1
    assert _BUILT == ["add_one"]  # built once
    with pytest.raises(TypeError, match="intrinsic"):
        _ADD_ONE(1)


@kernel("(int64,)", cache=False, internal=True)
def _square(v: int) -> int:
    return v * v


@kernel("(int64,)", cache=False)
def _square_plus_one(v: int) -> int:
    return _square(v) + 1


_SQUARE = _square


def test_an_internal_kernel_serves_kernels_only() -> None:
    assert _square_plus_one(7) == 50
    with pytest.raises(TypeError, match="internal"):
        _SQUARE(7)


def test_the_background_compile_covers_the_lossless_entry_points() -> None:
    proc = subprocess.run([sys.executable, "-m", "elves.kernels.warm", "decode"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert warm.main(["both"]) == 2


def test_no_eta_until_a_rate_is_known() -> None:
    eta = Eta(total=1000, now=0.0)
    assert eta.text(0.0) is None
    eta.pos = 1
    assert eta.text(1.0) is None  # too soon
    assert eta.text(5.0) is None  # 0.1% of the work: no rate yet
    eta.pos = 100
    assert eta.text(10.0) == "eta 00:01:30"  # 100 in 10 s, 900 to go


def test_a_compile_stage_does_not_poison_the_eta() -> None:
    eta = Eta(total=1000, now=0.0)
    eta.pos = 10  # the first chunk waited 100 s for the kernels to compile
    eta.restart(100.0)  # the compile stage ends
    assert eta.text(100.5) is None  # a rate is measured afresh
    eta.pos = 110
    assert eta.text(102.0) == "eta 00:00:17"  # 100 in 2 s, 890 to go: not the 2h 30m the compile suggests
    eta.pos = 1000
    assert eta.text(120.0) is None  # finished


def test_a_long_eta_shows_its_days() -> None:
    eta = Eta(total=10**9, now=0.0)
    eta.pos = 10**7
    assert eta.text(3600.0) == "eta 4d 03:00:00"
