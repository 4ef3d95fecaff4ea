// Per-element math of the EXL2 kernels, shared by the CPU (g++) and CUDA (nvcc) builds.
//
// Everything here is a small inline function over scalars: bit extraction and insertion per width,
// fp16 rounding, the loader's scale formula, the GPTQ rounding and row update, the Walsh-Hadamard
// butterfly of the KV cache.  The CPU extension calls these very functions, so its bit-exact tests
// against the torch reference (quant_kernels/codec.py, gptq.py, kv_quant.py) cover the GPU's math too;
// only indexing and memory movement differ between the two builds.
//
// No torch (and no c10::Half) here: the .cu files include this header and must compile against a CPU
// build of torch.  fp16 values travel as uint16_t bit patterns.
//
// Floating-point contract: products and sums are rounded separately (no FMA contraction), as torch's
// elementwise ops do.  The host build passes -ffp-contract=off; device code uses the _rn intrinsics,
// which nvcc never fuses.
#pragma once

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define EXL2_HD __host__ __device__ __forceinline__
#else
#define EXL2_HD inline
#endif

namespace exl2 {

// ------------------------------------------------------------------------------------------------
// Exact fp32 helpers (no contraction, default rounding)
// ------------------------------------------------------------------------------------------------

EXL2_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

EXL2_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

EXL2_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

EXL2_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// Round to nearest integer, ties to even (torch.round, __half2int_rn, rint in the default mode).
EXL2_HD float rint_even(float x) {
#if defined(__CUDA_ARCH__)
    return rintf(x);
#else
    return __builtin_rintf(x);
#endif
}

EXL2_HD float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

EXL2_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    union { float f; uint32_t u; } v; v.f = f; return v.u;
#endif
}

EXL2_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    union { float f; uint32_t u; } v; v.u = u; return v.f;
#endif
}

// ------------------------------------------------------------------------------------------------
// fp16 <-> fp32, round to nearest even (portable; tested over all 65536 halves against torch)
// ------------------------------------------------------------------------------------------------

// fp16 bit pattern -> fp32 (exact).
EXL2_HD float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t u;
    if (exp == 0x1Fu) {                       // inf / NaN (payload kept, made quiet)
        u = sign | 0x7F800000u | (man << 13) | (man ? 0x00400000u : 0u);
    } else if (exp != 0) {                    // normal
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {                    // zero
        u = sign;
    } else {                                  // subnormal: man * 2^-24, exact in fp32
        float f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    return bits_f32(u);
}

// fp32 -> fp16 bit pattern, round to nearest, ties to even; overflow gives inf, NaN stays NaN.
EXL2_HD uint16_t float_to_half(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u)                                     // inf or NaN
        return sign | 0x7C00u | (a > 0x7F800000u ? (uint16_t)(0x200u | ((a >> 13) & 0x3FFu)) : 0u);
    if (a >= 0x477FF000u) return sign | 0x7C00u;              // >= 65520: rounds to inf
    if (a >= 0x38800000u) {                                   // normal half range (>= 2^-14)
        uint32_t mant = a & 0x7FFFFFu;
        uint32_t e = (a >> 23) - 112u;                        // half exponent, 1..30
        uint32_t r = (e << 10) | (mant >> 13);
        uint32_t rem = mant & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r += 1u;   // carry may bump the exponent: correct
        return sign | (uint16_t)r;
    }
    if (a < 0x33000000u) return sign;                         // < 2^-25: rounds to zero (2^-25 is a tie -> 0)
    // Subnormal half: value = m * 2^-24 with m in [0, 1024]
    uint32_t e = a >> 23;                                     // 102..112
    uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;              // 24-bit significand
    uint32_t shift = 126u - e;                                // 14..24
    uint32_t r = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) r += 1u;
    return sign | (uint16_t)r;
}

// Round an fp32 value to the nearest fp16 and back: one fp16 operation on fp32-computed operands.
EXL2_HD float round_half(float f) { return half_to_float(float_to_half(f)); }

// ------------------------------------------------------------------------------------------------
// The EXL2 bitstream (docs/format.md): code i of a b-bit run occupies stream bits [i*b, (i+1)*b),
// stream bit j is bit j % 32 of word j / 32; a code crossing a word keeps its low bits in the earlier
// word.  One column is one stream; consecutive words of a column are `stride` elements apart.
// ------------------------------------------------------------------------------------------------

// Reads consecutive BITS-bit codes of one column.
template <int BITS>
struct BitReader {
    const uint32_t* words;
    long stride;
    uint64_t buf;
    int nbits;
    EXL2_HD BitReader(const uint32_t* w, long s) : words(w), stride(s), buf(0), nbits(0) {}
    EXL2_HD uint32_t next() {
        if (nbits < BITS) {                   // refill: the next word goes above the bits left over
            buf |= (uint64_t)(*words) << nbits;
            words += stride;
            nbits += 32;
        }
        uint32_t q = (uint32_t)buf & ((1u << BITS) - 1u);
        buf >>= BITS;
        nbits -= BITS;
        return q;
    }
};

// Writes consecutive BITS-bit codes of one column; call flush() when rows*BITS is not yet a multiple
// of 32 (never needed for whole EXL2 groups).
template <int BITS>
struct BitWriter {
    uint32_t* words;
    long stride;
    uint64_t buf;
    int nbits;
    EXL2_HD BitWriter(uint32_t* w, long s) : words(w), stride(s), buf(0), nbits(0) {}
    EXL2_HD void put(uint32_t q) {
        buf |= (uint64_t)(q & ((1u << BITS) - 1u)) << nbits;
        nbits += BITS;
        if (nbits >= 32) {
            *words = (uint32_t)buf;
            words += stride;
            buf >>= 32;
            nbits -= 32;
        }
    }
    EXL2_HD void flush() {
        if (nbits > 0) { *words = (uint32_t)buf; words += stride; buf = 0; nbits = 0; }
    }
};

// 4-bit scale code of column n from the packed q_scale row: word n / 8, nibble n % 8.
EXL2_HD uint32_t scale_code(const uint32_t* q_scale_row, int n) {
    return (q_scale_row[n >> 3] >> ((n & 7) * 4)) & 0xFu;
}

// ------------------------------------------------------------------------------------------------
// Scales and dequantization, rounded as ExLlamaV2's loader does (codec.group_scales)
// ------------------------------------------------------------------------------------------------

// fp16(q_scale_max * prescale / 256), with `smax_mul` = fp32(prescale / 256).
EXL2_HD float group_smax(uint16_t q_scale_max, float smax_mul) {
    return round_half(mul_rn(half_to_float(q_scale_max), smax_mul));
}

// s = fp16( fp16((code + 1)^2) * smax16 ); returned as fp32 holding the fp16 value.
EXL2_HD float dequant_scale(uint32_t code, float smax16) {
    float sq = (float)((code + 1u) * (code + 1u));     // <= 256, exact in fp16
    return round_half(mul_rn(sq, smax16));
}

// The loader's weight: fp16((q - 2^(b-1)) * s), as an fp16 bit pattern.
template <int BITS>
EXL2_HD uint16_t dequant_value(uint32_t q, float s) {
    return float_to_half(mul_rn((float)((int)q - (1 << (BITS - 1))), s));
}

// ------------------------------------------------------------------------------------------------
// GPTQ (gptq.quantize_rows, gptq.quantize's row loop)
// ------------------------------------------------------------------------------------------------

// q = clamp(rint(w / s) + 2^(b-1), 0, 2^b - 1); a zero scale gives the zero code.  Returns the code
// and stores the fp16-exact value fp16((q - zero) * s) in *deq.
EXL2_HD int gptq_quantize(float w, float s, int bits, float* deq) {
    const float zero = (float)(1 << (bits - 1));
    const float maxq = (float)((1 << bits) - 1);
    float q;
    if (s == 0.0f) {
        q = zero;
    } else {
        q = clampf(add_rn(rint_even(div_rn(w, s)), zero), 0.0f, maxq);
    }
    *deq = round_half(mul_rn(sub_rn(q, zero), s));
    return (int)q;
}

// err = (w - q) / Hinv[c, c]
EXL2_HD float gptq_error(float w, float deq, float hinv_cc) { return div_rn(sub_rn(w, deq), hinv_cc); }

// W[r] -= Hinv[c, r] * err[c]: a product and a difference, each rounded (torch's two ops).
EXL2_HD float gptq_update(float w, float hinv_cr, float err) { return sub_rn(w, mul_rn(hinv_cr, err)); }

// Scale search (gptq.find_scales): the term |clamp(rint(w / s), -zero, maxq - zero) * s - w|^3.5.
EXL2_HD float scale_search_term(float w, float s, float lo, float hi) {
    float e = fabsf(sub_rn(mul_rn(clampf(rint_even(div_rn(w, s)), lo, hi), s), w));
    return mul_rn(mul_rn(mul_rn(e, e), e), sqrtf(e));
}

// Multiplier of grid point i (0..96): 0.70 (1 - i/96) + 1.20 i/96, in double as Python computes it.
EXL2_HD double scale_grid_p(int i) {
    double pi = (double)i / 96.0;
    return 0.70 * (1.0 - pi) + 1.20 * pi;
}

// Per-column code multiplier: clamp(rint(sqrt(base / smax) * 16), 1, 16).
EXL2_HD float scale_mult(float base, float smax) {
    return clampf(rint_even(mul_rn(sqrtf(div_rn(base, smax)), 16.0f)), 1.0f, 16.0f);
}

// ------------------------------------------------------------------------------------------------
// KV cache (kv_quant.py): every step one fp16 operation
// ------------------------------------------------------------------------------------------------

EXL2_HD uint16_t h_add(uint16_t a, uint16_t b) { return float_to_half(add_rn(half_to_float(a), half_to_float(b))); }
EXL2_HD uint16_t h_sub(uint16_t a, uint16_t b) { return float_to_half(sub_rn(half_to_float(a), half_to_float(b))); }
EXL2_HD uint16_t h_mul(uint16_t a, float b) { return float_to_half(mul_rn(half_to_float(a), b)); }
EXL2_HD uint16_t h_abs(uint16_t a) { return a & 0x7FFFu; }
EXL2_HD bool h_finite(uint16_t a) { return (a & 0x7C00u) != 0x7C00u; }

// In-place unnormalised 32-point Walsh-Hadamard transform of x[0], x[step], ..., x[31*step] (fp16):
// stages 1, 2, 4, 8, 16; the index with the stage bit clear gets a + b, the other a - b.
EXL2_HD void hadamard32_half(uint16_t* x, int step) {
    for (int h = 1; h < 32; h <<= 1) {
        for (int i = 0; i < 32; i++) {
            if (i & h) continue;
            uint16_t a = x[i * step], b = x[(i + h) * step];
            x[i * step] = h_add(a, b);
            x[(i + h) * step] = h_sub(a, b);
        }
    }
}

// One rotated value v of a group with fp16 max |v| = m -> code (c = 2^(bits-1)).
EXL2_HD uint32_t kv_code(uint16_t v, uint16_t m, int bits) {
    const float c = (float)(1 << (bits - 1));
    if ((m & 0x7FFFu) == 0) return 0;                          // 0/0 = NaN -> __half2int_rn gives 0
    uint16_t w = float_to_half(div_rn(half_to_float(v), half_to_float(m)));   // correctly rounded __h2div
    w = float_to_half(mul_rn(half_to_float(w), c));            // exact (c a power of two)
    w = float_to_half(add_rn(half_to_float(w), c));
    float q = clampf(rint_even(half_to_float(w)), 0.0f, 2.0f * c - 1.0f);
    return (uint32_t)q;
}

// Scale of a group: fp16(m * (1/c)).
EXL2_HD uint16_t kv_scale(uint16_t m, int bits) { return h_mul(m, 1.0f / (float)(1 << (bits - 1))); }

// Decoded (pre-rotation) value: fp16((q - c) * scale).
EXL2_HD uint16_t kv_decode(uint32_t q, uint16_t scale, int bits) {
    return h_mul(float_to_half((float)((int)q - (1 << (bits - 1)))), half_to_float(scale));
}

// Dequantize one 64-element chunk (codes, two group scales) into x[0..63]: decode, the two 32-point
// butterflies (even and odd elements), then x 1/32.  Shared by the CPU loop and the CUDA kernel (one
// chunk per thread).  Returns true if any value overflowed fp16.
EXL2_HD bool kv_dequantize_chunk(const uint8_t* q, const uint16_t* scales, long ch, int bits, uint16_t* x) {
    uint16_t v[64];
    for (int i = 0; i < 64; i++) {
        long e = ch * 64 + i;
        uint32_t code = bits == 8 ? q[e] : ((q[e >> 1] >> ((e & 1) * 4)) & 0xF);
        v[i] = kv_decode(code, scales[ch * 2 + i / 32], bits);
    }
    hadamard32_half(v, 2);
    hadamard32_half(v + 1, 2);
    bool overflow = false;
    for (int i = 0; i < 64; i++) {
        if (!h_finite(v[i])) overflow = true;
        x[ch * 64 + i] = h_mul(v[i], 1.0f / 32.0f);
    }
    return overflow;
}

}  // namespace exl2
