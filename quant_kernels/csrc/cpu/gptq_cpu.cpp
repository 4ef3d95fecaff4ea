// GPTQ group step, scale search and loader scales on the CPU (OpenMP over column tiles: every column
// of a group is quantized independently, so tiles need no synchronisation and results do not depend
// on the thread count).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif
#include "../exl2_math.h"
#include "kernels_cpu.h"

namespace exl2 {
namespace cpu {

void group_scales(const uint32_t* q_scale, const uint16_t* q_scale_max, long G, long np, float smax_mul,
                  float* scales) {
    for (long g = 0; g < G; g++) {
        const float smax16 = group_smax(q_scale_max[g], smax_mul);
        for (long c = 0; c < np; c++) scales[g * np + c] = dequant_scale(scale_code(q_scale + g * (np / 8), (int)c), smax16);
    }
}

static constexpr long GPTQ_TILE = 64;

#if defined(__AVX2__) && defined(__F16C__)
// gptq_quantize for 8 columns: codes (as floats) and the loader's values; zs marks zero scales (zero code).
static inline __m256 quantize8(__m256 wv, __m256 sv, __m256 zs, __m256 zero, __m256 maxq, __m256* deq) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(wv, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, zero), _mm256_setzero_ps()), maxq);
    q = _mm256_blendv_ps(q, zero, zs);
    *deq = _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_mul_ps(_mm256_sub_ps(q, zero), sv), _MM_FROUND_TO_NEAREST_INT));
    return q;
}
#endif

// Columns [c0, c1) of one row wr of a tile: codes, values and (with hinv) errors; e[c - c0] gets the
// error.  The vector path does gptq_quantize's and gptq_error's operations in the same order.
static inline void gptq_row(const float* wr, long c0, long c1, const float* scale, int bits, float hrr,
                            bool has_h, int64_t* codes, float* Q, float* err, float* e) {
    long c = c0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256 zero = _mm256_set1_ps((float)(1 << (bits - 1)));
    const __m256 maxq = _mm256_set1_ps((float)((1 << bits) - 1));
    const __m256 hv = _mm256_set1_ps(hrr);
    for (; c + 8 <= c1; c += 8) {
        const __m256 wv = _mm256_loadu_ps(wr + c), sv = _mm256_loadu_ps(scale + c);
        __m256 deq;
        const __m256 q = quantize8(wv, sv, _mm256_cmp_ps(sv, _mm256_setzero_ps(), _CMP_EQ_OQ), zero, maxq, &deq);
        const __m256i qi = _mm256_cvtps_epi32(q);                       // exact: q is an integer <= 255
        _mm256_storeu_si256((__m256i*)(codes + c), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(qi)));
        _mm256_storeu_si256((__m256i*)(codes + c + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(qi, 1)));
        _mm256_storeu_ps(Q + c, deq);
        if (has_h) {
            const __m256 ev = _mm256_div_ps(_mm256_sub_ps(wv, deq), hv);
            _mm256_storeu_ps(err + c, ev);
            _mm256_storeu_ps(e + (c - c0), ev);
        }
    }
#endif
    for (; c < c1; c++) {
        float deq;
        codes[c] = gptq_quantize(wr[c], scale[c], bits, &deq);
        Q[c] = deq;
        if (has_h) {
            e[c - c0] = gptq_error(wr[c], deq, hrr);
            err[c] = e[c - c0];
        }
    }
}

void gptq_group(float* W, long rows, long n, const float* hinv, long ldh, const float* scale, int bits,
                int64_t* codes, float* Q, float* err) {
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < n; t += GPTQ_TILE) {
        const long c1 = t + GPTQ_TILE < n ? t + GPTQ_TILE : n;
        float e[GPTQ_TILE];
        for (long r = 0; r < rows; r++) {
            float* wr = W + r * n;
            const float hrr = hinv ? hinv[r * ldh + r] : 1.0f;
            gptq_row(wr, t, c1, scale, bits, hrr, hinv != nullptr, codes + r * n, Q + r * n,
                     hinv ? err + r * n : nullptr, e);
            if (!hinv) continue;
            for (long r2 = r + 1; r2 < rows; r2++) {        // W[r+1:rows] -= Hinv[r, r+1:rows]^T (x) err[r]
                const float h = hinv[r * ldh + r2];
                float* w2 = W + r2 * n;
                for (long c = t; c < c1; c++) w2[c] = gptq_update(w2[c], h, e[c - t]);
            }
        }
    }
}

static constexpr long SCALE_TILE = 64;
static constexpr int NGRID = 97;

void find_scales(const float* w, long rows, long n, int bits, int64_t* codes, uint16_t* scale_max, float* scale) {
    const int maxq = (1 << bits) - 1;
    const int zero = 1 << (bits - 1);
    const float lo = (float)-zero, hi = (float)(maxq - zero);
    // Per column: base = (max|w| + 1e-12) / (maxq / 2)
    std::vector<float> base(n);
    #pragma omp parallel for schedule(static)
    for (long c = 0; c < n; c++) {
        float m = 0.0f;
        for (long r = 0; r < rows; r++) { float a = fabsf(w[r * n + c]); m = a > m ? a : m; }
        base[c] = div_rn(add_rn(m, 1e-12f), (float)maxq / 2.0f);
    }
    float smax = 0.0f;
    for (long c = 0; c < n; c++) smax = base[c] > smax ? base[c] : smax;
    std::vector<float> s0(n);
    for (long c = 0; c < n; c++) {
        float mult = scale_mult(base[c], smax);
        codes[c] = (int64_t)mult - 1;
        float f = mult / 16.0f;
        s0[c] = mul_rn(mul_rn(f, f), smax);
    }
    float pf[NGRID];
    for (int i = 0; i < NGRID; i++) pf[i] = (float)scale_grid_p(i);
    // A grid point's total is the sum, in tile order and in double, of its tiles' sums; a tile's sum adds
    // float partials into a double every 16 rows.  Every term is >= 0, so a running total never decreases:
    // once it exceeds a finished total, that point cannot be the minimum and its remaining tiles are skipped.
    // The finished totals are the same numbers as without skipping, so the choice does not depend on the
    // thread count or on which points finished first.
    const long ntiles = (n + SCALE_TILE - 1) / SCALE_TILE;
    auto tile_sum = [&](int i, long ti) -> double {
        const long t = ti * SCALE_TILE;
        const long cols = n - t < SCALE_TILE ? n - t : SCALE_TILE;
        float s[SCALE_TILE], acc[SCALE_TILE];
        for (long j = 0; j < cols; j++) { s[j] = mul_rn(s0[t + j], pf[i]); acc[j] = 0.0f; }
        double tot = 0.0;
        for (long r = 0; r < rows; r++) {
            const float* wr = w + r * n + t;
            for (long j = 0; j < cols; j++) acc[j] += scale_search_term(wr[j], s[j], lo, hi);
            if ((r & 15) == 15) {                       // flush float partials every 16 rows
                for (long j = 0; j < cols; j++) { tot += acc[j]; acc[j] = 0.0f; }
            }
        }
        for (long j = 0; j < cols; j++) tot += acc[j];
        return tot;
    };
    // First tile of every point; the points then run in the order of that partial sum (smallest first), so
    // a good total is usually finished early and the poor points stop after a few tiles.
    double total[NGRID];
    bool done[NGRID];
    #pragma omp parallel for schedule(dynamic, 4)
    for (int i = 0; i < NGRID; i++) total[i] = tile_sum(i, 0);
    int order[NGRID];
    for (int i = 0; i < NGRID; i++) order[i] = i;
    std::sort(order, order + NGRID,
              [&](int a, int b) { return total[a] < total[b] || (total[a] == total[b] && a < b); });
    // (ops.find_scales refuses w with inf or NaN, so every total is a finite number or +inf, and the order is strict.)
    // The smallest finished total so far, as the bits of a non-negative double (ordered like the values).
    std::atomic<uint64_t> bound{std::numeric_limits<uint64_t>::max()};
    auto as_double = [](uint64_t u) { double d; std::memcpy(&d, &u, sizeof d); return d; };
    #pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < NGRID; k++) {
        const int i = order[k];
        double e = total[i];
        bool complete = true;
        for (long ti = 1; ti < ntiles; ti++) {
            const uint64_t b = bound.load(std::memory_order_relaxed);
            if (b != std::numeric_limits<uint64_t>::max() && e > as_double(b)) { complete = false; break; }
            e += tile_sum(i, ti);
        }
        done[i] = complete;
        total[i] = e;
        if (complete) {
            uint64_t u;
            std::memcpy(&u, &e, sizeof u);
            uint64_t b = bound.load(std::memory_order_relaxed);
            while (u < b && !bound.compare_exchange_weak(b, u, std::memory_order_relaxed)) {}
        }
    }
    int best = -1;
    double best_err = 0.0;
    for (int i = 0; i < NGRID; i++) {
        if (done[i] && (best < 0 || total[i] < best_err)) { best = i; best_err = total[i]; }
    }
    const uint16_t sm = float_to_half(mul_rn(smax, (float)scale_grid_p(best)));
    *scale_max = sm;
    const float smax16 = group_smax(sm, 1.0f / 256.0f);
    for (long c = 0; c < n; c++) scale[c] = dequant_scale((uint32_t)codes[c], smax16);
}

static constexpr long REFINE_TILE = 64;

// Sum over rows of (Q - w)^2 in double for columns [c0, c1) of w [rows, n], Q = gptq_quantize's value with
// scale s[c - c0]: the scalar loop, and an AVX2 + F16C one for 8 columns at a time.  Each column's sum is
// the same sequence of operations in both (fp32 quotient, rint, clamp, product, fp16 rounding, difference
// and square, then the double sum in row order), so they agree bit for bit.
static void refine_sums(const float* w, long rows, long n, long c0, long c1, const float* s, int bits,
                        double* acc) {
    long c = c0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256 zero = _mm256_set1_ps((float)(1 << (bits - 1)));
    const __m256 maxq = _mm256_set1_ps((float)((1 << bits) - 1));
    for (; c + 8 <= c1; c += 8) {
        const __m256 sv = _mm256_loadu_ps(s + (c - c0));
        const __m256 zs = _mm256_cmp_ps(sv, _mm256_setzero_ps(), _CMP_EQ_OQ);    // an all-zero column
        __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
        for (long r = 0; r < rows; r++) {
            const __m256 wv = _mm256_loadu_ps(w + r * n + c);
            __m256 deq;
            quantize8(wv, sv, zs, zero, maxq, &deq);
            const __m256 e = _mm256_sub_ps(deq, wv);
            const __m256 e2 = _mm256_mul_ps(e, e);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e2)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e2, 1)));
        }
        _mm256_storeu_pd(acc + (c - c0), lo);
        _mm256_storeu_pd(acc + (c - c0) + 4, hi);
    }
#endif
    for (; c < c1; c++) {
        double a = 0.0;
        for (long r = 0; r < rows; r++) {
            float deq;
            const float wv = w[r * n + c];
            gptq_quantize(wv, s[c - c0], bits, &deq);
            const float e = sub_rn(deq, wv);
            a += (double)mul_rn(e, e);
        }
        acc[c - c0] = a;
    }
}

void refine_codes(const float* w, long rows, long n, int bits, int span, const int64_t* codes_in,
                  uint16_t scale_max, int64_t* codes_out, float* scale_out) {
    const float smax16 = group_smax(scale_max, 1.0f / 256.0f);
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < n; t += REFINE_TILE) {
        const long c1 = t + REFINE_TILE < n ? t + REFINE_TILE : n;
        double best[REFINE_TILE], acc[REFINE_TILE];
        float s[REFINE_TILE];
        int64_t cand[REFINE_TILE];
        for (int d = -span; d <= span; d++) {              // smallest scale first: ties keep the smaller
            for (long c = t; c < c1; c++) {
                const int64_t k = codes_in[c] + d;
                cand[c - t] = k < 0 ? 0 : (k > 15 ? 15 : k);
                s[c - t] = dequant_scale((uint32_t)cand[c - t], smax16);
            }
            refine_sums(w, rows, n, t, c1, s, bits, acc);
            for (long c = t; c < c1; c++) {
                const long j = c - t;
                if (d == -span || acc[j] < best[j]) {
                    best[j] = acc[j];
                    codes_out[c] = cand[j];
                    scale_out[c] = s[j];
                }
            }
        }
    }
}

}  // namespace cpu
}  // namespace exl2
