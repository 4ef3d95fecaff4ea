// KV-cache Q4/Q8 quantization on the CPU: one 64-element chunk at a time (kv_quant.py).
#include "../exl2_math.h"
#include "kernels_cpu.h"

namespace exl2 {
namespace cpu {

int kv_quantize(const uint16_t* x, long rows, long D, int bits, uint8_t* q, uint16_t* scales) {
    const long chunks = rows * (D / 64);
    int overflow = 0;
    #pragma omp parallel for schedule(static) reduction(| : overflow)
    for (long ch = 0; ch < chunks; ch++) {
        uint16_t v[64];
        for (int i = 0; i < 64; i++) v[i] = x[ch * 64 + i];
        hadamard32_half(v, 2);                 // even elements
        hadamard32_half(v + 1, 2);             // odd elements
        for (int g = 0; g < 2; g++) {
            const uint16_t* vg = v + 32 * g;
            uint16_t m = 0;
            for (int i = 0; i < 32; i++) {
                if (!h_finite(vg[i])) overflow = 1;
                uint16_t a = h_abs(vg[i]);
                if (half_to_float(a) > half_to_float(m)) m = a;
            }
            scales[ch * 2 + g] = kv_scale(m, bits);
            const long e0 = ch * 64 + 32 * g;  // first element of the group in the row-major stream
            for (int i = 0; i < 32; i++) {
                uint32_t code = kv_code(vg[i], m, bits);
                long e = e0 + i;
                if (bits == 8) {
                    q[e] = (uint8_t)code;
                } else if (i & 1) {
                    q[e >> 1] |= (uint8_t)(code << 4);     // odd element -> high nibble
                } else {
                    q[e >> 1] = (uint8_t)code;             // even element -> low nibble
                }
            }
        }
    }
    return overflow;
}

int kv_dequantize(const uint8_t* q, const uint16_t* scales, long rows, long D, int bits, uint16_t* x) {
    const long chunks = rows * (D / 64);
    int overflow = 0;
    #pragma omp parallel for schedule(static) reduction(| : overflow)
    for (long ch = 0; ch < chunks; ch++) {
        if (kv_dequantize_chunk(q, scales, ch, bits, x)) overflow = 1;
    }
    return overflow;
}

}  // namespace cpu
}  // namespace exl2
