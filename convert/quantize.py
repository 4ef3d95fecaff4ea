"""The quantization pass: every decoder module with its chosen option, then the head (docs/pipeline.md section 6).

Per module, with only that layer's weights resident:

1. run the full-precision module on the current states, which are the outputs of the already
   *quantized* earlier modules (errors propagate, as they will at inference), collecting the Hessians;
2. GPTQ each projection with the strategy's option (q/k/v share one act-order and inverse, gate/up too);
3. write ``out_tensor/<projection>.safetensors``, read it back and check that the codec reconstructs the
   quantizer's own weight bit for bit;
4. swap the quantized weights in and re-run the module: its outputs are the next module's inputs.  Where the
   last collect (sequential collection, below) already ran the module up to its last projection with every
   earlier one quantized, and those inputs fit ``layers.stream.REPLAY_BUDGET``, they are kept and only the last
   projection and the residual add run again.

The head is quantized with the head option on the final-norm outputs, round-to-nearest (act-order kept)
when it has more than 1e9 elements.  States are checkpointed after every layer, so a killed run resumes
from the last finished layer and writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from exl2.core.errors import UserError
from exl2.core.threads import fit_threads
from exl2.layers.checkpoint import clear_checkpoint, load_checkpoint, save_checkpoint, save_tensors
from exl2.layers.moe import MOE, specs_for
from exl2.layers.stream import (FINISH_FROM, MODULES, advance, collect, embed_rows, inputs_of, linears,
                                replay_bytes, set_weight, swapped_weights)
from exl2.measure.measurement import entry_options
from exl2.quant_kernels import codec, gptq
from exl2.quant_kernels.qparams import HEAD_OPTIONS
from exl2.runtime.loader import ModelParts
from exl2.runtime.model import Rotary, final_softcap

RTN_HEAD_ELEMENTS = 1e9
ERROR_ROWS = 4          # rows of the reported per-module error (error_rows)

Status = Callable[[dict], None]


class QuantizeError(UserError, RuntimeError):
    """A packed layer does not reload to the quantizer's weight, or the quantization cannot proceed."""


def _store(out_dir: Path, prefix: str, result: gptq.QuantResult) -> None:
    """Write one layer's tensors, then reload them from disk and check the reconstruction bit for bit."""
    path = out_dir / f"{prefix}.safetensors"
    save_tensors(path, {f"{prefix}.{k}": v for k, v in result.tensors.items()})
    back = {k.split(".")[-1]: v for k, v in load_file(str(path)).items()}
    n = result.weight.shape[0]
    w = codec.dequantize_layer(back)[:n]
    if not torch.equal(w.view(torch.int16), result.weight.view(torch.int16)):
        diff = float((w.float() - result.weight.float()).abs().max())
        raise QuantizeError(f"{path}: reloaded {prefix} differs from the quantized weight (max |diff| {diff:.3g})")


def error_rows(n: int) -> list[int]:
    """The rows (of ``n``) on which each module's reported output error is measured: ERROR_ROWS of them, evenly
    spaced from the first.  The error is a diagnostic; the reference outputs it needs cost a full-precision
    run of the module per row, which the other rows skip."""
    k = min(n, ERROR_ROWS)
    return [i * n // k for i in range(k)]


def owner_order(spec) -> list[str]:
    """The module's shared inputs in data-flow order: q/k/v before o_proj, gate/up before down_proj."""
    out: list[str] = []
    for p in spec.projections:
        if spec.hessian_of[p] not in out:
            out.append(spec.hessian_of[p])
    return out


def quantize_module(block, spec, layer: int, strategy: dict, states, cos, sin, device, out_dir: Path,
                    opts: gptq.GPTQOptions = gptq.GPTQOptions(), fstates: list | None = None, asym: float = 0.0):
    """Quantize one module in place; returns (new states, relative output error vs full precision on
    :func:`error_rows`).

    ``states`` is consumed: its rows are replaced by the module's outputs (the list returned).

    Asymmetric calibration: with ``fstates`` (the full-precision model's states at this module; replaced
    in place by its full-precision outputs) and ``asym`` > 0, every projection is quantized from
    :func:`gptq.asymmetric_targets` (``alpha = asym``), toward the full-precision model's output rather
    than the output of its own, already perturbed inputs; the Hessians are then collected sequentially.
    ``opts``: the quantizer's settings (:class:`gptq.GPTQOptions`; the converter uses the defaults).
    """
    key = spec.key(layer)
    options = entry_options(strategy[key])
    layers = linears(block, spec)
    order = owner_order(spec)
    fp_input, cross = None, {}
    sequential = opts.sequential or fstates is not None
    last_collect = len(order) == 1
    if fstates is not None:
        # The full-precision weights stay referenced (set_weight swaps tensors, never writes into them), so each
        # row's full-precision input is recomputed when it is paired: one row of it in memory, not all rows.
        # In the last collect nothing reads a row's full-precision input again, so the output of that run
        # replaces it there (one full-precision pass over the rows fewer than running the module once more);
        # in the others the full-precision module stops once the inputs are captured.
        fp_weights = {p: lin.weight.data for p, lin in layers.items()}

        def fp_input(i: int, owners: list[str]) -> dict[str, torch.Tensor]:
            with swapped_weights(block, spec, fp_weights):
                got, y = inputs_of(block, spec, owners, fstates[i].to(device), cos, sin, output=last_collect)
            if last_collect:
                fstates[i] = y.float().cpu()
            return got

    # Collected sequentially, each later input's Hessian is gathered again once the projections before it are
    # quantized, so the first pass gathers only the first input's.  It runs the module to the end on the rows
    # whose full-precision outputs are the reference of the reported error (error_rows), and stops the others
    # once that input is recorded.
    # The last collect sees the input of the module's last projection with every earlier projection quantized:
    # kept (within the budget), advance finishes each row from it instead of running the module again.
    last = order[-1]
    kept = {} if (sequential and len(order) > 1 and last == FINISH_FROM.get(spec.kind)
                  and replay_bytes(len(states), states[0].shape[1], layers[last].in_features)) else None
    rows = error_rows(len(states))
    H, outs = collect(block, spec, states, cos, sin, device, owners=(order[0],) if sequential else None,
                      fp_input=fp_input, cross=cross, out_rows=rows)
    ref: list = [None] * len(states)
    for i, y in zip(rows, outs):
        ref[i] = y
    for i, owner in enumerate(order):
        if sequential and i > 0:
            last_collect = i == len(order) - 1
            H.update(collect(block, spec, states, cos, sin, device, owners=(owner,), fp_input=fp_input, cross=cross,
                             output=False, keep=kept if last_collect else None)[0])
        prepared = gptq.prepare(H[owner].cpu(), percdamp=opts.percdamp, keep_h=bool(opts.polish_sweeps))
        mine = [p for p in spec.projections if spec.hessian_of[p] == owner]
        weights = {p: layers[p].weight.data.float().cpu() for p in mine}
        if fp_input is not None:
            weights = gptq.asymmetric_targets(weights, cross[owner].cpu(), prepared, asym)
        for p in mine:
            lin = layers[p]
            bias = None if lin.bias is None else lin.bias.data.float().cpu()
            r = gptq.quantize(weights[p], options[p], prepared, bias, opts)
            _store(out_dir, f"{key}.{p}", r)
            set_weight(lin, r.weight)
        del prepared
    err = advance(block, spec, states, ref, device, cos, sin, None if kept is None else kept[last])
    # (fstates, if given, already holds the full-precision outputs: the last collect put them there)
    return states, err


def quantize_head(parts: ModelParts, states, input_ids: torch.Tensor, head_bits: int, out_dir: Path, device,
                  ppl_rows: int, opts: gptq.GPTQOptions = gptq.GPTQOptions(), fstates: list | None = None,
                  asym: float = 0.0) -> dict:
    """Quantize lm_head (or the tied embedding) on the final-norm outputs; returns head facts and the
    calibration perplexity of the quantized model on the first ``ppl_rows`` rows.  ``fstates`` and
    ``asym``: asymmetric calibration as in :func:`quantize_module`.  Of ``opts`` the head uses the damping
    and the refine span, no lever."""
    qp = HEAD_OPTIONS[head_bits]
    norm = parts.norm("norm")
    if parts.has_head():
        w = parts.src.get_float("lm_head.weight", (parts.cfg.vocab_size, parts.cfg.hidden_size), torch.float32, "cpu")
    else:
        w = parts.embedding().float().cpu()                                    # tied: [V, C]
    H = gptq.Hessian(w.shape[1]) if fstates is None else gptq.CrossHessian(w.shape[1])
    with torch.no_grad():
        normed = [norm(x.to(device)) for x in states]
        for i, h in enumerate(normed):
            if fstates is None:
                H.add(h)
            else:
                H.add_pair(h, norm(fstates[i].to(device)))
    rtn = w.numel() > RTN_HEAD_ELEMENTS
    prepared = gptq.prepare(H.result().cpu(), percdamp=opts.percdamp, invert=not rtn)
    if fstates is not None:                      # round-to-nearest (no inverse) leaves the head as it is
        w = gptq.asymmetric_targets({"head": w}, H.cross().cpu(), prepared, asym)["head"]
    r = gptq.quantize(w, qp, prepared, opts=gptq.GPTQOptions(refine_span=opts.refine_span))
    _store(out_dir, "lm_head", r)
    # Calibration perplexity of the whole quantized model (a sanity number, not a benchmark).
    wq = r.weight.to(device, torch.float32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for h, ids in zip(normed[:ppl_rows], input_ids[:ppl_rows]):
            logits = final_softcap(parts.cfg, F.linear(h.float(), wq))[0, :-1]   # [L-1, V]
            target = ids[1:].to(device)
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            count += target.numel()
    return {"head_bits": head_bits, "rtn": rtn, "option": qp.desc(),
            "calibration_ppl": math.exp(nll / max(count, 1))}


def run_quantization(model_dir: str | Path, input_ids: torch.Tensor, strategy: dict, head_bits: int,
                     work: str | Path, *, device="cpu", status: Status | None = None, progress=None,
                     ppl_rows: int = 4, opts: gptq.GPTQOptions = gptq.GPTQOptions(), asym: float = 0.0) -> dict:
    """Quantize the whole model into ``work/out_tensor``; resumes from its checkpoint
    (``work/quant.checkpoint.safetensors``).

    Returns a report: per-module relative output errors and the head facts.  ``opts``: the quantizer's
    settings (:class:`gptq.GPTQOptions`; benchmarks vary them, the converter uses the defaults).  ``asym`` > 0
    turns on asymmetric calibration with that ``alpha`` (:func:`gptq.asymmetric_targets`): the full-precision
    model's states run beside the quantized ones (one more copy of the states in memory and in the checkpoint).
    """
    work = Path(work)
    out_dir = work / "out_tensor"
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ModelParts(model_dir, device=device, dtype=torch.float32)   # the states are fp32 on every device
    n_layers = parts.cfg.num_layers
    saved = load_checkpoint(work, "quant")
    if saved:
        report, states = saved
        old = float(report.get("asym", 0.0))
        if old != float(asym):
            raise QuantizeError(f"{work}: the interrupted quantization ran with --asym {old:g}, this run asks for "
                                f"{float(asym):g}; rerun with --asym {old:g}, or use -nr to start over")
    else:
        report, states = {"next_layer": 0, "errors": {}, "asym": asym}, embed_rows(parts, input_ids)
        if asym:
            states = states + [s.clone() for s in states]
    # With asymmetric calibration the checkpointed list holds the quantized model's states, then the
    # full-precision model's.
    fstates = None
    if asym:
        half = len(states) // 2
        states, fstates = states[:half], states[half:]
    cos, sin = Rotary(parts.cfg).to(device).cos_sin(0, input_ids.shape[1])
    for layer in range(report["next_layer"], n_layers):
        t0 = time.time()
        block = parts.block(layer)
        for spec in specs_for(parts.cfg, MODULES):      # a sparse MLP in place of the MLP (layers/moe.py)
            fit_threads()       # fewer threads while other processes keep CPUs busy (core/threads.py)
            if spec.kind == MOE.kind:
                from .moe import quantize_moe
                states, err, routed = quantize_moe(block, spec, layer, strategy, states, cos, sin, device,
                                                   out_dir, parts.cfg, opts, fstates, _store)
                report.setdefault("routed", {})[spec.key(layer)] = routed
            else:
                states, err = quantize_module(block, spec, layer, strategy, states, cos, sin, device, out_dir,
                                              opts, fstates, asym)
            report["errors"][spec.key(layer)] = err
            if status:
                status({"stage": "quant", "module": spec.key(layer), "rfn_error": err})
        del block
        report["next_layer"] = layer + 1
        save_checkpoint(work, "quant", report, states if fstates is None else states + fstates)
        if status:
            status({"stage": "quant", "layer": layer, "layers": n_layers, "seconds": round(time.time() - t0, 2)})
        if progress:
            progress(layer + 1, n_layers)
    report["head"] = quantize_head(parts, states, input_ids, head_bits, out_dir, device, ppl_rows, opts,
                                   fstates, asym)
    if status:
        status({"stage": "quant", "module": "lm_head", **report["head"]})
    clear_checkpoint(work, "quant")
    return report
