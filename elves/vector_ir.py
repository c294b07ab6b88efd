"""What the hand-written vector kernels are built from: numba's LLVM cannot vectorise a loop
whose loads are gathers (the rANS lanes' table and word reads, BitX's ranked byte), so those
loops are written as LLVM IR, in numba intrinsics built from these pieces.

Importing this module imports neither numba nor llvmlite: :func:`vector_ir` does, when the first
kernel that needs it is built.
"""
from __future__ import annotations

from typing import Any


def vector_ir() -> Any:
    """What the vector intrinsics are built from (imports numba and llvmlite): 16-lane i32
    vectors, gathers and scatters through a vector of addresses, a loop, a prefetch loop."""
    from types import SimpleNamespace

    from llvmlite import ir  # type: ignore[import-untyped]

    i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
    v32 = ir.VectorType(i32, 16)
    vptr = ir.VectorType(ir.PointerType(), 16)
    every = ir.Constant(ir.VectorType(i1, 16), [1] * 16)

    class VectorGEP(ir.instructions.Instruction):  # type: ignore[misc]
        """``getelementptr`` with a vector of indices, which llvmlite's builder refuses: x86
        lowers a gather through it to one ``vpgatherdd`` (base + index * scale)."""

        def __init__(self, block: Any, base: Any, index: Any, element: Any):
            super().__init__(block, vptr, "getelementptr", [base, index])
            self.element = element

        def descr(self, buf: list[str]) -> None:
            base, index = self.operands
            buf.append(f"getelementptr {self.element}, {base.type} {base.get_reference()}, "
                       f"{index.type} {index.get_reference()}\n")

    def const(v: int) -> Any:
        return ir.Constant(v32, [v] * 16)

    def splat(builder: Any, v: Any) -> Any:
        """The i32 ``v`` in all 16 lanes."""
        one = builder.insert_element(ir.Constant(v32, None), v, ir.Constant(i32, 0))
        return builder.shuffle_vector(one, ir.Constant(v32, None), ir.Constant(v32, [0] * 16))

    def function(builder: Any, name: str, ret: Any, args: list[Any]) -> Any:
        return builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ret, args), name)

    def addresses(builder: Any, base: Any, index: Any, element: Any) -> Any:
        ptrs = VectorGEP(builder.block, base, index, element)
        builder._insert(ptrs)
        return ptrs

    def gather(builder: Any, base: Any, index: Any, element: Any, value: Any = v32) -> Any:
        """``base[index]`` for 16 indices, read as ``value`` elements (i32 unless told)."""
        name = "llvm.masked.gather.v16i32.v16p0" if value is v32 else "llvm.masked.gather.v16f64.v16p0"
        fn = function(builder, name, value, [vptr, i32, every.type, value])
        return builder.call(fn, [addresses(builder, base, index, element), ir.Constant(i32, 1), every,
                                 ir.Constant(value, None)])

    def scatter(builder: Any, base: Any, index: Any, element: Any, v: Any, mask: Any) -> None:
        """``base[index] = v`` (i32 values) where ``mask`` is set."""
        fn = function(builder, "llvm.masked.scatter.v16i32.v16p0", ir.VoidType(), [v32, vptr, i32, every.type])
        builder.call(fn, [v, addresses(builder, base, index, element), ir.Constant(i32, 1), mask])

    def loop(builder: Any, start: Any, stop: Any, step: int, carried: list[Any], body: Any) -> list[Any]:
        """``for q in range(start, stop, step)`` (``stop`` exclusive; a negative ``step`` counts
        down to it), with ``carried`` values through ``body(q, carried) -> carried``; returns
        the carried values at the end."""
        pre = builder.block
        cond = builder.append_basic_block("loop.cond")
        inner = builder.append_basic_block("loop.body")
        done = builder.append_basic_block("loop.done")
        builder.branch(cond)
        builder.position_at_end(cond)
        q = builder.phi(i64)
        q.add_incoming(start, pre)
        phis = [builder.phi(c.type) for c in carried]
        for ph, c in zip(phis, carried):
            ph.add_incoming(c, pre)
        builder.cbranch(builder.icmp_signed("<" if step > 0 else ">", q, stop), inner, done)
        builder.position_at_end(inner)
        new = body(q, phis)
        end = builder.block
        q.add_incoming(builder.add(q, ir.Constant(i64, step)), end)
        for ph, c in zip(phis, new):
            ph.add_incoming(c, end)
        builder.branch(cond)
        builder.position_at_end(done)
        return phis

    def prefetch(builder: Any, base: Any, first: Any, last: Any, per_line: int) -> None:
        """Ask for ``base[first:last]``, ``per_line`` elements a cache line: the lanes read 32 streams at
        once, more than the hardware prefetcher follows, and a payload not yet in cache would
        otherwise cost a miss per line per lane (50% more time on a cold 256 KiB chunk)."""
        fn = function(builder, "llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(), i32, i32, i32])

        def touch(q: Any, carried: list[Any]) -> list[Any]:
            line = builder.bitcast(builder.gep(base, [q]), ir.PointerType())
            builder.call(fn, [line, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return carried
        loop(builder, first, last, per_line, [], touch)

    return SimpleNamespace(ir=ir, i32=i32, i64=i64, v32=v32, const=const, splat=splat, gather=gather, scatter=scatter,
                           loop=loop, prefetch=prefetch)
