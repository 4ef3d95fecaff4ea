// GPTQ group step, scale search and loader scales on the GPU.  Per-element math: exl2_math.h (the
// same functions the CPU build runs and tests).
#include "../exl2_math.h"
#include "kernels_cuda.h"

namespace exl2 {
namespace cuda {

static inline unsigned nblocks(long n, int threads) { return (unsigned)((n + threads - 1) / threads); }
static constexpr int NGRID = 97;
static constexpr int SEARCH_THREADS = 128;

__global__ void group_scales_kernel(const uint32_t* q_scale, const uint16_t* q_scale_max, long G, long np,
                                    float smax_mul, float* scales) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= G * np) return;
    long g = i / np, c = i % np;
    scales[i] = dequant_scale(scale_code(q_scale + g * (np / 8), (int)c), group_smax(q_scale_max[g], smax_mul));
}

// One thread per column: the rows of a group are processed in order, exactly as the CPU loop.
__global__ void gptq_group_kernel(float* W, long rows, long n, const float* hinv, long ldh, const float* scale,
                                  int bits, int64_t* codes, float* Q, float* err) {
    long c = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (c >= n) return;
    const float s = scale[c];
    for (long r = 0; r < rows; r++) {
        const float w = W[r * n + c];
        float deq;
        codes[r * n + c] = gptq_quantize(w, s, bits, &deq);
        Q[r * n + c] = deq;
        if (!hinv) continue;
        const float e = gptq_error(w, deq, hinv[r * ldh + r]);
        err[r * n + c] = e;
        for (long r2 = r + 1; r2 < rows; r2++) W[r2 * n + c] = gptq_update(W[r2 * n + c], hinv[r * ldh + r2], e);
    }
}

// Phase 1: per column base scale (max|w| + 1e-12) / (maxq / 2).
__global__ void colmax_kernel(const float* w, long rows, long n, int bits, float* base) {
    long c = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (c >= n) return;
    float m = 0.0f;
    for (long r = 0; r < rows; r++) m = fmaxf(m, fabsf(w[r * n + c]));
    base[c] = div_rn(add_rn(m, 1e-12f), (float)((1 << bits) - 1) / 2.0f);
}

// Phase 2 (one block): smax = max(base); codes and working scales s0 per column.
__global__ void smax_kernel(const float* base, long n, int64_t* codes, float* s0, float* smax_out) {
    __shared__ float red[256];
    float m = 0.0f;
    for (long c = threadIdx.x; c < n; c += blockDim.x) m = fmaxf(m, base[c]);
    red[threadIdx.x] = m;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + h]);
        __syncthreads();
    }
    const float smax = red[0];
    for (long c = threadIdx.x; c < n; c += blockDim.x) {
        float mult = scale_mult(base[c], smax);
        codes[c] = (int64_t)mult - 1;
        float f = mult / 16.0f;
        s0[c] = mul_rn(mul_rn(f, f), smax);
    }
    if (threadIdx.x == 0) *smax_out = smax;
}

// Phase 3: grid (column blocks, 97 grid points); per block one partial error sum (double), written
// to part[p * nblk + block] so that phase 4 adds them in a fixed order (deterministic).
__global__ void search_kernel(const float* w, long rows, long n, int bits, const float* s0, double* part) {
    __shared__ double red[SEARCH_THREADS];
    const int i = blockIdx.y;
    const long c = blockIdx.x * (long)SEARCH_THREADS + threadIdx.x;
    const int zero = 1 << (bits - 1);
    double acc = 0.0;
    if (c < n) {
        const float s = mul_rn(s0[c], (float)scale_grid_p(i));
        for (long r = 0; r < rows; r++) acc += scale_search_term(w[r * n + c], s, (float)-zero, (float)((1 << bits) - 1 - zero));
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int h = SEARCH_THREADS / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) red[threadIdx.x] += red[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[(long)i * gridDim.x + blockIdx.x] = red[0];
}

// Phase 4 (one block): argmin over the grid, q_scale_max and the loader's scales.
__global__ void pick_kernel(const double* part, long nblk, long n, const float* smax_in, const int64_t* codes,
                            uint16_t* scale_max, float* scale) {
    __shared__ int best;
    if (threadIdx.x == 0) {
        double best_err = 0.0;
        best = 0;
        for (int i = 0; i < NGRID; i++) {
            double e = 0.0;
            for (long b = 0; b < nblk; b++) e += part[(long)i * nblk + b];
            if (i == 0 || e < best_err) { best = i; best_err = e; }
        }
        *scale_max = float_to_half(mul_rn(*smax_in, (float)scale_grid_p(best)));
    }
    __syncthreads();
    const float smax16 = group_smax(float_to_half(mul_rn(*smax_in, (float)scale_grid_p(best))), 1.0f / 256.0f);
    for (long c = threadIdx.x; c < n; c += blockDim.x) scale[c] = dequant_scale((uint32_t)codes[c], smax16);
}

void group_scales(const uint32_t* q_scale, const uint16_t* q_scale_max, long G, long np, float smax_mul,
                  float* scales, cudaStream_t stream) {
    group_scales_kernel<<<nblocks(G * np, 256), 256, 0, stream>>>(q_scale, q_scale_max, G, np, smax_mul, scales);
}

void gptq_group(float* W, long rows, long n, const float* hinv, long ldh, const float* scale, int bits,
                int64_t* codes, float* Q, float* err, cudaStream_t stream) {
    gptq_group_kernel<<<nblocks(n, 128), 128, 0, stream>>>(W, rows, n, hinv, ldh, scale, bits, codes, Q, err);
}

long find_scales_work_bytes(long n) {
    long nblk = (n + SEARCH_THREADS - 1) / SEARCH_THREADS;
    return (long)sizeof(double) * NGRID * nblk + 2 * sizeof(float) * n + 16;
}

void find_scales(const float* w, long rows, long n, int bits, int64_t* codes, uint16_t* scale_max, float* scale,
                 void* work, cudaStream_t stream) {
    const long nblk = (n + SEARCH_THREADS - 1) / SEARCH_THREADS;
    double* part = (double*)work;                         // [97, nblk]
    float* base = (float*)(part + NGRID * nblk);          // [n]
    float* s0 = base + n;                                 // [n]
    float* smax = s0 + n;                                 // [1]
    colmax_kernel<<<nblocks(n, 128), 128, 0, stream>>>(w, rows, n, bits, base);
    smax_kernel<<<1, 256, 0, stream>>>(base, n, codes, s0, smax);
    search_kernel<<<dim3((unsigned)nblk, NGRID), SEARCH_THREADS, 0, stream>>>(w, rows, n, bits, s0, part);
    pick_kernel<<<1, 256, 0, stream>>>(part, nblk, n, smax, codes, scale_max, scale);
}

}  // namespace cuda
}  // namespace exl2
