"""Prototype of a format change, for issue 14 (a benchmark, not a test): would the rANS lanes
decode faster if they shared one word stream? Today each of a plane's 32 lanes reads its own
stream, so a step's refill is a gather (``vpgatherdd``) beside the table's; with one stream
interleaved in lane order (as DietGPU's warps share theirs), the lanes that need a word take the
next ones in order, a masked ``vpexpandw`` and a popcount.

    python bench/rans_shared.py fall silero astra

Timing only: the shared-stream loop runs on random words (the states stay in range, so the
refill pattern is a real one's), beside the kernel's own loop (``_build_run``) on the real
chunk, both on plane 0 of the first 8 full chunks, warm, one thread, best of 15.
"""
import sys
import time

import numpy as np
from compare import load_datasets_module  # bench/compare.py, beside this script
from kernel_speed import tensor_bytes  # bench/kernel_speed.py, beside this script
from numba import njit
from rans_lanes import lane_states  # bench/rans_lanes.py, beside this script

from elves.codecs import Pipeline
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.encoder import TENSOR_CHUNK_BYTES
from elves.kernels.planes_rans import _build_run, RANS_L
from elves.vector_ir import vector_ir


def build_shared(vectors):
    """``run(x, p, g, dec, words, out, steps, lanes) -> p``: ``_build_run``'s loop with the lanes'
    refills taken in lane order from one stream at ``words[p:]``; returns the stream's new position."""
    from numba.core import types
    from numba.extending import intrinsic
    t = vector_ir()
    ir, i64, v32, const = t.ir, t.i64, t.v32, t.const
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), t.i32
    v16 = ir.VectorType(i16, 16)

    def expand(builder, ptr, mask):
        name = "llvm.masked.expandload.v16i16"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(v16, [i16.as_pointer(), mask.type, v16]), name)
        return builder.call(fn, [ptr, mask, ir.Constant(v16, None)])

    def popcnt(builder, mask):
        bits = builder.bitcast(mask, i16)
        name = "llvm.ctpop.i16"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(i16, [i16]), name)
        return builder.zext(builder.call(fn, [bits]), i64)

    def step(builder, x, p, dec, words, out, o):
        e = t.gather(builder, dec, builder.and_(x, const(0xFFF)), i32)
        f = builder.and_(builder.lshr(e, const(8)), const(0xFFF))
        x = builder.add(builder.mul(f, builder.lshr(x, const(12))), builder.lshr(e, const(20)))
        at = builder.bitcast(builder.gep(out, [o]), ir.VectorType(i8, 16).as_pointer())
        builder.store(builder.trunc(e, ir.VectorType(i8, 16)), at, align=1)
        need = builder.icmp_unsigned("<", x, const(RANS_L))
        w = builder.zext(expand(builder, builder.gep(words, [p]), need), v32)
        return builder.select(need, builder.or_(builder.shl(x, const(16)), w), x), builder.add(p, popcnt(builder, need))

    @intrinsic
    def run(typingctx, x, ptr, g, dec, words, out, steps, lanes):
        def codegen(context, builder, sig, args):
            g, steps, lanes, p0 = args[2], args[6], args[7], args[1]
            xs, dec, words, out = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 3, 4, 5))
            at = [builder.bitcast(builder.gep(xs, [builder.add(g, ir.Constant(i64, h))]), v32.as_pointer()) for h in range(0, 16 * vectors, 16)]
            start = [builder.load(a, align=4) for a in at] + [p0]
            def body(k, state):
                o = builder.add(g, builder.mul(k, lanes))
                p = state[vectors]
                xs_ = []
                for h in range(vectors):
                    xv, p = step(builder, state[h], p, dec, words, out, builder.add(o, ir.Constant(i64, 16 * h)))
                    xs_.append(xv)
                return xs_ + [p]
            res = t.loop(builder, ir.Constant(i64, 0), steps, 1, start, body)
            for a, v in zip(at, res[:vectors]):
                builder.store(v, a, align=4)
            return res[vectors]
        return types.int64(x, ptr, g, dec, words, out, steps, lanes), codegen
    return run


def main() -> None:
    shared = build_shared(2)
    gathered = _build_run(2)

    @njit(nogil=True)
    def dec_shared(x, p, dec, words, out, steps, lanes):
        for g in range(0, lanes, 32):
            p = shared(x, p, g, dec, words, out, steps, lanes)
        return p

    @njit(nogil=True)
    def dec_gather(x, ptr, dec, words, out, steps, lanes):
        for g in range(0, lanes, 32):
            gathered(x, ptr, g, dec, words, out, steps, lanes, np.int64(ptr[g:g + 32].min()), np.int64(ptr[g:g + 32].max()) + steps)

    ds = load_datasets_module()
    for name in sys.argv[1:]:
        for dtype, segments in sorted(tensor_bytes(ds.model_dir(name)).items()):
            width = Planes(dtype).width
            step = TENSOR_CHUNK_BYTES // width * width
            chunks = [s[o:o + step] for s in segments for o in range(0, len(s), step)]
            full = [c for c in chunks if len(c) == step][:8]
            pipeline = Pipeline([Planes(dtype), Rans(lanes=32)])
            tg = ts = syms = 0.0
            for c in full:
                buf = np.frombuffer(pipeline.encode(c), np.uint8)
                n = len(c) // width
                got = lane_states(buf, n, 32)
                if got is None: continue
                dec, x0, p0 = got
                words, steps = buf[:len(buf) & ~1].view(np.uint16), n // 32
                rnd = np.random.default_rng(0).integers(0, 65536, steps * 32 + 64, dtype=np.uint16)
                out = np.empty(n, np.uint8)
                bg = bs = 1e9
                for _ in range(15):
                    x, ptr = x0.copy(), p0.copy()
                    t = time.thread_time(); dec_gather(x, ptr, dec, words, out, steps, 32); bg = min(bg, time.thread_time() - t)
                    x = x0.copy()
                    t = time.thread_time(); dec_shared(x, 0, dec, rnd, out, steps, 32); bs = min(bs, time.thread_time() - t)
                tg += bg; ts += bs; syms += steps * 32
            if syms:
                print(f"{name} {dtype}: gather {syms/tg/1e6:.0f} Msym/s, shared {syms/ts/1e6:.0f} Msym/s", flush=True)


if __name__ == "__main__":
    main()
