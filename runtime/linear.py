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
                plus "bias" and/or "q_perm" when present
    in_features, out_features
                the layer's true K and N from config.json (q_weight may carry N padded to 32)
    Returns a module obeying this file's contract.
    """
    raise NotImplementedError(
        f"{prefix}: EXL2 layers are not supported by the runtime yet (quant_kernels/codec.py is not wired in)"
    )
