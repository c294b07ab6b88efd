// GPU decoder for the `elf` filter (docs/FORMAT.md): a chunk's integer codes, which the planes +
// rANS kernel (rans_decode.cu) has decoded into a scratch buffer, dequantised to floats with the
// chunk's exceptions written back. The CUDA twin of Elf.decode (elves/codecs/elf.py) and its numba
// kernels (elves/kernels/elf.py). Compiled at run time with NVRTC like rans_decode.cu: no headers,
// extern "C" entry points, the same ChunkDesc.
//
// * A block per chunk, kElfThreads threads: every thread reads the section header (a few words,
//   the same for all, so every branch on it is uniform), then the elements are dequantised with
//   a block-stride loop (coalesced loads of codes, stores of words), then the exceptions are
//   scattered, each thread checking that its position follows the one before it.
// * The arithmetic is the numba decoder's, operation for operation: a code's value is computed in
//   float64 with correctly rounded operations only (__dmul_rn, __ddiv_rn: no fused multiply-add,
//   which nvcc would otherwise contract), then rounded once to the dtype (__double2float_rn for
//   F32; for F16 and BF16 the numba decoder's round-half-even on the bits, ported as it is). The
//   numba decoder's faster paths (kept mantissa bits, per-residue tables) are proven there to give
//   the general formula's bits, which is what this kernel computes.
// * A palette chunk's distinct codes are a prefix sum of differences: thread 0 sums them in place
//   (in the scratch buffer, which this launch owns), checking they increase; palettes are small.
// * Every read is checked against the chunk (src_len) and every write against dst_len; errors go
//   to status[chunk] with codes that elves/gpu/launcher.py maps to the CPU decoder's messages.

namespace {

constexpr unsigned int kElfThreads = 256;

constexpr unsigned int kElfShort = 16;        // cut short or not whole words
constexpr unsigned int kElfFlags = 17;        // unknown flags
constexpr unsigned int kElfSub = 18;          // bad sub-binade count
constexpr unsigned int kElfKind = 19;         // unknown grid kind
constexpr unsigned int kElfPosWidth = 20;     // bad exception position width
constexpr unsigned int kElfSection = 21;      // the exception section runs past the chunk
constexpr unsigned int kElfMalformed = 22;    // malformed section
constexpr unsigned int kElfPaletteSize = 23;  // bad palette size
constexpr unsigned int kElfSize = 24;         // another number of elements than the chunk's
constexpr unsigned int kElfBinade = 25;       // malformed binade grid
constexpr unsigned int kElfUniform = 26;      // malformed uniform grid
constexpr unsigned int kElfPalette = 27;      // malformed palette
constexpr unsigned int kElfIndex = 28;        // a palette index is out of range
constexpr unsigned int kElfScatter = 29;      // exception positions out of order or range
constexpr unsigned int kElfDesc = 30;         // a descriptor the host should not have made
constexpr unsigned int kElfDeltaPalette = 31; // a palette in a delta chunk
constexpr unsigned int kElfRef = 32;          // a delta chunk's reference is not as long as the chunk

constexpr unsigned int kKindExact = 0;
constexpr unsigned int kKindUniform = 1;
constexpr unsigned int kKindBinade = 2;
constexpr unsigned int kFlagPalette = 1;
constexpr unsigned int kMaxSub = 64;
// Descriptor flags above the float format's bits: a delta chunk (`elf` with `delta`: the codes
// are differences from the reference's codes on the chunk's grid), and the bound's kind.
constexpr unsigned int kFlagDelta = 1u << 16;
constexpr unsigned int kFlagRelative = 1u << 17;   // relative bound (else absolute)
constexpr unsigned int kFlagRelExact = 1u << 18;   // ...a power of two: bound * |x| is exact when normal
constexpr unsigned int kHead = 8;             // kind, pos_bytes, S, flags, exception count

typedef unsigned long long u64;
typedef long long i64;

}  // namespace

// The record every kernel of cuda/ reads (rans_decode.cu has the commented original). For this
// kernel: src = the chunk's elf bytes (codes and section), dst = its decoded elements, width =
// the element bytes (2, 4 or 8), flags = exponent bits | mantissa bits << 8 (| kFlagDelta ...);
// a delta chunk's reference at ref (ref_len bytes), the bound's float64 bits in mask.
struct ChunkDesc {
    unsigned long long src, src_len, dst, dst_len;
    unsigned int width, flags;
    unsigned long long ref, ref_len, mask, table;
};
static_assert(sizeof(ChunkDesc) == 72, "ChunkDesc must match the host's 72-byte record");

namespace {

struct Chunk {
    const unsigned char* b;
    u64 len;
    unsigned int w;
};

// Section byte k: each leading word of the chunk carries w - 1 of them.
// 32-bit arithmetic: a chunk is under 2^31 bytes (64-bit division is a slow subroutine here).
__device__ __forceinline__ unsigned int sec_u8(const Chunk& c, u64 k) {
    const unsigned int k32 = static_cast<unsigned int>(k), per = c.w - 1;
    const unsigned int row = k32 / per;
    return __ldg(c.b + static_cast<u64>(row) * c.w + (k32 - row * per));
}

__device__ __forceinline__ u64 sec_le(const Chunk& c, u64 k, unsigned int nbytes) {
    u64 v = 0;
    for (unsigned int i = 0; i < nbytes; ++i) v |= static_cast<u64>(sec_u8(c, k + i)) << (8 * i);
    return v;
}

// Body word i (w bytes, little-endian) at byte offset `at` of the chunk.
__device__ __forceinline__ u64 word_at(const unsigned char* p, u64 i, unsigned int w) {
    if (w == 8) return __ldg(reinterpret_cast<const u64*>(p) + i);
    if (w == 4) return __ldg(reinterpret_cast<const unsigned int*>(p) + i);
    return __ldg(reinterpret_cast<const unsigned short*>(p) + i);
}

__device__ __forceinline__ void put_word(unsigned char* p, u64 i, unsigned int w, u64 v) {
    if (w == 8) {
        reinterpret_cast<u64*>(p)[i] = v;
    } else if (w == 4) {
        reinterpret_cast<unsigned int*>(p)[i] = static_cast<unsigned int>(v);
    } else {
        reinterpret_cast<unsigned short*>(p)[i] = static_cast<unsigned short>(v);
    }
}

// elves.kernels.elf._round_bits: magnitude bits of the (ebits, mbits) float nearest to the
// non-negative finite float64 with bits `b` (round half to even; too large -> infinity).
__device__ __forceinline__ u64 round_bits(u64 b, unsigned int ebits, unsigned int mbits) {
    if (ebits == 11) return b;
    if (b == 0) return 0;
    const i64 e64 = static_cast<i64>(b >> 52);
    if (e64 == 0) return 0;
    const u64 sig = (b & ((1ull << 52) - 1)) | (1ull << 52);
    const i64 bias = (1ll << (ebits - 1)) - 1;
    const i64 maxexp = (1ll << ebits) - 1;
    const i64 ef = e64 - 1023 + bias;
    i64 sh;
    u64 mag;
    if (ef >= 1) {
        sh = 52 - mbits;
        mag = (static_cast<u64>(ef) << mbits) | ((sig >> sh) & ((1ull << mbits) - 1));
    } else {
        sh = 52 - static_cast<i64>(mbits) + 1 - ef;
        if (sh >= 64) return 0;
        mag = sig >> sh;
    }
    const u64 rem = sig & ((1ull << sh) - 1);
    const u64 half = 1ull << (sh - 1);
    mag += (rem > half) | ((rem == half) & ((mag & 1) == 1));
    const u64 inf = static_cast<u64>(maxexp) << mbits;
    return mag < inf ? mag : inf;
}

// math.ldexp(1.0, k): exact, 0 below the subnormals, infinity above float64's range.
__device__ __forceinline__ double pow2(i64 k) {
    if (k > 1023) return __longlong_as_double(0x7FF0000000000000ll);
    if (k >= -1022) return __longlong_as_double(static_cast<i64>(k + 1023) << 52);
    if (k >= -1074) return __longlong_as_double(1ll << (k + 1074));
    return 0.0;
}

// A float64 value of the chunk's dtype as the element's bits: sign s, magnitude v >= 0.
__device__ __forceinline__ u64 to_dtype(double v, u64 s, unsigned int w, unsigned int ebits, unsigned int mbits) {
    if (ebits == 8 && mbits == 23) {
        return static_cast<unsigned int>(__float_as_uint(__double2float_rn(s ? -v : v)));
    }
    return round_bits(static_cast<u64>(__double_as_longlong(v)), ebits, mbits) | (s << (8 * w - 1));
}

struct Grid {
    unsigned int kind;
    double step;        // uniform
    u64 m_code, b_bits; // uniform
    i64 e0;             // binade
    unsigned int sub;
    u64 lsum;
    double inv;         // 1 / lsum
    int kept_bits;      // k when S == 1 and L = 2^k <= 2^mbits (kept mantissa bits), else -1
    u64 sec_l;          // section byte where L[] starts
};

// The binade b (returned in b) and the in-binade value ((S + i) * L[i] + j) / (S * L[i]) of a
// binade-grid code magnitude t + 1: elves.kernels.elf._binade_value's parts.
__device__ __forceinline__ double binade_q(const Chunk& c, const Grid& g, u64 t, u64& b) {
    // t div lsum without a 64-bit division: a float64 estimate, corrected (as the numba decoder)
    b = g.lsum == 1 ? t : static_cast<u64>(static_cast<i64>(__dmul_rn(static_cast<double>(static_cast<i64>(t)), g.inv)));
    while (b * g.lsum > t) --b;
    while ((b + 1) * g.lsum <= t) ++b;
    const u64 r = t - b * g.lsum;
    unsigned int lo = 0;
    u64 cum_lo = 0, cum = 0;
    for (unsigned int i = 0; i < g.sub; ++i) {  // the last i with cum[i] <= r (S <= 64)
        if (cum <= r) {
            lo = i;
            cum_lo = cum;
        }
        cum += sec_le(c, g.sec_l + 4ull * i, 4);
    }
    const u64 li = sec_le(c, g.sec_l + 4ull * lo, 4);
    const u64 j = r - cum_lo;
    const double q = __ddiv_rn(static_cast<double>((static_cast<u64>(g.sub) + lo) * li + j),
                               static_cast<double>(static_cast<u64>(g.sub) * li));
    return q;
}

// The exponent of 2^(e0 + b) as math.ldexp takes it from numba: a C int (truncated).
__device__ __forceinline__ i64 ldexp_int(const Grid& g, u64 b) {
    return static_cast<int>(static_cast<unsigned int>(static_cast<u64>(g.e0) + b));
}

__device__ __forceinline__ u64 dequant(const Chunk& c, const Grid& g, u64 u, unsigned int ebits, unsigned int mbits) {
    const unsigned int w = c.w;
    const unsigned int sh = 8 * w - 1;
    const u64 mask = (w == 8 ? ~0ull : (1ull << (8 * w)) - 1) >> 1;
    const u64 s = u & 1;
    const u64 a = u >> 1;
    if (g.kind == kKindExact) return ((u >> 1) | (s << sh)) & (mask | (1ull << sh));
    if (g.kind == kKindUniform) {
        if (a >= g.m_code) return ((g.b_bits + (a - g.m_code)) & mask) | (s << sh);
        const double v = __dmul_rn(static_cast<double>(static_cast<i64>(a)), g.step);
        if (ebits == 11) return static_cast<u64>(__double_as_longlong(s ? -v : v));
        if (ebits == 8 && mbits == 23) return to_dtype(v, s, w, ebits, mbits);
        return (round_bits(static_cast<u64>(__double_as_longlong(v)), ebits, mbits) & mask) | (s << sh);
    }
    if (a == 0) return s << sh;
    // elves.kernels.elf._dequant_binade: binade b, sub-binade i, level j. Its three paths are
    // followed as they are, so that even codes no encoder writes (a damaged chunk's) decode to
    // the same bits: 2^k is math.ldexp, whose exponent numba passes as a C int (truncated).
    const u64 t = a - 1;
    const i64 bias = (1ll << (ebits - 1)) - 1;
    if (g.kept_bits >= 0) {  // S == 1, L = 2^k levels with k <= mbits: kept mantissa bits
        const i64 e = g.e0 + static_cast<i64>(t >> g.kept_bits);
        if (e >= 1 - bias && e <= bias) {
            return (static_cast<u64>(e + bias) << mbits) | ((t & ((1ull << g.kept_bits) - 1)) << (mbits - g.kept_bits))
                 | (s << sh);
        }
    }
    u64 b;
    const double q = binade_q(c, g, t, b);
    const i64 k = ldexp_int(g, b);
    if (g.kept_bits < 0 && g.lsum <= 65536 && ebits != 11 && !(ebits == 8 && mbits == 23)) {
        // F16, BF16 with a small grid: the quotient rounded once, the exponent added to its bits
        const i64 e = static_cast<i64>(static_cast<u64>(g.e0) + b + static_cast<u64>(bias));
        if (e >= 1) {
            const u64 off = round_bits(static_cast<u64>(__double_as_longlong(q)), ebits, mbits)
                          - (static_cast<u64>(bias) << mbits);
            const u64 inf = ((1ull << ebits) - 1) << mbits;
            const u64 mag = (static_cast<u64>(e) << mbits) + off;
            return (mag < inf ? mag : inf) | (s << sh);
        }
    }
    const double v = __dmul_rn(q, pow2(k));
    if (ebits == 11) return static_cast<u64>(__double_as_longlong(v)) | (s << 63);
    if (g.kept_bits >= 0) return round_bits(static_cast<u64>(__double_as_longlong(v)), ebits, mbits) | (s << sh);
    return to_dtype(v, s, w, ebits, mbits);
}

// ---------------------------------------------------------------- delta chunks: the reference's codes
// The reference chunk is quantised on the chunk's own grid as Elf._ref_codes does it (the
// encoder did the same), then each code is the reference's plus the stored difference.

// elves.kernels.elf._mag_to_f64bits: float64 bits of a (ebits, mbits) magnitude, exactly.
__device__ __forceinline__ u64 mag_to_f64(u64 mag, unsigned int ebits, unsigned int mbits) {
    if (ebits == 11) return mag;
    const i64 bias = (1ll << (ebits - 1)) - 1, maxexp = (1ll << ebits) - 1;
    const i64 ef = static_cast<i64>(mag >> mbits);
    const u64 mant = mag & ((1ull << mbits) - 1);
    if (ef == maxexp) return (0x7FFull << 52) | (mant << (52 - mbits));
    if (ef == 0) {
        if (mant == 0) return 0;
        int p = 0;  // the highest set bit
        while ((mant >> (p + 1)) != 0) ++p;
        const i64 e = p + 1 - bias - static_cast<i64>(mbits);
        return (static_cast<u64>(e + 1023) << 52) | ((mant - (1ull << p)) << (52 - p));
    }
    return (static_cast<u64>(ef - bias + 1023) << 52) | (mant << (52 - mbits));
}

// The element with bits v (w bytes) as a float64, exactly (elves.kernels.elf._to_f64).
__device__ __forceinline__ double word_f64(u64 v, unsigned int w, unsigned int ebits, unsigned int mbits) {
    const unsigned int sh = 8 * w - 1;
    return __longlong_as_double(static_cast<i64>(mag_to_f64(v & ((1ull << sh) - 1), ebits, mbits) | ((v >> sh) << 63)));
}

// elves.kernels.elf._round_value: v >= 0 rounded to the dtype, as a float64.
__device__ __forceinline__ double round_value(double v, unsigned int ebits, unsigned int mbits) {
    if (ebits == 11) return v;
    if (ebits == 8 && mbits == 23) return static_cast<double>(__double2float_rn(v));
    return __longlong_as_double(static_cast<i64>(
        mag_to_f64(round_bits(static_cast<u64>(__double_as_longlong(v)), ebits, mbits), ebits, mbits)));
}

// elves.kernels.elf._le_exact: the exact |y - x| <= lim (TwoSum on the rounded difference).
__device__ __forceinline__ bool le_exact(double y, double x, double lim) {
    const double d = __dsub_rn(y, x);
    const double ad = fabs(d);
    if (ad < lim) return true;
    if (ad > lim || ad != ad) return false;
    const double bp = __dsub_rn(d, y);
    const double ap = __dsub_rn(d, bp);
    const double t = __dadd_rn(__dsub_rn(y, ap), __dsub_rn(-x, bp));
    return t == 0.0 || (t > 0.0) != (d > 0.0);
}

// elves.kernels.elf._within: the bound, absolute or relative, in exact arithmetic.
__device__ __forceinline__ bool within(double y, double x, unsigned int flags, double bound) {
    if (!(flags & kFlagRelative)) return le_exact(y, x, bound);
    double lim = __dmul_rn(bound, fabs(x));
    if (!((flags & kFlagRelExact) && lim >= 2.2250738585072014e-308)) lim = __dmul_rn(lim, 1.0 - 1e-13);
    return le_exact(y, x, lim);
}

// The float64 value of binade-grid code magnitude a >= 1 (elves.kernels.elf._binade_value).
__device__ __forceinline__ double binade_value(const Chunk& c, const Grid& g, u64 a) {
    u64 b;
    const double q = binade_q(c, g, a - 1, b);
    return __dmul_rn(q, pow2(ldexp_int(g, b)));
}

// The reference element v's code on the chunk's grid: elves.kernels.elf.quant_exact,
// nearest_uniform, or the binade quantiser (_quant_binade; an element it makes an exception
// has code 0). On the binade grid the quantiser's table paths give the values of
// _binade_value rounded once (they are proven equal there), which is what is computed here.
__device__ u64 ref_code(const Chunk& c, const Grid& g, u64 v, unsigned int flags, double bound) {
    const unsigned int w = c.w, ebits = flags & 0xFF, mbits = (flags >> 8) & 0xFF;
    const unsigned int sh = 8 * w - 1;
    const u64 mask = (w == 8 ? ~0ull : (1ull << (8 * w)) - 1) >> 1;
    const u64 s = v >> sh, mag = v & mask;
    if (g.kind == kKindExact) return ((v << 1) | s) & (mask | (1ull << sh));
    if (g.kind == kKindUniform) {
        if (mag >= g.b_bits) return mag - g.b_bits > mask - g.m_code ? 0 : ((g.m_code + (mag - g.b_bits)) << 1) | s;
        const double top = static_cast<double>(g.m_code - 1);
        const double q = fmin(rint(__dmul_rn(fabs(word_f64(v, w, ebits, mbits)), __ddiv_rn(1.0, g.step))), top);
        const u64 a = static_cast<u64>(static_cast<i64>(q));
        return (a << 1) | (a != 0 || mag == 0 ? s : 0);
    }
    if (mag == 0) return s;
    const double x = word_f64(v, w, ebits, mbits);
    const u64 bx = static_cast<u64>(__double_as_longlong(x)) & ~(1ull << 63);
    const i64 e64 = static_cast<i64>(bx >> 52), e = e64 - 1023;
    if (e64 == 0 || e64 == 0x7FF || e < g.e0) return 0;
    const double ax = fabs(x);
    const double f = __dmul_rn(__dsub_rn(__dmul_rn(ax, pow2(-e)), 1.0), static_cast<double>(g.sub));
    i64 ii = static_cast<i64>(f);
    if (ii > static_cast<i64>(g.sub) - 1) ii = g.sub - 1;
    u64 cum = 0;
    for (i64 i = 0; i < ii; ++i) cum += sec_le(c, g.sec_l + 4ull * i, 4);
    const double li = static_cast<double>(sec_le(c, g.sec_l + 4ull * ii, 4));
    const u64 j = static_cast<u64>(static_cast<i64>(floor(__dadd_rn(__dmul_rn(__dsub_rn(f, static_cast<double>(ii)), li), 0.5))));
    const u64 t = static_cast<u64>(e - g.e0) * g.lsum + cum + j;
    if (t >= mask) return 0;
    u64 a = t + 1;
    double y = round_value(binade_value(c, g, a), ebits, mbits);
    if (within(y, ax, flags, bound)) return (a << 1) | s;
    if (y > ax && a > 1) {
        --a;
    } else if (y < ax && a < mask) {
        ++a;
    } else {
        return 0;
    }
    y = round_value(binade_value(c, g, a), ebits, mbits);
    return within(y, ax, flags, bound) ? (a << 1) | s : 0;
}

// elves.kernels.elf.undelta_codes: zig(signed(unzig(ref) + unzig(delta))) in 8w-bit arithmetic.
__device__ __forceinline__ u64 undelta(u64 d, u64 r, unsigned int w) {
    u64 v = ((r >> 1) ^ (0 - (r & 1))) + ((d >> 1) ^ (0 - (d & 1)));
    if (w < 8) {
        const u64 sb = 1ull << (8 * w - 1);
        v = ((v & ((1ull << (8 * w)) - 1)) ^ sb) - sb;
    }
    const u64 z = (v << 1) ^ static_cast<u64>(static_cast<i64>(v) >> 63);
    return w == 8 ? z : z & ((1ull << (8 * w)) - 1);
}

__device__ __forceinline__ bool block_failed(unsigned int* status, unsigned int code) {
    if (code) atomicMax(status + blockIdx.x, code);
    __syncthreads();
    const bool failed = *static_cast<volatile unsigned int*>(status + blockIdx.x) != 0;
    __syncthreads();
    return failed;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kElfThreads)
    elves_elf_decode(const ChunkDesc* __restrict__ descs, unsigned int* __restrict__ status) {
    const ChunkDesc d = descs[blockIdx.x];
    const unsigned int w = d.width;
    const unsigned int ebits = d.flags & 0xFF, mbits = (d.flags >> 8) & 0xFF;
    const unsigned int t = threadIdx.x;
    const Chunk c{reinterpret_cast<const unsigned char*>(d.src), d.src_len, w};
    unsigned char* const out = reinterpret_cast<unsigned char*>(d.dst);

    // Everything up to the element loop is the same in every thread.
    unsigned int err = 0;
    if (!(w == 2 || w == 4 || w == 8) || (d.src % w) || (d.dst % w) || 8 * w - 1 != ebits + mbits) {
        err = kElfDesc;
    } else if (d.src_len % w || d.src_len < w * ((kHead + w - 2) / (w - 1))) {
        err = kElfShort;
    }
    Grid g{};
    unsigned int pos_bytes = 0, flags = 0;
    u64 m = 0, plen = 0, pcount = 0, ns = 0, npal = 0, n = 0;
    const u64 total_words = d.src_len / (w ? w : 1);
    if (!err) {
        g.kind = sec_u8(c, 0);
        pos_bytes = sec_u8(c, 1);
        g.sub = sec_u8(c, 2);
        flags = sec_u8(c, 3);
        m = sec_le(c, 4, 4);
        if (flags & ~kFlagPalette) {
            err = kElfFlags;
        } else if (g.kind == kKindUniform) {
            plen = 24;
        } else if (g.kind == kKindBinade) {
            if (g.sub < 1 || g.sub > kMaxSub || (g.sub & (g.sub - 1))) err = kElfSub;
            plen = 4 + 4ull * g.sub;
        } else if (g.kind != kKindExact) {
            err = kElfKind;
        }
    }
    if (!err && pos_bytes != 2 && pos_bytes != 4) err = kElfPosWidth;
    if (!err) {
        pcount = (flags & kFlagPalette) ? 4 : 0;
        const u64 slen = kHead + plen + pcount + m * (pos_bytes + w);
        ns = (slen + w - 2) / (w - 1);
        if (ns > total_words) err = kElfSection;
    }
    // Each of the section's words keeps its top byte zero: checked by all threads together.
    for (u64 r = t; !err && r < ns; r += kElfThreads) {
        if (__ldg(c.b + r * w + w - 1)) err = kElfMalformed;
    }
    if (block_failed(status, err)) return;

    const unsigned char* const body = c.b + ns * w;
    const u64 body_words = total_words - ns;
    npal = pcount ? sec_le(c, kHead + plen, 4) : 0;
    if (npal > body_words || body_words - npal < npal) err = kElfPaletteSize;  // not npal <= n
    n = err ? 0 : body_words - npal;
    if (!err && n * w != d.dst_len) err = kElfSize;
    if (!err && g.kind == kKindBinade) {
        g.e0 = static_cast<int>(static_cast<unsigned int>(sec_le(c, kHead, 4)));
        g.sec_l = kHead + 4;
        g.lsum = 0;
        bool bad = g.e0 < -1022 || g.e0 > 1023;
        for (unsigned int i = 0; i < g.sub; ++i) {
            const u64 li = sec_le(c, g.sec_l + 4ull * i, 4);
            bad |= li < 1;
            g.lsum += li;
        }
        if (bad) err = kElfBinade;
        g.inv = __ddiv_rn(1.0, static_cast<double>(g.lsum));
        g.kept_bits = -1;
        if (g.sub == 1) {
            int lk = 0;
            while ((1ull << lk) < g.lsum) ++lk;
            if ((1ull << lk) == g.lsum && static_cast<unsigned int>(lk) <= mbits) g.kept_bits = lk;
        }
    } else if (!err && g.kind == kKindUniform) {
        g.step = __longlong_as_double(static_cast<i64>(sec_le(c, kHead, 8)));
        g.m_code = sec_le(c, kHead + 8, 8);
        g.b_bits = sec_le(c, kHead + 16, 8);
        // finite and positive (a NaN fails the comparison)
        if (!(g.step > 0.0 && g.step < __longlong_as_double(0x7FF0000000000000ll))) err = kElfUniform;
    }
    const bool delta = (d.flags & kFlagDelta) != 0;
    if (!err && delta && pcount) err = kElfDeltaPalette;
    if (!err && delta && (d.ref_len != n * w || d.ref % w)) err = kElfRef;
    if (!err && pcount) {
        if (npal < 1) {
            err = kElfPaletteSize;
        } else if (t == 0) {
            // The distinct codes: a prefix sum of differences, strictly increasing (no zero
            // difference, no wrap past 2^64), none wider than the word; summed in place.
            u64 v = 0;
            bool bad = false;
            unsigned char* const sums = const_cast<unsigned char*>(body);
            for (u64 i = 0; i < npal; ++i) {
                // plain loads (not __ldg): these words are rewritten by this launch
                const u64 next = v + (w == 8 ? reinterpret_cast<const u64*>(sums)[i]
                                    : w == 4 ? reinterpret_cast<const unsigned int*>(sums)[i]
                                             : reinterpret_cast<const unsigned short*>(sums)[i]);
                if (i > 0 && next <= v) bad = true;
                v = next;
                put_word(sums, i, w, v);
            }
            if (bad || (w < 8 && (v >> (8 * w)))) err = kElfPalette;
        }
    }
    if (block_failed(status, err)) return;
    if (pcount) {
        for (u64 i = t; i < n; i += kElfThreads) {
            if (word_at(body, npal + i, w) >= npal) err = kElfIndex;
        }
        if (block_failed(status, err)) return;
    }
    // The palette's sums were written by thread 0 before the barrier above: plain loads.
    for (u64 i = t; i < n; i += kElfThreads) {
        u64 code;
        if (pcount) {
            const u64 k = word_at(body, npal + i, w);
            code = w == 8 ? reinterpret_cast<const u64*>(body)[k]
                 : w == 4 ? reinterpret_cast<const unsigned int*>(body)[k]
                          : reinterpret_cast<const unsigned short*>(body)[k];
        } else {
            code = word_at(body, i, w);
            if (delta) {
                const u64 r = word_at(reinterpret_cast<const unsigned char*>(d.ref), i, w);
                code = undelta(code, ref_code(c, g, r, d.flags, __longlong_as_double(static_cast<i64>(d.mask))), w);
            }
        }
        put_word(out, i, w, dequant(c, g, code, ebits, mbits));
    }
    __syncthreads();
    // The exceptions: positions (pos_bytes each) then original words, after the parameters.
    const u64 p0 = kHead + plen + pcount;
    for (u64 k = t; k < m; k += kElfThreads) {
        const u64 p = sec_le(c, p0 + k * pos_bytes, pos_bytes);
        const bool after = k == 0 || p > sec_le(c, p0 + (k - 1) * pos_bytes, pos_bytes);
        if (!after || p >= n) {
            err = kElfScatter;
            continue;
        }
        put_word(out, p, w, sec_le(c, p0 + m * pos_bytes + k * w, w));
    }
    if (err) atomicMax(status + blockIdx.x, err);
}
