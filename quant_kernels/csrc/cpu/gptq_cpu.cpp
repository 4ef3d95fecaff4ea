// GPTQ group step, scale search and loader scales on the CPU (OpenMP over column tiles: every column
// of a group is quantized independently, so tiles need no synchronisation and results do not depend
// on the thread count).
#include <vector>
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

void gptq_group(float* W, long rows, long n, const float* hinv, long ldh, const float* scale, int bits,
                int64_t* codes, float* Q, float* err) {
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < n; t += GPTQ_TILE) {
        const long c1 = t + GPTQ_TILE < n ? t + GPTQ_TILE : n;
        float e[GPTQ_TILE];
        for (long r = 0; r < rows; r++) {
            float* wr = W + r * n;
            const float hrr = hinv ? hinv[r * ldh + r] : 1.0f;
            for (long c = t; c < c1; c++) {
                float deq;
                codes[r * n + c] = gptq_quantize(wr[c], scale[c], bits, &deq);
                Q[r * n + c] = deq;
                if (hinv) {
                    e[c - t] = gptq_error(wr[c], deq, hrr);
                    err[r * n + c] = e[c - t];
                }
            }
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
    // Error sums per tile in double, added in tile order (deterministic for any thread count).
    const long ntiles = (n + SCALE_TILE - 1) / SCALE_TILE;
    std::vector<double> part((size_t)ntiles * NGRID);
    #pragma omp parallel for schedule(dynamic)
    for (long ti = 0; ti < ntiles; ti++) {
        const long t = ti * SCALE_TILE;
        const long cols = n - t < SCALE_TILE ? n - t : SCALE_TILE;
        float s[SCALE_TILE], acc[SCALE_TILE];
        for (int i = 0; i < NGRID; i++) {
            for (long j = 0; j < cols; j++) { s[j] = mul_rn(s0[t + j], pf[i]); acc[j] = 0.0f; }
            double tot = 0.0;
            for (long r = 0; r < rows; r++) {
                const float* wr = w + r * n + t;
                for (long j = 0; j < cols; j++) acc[j] += scale_search_term(wr[j], s[j], lo, hi);
                if ((r & 15) == 15) {                   // flush float partials every 16 rows
                    for (long j = 0; j < cols; j++) { tot += acc[j]; acc[j] = 0.0f; }
                }
            }
            for (long j = 0; j < cols; j++) tot += acc[j];
            part[ti * NGRID + i] = tot;
        }
    }
    int best = 0;
    double best_err = 0.0;
    for (int i = 0; i < NGRID; i++) {
        double e = 0.0;
        for (long ti = 0; ti < ntiles; ti++) e += part[ti * NGRID + i];
        if (i == 0 || e < best_err) { best = i; best_err = e; }
    }
    const uint16_t sm = float_to_half(mul_rn(smax, (float)scale_grid_p(best)));
    *scale_max = sm;
    const float smax16 = group_smax(sm, 1.0f / 256.0f);
    for (long c = 0; c < n; c++) scale[c] = dequant_scale((uint32_t)codes[c], smax16);
}

}  // namespace cpu
}  // namespace exl2
