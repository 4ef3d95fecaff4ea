"""EXL2 layers in the runtime: a layer quantized by our GPTQ, saved and loaded, computes x @ W exactly."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2.quant_kernels import gptq
from exl2.quant_kernels.qparams import QParams
from exl2.runtime.loader import load_model
from exl2.runtime.linear import load_exl2_linear


U = 2.0 ** -24      # fp32 unit roundoff


def sum_order_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """How far two fp32 evaluations of x W^T + b that differ only in the order of their sums can lie apart, per
    output: each is within gamma_{K+1} (sum_i |x_i w_i| + |b|) of the exact value (recursive summation of K
    products and the bias, gamma_n = n u / (1 - n u)), so twice that.  Computed in float64."""
    k = x.shape[-1]
    gamma = (k + 1) * U / (1 - (k + 1) * U)
    s = x.double().abs() @ w.double().abs().t()
    if b is not None:
        s = s + b.double().abs()
    return 2 * gamma * s


@pytest.mark.parametrize("rows", [1, 5, 40, 2048])   # packed kernel (few rows, panels) below DENSE_FROM_ROWS,
                                                      # rebuilt weight from it
@pytest.mark.parametrize("option", [([32, 128], [6, 4], [0.1, 0.9]), (64, [3, 2], [0.3, 0.7]), (128, [8], [1.0]),
                                    (32, [5], [1.0])])
def test_packed_and_dense_agree_within_the_fp32_sum_order_bound(rows, option, monkeypatch):
    from exl2.quant_kernels import ops
    from exl2.runtime import linear

    assert (rows < linear.DENSE_FROM_ROWS) == (rows < 2048)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 512, generator=g) * 0.05
    bias = torch.randn(200, generator=g)
    r = gptq.quantize_linear(w, QParams.make(*option), bias=bias)
    args = dict(in_features=512, out_features=200, dtype=torch.float32, device="cpu")
    packed = load_exl2_linear("x", r.tensors, **args)
    dense = load_exl2_linear("x", r.tensors, mode="dense", **args)
    assert packed.weight is None and dense.weight is not None
    x = torch.randn(rows, 512, generator=g)
    calls = []
    real = ops.matmul
    monkeypatch.setattr(ops, "matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    yp, yd = packed(x), dense(x)
    native = ops.backend(packed.prepared()) != "reference"
    assert calls == ([(rows, 512)] if native and rows < linear.DENSE_FROM_ROWS else [])     # which path ran
    bound = sum_order_bound(x, r.weight.float(), bias.half().float())
    assert bool(((yp.double() - yd.double()).abs() <= bound).all()), float(((yp - yd).abs() / bound).max())


def test_exl2_linear_matches_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 256, generator=g) * 0.05          # N = 200 is padded to 224 on disk
    bias = torch.randn(200, generator=g)
    r = gptq.quantize_linear(w, QParams.make([32, 128], [6, 4], [0.1, 0.9]), bias=bias)
    lin = load_exl2_linear("x", r.tensors, in_features=256, out_features=200, dtype=torch.float32, device="cpu",
                           mode="dense")
    x = torch.randn(3, 7, 256, generator=g)
    y = lin(x)
    assert y.shape == (3, 7, 200)
    ref = x @ r.weight.float().t() + bias.half().float()
    # Same weights, same matmul order up to BLAS blocking: float32 rounding only.
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_exl2_shape_mismatch_names_layer():
    w = torch.randn(64, 128) * 0.05
    r = gptq.quantize_linear(w, QParams.make(64, [4], [1]))
    with pytest.raises(ValueError, match="q_proj: EXL2 layer is 128 x 64, config expects 128 x 96"):
        load_exl2_linear("q_proj", r.tensors, in_features=128, out_features=96, dtype=torch.float32, device="cpu")


def test_model_with_quantized_layer_uses_it(tiny_checkpoint):
    d = tiny_checkpoint("llama3")
    st = d / "model.safetensors"
    tensors = load_file(st)
    key = "model.layers.0.mlp.down_proj"
    w = tensors.pop(f"{key}.weight").float()
    ref_model = load_model(d)
    # Quantize the whole MLP of layer 0 (all of gate/up/down must be EXL2 together).
    for proj in ("gate_proj", "up_proj"):
        pk = f"model.layers.0.mlp.{proj}"
        r = gptq.quantize_linear(tensors.pop(f"{pk}.weight").float(), QParams.make(32, [8], [1]))
        tensors.update({f"{pk}.{k}": v for k, v in r.tensors.items()})
    r = gptq.quantize_linear(w, QParams.make(32, [8], [1]))
    tensors.update({f"{key}.{k}": v for k, v in r.tensors.items()})
    save_file(tensors, str(st))
    m = load_model(d)
    torch.testing.assert_close(m.layers[0].mlp.down_proj.dequantized(), r.weight.float())
    assert m.layers[0].mlp.down_proj.weight is None                   # packed: no dense weight is held
    ids = torch.arange(20).unsqueeze(0) % m.cfg.vocab_size
    with torch.no_grad():
        a, b = m(ids), ref_model(ids)
    # 8-bit weights: the logits move, but only a little.
    assert 0 < float((a - b).abs().max()) < 0.1 * float(b.abs().max())
