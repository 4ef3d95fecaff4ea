// Per-width CUDA kernels; each bits_<b>.cu instantiates one width.  Bit and scale math: exl2_math.h.
#pragma once
#include "../exl2_math.h"
#include "kernels_cuda.h"

namespace exl2 {
namespace cuda {

static inline unsigned nblocks(long n, int threads) { return (unsigned)((n + threads - 1) / threads); }

template <int BITS>
__global__ void pack_kernel(const int32_t* __restrict__ q, long rows, long n, uint32_t* __restrict__ w) {
    long c = blockIdx.x * (long)blockDim.x + threadIdx.x;       // one column per thread: coalesced rows
    if (c >= n) return;
    BitWriter<BITS> bw(w + c, n);
    for (long r = 0; r < rows; r++) bw.put((uint32_t)q[r * n + c]);
    bw.flush();
}

template <int BITS>
__global__ void unpack_kernel(const uint32_t* __restrict__ w, long rows, long n, int64_t* __restrict__ q) {
    long c = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (c >= n) return;
    BitReader<BITS> br(w + c, n);
    for (long r = 0; r < rows; r++) q[r * n + c] = br.next();
}

template <int BITS>
__global__ void dequant_kernel(const uint32_t* __restrict__ qw, long rows, long np, const float* __restrict__ scales,
                               const int64_t* __restrict__ perm, long K, uint16_t* __restrict__ out) {
    long c = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long r0 = blockIdx.y * 32L;                                 // 32 rows = BITS whole words per column
    if (c >= np || r0 >= rows) return;
    long nr = rows - r0 < 32 ? rows - r0 : 32;
    BitReader<BITS> br(qw + (r0 * BITS / 32) * np + c, np);
    const float s = scales[c];
    for (long r = 0; r < nr; r++) out[c * K + perm[r0 + r]] = dequant_value<BITS>(br.next(), s);
}

// Block: 32 columns (threadIdx.x) x 32 rows of the group (blockIdx.y); each thread dequantizes its
// column's 32 weights into registers, x's 32 columns for all M rows sit in shared memory.
template <int BITS>
__global__ void gemm_kernel(const uint32_t* __restrict__ qw, long rows, long np, const float* __restrict__ scales,
                            const float* __restrict__ xp, long ldx, long M, float* __restrict__ y) {
    __shared__ float xs[GEMM_MAX_M][32];
    const long c = blockIdx.x * 32L + threadIdx.x;
    const long r0 = blockIdx.y * 32L;
    const long nr = rows - r0 < 32 ? rows - r0 : 32;
    for (long m = 0; m < M; m++)
        xs[m][threadIdx.x] = threadIdx.x < nr ? xp[m * ldx + r0 + threadIdx.x] : 0.0f;
    __syncthreads();
    if (c >= np) return;
    float wv[32];
    BitReader<BITS> br(qw + (r0 * BITS / 32) * np + c, np);
    const float s = scales[c];
    #pragma unroll
    for (int r = 0; r < 32; r++) wv[r] = r < nr ? half_to_float(dequant_value<BITS>(br.next(), s)) : 0.0f;
    for (long m = 0; m < M; m++) {
        float acc = 0.0f;
        #pragma unroll
        for (int r = 0; r < 32; r++) acc += xs[m][r] * wv[r];
        atomicAdd(y + m * np + c, acc);
    }
}

template <int BITS>
void pack(const int32_t* q, long rows, long n, uint32_t* w, cudaStream_t stream) {
    pack_kernel<BITS><<<nblocks(n, 128), 128, 0, stream>>>(q, rows, n, w);
}

template <int BITS>
void unpack(const uint32_t* w, long rows, long n, int64_t* q, cudaStream_t stream) {
    unpack_kernel<BITS><<<nblocks(n, 128), 128, 0, stream>>>(w, rows, n, q);
}

template <int BITS>
void dequant_group(const uint32_t* qw, long rows, long np, const float* scales, const int64_t* perm, long K,
                   uint16_t* out, cudaStream_t stream) {
    dim3 grid(nblocks(np, 128), nblocks(rows, 32));
    dequant_kernel<BITS><<<grid, 128, 0, stream>>>(qw, rows, np, scales, perm, K, out);
}

template <int BITS>
void gemm_group(const uint32_t* qw, long rows, long np, const float* scales, const float* xp, long ldx, long M,
                float* y, cudaStream_t stream) {
    dim3 grid(nblocks(np, 32), nblocks(rows, 32));
    gemm_kernel<BITS><<<grid, 32, 0, stream>>>(qw, rows, np, scales, xp, ldx, M, y);
}

}  // namespace cuda
}  // namespace exl2

#define EXL2_INSTANTIATE_CUDA(B)                                                                      \
    namespace exl2 { namespace cuda {                                                                 \
    template void pack<B>(const int32_t*, long, long, uint32_t*, cudaStream_t);                       \
    template void unpack<B>(const uint32_t*, long, long, int64_t*, cudaStream_t);                     \
    template void dequant_group<B>(const uint32_t*, long, long, const float*, const int64_t*, long,   \
                                   uint16_t*, cudaStream_t);                                         \
    template void gemm_group<B>(const uint32_t*, long, long, const float*, const float*, long, long,  \
                                float*, cudaStream_t);                                               \
    } }
