// Whole-layer drivers: one OpenMP loop over 32-column tiles, every group of the tile inside it (one
// parallel region per layer, not per group), each group by its width's instance (bits_<b>.cpp).
#include "kernels_cpu.h"

namespace exl2 {
namespace cpu {

#define EXL2_BITS_CASE(bits, FN, ...)                      \
    switch (bits) {                                        \
        case 2: FN<2>(__VA_ARGS__); break;                 \
        case 3: FN<3>(__VA_ARGS__); break;                 \
        case 4: FN<4>(__VA_ARGS__); break;                 \
        case 5: FN<5>(__VA_ARGS__); break;                 \
        case 6: FN<6>(__VA_ARGS__); break;                 \
        case 8: FN<8>(__VA_ARGS__); break;                 \
        default: break;                                    \
    }

void dequant_layer(const uint32_t* qw, const int64_t* groups, long G, long np, const float* scales,
                   const int64_t* perm, long K, uint16_t* out) {
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < np; t += 32) {
        long row = 0;
        for (long i = 0; i < G; i++) {
            const int bits = (int)groups[3 * i];
            const long rows = groups[3 * i + 1], qrow = groups[3 * i + 2];
            EXL2_BITS_CASE(bits, dequant_tile, qw + qrow * np, rows, np, scales + i * np, perm + row, K, out, t);
            row += rows;
        }
    }
}

void matmul_layer(const uint32_t* qw, const int64_t* groups, long G, long np, const float* scales,
                  const float* xp, long K, long M, float* y) {
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < np; t += 32) {
        long row = 0;
        for (long i = 0; i < G; i++) {
            const int bits = (int)groups[3 * i];
            const long rows = groups[3 * i + 1], qrow = groups[3 * i + 2];
            EXL2_BITS_CASE(bits, matmul_tile, qw + qrow * np, rows, np, scales + i * np, xp + row, K, M, y, t);
            row += rows;
        }
    }
}

}  // namespace cpu
}  // namespace exl2
