// 2-bit instances of the CUDA kernels (own translation unit: ninja builds widths in parallel).
#include "bits_impl.cuh"
EXL2_INSTANTIATE_CUDA(2)
