"""Measuring a sparse MLP (layers/moe.py): every expert's projections quantized with each distinct option of
their column, then each combination of the MLP table applied to *all* experts at once and the block's output
error measured over the calibration rows with the real routing (ExLlamaV2 0.3.2's measure_moe_mlp).  The
entry's total bits count every expert."""
from __future__ import annotations

from pathlib import Path

import torch

from exl2.core.threads import fit_threads
from exl2.layers.moe import collect_moe, expert_layers, hessian_of
from exl2.layers.stream import set_weight
from exl2.quant_kernels import gptq
from exl2.quant_kernels.qparams import QParams, distinct_options

from . import measurement as mj
from .measure import (MEASURE_GPTQ, MIN_ACCURACY, MeasureError, Variants, module_error, sample_positions,
                      shapes_of)


def measure_moe(block, spec, layer: int, states: list[torch.Tensor], cos, sin, device, status=None, *,
                variant_budget: int | None = None, spill_dir: str | Path | None = None,
                gptq_opts: gptq.GPTQOptions | None = None, stride: int = 1
                ) -> tuple[list[dict], list[torch.Tensor]]:
    """As :func:`exl2.measure.measure.measure_module`, for a sparse MLP."""
    hs, ref = collect_moe(block, states, device)
    E = len(block.mlp.experts)
    layers = [expert_layers(block, e) for e in range(E)]
    original = [{p: m.weight.data for p, m in ls.items()} for ls in layers]
    distinct = distinct_options(spec.options)
    total = sum(len(opts) * layers[0][p].out_features * layers[0][p].in_features * 2
                for p, opts in zip(spec.projections, distinct)) * E
    variants = Variants(total, variant_budget, spill_dir)
    try:
        for e in range(E):          # one expert's Hessian factors and fp32 weights at a time
            prepared = {o: gptq.prepare(hessian_of(hs, e, o).cpu()) for o in ("w1", "w2")}
            for p, opts in zip(spec.projections, distinct):
                w = original[e][p].float().cpu()
                for qp in opts:
                    fit_threads()
                    variants.add(f"{p}.{e}", qp, gptq.quantize(w, qp, prepared[spec.hessian_of[p]], None,
                                                                    gptq_opts or MEASURE_GPTQ, pack=False).weight)
                del w
            del prepared
        del hs
        shapes = shapes_of(layers[0])
        positions = sample_positions(states[0].shape[1], stride)
        entries = []
        current: dict[str, QParams] = {}
        for ci, combo in enumerate(spec.options):
            for p, qp in zip(spec.projections, combo):
                if current.get(p) != qp:
                    for e in range(E):
                        set_weight(layers[e][p], variants.get(f"{p}.{e}", qp))
                    current[p] = qp
            fit_threads()
            err, tok_err = module_error(block, spec, states, ref, device, cos, sin, positions)
            acc = max(1e-6, 1.0 - err)
            ent = mj.entry(acc, dict(zip(spec.projections, combo)), shapes)
            ent["total_bits"] *= E          # every expert carries the combination's options
            ent["token_err"] = tok_err
            entries.append(ent)
            if status:
                status({"stage": "measure", "module": spec.key(layer), "option": ci, "of": len(spec.options),
                        "accuracy": acc})
    finally:
        variants.close()
        for e in range(E):
            for p, w in original[e].items():
                set_weight(layers[e][p], w)
    best = max(e["accuracy"] for e in entries)
    if best < MIN_ACCURACY:
        raise MeasureError(f"{spec.key(layer)}: best accuracy {best:.4f} is below {MIN_ACCURACY}; "
                           f"the model cannot be quantized with these options")
    return entries, ref
