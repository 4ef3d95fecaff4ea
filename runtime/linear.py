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


# Suffixes of one EXL2 layer (EXL2-SPEC 1.1). `q_perm` is optional (older files write it); `bias` is
# optional and checked against the architecture by the loader.
EXL2_REQUIRED = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
EXL2_OPTIONAL = ("q_perm", "bias")


class EXL2Linear(nn.Module):
    """An EXL2 layer: keeps the packed tensors and computes with the weight the ExLlamaV2 loader rebuilds.

    The fp16 reconstruction (exact, see quant_kernels/codec.py) is made once at load time and held in the
    compute dtype; fp16 values are exact in fp32, so a float32 CPU run sees the very same weights.
    """

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 dtype: torch.dtype, device):
        super().__init__()
        from exl2.quant_kernels import codec

        try:
            codec.validate_layer(tensors, name=prefix)
        except codec.EXL2FormatError as e:
            raise ValueError(str(e)) from None
        k, np_ = codec.layer_shape(tensors)
        if k != in_features or np_ != codec.padded_columns(out_features):
            raise ValueError(f"{prefix}: EXL2 layer is {k} x {np_}, config expects {in_features} x "
                             f"{out_features} (padded to {codec.padded_columns(out_features)})")
        self.in_features, self.out_features = in_features, out_features
        w = codec.dequantize_layer(tensors)[:out_features]                    # [N, K] fp16
        self.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
        b = tensors.get("bias")
        self.bias = None if b is None else nn.Parameter(b[:out_features].to(device=device, dtype=dtype), requires_grad=False)
        self.bits = sorted({int(x) for x in tensors["q_groups"][0::2].tolist()}, reverse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


def load_exl2_linear(
    prefix: str,
    tensors: dict[str, torch.Tensor],
    *,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Module:
    """Build a linear module from one EXL2 layer. THE SWAP POINT for quantized weights.

    prefix      e.g. "model.layers.3.self_attn.q_proj" (for messages)
    tensors     suffix -> tensor as stored on disk (CPU, original dtype): every key of EXL2_REQUIRED,
                plus "bias" and/or "q_perm" when present (q_perm is ignored: the loader derives it)
    in_features, out_features
                the layer's true K and N from config.json (q_weight may carry N padded to 32)
    Returns a module obeying this file's contract.
    """
    tensors = {k: v for k, v in tensors.items() if k != "q_perm"}
    return EXL2Linear(prefix, tensors, in_features, out_features, dtype, device)
