// Per-width CPU kernel templates; each bits_<b>.cpp instantiates one width so ninja builds them in
// parallel.  The bit and scale math is exl2_math.h, shared with the CUDA kernels.
#pragma once
#include <string.h>
#include <vector>
#include "../exl2_math.h"
#include "kernels_cpu.h"
#include "matmul_impl.h"

namespace exl2 {
namespace cpu {

constexpr long COL_TILE = 32;   // columns per task (Np is a multiple of 32)

// Column tiles of 32: each task walks its rows in order with 32 bit streams, so reads and writes
// go along rows (cache lines) rather than down single columns.
template <int BITS>
void pack(const int32_t* q, long rows, long n, uint32_t* w) {
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < n; t += COL_TILE) {
        const long cols = n - t < COL_TILE ? n - t : COL_TILE;
        uint64_t buf[COL_TILE] = {0};
        int nbits = 0;                                  // the same for every column of the tile
        uint32_t* out = w + t;
        for (long r = 0; r < rows; r++) {
            const int32_t* qr = q + r * n + t;
            for (long j = 0; j < cols; j++) buf[j] |= (uint64_t)((uint32_t)qr[j] & ((1u << BITS) - 1u)) << nbits;
            nbits += BITS;
            if (nbits >= 32) {                          // BitWriter::put, for 32 columns at once
                for (long j = 0; j < cols; j++) { out[j] = (uint32_t)buf[j]; buf[j] >>= 32; }
                out += n;
                nbits -= 32;
            }
        }
        if (nbits > 0)
            for (long j = 0; j < cols; j++) out[j] = (uint32_t)buf[j];
    }
}

template <int BITS>
void unpack(const uint32_t* w, long rows, long n, int64_t* q) {
    #pragma omp parallel for schedule(static)
    for (long t = 0; t < n; t += COL_TILE) {
        const long cols = n - t < COL_TILE ? n - t : COL_TILE;
        uint64_t buf[COL_TILE] = {0};
        int nbits = 0;
        const uint32_t* in = w + t;
        for (long r = 0; r < rows; r++) {
            if (nbits < BITS) {                         // BitReader::next refill, 32 columns at once
                for (long j = 0; j < cols; j++) buf[j] |= (uint64_t)in[j] << nbits;
                in += n;
                nbits += 32;
            }
            int64_t* qr = q + r * n + t;
            for (long j = 0; j < cols; j++) { qr[j] = (uint32_t)buf[j] & ((1u << BITS) - 1u); buf[j] >>= BITS; }
            nbits -= BITS;
        }
    }
}

// lut[j][q] = the loader's fp16 value of code q in column t + j (dequant_value, exl2_math.h): a group
// has one scale per column, so every weight is one of 2^BITS values.
template <int BITS>
static inline void build_lut(const float* scales, long t, uint16_t (*lut)[1 << BITS]) {
    for (long j = 0; j < COL_TILE; j++)
        for (uint32_t v = 0; v < (1u << BITS); v++) lut[j][v] = dequant_value<BITS>(v, scales[t + j]);
}

template <int BITS>
void dequant_tile(const uint32_t* qw, long rows, long np, const float* scales, const int64_t* perm,
                  long K, uint16_t* out, long t) {
    {
        uint16_t lut[COL_TILE][1 << BITS];
        build_lut<BITS>(scales, t, lut);
        uint64_t buf[COL_TILE] = {0};
        int nbits = 0;
        const uint32_t* in = qw + t;
        for (long r = 0; r < rows; r++) {
            if (nbits < BITS) {
                for (long j = 0; j < COL_TILE; j++) buf[j] |= (uint64_t)in[j] << nbits;
                in += np;
                nbits += 32;
            }
            const long k = perm[r];
            for (long j = 0; j < COL_TILE; j++) {
                out[(t + j) * K + k] = lut[j][(uint32_t)buf[j] & ((1u << BITS) - 1u)];
                buf[j] >>= BITS;
            }
            nbits -= BITS;
        }
    }
}

template <int BITS>
void matmul_tile(const uint32_t* qw, long rows, long np, const float* scales, const float* xp, long ldx,
                 long M, float* y, long t) {
    {
        float lut[COL_TILE][1 << BITS];
        {
            uint16_t h[COL_TILE][1 << BITS];
            build_lut<BITS>(scales, t, h);
            for (long j = 0; j < COL_TILE; j++)
                for (long v = 0; v < (1 << BITS); v++) lut[j][v] = half_to_float(h[j][v]);
        }
        float wb[32][COL_TILE];                       // 32 dequantized rows of this column tile
        float acc[COL_TILE];
        uint64_t buf[COL_TILE] = {0};
        int nbits = 0;
        const uint32_t* in = qw + t;
        for (long r0 = 0; r0 < rows; r0 += 32) {
            const long nr = rows - r0 < 32 ? rows - r0 : 32;
            for (long r = 0; r < nr; r++) {
                if (nbits < BITS) {
                    for (long j = 0; j < COL_TILE; j++) buf[j] |= (uint64_t)in[j] << nbits;
                    in += np;
                    nbits += 32;
                }
                for (long j = 0; j < COL_TILE; j++) {
                    wb[r][j] = lut[j][(uint32_t)buf[j] & ((1u << BITS) - 1u)];
                    buf[j] >>= BITS;
                }
                nbits -= BITS;
            }
            for (long m = 0; m < M; m++) {
                const float* xr = xp + m * ldx + r0;
                float* yr = y + m * np + t;
                for (long j = 0; j < COL_TILE; j++) acc[j] = yr[j];
                for (long r = 0; r < nr; r++) {
                    const float xv = xr[r];
                    for (long j = 0; j < COL_TILE; j++) acc[j] += xv * wb[r][j];
                }
                for (long j = 0; j < COL_TILE; j++) yr[j] = acc[j];
            }
        }
    }
}

}  // namespace cpu
}  // namespace exl2

#define EXL2_INSTANTIATE_CPU(B)                                                                      \
    namespace exl2 { namespace cpu {                                                                 \
    template void pack<B>(const int32_t*, long, long, uint32_t*);                                     \
    template void unpack<B>(const uint32_t*, long, long, int64_t*);                                   \
    template void dequant_tile<B>(const uint32_t*, long, long, const float*, const int64_t*, long,    \
                                  uint16_t*, long);                                                  \
    template void matmul_tile<B>(const uint32_t*, long, long, const float*, const float*, long, long,  \
                                 float*, long);                                                      \
    EXL2_MM_INSTANCES(B)                                                                             \
    } }
