"""Quantizing a sparse MLP (layers/moe.py): every expert's w1, w3 and w2 with the strategy's option for that
projection kind, each expert from its own Hessians (the tokens routed to it, or every token for an expert the
calibration rows never reach), stored under ExLlamaV2's names (runtime/arch.py MOE_NAMES)."""
from __future__ import annotations

from pathlib import Path

import torch

from exl2.core.threads import fit_threads
from exl2.layers.moe import collect_moe, expert_layers, expert_prefix, hessian_of
from exl2.layers.stream import advance, run_module, set_weight
from exl2.measure.measurement import entry_options
from exl2.quant_kernels import gptq
from exl2.runtime.memory import release_free_heap


def quantize_moe(block, spec, layer: int, strategy: dict, states, cos, sin, device, out_dir: Path, cfg,
                 opts: gptq.GPTQOptions = gptq.GPTQOptions(), fstates: list | None = None, store=None):
    """As :func:`exl2.convert.quantize.quantize_module`, for a sparse MLP; returns (new states, relative output
    error, routed tokens per expert).  Asymmetric calibration does not apply to the experts: with ``fstates``
    they are still quantized toward their own inputs' outputs, and ``fstates`` advance through the
    full-precision block."""
    options = entry_options(strategy[spec.key(layer)])
    E = len(block.mlp.experts)
    hs, ref = collect_moe(block, states, device)
    if fstates is not None:         # the full-precision block's outputs, before its weights are replaced
        with torch.no_grad():
            for i in range(len(fstates)):
                fstates[i] = run_module(block, spec, fstates[i].to(device), cos, sin).float().cpu()
    for e in range(E):              # one expert's Hessian factors and fp32 weights at a time
        fit_threads()
        layers = expert_layers(block, e)
        prepared = {o: gptq.prepare(hessian_of(hs, e, o).cpu(), percdamp=opts.percdamp,
                                    keep_h=bool(opts.polish_sweeps)) for o in ("w1", "w2")}
        for p in spec.projections:
            r = gptq.quantize(layers[p].weight.data.float().cpu(), options[p], prepared[spec.hessian_of[p]],
                              None, opts)
            store(out_dir, expert_prefix(cfg, layer, e, p), r)
            set_weight(layers[p], r.weight)
        del prepared
        release_free_heap()         # the expert's freed fp32 weights (runtime/memory.py)
    return states, advance(block, spec, states, ref, device, cos, sin), hs.routed
