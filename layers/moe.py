"""Mixture-of-experts blocks (Arch.moe) in the measurement and quantization passes.

A sparse MLP is one module in ExLlamaV2's sense, ``model.layers.N.block_sparse_moe``, whose projections are
the experts' ``w1`` (gate), ``w3`` (up) and ``w2`` (down): one option per projection kind, shared by every
expert (ExLlamaV2 0.3.2 conversion/measure.py, measure_moe_mlp), measured on the block's output with the real
routing over the calibration rows.  The router stays in fp16 and is not measured.

Hessians (:func:`collect_moe`): each expert has its own, from the tokens the router sends it: ``w1``/``w3``
from those tokens' block inputs (after the norm), ``w2`` from the expert's intermediate states on them.
An expert the calibration rows never route to gets the Hessians of *every* token of the block instead (its
``w1``/``w3`` from all block inputs, its ``w2`` from its intermediate states computed on all of them), so its
GPTQ problem is well posed and weighted by realistic inputs.  ExLlamaV2 differs: its ``w1``/``w3`` of every
expert share one Hessian of all the block's inputs (routed or not), and an unrouted expert's ``w2`` gets the
identity (adaptivegptq.py ``prepare``: no batch -> ``torch.eye``).

Memory: the per-expert Hessians (E x (C^2 + I^2) fp32) are held during a module; one expert's fp32 weights at a
time are quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from exl2.core.threads import fixed_threads
from exl2.quant_kernels import gptq
from exl2.quant_kernels.finite import has_nan
from exl2.quant_kernels.qparams import MLP_OPTIONS, MOE_PROJ

from .stream import LayerError, ModuleSpec

EXPERT_ATTR = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MOE = ModuleSpec("block_sparse_moe", MOE_PROJ, {"w1": "w1", "w3": "w1", "w2": "w2"}, MLP_OPTIONS)


def moe_spec(mlp_spec: ModuleSpec) -> ModuleSpec:
    """The sparse block's spec with the option table of the dense MLP spec given."""
    return ModuleSpec(MOE.kind, MOE.projections, MOE.hessian_of, mlp_spec.options)


def specs_for(cfg, specs: tuple[ModuleSpec, ...]) -> tuple[ModuleSpec, ...]:
    """The module specs of a model: ``specs`` with the MLP's replaced by the sparse block's where the
    architecture has experts."""
    if not cfg.arch.moe:
        return specs
    return tuple(moe_spec(s) if s.kind == "mlp" else s for s in specs)


def expert_layers(block, e: int) -> dict:
    """Expert e's projections by their measurement names (w1, w3, w2)."""
    ex = block.mlp.experts[e]
    return {p: getattr(ex, a) for p, a in EXPERT_ATTR.items()}


def expert_prefix(cfg, layer: int, e: int, p: str) -> str:
    from exl2.runtime.arch import MOE_NAMES
    return MOE_NAMES[cfg.arch.moe][{"w1": "gate", "w3": "up", "w2": "down"}[p]].format(i=layer, e=e)


def _mid(expert, h: torch.Tensor) -> torch.Tensor:
    """The expert's intermediate state (down_proj's input) on tokens h [n, C]."""
    g = expert.gate_proj(h)
    g = F.silu(g) if expert.act == "silu" else F.gelu(g, approximate="tanh")
    return g * expert.up_proj(h)


@dataclass
class ExpertHessians:
    inputs: list[torch.Tensor]    # per expert: w1/w3's Hessian [C, C]
    mids: list[torch.Tensor]      # per expert: w2's Hessian [I, I]
    routed: list[int]             # per expert: tokens routed to it over all rows
    fallback: list[int]           # the experts no token was routed to (Hessians from every token)


def collect_moe(block, states: list[torch.Tensor], device, max_abs: list | None = None
                ) -> tuple[ExpertHessians, list[torch.Tensor]]:
    """Run the block over all rows with its current weights: per-expert Hessians and the outputs (CPU)."""
    mlp = block.mlp
    E = len(mlp.experts)
    C = block.post_attention_layernorm.weight.shape[-1]
    I_ = mlp.experts[0].down_proj.in_features
    h_in = [gptq.Hessian(C, device=device) for _ in range(E)]
    h_mid = [gptq.Hessian(I_, device=device) for _ in range(E)]
    routed = [0] * E
    outputs = []
    with torch.no_grad():
        for x in states:
            x = x.to(device)
            h = block.post_attention_layernorm(x).reshape(-1, x.shape[-1])   # [N, C]
            _, idx = mlp.route(h)
            with fixed_threads():       # few-row products: see SparseMLP.forward
                for e in range(E):
                    tok = torch.where((idx == e).any(-1))[0]
                    if tok.numel():
                        routed[e] += int(tok.numel())
                        h_in[e].add(h[tok])
                        h_mid[e].add(_mid(mlp.experts[e], h[tok]))
            y = block.mlp_residual(x)
            if has_nan(y):
                raise LayerError("block_sparse_moe: NaN in the full-precision output")
            if max_abs is not None:
                max_abs.append(float(y.abs().max()))
            outputs.append(y.cpu())
        fallback = [e for e in range(E) if routed[e] == 0]
        if fallback:      # every token's inputs, and the expert's intermediate states on them
            for x in states:
                h = block.post_attention_layernorm(x.to(device)).reshape(-1, x.shape[-1])
                for e in fallback:
                    h_in[e].add(h)
                    h_mid[e].add(_mid(mlp.experts[e], h))
    return ExpertHessians(_results(h_in), _results(h_mid), routed, fallback), outputs


def _results(accumulators: list) -> list[torch.Tensor]:
    """Each accumulator's averaged Hessian, dropping the accumulator as soon as its result exists: with 128
    experts both lists at once would double the module's largest memory (2.4 GB more on Qwen3-30B-A3B)."""
    out = []
    while accumulators:
        out.append(accumulators.pop(0).result())
    return out


def hessian_of(hs: ExpertHessians, e: int, p: str) -> torch.Tensor:
    return hs.inputs[e] if MOE.hessian_of[p] == "w1" else hs.mids[e]
