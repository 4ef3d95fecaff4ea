// Torch glue of the CUDA kernels (built only when torch has CUDA; registered by bind.cpp under the
// names "cuda_<op>", with the same arguments as the CPU ops).  The kernels take raw pointers and the
// current stream; see cuda/kernels_cuda.h.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <tuple>
#include "cuda/kernels_cuda.h"

namespace {

using namespace exl2;

#define CHECK_CUDA_CONTIG(t, dt) \
    TORCH_CHECK((t).is_cuda() && (t).is_contiguous() && (t).scalar_type() == (dt), \
                #t " must be a contiguous CUDA tensor of ", dt)

template <typename T> T* ptr(torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <typename T> const T* cptr(const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

#define DISPATCH_BITS(bits, FN, ...)                                           \
    switch (bits) {                                                            \
        case 2: cuda::FN<2>(__VA_ARGS__); break;                               \
        case 3: cuda::FN<3>(__VA_ARGS__); break;                               \
        case 4: cuda::FN<4>(__VA_ARGS__); break;                               \
        case 5: cuda::FN<5>(__VA_ARGS__); break;                               \
        case 6: cuda::FN<6>(__VA_ARGS__); break;                               \
        case 8: cuda::FN<8>(__VA_ARGS__); break;                               \
        default: TORCH_CHECK(false, "bit width ", bits, " is not one of 2, 3, 4, 5, 6, 8"); \
    }

torch::Tensor pack_bits(torch::Tensor q, int64_t bits) {
    CHECK_CUDA_CONTIG(q, torch::kInt32);
    const c10::cuda::CUDAGuard guard(q.device());
    const long rows = q.size(0), n = q.size(1);
    auto w = torch::empty({rows * bits / 32, n}, q.options());
    DISPATCH_BITS(bits, pack, cptr<int32_t>(q), rows, n, ptr<uint32_t>(w), stream());
    return w;
}

torch::Tensor unpack_bits(torch::Tensor w, int64_t bits, int64_t rows) {
    CHECK_CUDA_CONTIG(w, torch::kInt32);
    const c10::cuda::CUDAGuard guard(w.device());
    auto q = torch::empty({rows, w.size(1)}, w.options().dtype(torch::kInt64));
    DISPATCH_BITS(bits, unpack, cptr<uint32_t>(w), rows, w.size(1), ptr<int64_t>(q), stream());
    return q;
}

torch::Tensor group_scales(torch::Tensor q_scale, torch::Tensor q_scale_max, double smax_mul) {
    CHECK_CUDA_CONTIG(q_scale, torch::kInt32);
    CHECK_CUDA_CONTIG(q_scale_max, torch::kFloat16);
    const c10::cuda::CUDAGuard guard(q_scale.device());
    const long G = q_scale.size(0), np = q_scale.size(1) * 8;
    auto s = torch::empty({G, np}, q_scale.options().dtype(torch::kFloat32));
    cuda::group_scales(cptr<uint32_t>(q_scale), cptr<uint16_t>(q_scale_max), G, np, (float)smax_mul, ptr<float>(s), stream());
    return s;
}

// groups: int64 [G, 3] (bits, rows, first packed row), read on the host.
torch::Tensor dequantize(torch::Tensor q_weight, torch::Tensor scales, torch::Tensor groups, torch::Tensor perm) {
    CHECK_CUDA_CONTIG(q_weight, torch::kInt32);
    CHECK_CUDA_CONTIG(scales, torch::kFloat32);
    CHECK_CUDA_CONTIG(perm, torch::kInt64);
    const c10::cuda::CUDAGuard guard(q_weight.device());
    auto g = groups.to(torch::kCPU).contiguous();
    const int64_t* gp = g.data_ptr<int64_t>();
    const long np = q_weight.size(1), K = perm.size(0);
    auto out = torch::empty({np, K}, q_weight.options().dtype(torch::kFloat16));
    long row = 0;
    for (long i = 0; i < g.size(0); i++) {
        const int bits = (int)gp[3 * i];
        const long rows = gp[3 * i + 1], qrow = gp[3 * i + 2];
        DISPATCH_BITS(bits, dequant_group, cptr<uint32_t>(q_weight) + qrow * np, rows, np,
                      cptr<float>(scales) + i * np, cptr<int64_t>(perm) + row, K, ptr<uint16_t>(out), stream());
        row += rows;
    }
    return out;
}

// Small M (decode): fused dequant-GEMM.  Larger M: reconstruct fp16 once, then a cuBLAS matmul.
torch::Tensor matmul(torch::Tensor x, torch::Tensor q_weight, torch::Tensor scales, torch::Tensor groups,
                     torch::Tensor perm) {
    CHECK_CUDA_CONTIG(q_weight, torch::kInt32);
    CHECK_CUDA_CONTIG(scales, torch::kFloat32);
    CHECK_CUDA_CONTIG(perm, torch::kInt64);
    const c10::cuda::CUDAGuard guard(q_weight.device());
    if (x.size(0) > cuda::GEMM_MAX_M) {
        auto w = dequantize(q_weight, scales, groups, perm);                    // [np, K] fp16
        return torch::matmul(x.to(torch::kFloat32), w.to(torch::kFloat32).t());
    }
    auto xp = x.index_select(1, perm).to(torch::kFloat32).contiguous();
    auto g = groups.to(torch::kCPU).contiguous();
    const int64_t* gp = g.data_ptr<int64_t>();
    const long M = xp.size(0), K = xp.size(1), np = q_weight.size(1);
    auto y = torch::zeros({M, np}, xp.options());
    long row = 0;
    for (long i = 0; i < g.size(0); i++) {
        const int bits = (int)gp[3 * i];
        const long rows = gp[3 * i + 1], qrow = gp[3 * i + 2];
        DISPATCH_BITS(bits, gemm_group, cptr<uint32_t>(q_weight) + qrow * np, rows, np,
                      cptr<float>(scales) + i * np, cptr<float>(xp) + row, K, M, ptr<float>(y), stream());
        row += rows;
    }
    return y;
}

void gptq_group(torch::Tensor W, torch::Tensor hinv, int64_t a, torch::Tensor scale, int64_t bits,
                torch::Tensor codes, torch::Tensor Q, torch::Tensor err) {
    CHECK_CUDA_CONTIG(W, torch::kFloat32);
    CHECK_CUDA_CONTIG(scale, torch::kFloat32);
    CHECK_CUDA_CONTIG(codes, torch::kInt64);
    CHECK_CUDA_CONTIG(Q, torch::kFloat32);
    const c10::cuda::CUDAGuard guard(W.device());
    const bool has_h = hinv.numel() > 0;
    if (has_h) { CHECK_CUDA_CONTIG(hinv, torch::kFloat32); CHECK_CUDA_CONTIG(err, torch::kFloat32); }
    const long ldh = has_h ? hinv.size(1) : 0;
    cuda::gptq_group(ptr<float>(W), W.size(0), W.size(1), has_h ? cptr<float>(hinv) + a * ldh + a : nullptr, ldh,
                     cptr<float>(scale), (int)bits, ptr<int64_t>(codes), ptr<float>(Q),
                     has_h ? ptr<float>(err) : nullptr, stream());
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> find_scales(torch::Tensor w, int64_t bits) {
    CHECK_CUDA_CONTIG(w, torch::kFloat32);
    const c10::cuda::CUDAGuard guard(w.device());
    const long n = w.size(1);
    auto codes = torch::empty({n}, w.options().dtype(torch::kInt64));
    auto smax = torch::empty({}, w.options().dtype(torch::kFloat16));
    auto scale = torch::empty({n}, w.options());
    auto work = torch::empty({cuda::find_scales_work_bytes(n)}, w.options().dtype(torch::kUInt8));
    cuda::find_scales(cptr<float>(w), w.size(0), n, (int)bits, ptr<int64_t>(codes), ptr<uint16_t>(smax),
                      ptr<float>(scale), work.data_ptr(), stream());
    return {codes, smax, scale};
}

std::tuple<torch::Tensor, torch::Tensor, int64_t> kv_quantize(torch::Tensor x, int64_t bits) {
    CHECK_CUDA_CONTIG(x, torch::kFloat16);
    const c10::cuda::CUDAGuard guard(x.device());
    const long rows = x.size(0), D = x.size(1);
    auto q = torch::empty({rows, D * bits / 8}, x.options().dtype(torch::kUInt8));
    auto s = torch::empty({rows, D / 32}, x.options());
    auto of = torch::zeros({1}, x.options().dtype(torch::kInt32));
    cuda::kv_quantize(cptr<uint16_t>(x), rows, D, (int)bits, ptr<uint8_t>(q), ptr<uint16_t>(s), ptr<int>(of), stream());
    return {q, s, of.item<int>()};
}

std::tuple<torch::Tensor, int64_t> kv_dequantize(torch::Tensor q, torch::Tensor scales, int64_t bits, int64_t D) {
    CHECK_CUDA_CONTIG(q, torch::kUInt8);
    CHECK_CUDA_CONTIG(scales, torch::kFloat16);
    const c10::cuda::CUDAGuard guard(q.device());
    const long rows = q.size(0);
    auto x = torch::empty({rows, D}, scales.options());
    auto of = torch::zeros({1}, q.options().dtype(torch::kInt32));
    cuda::kv_dequantize(cptr<uint8_t>(q), cptr<uint16_t>(scales), rows, D, (int)bits, ptr<uint16_t>(x), ptr<int>(of), stream());
    return {x, of.item<int>()};
}

}  // namespace

void exl2_register_cuda(pybind11::module_& m) {
    m.def("cuda_pack_bits", &pack_bits);
    m.def("cuda_unpack_bits", &unpack_bits);
    m.def("cuda_group_scales", &group_scales);
    m.def("cuda_dequantize", &dequantize);
    m.def("cuda_matmul", &matmul);
    m.def("cuda_gptq_group", &gptq_group);
    m.def("cuda_find_scales", &find_scales);
    m.def("cuda_kv_quantize", &kv_quantize);
    m.def("cuda_kv_dequantize", &kv_dequantize);
}
