// 8-bit instances of the CPU kernels (own translation unit: ninja builds widths in parallel).
#include "bits_impl.h"
EXL2_INSTANTIATE_CPU(8)
