"""Linear layers as a swappable interface (gpt-fast style: the model file holds no quantization code).

Contract for every linear module the loader builds (FP or EXL2):
    attributes  in_features, out_features
    forward(x)  x [..., in_features] in the model's compute dtype -> [..., out_features], same dtype,
                bias (if any) already added. An EXL2 layer whose tensors are padded to 32 columns must
                return exactly `out_features` (the unpadded N) columns.
"""
from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """y = x @ weight.T + bias, with weight [N, K] (HF orientation) and optional bias [N]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Linear: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"Linear: bias shape {tuple(bias.shape)} does not match weight N={weight.shape[0]}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


# Suffixes of one EXL2 layer (docs/format.md section 2). `q_perm` is optional (older files write it); `bias` is
# optional and checked against the architecture by the loader.
EXL2_REQUIRED = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
EXL2_OPTIONAL = ("q_perm", "bias")


# Rows of input from which a packed layer computes by rebuilding its weight for the call (one layer's weight
# alive at a time) and running a dense matmul, instead of the packed kernel.  The packed kernel decodes panels
# of the weight into fp32 and multiplies them for many rows, so it stays ahead up to long prefills (the measured
# crossovers: docs/decisions/0010-runtime-at-scale.md); above it the rebuilt weight costs a transient copy of
# one layer.
DENSE_FROM_ROWS = 2048

# How EXL2 layers are held: "packed" (the stored tensors, computed through ops.matmul; about the file's size
# in memory) or "dense" (the weight the loader reconstructs, rebuilt once at load in the compute dtype; exact,
# for tests and tiny models).
EXL2_MODES = ("packed", "dense")


class EXL2Linear(nn.Module):
    """An EXL2 layer: the weight ExLlamaV2's loader rebuilds from the stored tensors, computed one of two ways.

    packed  the stored tensors stay (validated and decoded once by ``codec.prepare_layer``) and each call runs
            ``ops.matmul`` (native C++ or CUDA kernel: x gathered by the act-order permutation, the weight decoded
            piece by piece, never whole, fp32 sums), or for inputs of ``DENSE_FROM_ROWS`` rows and more rebuilds
            the weight for the call and runs a dense matmul;
    dense   the fp16 reconstruction (exact, see quant_kernels/codec.py) is made once at load time and held in
            the compute dtype; fp16 values are exact in fp32, so a float32 CPU run sees the very same weights.

    Both compute y = x W^T + b with the same W; they differ only in the order of the fp32 sums.  For one output
    value, a sum of K products in fp32 in any order is within K u sum_i |x_i w_i| of the exact value
    (u = 2^-24; the standard bound for recursive summation), so packed and dense agree within twice that
    (tests/runtime/test_runtime_exl2.py checks this bound).
    """

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 dtype: torch.dtype, device, mode: str = "packed"):
        super().__init__()
        from exl2.quant_kernels import codec, ops

        if mode not in EXL2_MODES:
            raise ValueError(f"EXL2 mode {mode!r}: use one of {', '.join(EXL2_MODES)}")
        try:
            layer = codec.prepare_layer(tensors, name=prefix)
        except codec.EXL2FormatError as e:
            raise ValueError(str(e)) from None
        k, np_ = layer.in_features, layer.padded_out_features
        if k != in_features or np_ != codec.padded_columns(out_features):
            raise ValueError(f"{prefix}: EXL2 layer is {k} x {np_}, config expects {in_features} x "
                             f"{out_features} (padded to {codec.padded_columns(out_features)})")
        self.in_features, self.out_features, self.mode, self.dtype = in_features, out_features, mode, dtype
        self.bits = sorted({g[0] for g in layer.group_list()}, reverse=True)
        b = tensors.get("bias")
        self.bias = None if b is None else nn.Parameter(b[:out_features].to(device=device, dtype=dtype),
                                                        requires_grad=False)
        if mode == "dense":
            w = ops.dequantize_layer(layer)[:out_features]                      # [N, K] fp16
            self.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
            return
        self.weight = None
        layer = layer.to(device)
        for name in ("q_weight", "groups", "perm", "scales"):
            self.register_buffer(name, getattr(layer, name), persistent=False)

    def prepared(self):
        from exl2.quant_kernels.layout import PreparedLayer

        return PreparedLayer(self.q_weight, self.groups, self.perm, self.scales)

    def dequantized(self) -> torch.Tensor:
        """The layer's weight [N, K] in the compute dtype (a copy rebuilt from the packed tensors when packed)."""
        if self.weight is not None:
            return self.weight
        from exl2.quant_kernels import ops

        return ops.dequantize_layer(self.prepared())[:self.out_features].to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return nn.functional.linear(x, self.weight, self.bias)
        from exl2.quant_kernels import ops

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        layer = self.prepared()
        if x2.shape[0] >= DENSE_FROM_ROWS or ops.backend(layer) == "reference":
            # the reference kernel rebuilds W anyway: do it once per call and let torch's matmul run
            y = nn.functional.linear(x2, ops.dequantize_layer(layer)[:self.out_features].to(x2.dtype))
        else:
            xs = x2 if x2.dtype in (torch.float16, torch.float32) else x2.float()
            y = ops.matmul(xs.contiguous(), layer)[:, :self.out_features].to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, bias={self.bias is not None}, "
                f"{self.mode}")


def load_exl2_linear(
    prefix: str,
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    device: torch.device | str,
    mode: str = "packed",
) -> nn.Module:
    """Build a linear module from one EXL2 layer. THE SWAP POINT for quantized weights.

    prefix      e.g. "model.layers.3.self_attn.q_proj" (for messages)
    tensors     suffix -> tensor as stored on disk (CPU, original dtype): every key of EXL2_REQUIRED,
                plus "bias" and/or "q_perm" when present (q_perm is ignored: the loader derives it)
    in_features, out_features
                the layer's true K and N from config.json (q_weight may carry N padded to 32)
    mode        "packed" (default) or "dense", see EXL2Linear
    Returns a module obeying this file's contract.
    """
    tensors = {k: v for k, v in tensors.items() if k != "q_perm"}
    return EXL2Linear(prefix, tensors, in_features, out_features, dtype, device, mode)
