// KV-cache Q4/Q8 on the GPU: one thread per 64-element chunk, the same fp16 steps as the CPU build
// (exl2_math.h: hadamard32_half, kv_code, kv_scale, kv_decode).
#include "../exl2_math.h"
#include "kernels_cuda.h"

namespace exl2 {
namespace cuda {

__global__ void kv_quantize_kernel(const uint16_t* x, long chunks, int bits, uint8_t* q, uint16_t* scales, int* overflow) {
    long ch = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (ch >= chunks) return;
    uint16_t v[64];
    for (int i = 0; i < 64; i++) v[i] = x[ch * 64 + i];
    hadamard32_half(v, 2);
    hadamard32_half(v + 1, 2);
    for (int g = 0; g < 2; g++) {
        const uint16_t* vg = v + 32 * g;
        uint16_t m = 0;
        for (int i = 0; i < 32; i++) {
            if (!h_finite(vg[i])) atomicOr(overflow, 1);
            uint16_t a = h_abs(vg[i]);
            if (half_to_float(a) > half_to_float(m)) m = a;
        }
        scales[ch * 2 + g] = kv_scale(m, bits);
        const long e0 = ch * 64 + 32 * g;
        for (int i = 0; i < 32; i += 2) {
            uint32_t c0 = kv_code(vg[i], m, bits), c1 = kv_code(vg[i + 1], m, bits);
            if (bits == 8) { q[e0 + i] = (uint8_t)c0; q[e0 + i + 1] = (uint8_t)c1; }
            else q[(e0 + i) >> 1] = (uint8_t)(c0 | (c1 << 4));
        }
    }
}

__global__ void kv_dequantize_kernel(const uint8_t* q, const uint16_t* scales, long chunks, int bits, uint16_t* x,
                                     int* overflow) {
    long ch = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (ch >= chunks) return;
    if (kv_dequantize_chunk(q, scales, ch, bits, x)) atomicOr(overflow, 1);
}

void kv_quantize(const uint16_t* x, long rows, long D, int bits, uint8_t* q, uint16_t* scales, int* overflow,
                 cudaStream_t stream) {
    long chunks = rows * (D / 64);
    kv_quantize_kernel<<<(unsigned)((chunks + 127) / 128), 128, 0, stream>>>(x, chunks, bits, q, scales, overflow);
}

void kv_dequantize(const uint8_t* q, const uint16_t* scales, long rows, long D, int bits, uint16_t* x, int* overflow,
                   cudaStream_t stream) {
    long chunks = rows * (D / 64);
    kv_dequantize_kernel<<<(unsigned)((chunks + 127) / 128), 128, 0, stream>>>(q, scales, chunks, bits, x, overflow);
}

}  // namespace cuda
}  // namespace exl2
