// CPU kernels: raw pointers only.  Torch glue is in ../bind.cpp.
#pragma once
#include <stdint.h>

namespace exl2 {
namespace cpu {

// Per-width kernels (one translation unit per width: bits_<b>.cpp).
// q [rows, n] codes -> w [rows*BITS/32, n] words (rows*BITS must be a multiple of 32).
template <int BITS> void pack(const int32_t* q, long rows, long n, uint32_t* w);
// w [ceil(rows*BITS/32), n] -> q [rows, n]
template <int BITS> void unpack(const uint32_t* w, long rows, long n, int64_t* q);
// One group, one tile of 32 columns starting at t: packed rows qw [rows*BITS/32, np], scales [np]
// (fp16-exact floats), perm [rows] (the original row of each of the group's rows) -> out [np, K] fp16,
// out[n, perm[r]].
template <int BITS> void dequant_tile(const uint32_t* qw, long rows, long np, const float* scales,
                                      const int64_t* perm, long K, uint16_t* out, long t);
// One group, one column tile: y[M, t:t+32] += xp[M, rows] @ Wg[rows, t:t+32]; xp points at the group's
// first (permuted) column of x, row stride ldx.  Weights are dequantized 32 rows at a time.  The portable
// scalar loop, used only by builds without AVX2 (the vector kernels are in matmul_impl.h).
template <int BITS> void matmul_tile(const uint32_t* qw, long rows, long np, const float* scales,
                                     const float* xp, long ldx, long M, float* y, long t);

// Whole layers (layer_cpu.cpp): one parallel loop over column tiles, groups inside.  groups [G, 3] =
// (bits, rows, first packed row); scales [G, np]; perm [K].
void dequant_layer(const uint32_t* qw, const int64_t* groups, long G, long np, const float* scales,
                   const int64_t* perm, long K, uint16_t* out);
// y [M, np] += xp [M, K] @ W, fp32; xp = x with its columns gathered by perm.  y must hold zeros or
// partial sums.
void matmul_layer(const uint32_t* qw, const int64_t* groups, long G, long np, const float* scales,
                  const float* xp, long K, long M, float* y);

// scales[g, n] = fp16(fp16((code+1)^2) * fp16(q_scale_max[g] * smax_mul)), smax_mul = fp32(prescale/256)
void group_scales(const uint32_t* q_scale, const uint16_t* q_scale_max, long G, long np, float smax_mul,
                  float* scales);

// GPTQ of one group: W rows [rows, n] (in place), hinv = &Hinv[a, a] with row stride ldh (nullptr:
// round to nearest), scale [n] -> codes [rows, n], Q [rows, n] (fp16-exact), err [rows, n] (may be
// nullptr when hinv is nullptr).
void gptq_group(float* W, long rows, long n, const float* hinv, long ldh, const float* scale, int bits,
                int64_t* codes, float* Q, float* err);

// find_scales of one group w [rows, n]: codes [n] (0..15), scale_max (fp16 bits), scale [n].
void find_scales(const float* w, long rows, long n, int bits, int64_t* codes, uint16_t* scale_max,
                 float* scale);

// refine_codes of one group w [rows, n] (gptq.refine_codes): per column, the code within +-span of
// codes_in [n] whose rounded column has the least sum of squared errors (summed in double; ties keep the
// smaller code) -> codes_out [n], scale_out [n] (fp16-exact).
void refine_codes(const float* w, long rows, long n, int bits, int span, const int64_t* codes_in,
                  uint16_t scale_max, int64_t* codes_out, float* scale_out);

// KV cache, rows of D fp16 values.  Return 0, or 1 if the rotation overflowed fp16.
int kv_quantize(const uint16_t* x, long rows, long D, int bits, uint8_t* q, uint16_t* scales);
int kv_dequantize(const uint8_t* q, const uint16_t* scales, long rows, long D, int bits, uint16_t* x);

}  // namespace cpu
}  // namespace exl2
