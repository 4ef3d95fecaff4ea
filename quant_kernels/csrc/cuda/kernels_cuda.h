// CUDA kernels: raw pointers and a stream, no torch headers (so `nvcc -c` works against a CPU build of
// torch; see check_nvcc.sh).  Torch glue is in ../bind_cuda.cpp.  Argument meanings match
// ../cpu/kernels_cpu.h.
#pragma once
#include <stdint.h>
#include <cuda_runtime.h>

namespace exl2 {
namespace cuda {

template <int BITS> void pack(const int32_t* q, long rows, long n, uint32_t* w, cudaStream_t stream);
template <int BITS> void unpack(const uint32_t* w, long rows, long n, int64_t* q, cudaStream_t stream);
template <int BITS> void dequant_group(const uint32_t* qw, long rows, long np, const float* scales,
                                       const int64_t* perm, long K, uint16_t* out, cudaStream_t stream);
// Fused dequant-GEMM for small M (decode, M <= GEMM_MAX_M): y[M, np] += xp[M, rows] @ Wg[rows, np];
// y must be zeroed first (blocks add their partial sums atomically).
constexpr long GEMM_MAX_M = 32;
template <int BITS> void gemm_group(const uint32_t* qw, long rows, long np, const float* scales,
                                    const float* xp, long ldx, long M, float* y, cudaStream_t stream);

void group_scales(const uint32_t* q_scale, const uint16_t* q_scale_max, long G, long np, float smax_mul,
                  float* scales, cudaStream_t stream);
void gptq_group(float* W, long rows, long n, const float* hinv, long ldh, const float* scale, int bits,
                int64_t* codes, float* Q, float* err, cudaStream_t stream);
// work: at least find_scales_work_bytes(n) bytes of device memory.
long find_scales_work_bytes(long n);
void find_scales(const float* w, long rows, long n, int bits, int64_t* codes, uint16_t* scale_max,
                 float* scale, void* work, cudaStream_t stream);
// overflow: one device int, set to 1 if the fp16 rotation overflowed (caller zeroes it).
void kv_quantize(const uint16_t* x, long rows, long D, int bits, uint8_t* q, uint16_t* scales, int* overflow,
                 cudaStream_t stream);
void kv_dequantize(const uint8_t* q, const uint16_t* scales, long rows, long D, int bits, uint16_t* x,
                   int* overflow, cudaStream_t stream);

}  // namespace cuda
}  // namespace exl2
