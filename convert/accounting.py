"""Bits-per-weight accounting (docs/options.md): which weights the budget of a target covers, and the bits
of a strategy that gives every decoder projection the same option."""
from __future__ import annotations

from exl2.layers.moe import specs_for
from exl2.layers.stream import MODULES
from exl2.measure import measurement as mj
from exl2.quant_kernels.codec import padded_columns
from exl2.quant_kernels.qparams import MLP_PROJ, MOE_PROJ
from exl2.runtime.config import ModelConfig


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """(in features, out features, has bias) of each decoder projection."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.kv_dim, cfg.intermediate_size
    return {"q_proj": (h, q, cfg.qkv_bias), "k_proj": (h, kv, cfg.qkv_bias), "v_proj": (h, kv, cfg.qkv_bias),
            "o_proj": (q, h, cfg.o_bias), "gate_proj": (h, i, cfg.mlp_bias), "up_proj": (h, i, cfg.mlp_bias),
            "down_proj": (i, h, cfg.mlp_bias)}


def experts(cfg: ModelConfig, proj: str) -> int:
    """How many copies of a projection a layer holds: every expert's for the MLP's of a mixture of experts."""
    return cfg.num_experts if cfg.arch.moe and proj in MLP_PROJ else 1


def decoder_numel(cfg: ModelConfig) -> int:
    """Weights the bpw budget covers: K x padded N of every attention and MLP projection of every layer (of
    every expert, in a mixture of experts; the router is not quantized and not counted)."""
    return cfg.num_layers * sum(k * padded_columns(n) * experts(cfg, p)
                                for p, (k, n, _) in projection_shapes(cfg).items())


def uniform_strategy(cfg: ModelConfig, qp) -> tuple[dict, float]:
    """Every decoder projection with option ``qp``: (strategy for ``run_quantization``, bpw as we count it).

    Baselines and tests use it; the converter's strategies come from the optimizer."""
    shapes = projection_shapes(cfg)
    shapes.update({m: shapes[d] for m, d in zip(MOE_PROJ, MLP_PROJ)})   # a sparse MLP's (one expert's)
    strat, bits = {}, 0
    for layer in range(cfg.num_layers):
        for spec in specs_for(cfg, MODULES):
            sh = {p: (k, padded_columns(n), b) for p, (k, n, b) in shapes.items() if p in spec.projections}
            e = mj.entry(1.0, {p: qp for p in spec.projections}, sh)
            if spec.projections == MOE_PROJ:
                e["total_bits"] *= cfg.num_experts
            strat[spec.key(layer)] = e
            bits += e["total_bits"]
    return strat, bits / decoder_numel(cfg)
