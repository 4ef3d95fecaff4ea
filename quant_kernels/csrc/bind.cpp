// Torch glue of the CPU kernels (and, when built with CUDA, registration of bind_cuda.cpp's ops).
// Inputs are checked by the Python front doors (quant_kernels/ops.py); TORCH_CHECKs here only guard
// against misuse of the raw module.
#include <torch/extension.h>
#include <tuple>
#include "cpu/kernels_cpu.h"
#include "exl2_math.h"

namespace {

using namespace exl2;

#define CHECK_CPU_CONTIG(t, dt) \
    TORCH_CHECK((t).device().is_cpu() && (t).is_contiguous() && (t).scalar_type() == (dt), \
                #t " must be a contiguous CPU tensor of ", dt)

template <typename T> T* ptr(torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <typename T> const T* cptr(const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

#define DISPATCH_BITS(bits, FN, ...)                                           \
    switch (bits) {                                                            \
        case 2: cpu::FN<2>(__VA_ARGS__); break;                                \
        case 3: cpu::FN<3>(__VA_ARGS__); break;                                \
        case 4: cpu::FN<4>(__VA_ARGS__); break;                                \
        case 5: cpu::FN<5>(__VA_ARGS__); break;                                \
        case 6: cpu::FN<6>(__VA_ARGS__); break;                                \
        case 8: cpu::FN<8>(__VA_ARGS__); break;                                \
        default: TORCH_CHECK(false, "bit width ", bits, " is not one of 2, 3, 4, 5, 6, 8"); \
    }

torch::Tensor pack_bits(torch::Tensor q, int64_t bits) {
    CHECK_CPU_CONTIG(q, torch::kInt32);
    const long rows = q.size(0), n = q.size(1);
    TORCH_CHECK((rows * bits) % 32 == 0, "rows * bits must be a multiple of 32");
    auto w = torch::empty({rows * bits / 32, n}, q.options());
    DISPATCH_BITS(bits, pack, cptr<int32_t>(q), rows, n, ptr<uint32_t>(w));
    return w;
}

torch::Tensor unpack_bits(torch::Tensor w, int64_t bits, int64_t rows) {
    CHECK_CPU_CONTIG(w, torch::kInt32);
    TORCH_CHECK(w.size(0) * 32 >= rows * bits, "too few words");
    auto q = torch::empty({rows, w.size(1)}, w.options().dtype(torch::kInt64));
    DISPATCH_BITS(bits, unpack, cptr<uint32_t>(w), rows, w.size(1), ptr<int64_t>(q));
    return q;
}

torch::Tensor group_scales(torch::Tensor q_scale, torch::Tensor q_scale_max, double smax_mul) {
    CHECK_CPU_CONTIG(q_scale, torch::kInt32);
    CHECK_CPU_CONTIG(q_scale_max, torch::kFloat16);
    const long G = q_scale.size(0), np = q_scale.size(1) * 8;
    auto s = torch::empty({G, np}, q_scale.options().dtype(torch::kFloat32));
    cpu::group_scales(cptr<uint32_t>(q_scale), cptr<uint16_t>(q_scale_max), G, np, (float)smax_mul, ptr<float>(s));
    return s;
}

// groups: int64 [G, 3] = (bits, rows, first packed row); perm: int64 [K] (original row of permuted row)
torch::Tensor dequantize(torch::Tensor q_weight, torch::Tensor scales, torch::Tensor groups, torch::Tensor perm) {
    CHECK_CPU_CONTIG(q_weight, torch::kInt32);
    CHECK_CPU_CONTIG(scales, torch::kFloat32);
    CHECK_CPU_CONTIG(groups, torch::kInt64);
    CHECK_CPU_CONTIG(perm, torch::kInt64);
    const long np = q_weight.size(1), K = perm.size(0);
    auto out = torch::empty({np, K}, q_weight.options().dtype(torch::kFloat16));
    cpu::dequant_layer(cptr<uint32_t>(q_weight), cptr<int64_t>(groups), groups.size(0), np, cptr<float>(scales),
                       cptr<int64_t>(perm), K, ptr<uint16_t>(out));
    return out;
}

// y [M, np] = x[:, perm] @ W_permuted, fp32 accumulation.
torch::Tensor matmul(torch::Tensor x, torch::Tensor q_weight, torch::Tensor scales, torch::Tensor groups,
                     torch::Tensor perm) {
    CHECK_CPU_CONTIG(q_weight, torch::kInt32);
    CHECK_CPU_CONTIG(scales, torch::kFloat32);
    CHECK_CPU_CONTIG(groups, torch::kInt64);
    CHECK_CPU_CONTIG(perm, torch::kInt64);
    auto xp = x.index_select(1, perm).to(torch::kFloat32).contiguous();   // [M, K] permuted columns
    const long M = xp.size(0), K = xp.size(1), np = q_weight.size(1);
    auto y = torch::zeros({M, np}, xp.options());
    cpu::matmul_layer(cptr<uint32_t>(q_weight), cptr<int64_t>(groups), groups.size(0), np, cptr<float>(scales),
                      cptr<float>(xp), K, M, ptr<float>(y));
    return y;
}

// In place on W (rows [rows, n]); hinv is the full [K, K] Hinv (or an empty tensor), a the group's
// first row.
void gptq_group(torch::Tensor W, torch::Tensor hinv, int64_t a, torch::Tensor scale, int64_t bits,
                torch::Tensor codes, torch::Tensor Q, torch::Tensor err) {
    CHECK_CPU_CONTIG(W, torch::kFloat32);
    CHECK_CPU_CONTIG(scale, torch::kFloat32);
    CHECK_CPU_CONTIG(codes, torch::kInt64);
    CHECK_CPU_CONTIG(Q, torch::kFloat32);
    const bool has_h = hinv.numel() > 0;
    if (has_h) { CHECK_CPU_CONTIG(hinv, torch::kFloat32); CHECK_CPU_CONTIG(err, torch::kFloat32); }
    const long ldh = has_h ? hinv.size(1) : 0;
    cpu::gptq_group(ptr<float>(W), W.size(0), W.size(1), has_h ? cptr<float>(hinv) + a * ldh + a : nullptr, ldh,
                    cptr<float>(scale), (int)bits, ptr<int64_t>(codes), ptr<float>(Q), has_h ? ptr<float>(err) : nullptr);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> find_scales(torch::Tensor w, int64_t bits) {
    CHECK_CPU_CONTIG(w, torch::kFloat32);
    const long n = w.size(1);
    auto codes = torch::empty({n}, w.options().dtype(torch::kInt64));
    auto smax = torch::empty({}, w.options().dtype(torch::kFloat16));
    auto scale = torch::empty({n}, w.options());
    cpu::find_scales(cptr<float>(w), w.size(0), n, (int)bits, ptr<int64_t>(codes), ptr<uint16_t>(smax), ptr<float>(scale));
    return {codes, smax, scale};
}

std::tuple<torch::Tensor, torch::Tensor> refine_codes(torch::Tensor w, int64_t bits, int64_t span,
                                                      torch::Tensor codes, torch::Tensor scale_max) {
    CHECK_CPU_CONTIG(w, torch::kFloat32);
    CHECK_CPU_CONTIG(codes, torch::kInt64);
    CHECK_CPU_CONTIG(scale_max, torch::kFloat16);
    const long n = w.size(1);
    TORCH_CHECK(codes.numel() == n, "refine_codes: codes has ", codes.numel(), " entries, w has ", n, " columns");
    auto codes_out = torch::empty({n}, codes.options());
    auto scale = torch::empty({n}, w.options());
    cpu::refine_codes(cptr<float>(w), w.size(0), n, (int)bits, (int)span, cptr<int64_t>(codes),
                      cptr<uint16_t>(scale_max)[0], ptr<int64_t>(codes_out), ptr<float>(scale));
    return {codes_out, scale};
}

// x fp16 [rows, D] -> (q uint8 [rows, D*bits/8], scales fp16 [rows, D/32], overflow flag)
std::tuple<torch::Tensor, torch::Tensor, int64_t> kv_quantize(torch::Tensor x, int64_t bits) {
    CHECK_CPU_CONTIG(x, torch::kFloat16);
    const long rows = x.size(0), D = x.size(1);
    auto q = torch::empty({rows, D * bits / 8}, x.options().dtype(torch::kUInt8));
    auto s = torch::empty({rows, D / 32}, x.options());
    int of = cpu::kv_quantize(cptr<uint16_t>(x), rows, D, (int)bits, ptr<uint8_t>(q), ptr<uint16_t>(s));
    return {q, s, of};
}

std::tuple<torch::Tensor, int64_t> kv_dequantize(torch::Tensor q, torch::Tensor scales, int64_t bits, int64_t D) {
    CHECK_CPU_CONTIG(q, torch::kUInt8);
    CHECK_CPU_CONTIG(scales, torch::kFloat16);
    const long rows = q.size(0);
    auto x = torch::empty({rows, D}, scales.options());
    int of = cpu::kv_dequantize(cptr<uint8_t>(q), cptr<uint16_t>(scales), rows, D, (int)bits, ptr<uint16_t>(x));
    return {x, of};
}

// Test hooks for the portable fp16 conversions of exl2_math.h.
torch::Tensor half_bits_to_float(torch::Tensor h) {
    CHECK_CPU_CONTIG(h, torch::kInt16);
    auto out = torch::empty(h.sizes(), h.options().dtype(torch::kFloat32));
    const uint16_t* p = cptr<uint16_t>(h);
    float* o = ptr<float>(out);
    for (long i = 0; i < h.numel(); i++) o[i] = half_to_float(p[i]);
    return out;
}

torch::Tensor float_to_half_bits(torch::Tensor f) {
    CHECK_CPU_CONTIG(f, torch::kFloat32);
    auto out = torch::empty(f.sizes(), f.options().dtype(torch::kInt16));
    const float* p = cptr<float>(f);
    uint16_t* o = ptr<uint16_t>(out);
    for (long i = 0; i < f.numel(); i++) o[i] = float_to_half(p[i]);
    return out;
}

}  // namespace

#ifdef EXL2_WITH_CUDA
void exl2_register_cuda(pybind11::module_& m);   // bind_cuda.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack_bits", &pack_bits);
    m.def("unpack_bits", &unpack_bits);
    m.def("group_scales", &group_scales);
    m.def("dequantize", &dequantize);
    m.def("matmul", &matmul);
    m.def("gptq_group", &gptq_group);
    m.def("find_scales", &find_scales);
    m.def("refine_codes", &refine_codes);
    m.def("kv_quantize", &kv_quantize);
    m.def("kv_dequantize", &kv_dequantize);
    m.def("half_bits_to_float", &half_bits_to_float);
    m.def("float_to_half_bits", &float_to_half_bits);
#ifdef EXL2_WITH_CUDA
    m.attr("has_cuda") = true;
    exl2_register_cuda(m);
#else
    m.attr("has_cuda") = false;
#endif
}
