"""The CUDA sources of cuda/ compiled for the host: the kernels' own code, run by g++ with a small
shim (a block's CUDA threads are std::threads; warp shuffles, votes and __syncwarp are barriers
over them; blocks run one after another, a global array standing for shared memory), and loaded
with ctypes. The tests feed them the descriptors elves.gpu lays out, with host addresses where
the device's would be, so the kernels' logic is tested against the numba decoders on every
machine with g++, not only on those with a GPU.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from elves.gpu import launcher
from elves.gpu.launcher import DESC

CUDA_DIR = Path(__file__).resolve().parent.parent / "cuda"
DECODER = CUDA_DIR / "rans_decode.cu"
KERNELS = [CUDA_DIR / name for name in launcher.KERNEL_FILES]  # every source elves.gpu compiles

SHIM = r"""
#include <version>
#if !defined(__cpp_lib_barrier)
#error ELVES_NO_BARRIER
#endif
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
static std::barrier<>* g_bar = nullptr;
static uint64_t g_xch[1024];
static std::mutex g_atomic;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__

// Blocks run one at a time, so a global array is the block's shared memory.
namespace { alignas(16) unsigned int smem[16 * 5120 / 4]; }

template <class T> T __ldg(const T* p) { return *p; }
template <class T> void __stcs(T* p, T v) { *p = v; }
inline void __syncwarp() { g_bar->arrive_and_wait(); }
inline void __syncthreads() { g_bar->arrive_and_wait(); }
// float64 operations are IEEE on the host (SSE2, no contraction in ISO C++ mode), as the
// intrinsics are on the device.
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
template <class T> T exchange(T v, unsigned src) {
    g_xch[threadIdx.x] = (uint64_t)v; g_bar->arrive_and_wait();
    uint64_t r = g_xch[src]; g_bar->arrive_and_wait();
    return (T)r;
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d) {
    return exchange(v, threadIdx.x >= d ? threadIdx.x - d : threadIdx.x);
}
template <class T> T __shfl_sync(unsigned, T v, int src) { return exchange(v, (unsigned)src); }
inline bool __any_sync(unsigned, bool p) {
    g_xch[threadIdx.x] = p; g_bar->arrive_and_wait();
    bool any = false;
    for (unsigned i = 0; i < blockDim.x; ++i) any |= g_xch[i] != 0;
    g_bar->arrive_and_wait();
    return any;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    std::lock_guard<std::mutex> lock(g_atomic);
    unsigned old = *p;
    if (v > old) *p = v;
    return old;
}

#include KERNEL_SOURCE

using Kernel = void (*)(const ChunkDesc*, unsigned int*);

// Runs `count` blocks of `threads` threads of kernel `k` over the descriptors, as a launch does.
extern "C" int run_kernel(Kernel k, unsigned threads, const void* descs, unsigned count, unsigned* status) {
    if (!k || threads < 1 || threads > 1024) return -1;
    blockDim.x = threads;
    gridDim.x = count;
    for (unsigned b = 0; b < count; ++b) {
        blockIdx.x = b;
        std::memset(smem, 0xCD, sizeof smem);  // stale, as a GPU's shared memory is
        std::barrier<> bar(blockDim.x);
        g_bar = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < blockDim.x; ++t)
            threads.emplace_back([=] { threadIdx.x = t; k((const ChunkDesc*)descs, status); });
        for (auto& th : threads) th.join();
    }
    return 0;
}
"""


class HostKernels:
    """The entry points of compiled sources (one library each), by name, launched on the host."""

    def __init__(self, libs: list[ctypes.CDLL]):
        self.libs = libs
        for lib in libs:
            lib.run_kernel.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p]
            lib.run_kernel.restype = ctypes.c_int

    def run(self, name: str, threads: int, descs: int, count: int, status: int) -> None:
        """Launch ``name`` over ``count`` descriptors at address ``descs``, statuses to ``status``."""
        if count:
            lib = next(lib for lib in self.libs if hasattr(lib, name))
            fn = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            assert lib.run_kernel(fn, threads, descs, count, status) == 0

    def launch(self, descs: int, status: int, runs: list[tuple[int, int, int]]) -> None:
        """What elves.gpu.launcher.Kernels.launch does: one launch per (kernel, first, count) run."""
        for kernel, first, count in runs:
            name, threads = launcher.kernel_launch(kernel)
            self.run(name, threads, descs + first * DESC.itemsize, count, status + 4 * first)


def compile_source(sources: Path | list[Path], out: Path) -> HostKernels:
    """The sources, each compiled with the shim into a shared library under ``out``; skips the
    test where g++ (with C++20 <barrier>) is missing."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    (out / "shim.cpp").write_text(SHIM)
    libs = []
    for source in [sources] if isinstance(sources, Path) else sources:
        lib = out / f"{source.stem}.so"
        cmd = [gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas",
               f'-DKERNEL_SOURCE="{source}"', "-o", str(lib), str(out / "shim.cpp")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if "ELVES_NO_BARRIER" in proc.stderr:
            pytest.skip("this g++ has no C++20 <barrier>")
        assert proc.returncode == 0, proc.stderr
        libs.append(ctypes.CDLL(str(lib)))
    return HostKernels(libs)


def aligned(nbytes: int, fill: int = 0) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` at a 16-byte aligned address (as device allocations are)."""
    raw = np.full(nbytes + 16, fill, dtype=np.uint8)
    return raw[-raw.ctypes.data % 16:][:nbytes]
