// Whole-layer drivers: one OpenMP region per layer (not per group) over 32-column tiles, every group of
// a tile inside it, each group by its width's instance (bits_<b>.cpp).
#include <omp.h>
#include <stdlib.h>
#include <algorithm>
#include <vector>
#include "kernels_cpu.h"
#include "matmul_impl.h"

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

// Packed matmul (matmul_impl.h).  Threads split the columns into contiguous ranges of whole 32-column
// tiles (no two write the same output); a product under PAR_MIN_MACS multiply-adds runs on one thread,
// where a parallel region would cost more than it saves (measured on 2 cores: 256 x 128 breaks even).
#if defined(EXL2_MM_SIMD)
namespace {

constexpr double PAR_MIN_MACS = 1 << 16;

// The panel path: every (strip of PANEL_COLS columns, chunk of up to PANEL_ROWS rows made of whole 32-row
// units of consecutive groups) decoded into `panel` once, then multiplied with all M rows of x.
void panel_range(const uint32_t* qw, const int64_t* groups, long G, long np, const float* scales, const float* xp,
                 long ldx, long M, float* y, long c_begin, long c_end, float* panel) {
    for (long c0 = c_begin; c0 < c_end; c0 += mm::PANEL_COLS) {
        const long nc = std::min(mm::PANEL_COLS, c_end - c0);
        long g = 0, gr = 0, row = 0;          // the next group, its next row, and that row of x
        while (g < G) {
            const long k0 = row;
            long kc = 0;
            while (g < G && kc < mm::PANEL_ROWS) {
                const int bits = (int)groups[3 * g];
                const long rows = groups[3 * g + 1], qrow = groups[3 * g + 2];
                const long nr = std::min(rows - gr, mm::PANEL_ROWS - kc);
                EXL2_BITS_CASE(bits, mm::decode_piece, qw + (qrow + gr * bits / 32) * np + c0, nr, np,
                               scales + g * np + c0, nc, panel + kc * mm::PANEL_COLS, mm::PANEL_COLS);
                kc += nr;
                gr += nr;
                row += nr;
                if (gr == rows) { g++; gr = 0; }
            }
            for (long m0 = 0; m0 < M; m0 += mm::PANEL_MR) {
                const float* x = xp + m0 * ldx + k0;
                float* yb = y + m0 * np + c0;
                switch (std::min<long>(mm::PANEL_MR, M - m0)) {
                    case 6: mm::panel_gemm<6>(x, ldx, panel, mm::PANEL_COLS, kc, nc, yb, np); break;
                    case 5: mm::panel_gemm<5>(x, ldx, panel, mm::PANEL_COLS, kc, nc, yb, np); break;
                    case 4: mm::panel_gemm<4>(x, ldx, panel, mm::PANEL_COLS, kc, nc, yb, np); break;
                    case 3: mm::panel_gemm<3>(x, ldx, panel, mm::PANEL_COLS, kc, nc, yb, np); break;
                    case 2: mm::panel_gemm<2>(x, ldx, panel, mm::PANEL_COLS, kc, nc, yb, np); break;
                    default: mm::panel_gemm<1>(x, ldx, panel, mm::PANEL_COLS, kc, nc, yb, np); break;
                }
            }
        }
    }
}

}  // namespace

void matmul_layer(const uint32_t* qw, const int64_t* groups, long G, long np, const float* scales,
                  const float* xp, long K, long M, float* y) {
    if (M <= 0 || np <= 0) return;
    const long ntiles = np / mm::TILE;
    const bool par = (double)K * (double)np * (double)M >= PAR_MIN_MACS && ntiles > 1;
    // The panel path cuts groups into 16-row blocks: every valid layer's groups (whole 32-row units, or a
    // 2-bit 16-row tail); a hand-made layer with other groups takes the few-rows path, whatever M.
    bool blocks16 = true;
    for (long g = 0; g < G; g++) {
        const long bits = groups[3 * g], rows = groups[3 * g + 1];
        if (rows % 16 || (bits % 2 && rows % 32)) blocks16 = false;
    }
    const bool panels = M >= mm::PANEL_MIN_M && blocks16;
    std::vector<mm::MBlock> blocks(M / 8 + 8);
    const int nb = mm::plan_mblocks(M, blocks.data());
#if defined(EXL2_MM_AVX512)
    // Few rows: strips of columns whose partial sums (16 floats per column and row of x) fit in ~256 KB.
    const long strip = std::max(mm::TILE, (4096 / M) / mm::TILE * mm::TILE);
    // ... and rows of x (up to 16 read at once) 16 floats more than K apart: K * 4 bytes is often a multiple
    // of 2048, which would put them all in the same few sets of the L1 cache.
    float* xpad = nullptr;
    long ldx = K;
    if (M > 1 && !panels) {
        ldx = (K + 15) / 16 * 16 + 16;
        xpad = (float*)aligned_alloc(64, sizeof(float) * M * ldx);
        for (long m = 0; m < M; m++) std::copy(xp + m * K, xp + m * K + K, xpad + m * ldx);
        xp = xpad;
    }
#else
    const long ldx = K;
#endif
    #pragma omp parallel if (par)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const long c_begin = ntiles * tid / nth * mm::TILE, c_end = ntiles * (tid + 1) / nth * mm::TILE;
        if (c_end > c_begin && panels) {
            float* panel = (float*)aligned_alloc(64, sizeof(float) * mm::PANEL_COLS * mm::PANEL_ROWS);
            panel_range(qw, groups, G, np, scales, xp, ldx, M, y, c_begin, c_end, panel);
            free(panel);
        } else if (c_end > c_begin) {
#if defined(EXL2_MM_AVX512)
            const long width = std::min(strip, c_end - c_begin);
            __m512* acc = (__m512*)aligned_alloc(64, sizeof(__m512) * width * M);
            for (long c0 = c_begin; c0 < c_end; c0 += strip) {
                const long nc = std::min(strip, c_end - c0);
                for (long i = 0; i < nc * M; i++) acc[i] = _mm512_setzero_ps();
                long row = 0;
                for (long g = 0; g < G; g++) {
                    const int bits = (int)groups[3 * g];
                    const long rows = groups[3 * g + 1], qrow = groups[3 * g + 2];
                    for (long r0 = 0; r0 < rows; r0 += mm::CHUNK_ROWS) {
                        const long nr = std::min(mm::CHUNK_ROWS, rows - r0);
                        const uint32_t* p = qw + (qrow + r0 * bits / 32) * np + c0;
                        for (int b = 0; b < nb; b++)
                            EXL2_BITS_CASE(bits, mm::strip_chunk, p, nr, np, scales + g * np + c0,
                                           xp + blocks[b].m0 * ldx + row + r0, ldx, blocks[b].mb, nc,
                                           acc + blocks[b].m0, M);
                    }
                    row += rows;
                }
                for (long j = 0; j < nc; j++)
                    for (long m = 0; m < M; m++) y[m * np + c0 + j] += _mm512_reduce_add_ps(acc[j * M + m]);
            }
            free(acc);
#else
            long row = 0;
            for (long g = 0; g < G; g++) {
                const int bits = (int)groups[3 * g];
                const long rows = groups[3 * g + 1], qrow = groups[3 * g + 2];
                for (long r0 = 0; r0 < rows; r0 += mm::CHUNK_ROWS) {
                    const long nr = std::min(mm::CHUNK_ROWS, rows - r0);
                    EXL2_BITS_CASE(bits, mm::strip_chunk, qw + (qrow + r0 * bits / 32) * np, nr, np,
                                   scales + g * np, xp + row + r0, ldx, blocks.data(), nb, c_begin,
                                   c_end - c_begin, y);
                }
                row += rows;
            }
#endif
        }
    }
#if defined(EXL2_MM_AVX512)
    free(xpad);
#endif
}
#else
// No AVX2: the portable scalar loops, one 32-column tile per task.
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
#endif

}  // namespace cpu
}  // namespace exl2
