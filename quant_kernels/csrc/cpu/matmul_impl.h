// Packed matmul on the CPU: y[M, np] += xp[M, K] @ W[K, np] read straight from the EXL2 bitstream.
//
// Every weight is the loader's value fp16((q - 2^(b-1)) * s) (exl2_math.h dequant_value) widened to fp32;
// products and sums are fp32, summed in another order than torch's (tolerance in
// tests/quant_kernels/test_native.py).  The build is -march=native, so the instruction set is chosen at
// compile time; layer_cpu.cpp (matmul_layer) drives these pieces:
//
// Few rows of x (M < PANEL_MIN_M), AVX-512 (F, BW, VL): "rows in lanes".  A 16-lane vector holds 16
//   consecutive rows of ONE column.  Within a group a column has one scale, so its weights take only 2^b
//   values: they are computed once per (group, column) into a table of 16 / 32 / 64 floats (1, 2 or 4
//   registers), and a vector of 16 codes becomes 16 weights by one in-register permute (vpermps, vpermt2ps;
//   6-bit: two and a blend).  The codes are cut from the column's words by broadcasting each word to the
//   lanes whose code it holds and one per-lane shift (a funnel shift, vpshrdvd, where a code crosses a word
//   boundary).  x is read as plain vectors of 16 consecutive rows.  A block of 16 weights thus costs ~4
//   instructions (2 broadcasts, a shift, a permute) plus one FMA per row of x.  8-bit codes (256 values)
//   are computed instead: byte shuffle, int -> float, (q - z) * s exactly by one FMA, fp16 rounding by
//   vcvtps2ph/vcvtph2ps.  Each (row of x, column) keeps 16 partial sums, reduced at the end.
// Few rows of x, AVX2 + FMA + F16C: "columns in lanes".  An 8-lane vector holds one packed row of 8
//   columns (one load); each code is cut by constant shifts and masks and its weight computed as for 8-bit
//   codes above, then FMA'd with x broadcast, straight into y.
// Many rows of x (M >= PANEL_MIN_M), either: decode a panel of PANEL_ROWS x PANEL_COLS weights into fp32
//   (columns in lanes, computed as above) once, then an ordinary register-tiled fp32 GEMM on it, so the
//   decoding is shared by all M rows and every load feeds several FMAs.
// Neither instruction set: the portable scalar loops (bits_impl.h matmul_tile).
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <type_traits>
#include <utility>
#include "../exl2_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && defined(__FMA__)
#define EXL2_MM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EXL2_MM_AVX2 1
#endif

#if defined(EXL2_MM_AVX512) || defined(EXL2_MM_AVX2)
#include <immintrin.h>
#define EXL2_MM_SIMD 1
#endif

#define EXL2_ALWAYS_INLINE inline __attribute__((always_inline))

namespace exl2 {
namespace cpu {
namespace mm {

constexpr long TILE = 32;            // columns: threads split the output in whole tiles
constexpr long CHUNK_ROWS = 128;     // few-rows path: rows of a group per pass over a strip (a multiple of 32)
constexpr long PANEL_MIN_M = 10;     // rows of x from which the panel path runs (measured crossover ~8-12)
constexpr long PANEL_ROWS = 256;     // panel path: rows per decoded panel (a multiple of 32)
constexpr long PANEL_COLS = 256;     // panel path: columns per decoded panel (a multiple of 32)
constexpr int PANEL_MR = 6;          // panel path: rows of x per register tile

// Rows of x in blocks of {8, 4, 3, 2, 1}, largest first (M = 7 -> 4, 3; M = 9 -> 8, 1).
struct MBlock {
    int m0, mb;
};

inline int plan_mblocks(long M, MBlock* out) {
    static const int sizes[] = {8, 4, 3, 2, 1};
    int n = 0;
    for (long m = 0; m < M;) {
        int mb = 1;
        for (int s : sizes)
            if (M - m >= s) { mb = s; break; }
        out[n++] = MBlock{(int)m, mb};
        m += mb;
    }
    return n;
}

template <int I, int N, class F>
EXL2_ALWAYS_INLINE void static_for(F&& f) {
    if constexpr (I < N) {
        f(std::integral_constant<int, I>{});
        static_for<I + 1, N>(f);
    }
}

// Code r of a BITS-bit run as stored (docs/format.md): stream bits [r*BITS, (r+1)*BITS) of the column.
template <int BITS> constexpr int code_word(int r) { return (r * BITS) >> 5; }
template <int BITS> constexpr int code_shift(int r) { return (r * BITS) & 31; }
template <int BITS> constexpr bool code_straddles(int r) { return code_shift<BITS>(r) + BITS > 32; }

// sum_{r0 <= r < rows} x[r] * w[r] for one column, w the loader's value: the rows left over after the
// vector blocks (none in a valid layer; kept for hand-made groups).  p: the column's word holding row
// r0's first bit (r0 * BITS is a multiple of 32).
template <int BITS>
inline float scalar_tail(const uint32_t* p, long np, float s, const float* x, long r0, long rows) {
    BitReader<BITS> br(p, np);
    float acc = 0.0f;
    for (long r = r0; r < rows; r++) acc += x[r] * half_to_float(dequant_value<BITS>(br.next(), s));
    return acc;
}

#if defined(EXL2_MM_SIMD)
// ================================================================================================
// Vectors: 16 lanes (AVX-512) or 8 (AVX2), for the loops written once for both
// ================================================================================================

#if defined(EXL2_MM_AVX512)
struct Vec {
    using f = __m512;
    using i = __m512i;
    static constexpr int N = 16;
    static EXL2_ALWAYS_INLINE i loadi(const uint32_t* p) { return _mm512_loadu_si512(p); }
    static EXL2_ALWAYS_INLINE f load(const float* p) { return _mm512_loadu_ps(p); }
    static EXL2_ALWAYS_INLINE f load_aligned(const float* p) { return _mm512_load_ps(p); }
    static EXL2_ALWAYS_INLINE void store(float* p, f v) { _mm512_storeu_ps(p, v); }
    static EXL2_ALWAYS_INLINE void store_aligned(float* p, f v) { _mm512_store_ps(p, v); }
    static EXL2_ALWAYS_INLINE f set1(float v) { return _mm512_set1_ps(v); }
    static EXL2_ALWAYS_INLINE f zero() { return _mm512_setzero_ps(); }
    static EXL2_ALWAYS_INLINE f add(f a, f b) { return _mm512_add_ps(a, b); }
    static EXL2_ALWAYS_INLINE f mul(f a, f b) { return _mm512_mul_ps(a, b); }
    static EXL2_ALWAYS_INLINE f fmadd(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
    static EXL2_ALWAYS_INLINE f fmsub(f a, f b, f c) { return _mm512_fmsub_ps(a, b, c); }
    static EXL2_ALWAYS_INLINE f cvt(i v) { return _mm512_cvtepi32_ps(v); }
    // fp16 rounding, to nearest even, whatever MXCSR says (float_to_half).
    static EXL2_ALWAYS_INLINE f round_half(f v) {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    // Bits [s, s + BITS) of w (lo) or of hi:lo (a code crossing into the next word), as an int.
    template <int S, int BITS>
    static EXL2_ALWAYS_INLINE i field(i lo) {
        i v = S ? _mm512_srli_epi32(lo, S) : lo;
        return S + BITS < 32 ? _mm512_and_si512(v, _mm512_set1_epi32((1 << BITS) - 1)) : v;
    }
    template <int S, int BITS>
    static EXL2_ALWAYS_INLINE i field2(i lo, i hi) {    // (lo >> S | hi << (32 - S)) & mask, one ternlog
        return _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, S), _mm512_slli_epi32(hi, 32 - S),
                                         _mm512_set1_epi32((1 << BITS) - 1), 0xA8);
    }
};
#else
struct Vec {
    using f = __m256;
    using i = __m256i;
    static constexpr int N = 8;
    static EXL2_ALWAYS_INLINE i loadi(const uint32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
    static EXL2_ALWAYS_INLINE f load(const float* p) { return _mm256_loadu_ps(p); }
    static EXL2_ALWAYS_INLINE f load_aligned(const float* p) { return _mm256_load_ps(p); }
    static EXL2_ALWAYS_INLINE void store(float* p, f v) { _mm256_storeu_ps(p, v); }
    static EXL2_ALWAYS_INLINE void store_aligned(float* p, f v) { _mm256_store_ps(p, v); }
    static EXL2_ALWAYS_INLINE f set1(float v) { return _mm256_set1_ps(v); }
    static EXL2_ALWAYS_INLINE f zero() { return _mm256_setzero_ps(); }
    static EXL2_ALWAYS_INLINE f add(f a, f b) { return _mm256_add_ps(a, b); }
    static EXL2_ALWAYS_INLINE f mul(f a, f b) { return _mm256_mul_ps(a, b); }
    static EXL2_ALWAYS_INLINE f fmadd(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
    static EXL2_ALWAYS_INLINE f fmsub(f a, f b, f c) { return _mm256_fmsub_ps(a, b, c); }
    static EXL2_ALWAYS_INLINE f cvt(i v) { return _mm256_cvtepi32_ps(v); }
    static EXL2_ALWAYS_INLINE f round_half(f v) {
        return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    template <int S, int BITS>
    static EXL2_ALWAYS_INLINE i field(i lo) {
        i v = S ? _mm256_srli_epi32(lo, S) : lo;
        return S + BITS < 32 ? _mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1)) : v;
    }
    template <int S, int BITS>
    static EXL2_ALWAYS_INLINE i field2(i lo, i hi) {
        return _mm256_and_si256(_mm256_or_si256(_mm256_srli_epi32(lo, S), _mm256_slli_epi32(hi, 32 - S)),
                                _mm256_set1_epi32((1 << BITS) - 1));
    }
};
#endif

// ------------------------------------------------------------------------------------------------
// Columns in lanes: code R of a 32-row unit, for Vec::N columns whose words w[0..BITS) were loaded whole,
// and its weight fp16((q - z) * s) = round_half(q * s - z * s): q * s and z * s are exact in fp32 (a code
// of at most 8 bits times an fp16 scale), so the FMA's one rounding leaves (q - z) * s exact.
// ------------------------------------------------------------------------------------------------

template <int BITS, int R>
EXL2_ALWAYS_INLINE Vec::f weight_cols(const Vec::i* w, Vec::f s, Vec::f zs) {
    constexpr int i = code_word<BITS>(R), sh = code_shift<BITS>(R);
    Vec::i q;
    if constexpr (sh + BITS <= 32) q = Vec::field<sh, BITS>(w[i]);
    else q = Vec::field2<sh, BITS>(w[i], w[i + 1]);
    return Vec::round_half(Vec::fmsub(Vec::cvt(q), s, zs));
}

// ------------------------------------------------------------------------------------------------
// Panel path (many rows of x)
// ------------------------------------------------------------------------------------------------

// Rows [0, rows) of a group (a multiple of 16; of 32 for odd widths) from p (their first packed row, at
// the panel's first column) into panel[r * ldp + c], c < nc (a multiple of 32).  Reads q_weight along its
// rows.
template <int BITS>
void decode_piece(const uint32_t* p, long rows, long np, const float* sc, long nc, float* panel, long ldp) {
    constexpr int z = 1 << (BITS - 1);
    const long units = rows / 32;
    for (long c = 0; c < nc; c += Vec::N) {
        const Vec::f s = Vec::load(sc + c);
        const Vec::f zs = Vec::mul(s, Vec::set1((float)z));    // exact (a power of two)
        auto unit = [&](const uint32_t* pu, float* out, auto nr) {
            constexpr int NR = decltype(nr)::value;
            Vec::i w[BITS];
            for (int i = 0; i < NR * BITS / 32; i++) w[i] = Vec::loadi(pu + i * np);
            static_for<0, NR>([&](auto r) {
                Vec::store_aligned(out + decltype(r)::value * ldp, weight_cols<BITS, decltype(r)::value>(w, s, zs));
            });
        };
        long u = 0;
        for (; u < units; u++) unit(p + u * BITS * np + c, panel + 32 * u * ldp + c, std::integral_constant<int, 32>{});
        if constexpr (BITS % 2 == 0) {         // a 16-row half unit (its codes end on a word boundary)
            if (rows - 32 * u >= 16)
                unit(p + u * BITS * np + c, panel + 32 * u * ldp + c, std::integral_constant<int, 16>{});
        }
    }
}

// y[m * ldy + c] += sum_{k < kc} x[m * ldx + k] * panel[k * ldp + c] for m < MR, c < NR * Vec::N: the
// MR x NR accumulators stay in registers, each weight vector is loaded once for MR FMAs and each x once
// (broadcast) for NR.
template <int MR, int NR>
EXL2_ALWAYS_INLINE void panel_tile(const float* x, long ldx, const float* w, long ldp, long kc, float* y, long ldy) {
    Vec::f a[MR][NR];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NR; j++) a[m][j] = Vec::zero();
    for (long k = 0; k < kc; k++) {
        Vec::f wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = Vec::load_aligned(w + k * ldp + Vec::N * j);
        for (int m = 0; m < MR; m++) {
            const Vec::f xb = Vec::set1(x[m * ldx + k]);
            for (int j = 0; j < NR; j++) a[m][j] = Vec::fmadd(wv[j], xb, a[m][j]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NR; j++) {
            float* yp = y + m * ldy + Vec::N * j;
            Vec::store(yp, Vec::add(Vec::load(yp), a[m][j]));
        }
}

// Register tiles: AVX-512 6 x 4 vectors (24 of 32 registers, 64 columns), AVX2 6 x 2 (12 of 16, 16 columns).
constexpr int PANEL_NR = Vec::N == 16 ? 4 : 2;

// MR rows of x (x at the panel's first row), nc columns (a multiple of 32) of the panel, into y.
template <int MR>
void panel_gemm(const float* x, long ldx, const float* panel, long ldp, long kc, long nc, float* y, long ldy) {
    constexpr long W = (long)PANEL_NR * Vec::N;
    long c = 0;
    for (; c + W <= nc; c += W) panel_tile<MR, PANEL_NR>(x, ldx, panel + c, ldp, kc, y + c, ldy);
    for (; c < nc; c += 2 * Vec::N) panel_tile<MR, 2>(x, ldx, panel + c, ldp, kc, y + c, ldy);
}

#endif  // EXL2_MM_SIMD

#if defined(EXL2_MM_AVX512)
// ================================================================================================
// Few rows of x, AVX-512: rows in lanes
// ================================================================================================

// Block H (rows 16H .. 16H+15) of a 32-row unit: the word each lane's code starts in, its shift, and
// whether it runs into the next word.
template <int BITS, int H>
struct RowBlock {
    static constexpr int word(int r) { return code_word<BITS>(16 * H + r); }
    static constexpr int shift(int r) { return code_shift<BITS>(16 * H + r); }
    static constexpr bool straddles(int r) { return code_straddles<BITS>(16 * H + r); }
    static constexpr int lo_first = code_word<BITS>(16 * H);
    static constexpr int lo_last = code_word<BITS>(16 * H + 15);
    static constexpr unsigned lo_mask(int j) {      // lanes whose code starts in word j
        unsigned m = 0;
        for (int r = 0; r < 16; r++)
            if (word(r) == j) m |= 1u << r;
        return m;
    }
    static constexpr int hi_first() {               // first word a code runs into (-1: none)
        for (int r = 0; r < 16; r++)
            if (straddles(r)) return word(r) + 1;
        return -1;
    }
    static constexpr int hi_last() {
        int v = -1;
        for (int r = 0; r < 16; r++)
            if (straddles(r)) v = word(r) + 1;
        return v;
    }
    static constexpr unsigned hi_mask(int j) {      // lanes whose code runs into word j
        unsigned m = 0;
        for (int r = 0; r < 16; r++)
            if (straddles(r) && word(r) + 1 == j) m |= 1u << r;
        return m;
    }
    static EXL2_ALWAYS_INLINE __m512i shifts() {
        return _mm512_setr_epi32(shift(0), shift(1), shift(2), shift(3), shift(4), shift(5), shift(6), shift(7),
                                 shift(8), shift(9), shift(10), shift(11), shift(12), shift(13), shift(14),
                                 shift(15));
    }
};

// v with the lanes of k replaced by *w.  Below 8 bits: a broadcast load and a blend (port 0 or 5) rather
// than the masked broadcast the compiler would fuse them into, whose merge runs on port 5 only, where the
// table lookups run (10-20% faster for 3- to 6-bit codes).  8-bit codes keep port 0 busy converting, so
// their merges stay on port 5.
template <int BITS>
EXL2_ALWAYS_INLINE __m512i merge_word(__m512i v, __mmask16 k, const uint32_t* w) {
    if constexpr (BITS == 8) {
        return _mm512_mask_set1_epi32(v, k, (int)*w);
    } else {
        __m512i b = _mm512_set1_epi32((int)*w);
        __asm__("" : "+v"(b));               // keeps the load and the blend apart
        return _mm512_mask_blend_epi32(k, v, b);
    }
}

// The 16 codes of rows 16H .. 16H+15 of the unit whose first word (of this column) is p; a column's words
// are np apart.  Below 8 bits the bits above each code are left in place: the table lookups ignore them.
template <int BITS, int H>
EXL2_ALWAYS_INLINE __m512i extract_codes(const uint32_t* p, long np) {
    using B = RowBlock<BITS, H>;
    __m512i lo = _mm512_set1_epi32((int)p[B::lo_first * np]);
    static_for<B::lo_first + 1, B::lo_last + 1>([&](auto j) {
        lo = merge_word<BITS>(lo, (__mmask16)B::lo_mask(j), p + j * np);
    });
    constexpr int hf = B::hi_first();
    if constexpr (BITS == 8) {
        // Lanes 4i .. 4i+3 hold word i: byte (lane % 4) of it, zero-extended, by one in-lane byte shuffle.
        const __m512i pick = _mm512_set4_epi32((int)0x80808003, (int)0x80808002, (int)0x80808001, (int)0x80808000);
        return _mm512_shuffle_epi8(lo, pick);
    } else if constexpr (hf < 0) {
        return _mm512_srlv_epi32(lo, B::shifts());
    } else {
        constexpr int hl = B::hi_last();
        __m512i hi = _mm512_set1_epi32((int)p[hf * np]);    // lanes that run into no word: any value
        static_for<hf + 1, hl + 1>([&](auto j) {
            if constexpr (B::hi_mask(j) != 0) hi = merge_word<BITS>(hi, (__mmask16)B::hi_mask(j), p + j * np);
        });
#if defined(__AVX512VBMI2__)
        return _mm512_shrdv_epi32(lo, hi, B::shifts());      // (hi:lo) >> shift, low 32 bits
#else
        const __m512i sh = B::shifts();
        return _mm512_or_si512(_mm512_srlv_epi32(lo, sh),
                               _mm512_sllv_epi32(hi, _mm512_sub_epi32(_mm512_set1_epi32(32), sh)));
#endif
    }
}

// Per (group, column): the weight of every code (b <= 6), or the scale and z * scale (b = 8).
template <int BITS> struct Table {
    static constexpr int regs = BITS <= 4 ? 1 : (BITS == 5 ? 2 : (BITS == 6 ? 4 : 2));
    __m512 t[regs];
};

template <int BITS>
EXL2_ALWAYS_INLINE void build_table(float s, Table<BITS>& tb) {
    const __m512 sv = _mm512_set1_ps(s);
    constexpr int z = 1 << (BITS - 1);
    if constexpr (BITS == 8) {
        tb.t[0] = sv;
        tb.t[1] = _mm512_mul_ps(sv, _mm512_set1_ps((float)z));         // exact (a power of two)
    } else {
        // Entry i of register t is code (16t + i) mod 2^b: narrower codes repeat, so the bits of the next
        // code left above a code never change the entry picked.
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int t = 0; t < Table<BITS>::regs; t++) {
            __m512i q = _mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * t)),
                                         _mm512_set1_epi32((1 << BITS) - 1));
            __m512 lv = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(z)));   // q - z, exact
            tb.t[t] = Vec::round_half(_mm512_mul_ps(lv, sv));                         // dequant_value
        }
    }
}

template <int BITS>
EXL2_ALWAYS_INLINE __m512 lookup(__m512i code, const Table<BITS>& tb) {
    if constexpr (BITS <= 4) {
        return _mm512_permutexvar_ps(code, tb.t[0]);                   // index bits 0-3
    } else if constexpr (BITS == 5) {
        return _mm512_permutex2var_ps(tb.t[0], code, tb.t[1]);        // index bits 0-4
    } else if constexpr (BITS == 6) {
        __m512 a = _mm512_permutex2var_ps(tb.t[0], code, tb.t[1]);
        __m512 b = _mm512_permutex2var_ps(tb.t[2], code, tb.t[3]);
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(code, _mm512_set1_epi32(32)), a, b);
    } else {
        return Vec::round_half(_mm512_fmsub_ps(_mm512_cvtepi32_ps(code), tb.t[0], tb.t[1]));   // exact product
    }
}

// One chunk of a group (rows [0, rows)) for CP columns and MB rows of x, into acc[m][j] (16-lane partial
// sums of row m of x and column j).  p: the chunk's first packed row at the first column; sc: the group's
// scales at the first column; x: the block's first row of x at the chunk's first row.
template <int BITS, int MB, int CP>
EXL2_ALWAYS_INLINE void columns_chunk(const uint32_t* p, long rows, long np, const float* sc, const float* x,
                                      long ldx, __m512 (&acc)[MB][CP]) {
    Table<BITS> tab[CP];
    for (int j = 0; j < CP; j++) build_table<BITS>(sc[j], tab[j]);
    auto block = [&](const uint32_t* pu, const float* xu, auto h) {
        constexpr int H = decltype(h)::value;
        __m512 xv[MB];                       // x loaded once for the CP columns
        for (int m = 0; m < MB; m++) xv[m] = _mm512_loadu_ps(xu + m * ldx + 16 * H);
        for (int j = 0; j < CP; j++) {
            const __m512 w = lookup<BITS>(extract_codes<BITS, H>(pu + j, np), tab[j]);
            for (int m = 0; m < MB; m++) acc[m][j] = _mm512_fmadd_ps(w, xv[m], acc[m][j]);
        }
    };
    using H0 = std::integral_constant<int, 0>;
    using H1 = std::integral_constant<int, 1>;
    const long units = rows / 32;
    long u = 0;
    for (; u < units; u++) {
        const uint32_t* pu = p + u * BITS * np;
        block(pu, x + u * 32, H0{});
        block(pu, x + u * 32, H1{});
    }
    long r = units * 32;
    if constexpr (BITS % 2 == 0) {           // a 16-row half unit (its codes end on a word boundary)
        if (rows - r >= 16) {
            block(p + u * BITS * np, x + r, H0{});
            r += 16;
        }
    }
    if (r < rows) {                          // anything shorter: scalar, into lane 0
        for (int j = 0; j < CP; j++)
            for (int m = 0; m < MB; m++) {
                float t = scalar_tail<BITS>(p + (r * BITS / 32) * np + j, np, sc[j], x + m * ldx, r, rows);
                acc[m][j] = _mm512_mask_add_ps(acc[m][j], 1, acc[m][j], _mm512_set1_ps(t));
            }
    }
}

// Columns per pass for MB rows of x: MB * CP accumulators (at most 16 of the 32 registers) and MB x vectors
// loaded once per pass.
constexpr int cols_per_pass(int mb) { return mb == 1 ? 8 : (mb <= 4 ? 4 : 2); }

// One chunk of a group for the nc columns of a strip and MB rows of x.  acc: the strip's partial sums,
// acc[j * ldacc + m] for column j and row m of the block.  Passes of CP columns walk the chunk's packed
// rows side by side, so each packed row is read along its length (the hardware prefetchers follow), and
// a pass cuts each code once for all MB rows of x.
template <int BITS, int MB>
void strip_chunk_mb(const uint32_t* p, long rows, long np, const float* sc, const float* x, long ldx, long nc,
                    __m512* acc, long ldacc) {
    constexpr int CP = cols_per_pass(MB);
    for (long c = 0; c < nc; c += CP) {
        __m512 a[MB][CP];
        for (int j = 0; j < CP; j++)
            for (int m = 0; m < MB; m++) a[m][j] = acc[(c + j) * ldacc + m];
        columns_chunk<BITS, MB, CP>(p + c, rows, np, sc + c, x, ldx, a);
        for (int j = 0; j < CP; j++)
            for (int m = 0; m < MB; m++) acc[(c + j) * ldacc + m] = a[m][j];
    }
}

template <int BITS>
void strip_chunk(const uint32_t* p, long rows, long np, const float* sc, const float* x, long ldx, int mb,
                 long nc, __m512* acc, long ldacc) {
    switch (mb) {
        case 8: strip_chunk_mb<BITS, 8>(p, rows, np, sc, x, ldx, nc, acc, ldacc); break;
        case 4: strip_chunk_mb<BITS, 4>(p, rows, np, sc, x, ldx, nc, acc, ldacc); break;
        case 3: strip_chunk_mb<BITS, 3>(p, rows, np, sc, x, ldx, nc, acc, ldacc); break;
        case 2: strip_chunk_mb<BITS, 2>(p, rows, np, sc, x, ldx, nc, acc, ldacc); break;
        default: strip_chunk_mb<BITS, 1>(p, rows, np, sc, x, ldx, nc, acc, ldacc); break;
    }
}

#define EXL2_MM_STRIP_CHUNK_DECL(X, B)                                                                    \
    X template void strip_chunk<B>(const uint32_t*, long, long, const float*, const float*, long, int, long, \
                                   __m512*, long);

#elif defined(EXL2_MM_AVX2)
// ================================================================================================
// Few rows of x, AVX2: columns in lanes, straight into y
// ================================================================================================

// One vector of 8 columns (p: their word in the chunk's first packed row), `units` 32-row units and an
// optional 16-row half unit, MB rows of x; acc[m] += ...  NA = 2: even and odd rows in separate FMA chains.
template <int BITS, int MB, int NA>
EXL2_ALWAYS_INLINE void cols_rows(const uint32_t* p, long np, long units, bool half, __m256 s, __m256 zs,
                                  const float* x, long ldx, __m256* acc) {
    __m256 a[NA][MB];
    for (int m = 0; m < MB; m++) {
        a[0][m] = acc[m];
        if constexpr (NA == 2) a[1][m] = _mm256_setzero_ps();
    }
    auto unit = [&](const uint32_t* pu, const float* xu, auto nr) {
        constexpr int NR = decltype(nr)::value;
        __m256i w[BITS];
        for (int i = 0; i < NR * BITS / 32; i++) w[i] = Vec::loadi(pu + i * np);
        static_for<0, NR>([&](auto r) {
            constexpr int R = decltype(r)::value;
            const __m256 wt = weight_cols<BITS, R>(w, s, zs);
            for (int m = 0; m < MB; m++)
                a[NA == 2 ? (R & 1) : 0][m] = _mm256_fmadd_ps(wt, _mm256_broadcast_ss(xu + m * ldx + R),
                                                              a[NA == 2 ? (R & 1) : 0][m]);
        });
    };
    long u = 0;
    for (; u < units; u++) unit(p + u * BITS * np, x + u * 32, std::integral_constant<int, 32>{});
    if constexpr (BITS % 2 == 0) {
        if (half) unit(p + u * BITS * np, x + u * 32, std::integral_constant<int, 16>{});
    }
    for (int m = 0; m < MB; m++) acc[m] = NA == 2 ? _mm256_add_ps(a[0][m], a[1][m]) : a[0][m];
}

// One chunk of a group (rows [0, rows), p its first packed row at column 0, sc the group's scales, x0 the
// first row of x at the chunk's first row) for the columns [c0, c0 + nc) and the blocks of rows of x,
// into y [M, np].
template <int BITS>
void strip_chunk(const uint32_t* p, long rows, long np, const float* sc, const float* x0, long ldx,
                 const MBlock* blocks, int nblocks, long c0, long nc, float* y) {
    constexpr int z = 1 << (BITS - 1);
    const long units = rows / 32;
    const bool half = BITS % 2 == 0 && rows - units * 32 >= 16;
    const long tail0 = units * 32 + (half ? 16 : 0);
    for (int b = 0; b < nblocks; b++) {
        const MBlock& mbk = blocks[b];
        const float* xb = x0 + (long)mbk.m0 * ldx;
        for (long c = c0; c < c0 + nc; c += 8) {
            const __m256 s = _mm256_loadu_ps(sc + c);
            const __m256 zs = _mm256_mul_ps(s, _mm256_set1_ps((float)z));
            __m256 acc[8];
            for (int m = 0; m < mbk.mb; m++) acc[m] = _mm256_loadu_ps(y + (long)(mbk.m0 + m) * np + c);
            const uint32_t* pc = p + c;
            switch (mbk.mb) {
                case 8: cols_rows<BITS, 8, 1>(pc, np, units, half, s, zs, xb, ldx, acc); break;
                case 4: cols_rows<BITS, 4, 1>(pc, np, units, half, s, zs, xb, ldx, acc); break;
                case 3: cols_rows<BITS, 3, 2>(pc, np, units, half, s, zs, xb, ldx, acc); break;
                case 2: cols_rows<BITS, 2, 2>(pc, np, units, half, s, zs, xb, ldx, acc); break;
                default: cols_rows<BITS, 1, 2>(pc, np, units, half, s, zs, xb, ldx, acc); break;
            }
            for (int m = 0; m < mbk.mb; m++) _mm256_storeu_ps(y + (long)(mbk.m0 + m) * np + c, acc[m]);
            if (tail0 < rows) {              // rows that fill no block: scalar, per column
                for (int m = 0; m < mbk.mb; m++)
                    for (long j = 0; j < 8; j++)
                        y[(long)(mbk.m0 + m) * np + c + j] +=
                            scalar_tail<BITS>(p + (tail0 * BITS / 32) * np + c + j, np, sc[c + j], xb + m * ldx,
                                              tail0, rows);
            }
        }
    }
}

#define EXL2_MM_STRIP_CHUNK_DECL(X, B)                                                                    \
    X template void strip_chunk<B>(const uint32_t*, long, long, const float*, const float*, long,          \
                                   const MBlock*, int, long, long, float*);
#endif

// One instance of each per width, in its own translation unit (bits_<b>.cpp; ninja builds them in
// parallel): EXL2_MM_INSTANCES(B) there, extern declarations everywhere else.
#if defined(EXL2_MM_SIMD)
#define EXL2_MM_DECLS(X, B)                                                                              \
    EXL2_MM_STRIP_CHUNK_DECL(X, B)                                                                       \
    X template void decode_piece<B>(const uint32_t*, long, long, const float*, long, float*, long);
#define EXL2_MM_INSTANCES(B) namespace mm { EXL2_MM_DECLS(, B) }
EXL2_MM_DECLS(extern, 2)
EXL2_MM_DECLS(extern, 3)
EXL2_MM_DECLS(extern, 4)
EXL2_MM_DECLS(extern, 5)
EXL2_MM_DECLS(extern, 6)
EXL2_MM_DECLS(extern, 8)
#else
#define EXL2_MM_INSTANCES(B)
#endif

}  // namespace mm
}  // namespace cpu
}  // namespace exl2
