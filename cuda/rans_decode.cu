// GPU decoder for `planes` + `rans` chunks (docs/FORMAT.md), the CUDA twin of the numba reference
// in elves/kernels/planes_rans.py, with BitX's `xor` filter in front of them fused in (a word is
// XORed with its reference in registers, on its way to the store: bitx/codec.py). elves/gpu compiles this file at run time with NVRTC (through
// cupy.RawModule), so it includes no headers and its entry points are extern "C".
//
// One launch decodes many chunks, possibly of many tensors: a block per chunk, described by a
// ChunkDesc (where the payload is, where the decoded bytes go). Design, and why:
//
// * One warp per chunk, one thread per rANS lane, and each thread decodes ALL planes of its
//   lane's elements. The container shares one lane count across planes, so the thread that owns
//   lane j holds symbol i (i = j, j + lanes, ...) of every plane: it assembles the whole word in
//   registers, rotates the sign back and stores it. The warp's 32 lanes are 32 adjacent elements,
//   so every store is one coalesced W-byte-per-thread write of final data. There is no planes
//   buffer, no byte-scattered write and no second pass over the output for the rotation.
// * The writer uses 32 lanes (the `rans` default), which is why a block is exactly one warp:
//   every thread has a lane, warp shuffles and __syncwarp are the only synchronisation, and the
//   parallelism comes from having many chunks (a 1 GB tensor has 4096 of them; a model launch has
//   all the chunks of a 64 MiB batch). Containers with more lanes loop over groups of 32.
// * Decode tables live in shared memory, two levels per plane: slot -> symbol (a byte per slot,
//   2^P <= 4096 bytes) and symbol -> freq | cum << 16 (256 words): 5 KiB per plane instead of the
//   16 KiB of a packed word per slot. Shared memory (5 KiB x W per block) is what limits how
//   many chunks an SM keeps in flight, and three times as many resident warps hide the second
//   dependent shared load better than a third of them hide one.
// * Only the rANS chain is latency-bound: raw and constant planes (in real weights, every plane
//   but the exponent) are a byte load that is prefetched one step ahead, and the next u16 of each
//   lane stream is prefetched one renormalisation ahead, so a step waits on the shared-memory
//   table and a multiply, not on global memory.
// * Nothing is read outside the chunk's payload, whatever the payload holds: header fields are
//   checked against the payload length, lane streams against their plane section, table writes
//   against 2^P, and a lane that runs past its stream reads zeros and fails the final check.
// * Nothing is written outside [dst, dst + dst_len): dst_len is the capacity the host gives, and
//   a container whose header claims another plane count or element count (n * W != dst_len) is
//   refused before any store. Payloads are at most 2^31 - 1 bytes, so no 32-bit offset sum wraps.
//   Errors go to status[chunk] with the numba decoder's codes (1 header, 2 lane overrun, 3 final
//   state, 4 table, 5 size); the host turns any nonzero status into CorruptArchiveError. The
//   decoded bytes of a flagged chunk are unspecified.
// * Descriptors carry absolute device addresses, so one launch can write into many separately
//   allocated tensors. Payloads must start on a 16-byte boundary (u16 lane words are read as
//   aligned words), decoded bytes on a multiple of min(W, 8).
// * BitX: the chunk's reference (the base model's tensor uploaded, or a gather of an earlier
//   stream already decoded on the device) is read once, word for word beside the store, so XOR
//   costs one coalesced load per element and no pass of its own. A chunk XOR left without a
//   payload is the filter applied to zeros.

namespace {

constexpr unsigned int kWarp = 32;
constexpr unsigned int kFullMask = 0xFFFFFFFFu;
constexpr unsigned int kRansL = 1u << 16;        // lower bound of the rANS state
constexpr unsigned int kMaxProbBits = 12;
constexpr unsigned int kSlots = 1u << kMaxProbBits;
constexpr unsigned int kSymbols = 256;
constexpr unsigned int kMaxLanes = 4096;

constexpr unsigned int kOk = 0;
constexpr unsigned int kErrHeader = 1;
constexpr unsigned int kErrOverrun = 2;
constexpr unsigned int kErrFinalState = 3;
constexpr unsigned int kErrTable = 4;
constexpr unsigned int kErrSize = 5;
constexpr unsigned long long kMaxPayload = 0x7FFFFFFFull;

constexpr unsigned int kModeRaw = 0;
constexpr unsigned int kModeConst = 1;
constexpr unsigned int kModeRans = 2;

constexpr unsigned int kFlagRotate = 1;
constexpr unsigned int kFlagXor = 2;    // XOR each decoded word with its reference (BitX)
constexpr unsigned int kFlagRemap = 4;  // and decode the byte below the sign bit through the table

}  // namespace

// The host builds these with a numpy structured dtype of the same layout (elves/gpu/launcher.py,
// DESC). Every kernel of cuda/ reads this one record.
struct ChunkDesc {
    unsigned long long src;      // device address of the payload, a multiple of 16
    unsigned long long src_len;  // payload bytes
    unsigned long long dst;      // device address of the decoded bytes
    unsigned long long dst_len;  // capacity at dst: the chunk's decoded bytes, n * width
    unsigned int width;          // element bytes; must be the kernel's W
    unsigned int flags;          // kFlagRotate: rotate each word right by one bit (float dtypes)
    // The `xor` filter (BitX), applied to each decoded word before it is stored (kFlagXor):
    unsigned long long ref;      // device address of the chunk's reference bytes, W-aligned
    unsigned long long ref_len;  // reference bytes; words past them pass unchanged
    unsigned long long mask;     // out = word ^ (ref & mask)
    unsigned long long table;    // kFlagRemap: the inverse rank table, 256 x 256 bytes
};
static_assert(sizeof(ChunkDesc) == 72, "ChunkDesc must match the host's 72-byte record");

namespace {

__device__ __forceinline__ unsigned int load_u8(const unsigned char* b, unsigned int pos) {
    return __ldg(b + pos);
}

// Header fields are read byte by byte: the format only promises 2-byte alignment for some.
__device__ __forceinline__ unsigned int load_u16(const unsigned char* b, unsigned int pos) {
    return load_u8(b, pos) | (load_u8(b, pos + 1) << 8);
}

__device__ __forceinline__ unsigned int load_u32(const unsigned char* b, unsigned int pos) {
    return load_u16(b, pos) | (load_u16(b, pos + 2) << 16);
}

template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v) {
#pragma unroll
    for (unsigned int d = 1; d < kWarp; d <<= 1) {
        const T u = __shfl_up_sync(kFullMask, v, d);
        if (threadIdx.x >= d) v += u;
    }
    return v;
}

// slot_sym[from, to) = s, with word stores for the aligned middle: one symbol may own thousands
// of slots, and its thread fills them alone.
__device__ __forceinline__ void fill_slots(unsigned int* slot_words, unsigned int from, unsigned int to,
                                           unsigned int s) {
    unsigned char* slot_sym = reinterpret_cast<unsigned char*>(slot_words);
    for (; from < to && (from & 3); ++from) slot_sym[from] = static_cast<unsigned char>(s);
    const unsigned int word = s * 0x01010101u;
    for (; from + 4 <= to; from += 4) slot_words[from >> 2] = word;
    for (; from < to; ++from) slot_sym[from] = static_cast<unsigned char>(s);
}

// Build plane p's tables from its rANS header (symbols at sym_pos, frequencies at freq_pos), all
// 32 threads together, 32 symbols per round: a warp scan gives each symbol its cum. Returns the
// status, the same in every thread.
__device__ unsigned int build_tables(const unsigned char* b, unsigned int sym_pos, unsigned int freq_pos,
                                     unsigned int k, unsigned int prob_bits, unsigned int* info,
                                     unsigned int* slot_words) {
    const unsigned int t = threadIdx.x;
    const unsigned int m = 1u << prob_bits;
    unsigned int base = 0;      // cum of the round's first symbol
    unsigned int last_sym = 0;  // the previous round's last symbol
    for (unsigned int r = 0; r < k; r += kWarp) {
        const unsigned int j = r + t;
        const bool has = j < k;
        const unsigned int s = has ? load_u8(b, sym_pos + j) : 0;
        const unsigned int f = has ? load_u16(b, freq_pos + 2 * j) : 0;
        const unsigned int incl = warp_inclusive_sum(f);
        const unsigned int cum = base + incl - f;
        unsigned int prev = __shfl_up_sync(kFullMask, s, 1);
        if (t == 0) prev = last_sym;
        const bool bad = has && (f < 1 || f >= m || cum + f > m || (j > 0 && s <= prev));
        if (has && !bad) {
            info[s] = f | (cum << 16);
            fill_slots(slot_words, cum, cum + f, s);
        }
        base += __shfl_sync(kFullMask, incl, kWarp - 1);
        last_sym = __shfl_sync(kFullMask, s, kWarp - 1);
        if (__any_sync(kFullMask, bad)) return kErrTable;
    }
    return base == m ? kOk : kErrTable;
}

// The word of a float dtype rotated back (the sign returns to the top bit); W <= 8.
template <int W>
__device__ __forceinline__ unsigned long long unrotate(unsigned long long v) {
    if constexpr (W == 8) {
        return (v >> 1) | (v << 63);
    } else {
        return (v >> 1) | ((v & 1u) << (8 * W - 1));
    }
}

// BitX's `xor` filter on decoded word i (W <= 8), as bitx.codec.Xor._apply: word ^ (ref & mask)
// where the chunk's reference has a whole word i, the word unchanged past it; with a remap table,
// the byte just below the sign bit is table[that byte of ref, that byte of word] instead
// (bitx.kernels.xor_ranked; the mask has that byte clear).
template <int W>
__device__ __forceinline__ unsigned long long xor_word(const ChunkDesc& d, unsigned int i, unsigned long long v) {
    if (static_cast<unsigned long long>(i + 1) * W > d.ref_len) return v;
    unsigned long long r;
    if constexpr (W == 8) {
        r = __ldg(reinterpret_cast<const unsigned long long*>(d.ref) + i);
    } else if constexpr (W == 4) {
        r = __ldg(reinterpret_cast<const unsigned int*>(d.ref) + i);
    } else if constexpr (W == 2) {
        r = __ldg(reinterpret_cast<const unsigned short*>(d.ref) + i);
    } else {
        r = __ldg(reinterpret_cast<const unsigned char*>(d.ref) + i);
    }
    unsigned long long o = v ^ (r & d.mask);
    if constexpr (W >= 2) {
        if (d.flags & kFlagRemap) {
            constexpr unsigned int shift = 8 * W - 9;
            const unsigned int e = static_cast<unsigned int>(r >> shift) & 0xFFu;
            const unsigned int k = static_cast<unsigned int>(v >> shift) & 0xFFu;
            const unsigned long long code = __ldg(reinterpret_cast<const unsigned char*>(d.table) + e * 256u + k);
            o = (o & ~(0xFFull << shift)) | (code << shift);
        }
    }
    return o;
}

// Stores one decoded element: W <= 8 as a single word, W == 16 (complex128, never rotated or
// XORed) as two 8-byte halves.
template <int W>
__device__ __forceinline__ void store_word(unsigned char* dst, unsigned int i, unsigned long long lo,
                                           unsigned long long hi) {
    // Streaming stores: the output is written once and not read back by this launch, so it
    // should not push the payloads out of L2.
    if constexpr (W == 16) {
        unsigned long long* out = reinterpret_cast<unsigned long long*>(dst) + 2ull * i;
        __stcs(out, lo);
        __stcs(out + 1, hi);
    } else if constexpr (W == 8) {
        __stcs(reinterpret_cast<unsigned long long*>(dst) + i, lo);
    } else if constexpr (W == 4) {
        __stcs(reinterpret_cast<unsigned int*>(dst) + i, static_cast<unsigned int>(lo));
    } else if constexpr (W == 2) {
        __stcs(reinterpret_cast<unsigned short*>(dst) + i, static_cast<unsigned short>(lo));
    } else {
        __stcs(dst + i, static_cast<unsigned char>(lo));
    }
}

// A chunk the `xor` filter left without a payload (every XORed word was zero): each word is the
// filter applied to zero.
template <int W>
__device__ void xor_zeros(const ChunkDesc& d) {
    unsigned char* const dst = reinterpret_cast<unsigned char*>(d.dst);
    const unsigned int n = static_cast<unsigned int>(d.dst_len / W);
    for (unsigned int i = threadIdx.x; i < n; i += kWarp) store_word<W>(dst, i, xor_word<W>(d, i, 0), 0);
}

template <int W>
__device__ __forceinline__ void decode_chunk(const ChunkDesc* __restrict__ descs, unsigned int* __restrict__ status) {
    extern __shared__ unsigned int smem[];
    unsigned int* const info = smem;                       // [W][256]: freq | cum << 16, by symbol
    unsigned int* const slot_words = smem + W * kSymbols;  // [W][4096 bytes]: slot -> symbol
    const unsigned char* const slot_sym = reinterpret_cast<const unsigned char*>(slot_words);

    const unsigned int t = threadIdx.x;
    const ChunkDesc d = descs[blockIdx.x];
    const unsigned char* const b = reinterpret_cast<const unsigned char*>(d.src);
    const unsigned short* const words = reinterpret_cast<const unsigned short*>(d.src);
    unsigned char* const dst = reinterpret_cast<unsigned char*>(d.dst);
    const bool rotate = (d.flags & kFlagRotate) != 0;
    const bool xored = (d.flags & kFlagXor) != 0;
    constexpr unsigned int kDstAlign = W < 8 ? W : 8;

    // Everything up to the lane loop is computed identically by all 32 threads, so every branch
    // on it is uniform and no state needs sharing.
    unsigned int err = kOk;
    if (xored && (W == 16 || (d.ref % kDstAlign) || d.ref_len > d.dst_len || ((d.flags & kFlagRemap) && !d.table))) {
        if (t == 0) status[blockIdx.x] = kErrHeader;
        return;
    }
    if (xored && d.src_len == 0 && d.width == W && d.dst_len % W == 0 && d.dst_len / W <= 0xFFFFFFFFull &&
        d.dst % kDstAlign == 0) {
        if constexpr (W <= 8) xor_zeros<W>(d);
        return;
    }
    if (d.width != W || (d.src & 15) || (d.dst % kDstAlign) || d.src_len > kMaxPayload ||
        d.src_len < 8 + 4 * W) {
        err = kErrHeader;
    }
    const unsigned int size = static_cast<unsigned int>(d.src_len);
    const unsigned int n = err ? 0 : load_u32(b, 0);
    const unsigned int lanes = err ? 0 : load_u16(b, 4);
    if (!err && (load_u8(b, 6) != W || static_cast<unsigned long long>(n) * W != d.dst_len)) {
        err = kErrSize;
    }
    if (!err && (lanes < 1 || lanes > kMaxLanes)) {
        err = kErrHeader;
    }

    // Per plane: rANS planes have a bit in rans_planes, pos = their lane-length table, end =
    // their section's end, bits = P; raw/constant planes read symbol i at pos + (i & idx_mask).
    unsigned int rans_planes = 0;
    unsigned int pos[W], end[W], bits[W], idx_mask[W];
#pragma unroll
    for (int p = 0; p < W; ++p) {
        pos[p] = end[p] = bits[p] = idx_mask[p] = 0;
        if (err) continue;
        const unsigned int start = load_u32(b, 8 + 4 * p);
        const unsigned int stop = p + 1 < W ? load_u32(b, 12 + 4 * p) : size;
        if (start < 8 + 4 * W || start >= stop || stop > size) {
            err = kErrHeader;
            continue;
        }
        end[p] = stop;
        const unsigned int mode = load_u8(b, start);
        if (mode == kModeRaw) {
            if (start + 1ull + n > stop) err = kErrOverrun;
            pos[p] = start + 1;
            idx_mask[p] = 0xFFFFFFFFu;
        } else if (mode == kModeConst) {
            if (start + 2 > stop) err = kErrOverrun;
            pos[p] = start + 1;
        } else if (mode == kModeRans) {
            // Lane words are read as aligned u16, which needs an even section start; the
            // format's sections start on multiples of 4.
            if ((start & 1) || start + 5 > stop) {
                err = kErrHeader;
                continue;
            }
            const unsigned int pb = load_u8(b, start + 1);
            const unsigned int k = load_u16(b, start + 2);
            const unsigned int sym_pos = start + 4;
            if (pb < 1 || pb > kMaxProbBits || k < 1 || k > kSymbols ||
                sym_pos + k + 1 + 2 * k > stop) {
                err = kErrTable;
                continue;
            }
            const unsigned int freq_pos = sym_pos + k + (k & 1);
            unsigned int q = freq_pos + 2 * k;
            q += (start - q) & 3;  // pad to a multiple of 4 from the section start
            if (q + 4ull * lanes > stop) {
                err = kErrHeader;
                continue;
            }
            err = build_tables(b, sym_pos, freq_pos, k, pb, info + p * kSymbols, slot_words + p * (kSlots / 4));
            rans_planes |= 1u << p;
            pos[p] = q;
            bits[p] = pb;
        } else {
            err = kErrHeader;
        }
    }
    if (err) {
        if (t == 0) status[blockIdx.x] = err;
        return;
    }
    __syncwarp();  // the tables are written by all lanes of the warp and read by all

    unsigned long long carry[W];  // per rANS plane: bytes of the lane streams before this group
#pragma unroll
    for (int p = 0; p < W; ++p) carry[p] = 0;

    for (unsigned int g = 0; g < lanes; g += kWarp) {
        const unsigned int j = g + t;
        const bool lane_ok = j < lanes;
        unsigned int x[W], ptr[W], lim[W], next_word[W], next_byte[W];
#pragma unroll
        for (int p = 0; p < W; ++p) {
            x[p] = ptr[p] = lim[p] = next_word[p] = next_byte[p] = 0;
            if (!(rans_planes & (1u << p))) continue;
            // Lane j's stream starts after the streams of lanes 0..j-1: a scan over the warp.
            const unsigned int nb = lane_ok ? load_u32(b, pos[p] + 4 * j) : 0;
            const unsigned long long incl = warp_inclusive_sum(static_cast<unsigned long long>(nb));
            const unsigned long long start = pos[p] + 4ull * lanes + carry[p] + incl - nb;
            carry[p] += __shfl_sync(kFullMask, incl, kWarp - 1);
            if (!lane_ok) continue;
            if (nb < 4 || (nb & 1) || start + nb > end[p]) {
                err = kErrOverrun;
                continue;
            }
            const unsigned int w0 = static_cast<unsigned int>(start >> 1);
            x[p] = __ldg(words + w0) | (static_cast<unsigned int>(__ldg(words + w0 + 1)) << 16);
            ptr[p] = w0 + 2;
            lim[p] = static_cast<unsigned int>((start + nb) >> 1);
            next_word[p] = ptr[p] < lim[p] ? __ldg(words + ptr[p]) : 0;
        }
        const unsigned int count = (lane_ok && !err && j < n) ? (n - 1 - j) / lanes + 1 : 0;
#pragma unroll
        for (int p = 0; p < W; ++p) {
            if (count && !(rans_planes & (1u << p))) next_byte[p] = load_u8(b, pos[p] + (j & idx_mask[p]));
        }

        unsigned int i = j;
        for (unsigned int c = 0; c < count; ++c, i += lanes) {
            // The element after this one, clamped so the prefetch stays inside the plane.
            const unsigned int i_next = c + 1 < count ? i + lanes : i;
            unsigned long long lo = 0, hi = 0;
#pragma unroll
            for (int p = 0; p < W; ++p) {
                unsigned int s;
                if (rans_planes & (1u << p)) {
                    const unsigned int xp = x[p];
                    const unsigned int slot = xp & ((1u << bits[p]) - 1);
                    s = slot_sym[p * kSlots + slot];
                    const unsigned int e = info[p * kSymbols + s];
                    const unsigned int xn = (e & 0xFFFFu) * (xp >> bits[p]) + slot - (e >> 16);
                    // Renormalise without a branch: on near-random planes it is a coin flip
                    // per lane, and the prefetch becomes a predicated load.
                    const bool need = xn < kRansL;
                    x[p] = need ? (xn << 16) | next_word[p] : xn;
                    ptr[p] += need;
                    unsigned int fetched = 0;
                    if (need && ptr[p] < lim[p]) fetched = __ldg(words + ptr[p]);
                    next_word[p] = need ? fetched : next_word[p];
                } else {
                    s = next_byte[p];
                    next_byte[p] = load_u8(b, pos[p] + (i_next & idx_mask[p]));
                }
                // Plane p is byte W-1-p of the little-endian word.
                const int byte = W - 1 - p;
                if (byte < 8) {
                    lo |= static_cast<unsigned long long>(s) << (8 * byte);
                } else {
                    hi |= static_cast<unsigned long long>(s) << (8 * (byte - 8));
                }
            }
            if constexpr (W <= 8) {
                if (rotate) lo = unrotate<W>(lo);
                if (xored) lo = xor_word<W>(d, i, lo);
            }
            store_word<W>(dst, i, lo, hi);
        }

        if (lane_ok && !err) {
#pragma unroll
            for (int p = 0; p < W; ++p) {
                if ((rans_planes & (1u << p)) && (ptr[p] != lim[p] || x[p] != kRansL)) err = kErrFinalState;
            }
        }
    }
    // Several lanes may fail with different codes; which one is kept does not matter.
    if (err) atomicMax(status + blockIdx.x, err);
}

}  // namespace

// Shared memory per block is W * 5 KiB (dynamic; the host passes it). The second launch-bounds
// argument is how many blocks of that size fit an H100 SM (228 KiB, 1 KiB reserved per block),
// which lets ptxas use every register that occupancy leaves.
#define ELVES_DECODE_KERNEL(W, MIN_BLOCKS)                                                            \
    extern "C" __global__ void __launch_bounds__(32, MIN_BLOCKS)                                      \
        elves_rans_decode_w##W(const ChunkDesc* __restrict__ descs, unsigned int* __restrict__ status) { \
        decode_chunk<W>(descs, status);                                                               \
    }

ELVES_DECODE_KERNEL(1, 32)
ELVES_DECODE_KERNEL(2, 20)
ELVES_DECODE_KERNEL(4, 10)
ELVES_DECODE_KERNEL(8, 5)
ELVES_DECODE_KERNEL(16, 2)

// Chunks stored as they are (an empty pipeline): copy src to dst, any block size. The writer
// only stores single-chunk streams that coding would not shrink, so these are small.
extern "C" __global__ void elves_copy_chunks(const ChunkDesc* __restrict__ descs, unsigned int* __restrict__ status) {
    const ChunkDesc d = descs[blockIdx.x];
    if (d.src_len != d.dst_len) {
        if (threadIdx.x == 0) status[blockIdx.x] = kErrSize;
        return;
    }
    const unsigned char* src = reinterpret_cast<const unsigned char*>(d.src);
    unsigned char* dst = reinterpret_cast<unsigned char*>(d.dst);
    unsigned long long i = threadIdx.x;
    if (((d.src | d.dst) & 15) == 0) {
        const unsigned long long vecs = d.dst_len / 16;
        for (; i < vecs; i += blockDim.x) {
            reinterpret_cast<uint4*>(dst)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
        }
        i = vecs * 16 + threadIdx.x;
    }
    for (; i < d.dst_len; i += blockDim.x) dst[i] = __ldg(src + i);
}

// ============================================================================ sparse xor
//
// BitX's sparse `xor` form (bitx/codec.py, Xor._unsparse; the numba kernel
// bitx.kernels.xor_unsparse): a chunk's bitmap of the elements whose XOR is not zero, then those
// XORed words only, which the planes + rANS kernel above has decoded into a scratch buffer
// (planes + rANS -> scratch -> this kernel, as for cuda/elf_decode.cu); each element is rebuilt
// as value-or-zero ^ (reference & mask). For this kernel: src = the chunk's sparse form, dst =
// its decoded elements, width = the element bytes (1, 2, 4 or 8), ref/ref_len/mask = the `xor`
// filter's reference and mask.
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

__device__ __forceinline__ u64 sparse_load(const unsigned char* p, u64 i, unsigned int w) {
    if (w == 8) return __ldg(reinterpret_cast<const u64*>(p) + i);
    if (w == 4) return __ldg(reinterpret_cast<const unsigned int*>(p) + i);
    if (w == 2) return __ldg(reinterpret_cast<const unsigned short*>(p) + i);
    return __ldg(p + i);
}

__device__ __forceinline__ void sparse_store(unsigned char* p, u64 i, unsigned int w, u64 v) {
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
                x = sparse_load(vals, rank, w);
            }
            if (i < m) x ^= sparse_load(ref, i, w) & mask;
            sparse_store(out, i, w, x);
        }
        before += tile_count;
        __syncthreads();  // the next tile rewrites the shared arrays
    }
}
