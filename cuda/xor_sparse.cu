// GPU decoder for BitX's sparse `xor` form (bitx/codec.py, Xor._unsparse; the numba kernel
// bitx.kernels.xor_unsparse): a chunk's bitmap of the elements whose XOR is not zero, then those
// XORed words only, which the planes + rANS kernel (rans_decode.cu) has decoded into a scratch
// buffer; each element is rebuilt as value-or-zero ^ (reference & mask). Compiled at run time
// with NVRTC like rans_decode.cu: no headers, extern "C" entry points, the same ChunkDesc.
//
// * A block per chunk, kSparseThreads threads. The values are packed: element i's value is the
//   k-th, k the number of bits set before bit i, so a tile of the chunk is ranked first (one
//   32-element group of the bitmap per thread: a popcount, then a scan in shared memory), and
//   then its elements are written by consecutive threads (coalesced loads of the reference and
//   stores of the output), each finding its rank from its group's offset and a popcount.
// * The CPU decoder's refusals, before anything is written: a scratch shorter than the bitmap,
//   or a bitmap whose bits (for the chunk's elements; its padding bits are not read) do not count
//   the values there are. Every read is inside the scratch (src_len) and the reference
//   (ref_len), every write inside dst_len. Statuses: codes elves/gpu/launcher.py maps to the CPU
//   decoder's messages.

namespace {

constexpr unsigned int kSparseThreads = 256;
constexpr unsigned int kSparseShort = 40;     // the chunk is shorter than its bitmap
constexpr unsigned int kSparseCount = 41;     // the bitmap does not match the number of elements
constexpr unsigned int kSparseDesc = 42;      // a descriptor the host should not have made

typedef unsigned long long u64;

// Per block: each group's bits, its values' first index, and the partial counts of the threads.
__shared__ unsigned int g_bits[kSparseThreads];
__shared__ u64 g_first[kSparseThreads];
__shared__ u64 g_total;

}  // namespace

// The record every kernel of cuda/ reads (rans_decode.cu has the commented original). For this
// kernel: src = the chunk's sparse form (bitmap, then values), dst = its decoded elements, width
// = the element bytes (1, 2, 4 or 8), ref/ref_len/mask = the `xor` filter's reference and mask.
struct ChunkDesc {
    unsigned long long src, src_len, dst, dst_len;
    unsigned int width, flags;
    unsigned long long ref, ref_len, mask, table;
};
static_assert(sizeof(ChunkDesc) == 72, "ChunkDesc must match the host's 72-byte record");

namespace {

__device__ __forceinline__ u64 load_word(const unsigned char* p, u64 i, unsigned int w) {
    if (w == 8) return __ldg(reinterpret_cast<const u64*>(p) + i);
    if (w == 4) return __ldg(reinterpret_cast<const unsigned int*>(p) + i);
    if (w == 2) return __ldg(reinterpret_cast<const unsigned short*>(p) + i);
    return __ldg(p + i);
}

__device__ __forceinline__ void store_word(unsigned char* p, u64 i, unsigned int w, u64 v) {
    if (w == 8) {
        reinterpret_cast<u64*>(p)[i] = v;
    } else if (w == 4) {
        reinterpret_cast<unsigned int*>(p)[i] = static_cast<unsigned int>(v);
    } else if (w == 2) {
        reinterpret_cast<unsigned short*>(p)[i] = static_cast<unsigned short>(v);
    } else {
        p[i] = static_cast<unsigned char>(v);
    }
}

// The bitmap's bits for elements [32 g, 32 g + 32) that are elements of the chunk (n of them).
__device__ __forceinline__ unsigned int group_bits(const unsigned char* bitmap, u64 g, u64 n) {
    unsigned int bits = 0;
    for (unsigned int b = 0; b < 4; ++b) {
        const u64 byte = 4 * g + b;
        if (8 * byte < n) bits |= static_cast<unsigned int>(__ldg(bitmap + byte)) << (8 * b);
    }
    const u64 left = n - 32 * g;
    return left >= 32 ? bits : bits & ((1u << left) - 1);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kSparseThreads)
    elves_xor_sparse(const ChunkDesc* __restrict__ descs, unsigned int* __restrict__ status) {
    const ChunkDesc d = descs[blockIdx.x];
    const unsigned int w = d.width;
    const unsigned int t = threadIdx.x;
    if (!(w == 1 || w == 2 || w == 4 || w == 8) || d.dst % w || d.ref % w || d.dst_len % w ||
        d.ref_len > d.dst_len) {
        if (t == 0) status[blockIdx.x] = kSparseDesc;
        return;
    }
    const u64 n = d.dst_len / w;
    const u64 nb = (n + 7) / 8 + ((w - (n + 7) / 8 % w) % w);  // Xor._bitmap_bytes: padded to whole words
    if (d.src_len < nb) {
        if (t == 0) status[blockIdx.x] = kSparseShort;
        return;
    }
    const unsigned char* const bitmap = reinterpret_cast<const unsigned char*>(d.src);
    const unsigned char* const vals = bitmap + nb;  // nb is whole words: aligned as the scratch is
    const u64 groups = (n + 31) / 32;
    const u64 m = d.ref_len / w;  // elements with a reference word
    const u64 mask = d.mask;

    // The values the bitmap asks for, against the values there are.
    u64 mine = 0;
    for (u64 g = t; g < groups; g += kSparseThreads) mine += __popc(group_bits(bitmap, g, n));
    g_first[t] = mine;
    __syncthreads();
    if (t == 0) {
        u64 sum = 0;
        for (unsigned int k = 0; k < kSparseThreads; ++k) sum += g_first[k];
        g_total = sum;
    }
    __syncthreads();
    const bool bad = (d.src_len - nb) % w != 0 || g_total * w != d.src_len - nb;
    __syncthreads();  // g_first is reused below
    if (bad) {
        if (t == 0) status[blockIdx.x] = kSparseCount;
        return;
    }

    u64 before = 0;  // values of the tiles already written
    unsigned char* const out = reinterpret_cast<unsigned char*>(d.dst);
    const unsigned char* const ref = reinterpret_cast<const unsigned char*>(d.ref);
    for (u64 tile = 0; tile < groups; tile += kSparseThreads) {
        const u64 g = tile + t;
        const unsigned int bits = g < groups ? group_bits(bitmap, g, n) : 0;
        g_bits[t] = bits;
        g_first[t] = __popc(bits);
        __syncthreads();
        // Inclusive scan of the counts (Hillis-Steele: log2(threads) rounds).
        for (unsigned int off = 1; off < kSparseThreads; off <<= 1) {
            const u64 add = t >= off ? g_first[t - off] : 0;
            __syncthreads();
            g_first[t] += add;
            __syncthreads();
        }
        const u64 tile_count = g_first[kSparseThreads - 1];
        const u64 first = tile * 32, last = n < first + 32ull * kSparseThreads ? n : first + 32ull * kSparseThreads;
        for (u64 i = first + t; i < last; i += kSparseThreads) {
            const unsigned int k = static_cast<unsigned int>(i - first) / 32, j = static_cast<unsigned int>(i % 32);
            const unsigned int gb = g_bits[k];
            u64 x = 0;
            if ((gb >> j) & 1u) {
                const u64 rank = before + g_first[k] - __popc(gb) + __popc(gb & ((1u << j) - 1));
                x = load_word(vals, rank, w);
            }
            if (i < m) x ^= load_word(ref, i, w) & mask;
            store_word(out, i, w, x);
        }
        before += tile_count;
        __syncthreads();  // the next tile rewrites the shared arrays
    }
}
