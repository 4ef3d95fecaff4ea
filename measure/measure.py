"""The measurement pass: for every decoder module, the output error of each candidate combination.

For each module (a layer's attention, then its MLP), with only that layer's weights resident:

1. run it in full precision over all calibration rows, collecting the Hessian of each projection's input
   (q/k/v share one, gate/up share one) and the reference output;
2. quantize each projection once per *distinct* option of its column of the table (GPTQ);
3. for each combination of the table (19 attention, 17 MLP), swap those weights in, re-run all rows and
   record ``accuracy = max(1e-6, 1 - mean_rows ||Y_q - Y_ref||_F / ||Y_ref||_F)`` (docs/pipeline.md section 4) and
   the module's total bits; by default both errors are estimated from a sample of each row's tokens
   (:func:`sample_positions`: the re-run computes those tokens' outputs only);
4. feed the next module the *reference* output (errors do not propagate while measuring).

Progress is checkpointed after every layer (states, partial measurement, layer index), so a killed run
resumes from the last finished layer and gives the same result as an uninterrupted one.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exl2.core.files import write_json_atomic
from exl2.core.threads import fit_threads
from exl2.quant_kernels import gptq
from exl2.quant_kernels.codec import padded_columns
from exl2.quant_kernels.finite import all_finite, has_nan
from exl2.quant_kernels.qparams import QParams, distinct_options
from exl2.runtime.loader import ModelParts
from exl2.layers.checkpoint import clear_checkpoint, load_checkpoint, save_checkpoint
from exl2.layers.moe import MOE, specs_for
from exl2.layers.stream import (FINISH_FROM, FP16_MAX, MODULES, LayerError, ModuleSpec, collect, embed_rows,
                                finish_module, linears, rel_error, replay_bytes, run_module_kept,
                                run_module, set_weight)

from . import measurement as mj

MeasureError = LayerError   # one class: the layer loop's NaN checks and measurement's own refusals

MIN_ACCURACY = 0.1      # a module whose best option is worse than this aborts the run (ExLlamaV2's rule)

Status = Callable[[dict], None]


@dataclass
class Preflight:
    max_abs: list[float]          # largest |activation| after each decoder layer
    overflow_layers: list[int]    # layers whose activations exceed the fp16 range

    def report(self) -> str:
        peak = max(self.max_abs) if self.max_abs else 0.0
        worst = max(range(len(self.max_abs)), key=lambda i: self.max_abs[i]) if self.max_abs else -1
        msg = f"preflight: peak |activation| {peak:.4g} at layer {worst} (fp16 max {FP16_MAX:.0f})"
        if self.overflow_layers:
            msg += f"; layers {self.overflow_layers} exceed the fp16 range: fp16 inference of this model will overflow"
        return msg


def token_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over tokens of ||y_t - ref_t|| / ||ref_t|| (fp32, y clamped to the fp16 range).

    Unlike :func:`rel_error` (one norm over the whole row), a token whose residual stream carries a
    massive activation (attention-sink tokens reach 1e4 and more in small models) does not drown the
    error of every other token.  The next layer's RMSNorm rescales each token by its own norm, so this
    is the error the next layer actually sees.
    """
    y = y.float().clamp(-FP16_MAX, FP16_MAX).reshape(-1, y.shape[-1])        # [tokens, C]
    ref = ref.float().reshape(-1, ref.shape[-1])
    return float(((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-20)).mean())


# The combination passes estimate the output error from the first and every MEASURE_STRIDE-th token of each
# row, keeping at least MIN_SAMPLED tokens over all rows (the Hessians always see every token).  Why these
# values: docs/decisions/0017-measure-stride.md.
MEASURE_STRIDE = 4
MIN_SAMPLED = 1024


def effective_stride(rows: int, length: int, stride: int) -> int:
    """The stride a measurement of ``rows`` x ``length`` tokens uses when ``stride`` is asked for: the largest
    one up to ``stride`` that still samples :data:`MIN_SAMPLED` tokens (all of them when there are fewer)."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    while stride > 1 and rows * (length // stride) < min(MIN_SAMPLED, rows * length):
        stride -= 1
    return stride


def sample_positions(length: int, stride: int) -> torch.Tensor | None:
    """The positions of a row of ``length`` tokens whose output errors are measured: the first token (an
    attention sink in most models, whose error is unlike the others') and every ``stride``-th one after it,
    ``0, stride - 1, 2 * stride - 1, ...``; ``None`` (every position) for stride 1."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if stride == 1:
        return None
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(stride - 1, length, stride)])


def sample_weights(length: int, positions: torch.Tensor) -> torch.Tensor:
    """What each sampled position stands for: the first token itself, each other one an equal share of the
    ``length - 1`` tokens after the first (fp32 [P], summing to ``length``)."""
    rest = positions.numel() - 1
    w = torch.full((positions.numel(),), (length - 1) / max(rest, 1), dtype=torch.float32)
    w[0] = 1.0
    return w


def sampled_errors(y: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """:func:`rel_error` and :func:`token_error` of a row from its sampled positions (y, ref [1, P, C]), each
    token weighted by ``weights`` [P]: the estimate of what the full row gives."""
    y = y.float().clamp(-FP16_MAX, FP16_MAX).reshape(-1, y.shape[-1])        # [P, C]
    ref = ref.float().reshape(-1, ref.shape[-1])
    d, n = (y - ref).norm(dim=-1), ref.norm(dim=-1)                           # [P] each
    rel = (weights * d.square()).sum().sqrt() / (weights * n.square()).sum().sqrt().clamp_min(1e-20)
    tok = (weights * d / n.clamp_min(1e-20)).sum() / weights.sum()
    return float(rel), float(tok)


def module_error(block, spec, states: list[torch.Tensor], ref: list[torch.Tensor], device, cos, sin,
                 positions: torch.Tensor | None = None, last_inputs: list | None = None,
                 keep: list | None = None) -> tuple[float, float]:
    """The module's output error with its current weights, over every row: (mean relative error, mean per-token
    error) against the rows' references; estimated from ``positions`` of each row only (see
    :func:`sample_positions`, :func:`sampled_errors`) when given.  ``last_inputs``: per row, what the module's last
    projection reads with the current weights (at ``positions``); the rows are finished from there
    (:func:`finish_module`).  ``keep`` (a list): receives that input of every row (:func:`run_module_kept`)."""
    errs, tok_errs = [], []
    weights = None if positions is None else sample_weights(states[0].shape[1], positions).to(device)
    with torch.no_grad():
        for i, (x, r) in enumerate(zip(states, ref)):
            x = x.to(device)
            if last_inputs is not None:
                y = finish_module(block, spec, x if positions is None else x[:, positions], last_inputs[i])
            elif keep is not None:
                y = run_module_kept(block, spec, x, cos, sin, positions, keep)
            else:
                y = run_module(block, spec, x, cos, sin, positions)
            if positions is None:
                r = r.to(device)
                errs.append(rel_error(y, r))
                tok_errs.append(token_error(y, r))
            else:
                err, tok = sampled_errors(y, r[:, positions].to(device), weights)
                errs.append(err)
                tok_errs.append(tok)
    return sum(errs) / len(errs), sum(tok_errs) / len(tok_errs)


def preflight(parts: ModelParts, first_row: torch.Tensor, device="cpu") -> Preflight:
    """One row through the full-precision model: per-layer peak |activation| against the fp16 range."""
    from exl2.runtime.model import Rotary

    x = embed_rows(parts, first_row.reshape(1, -1))[0].to(device)
    cos, sin = Rotary(parts.cfg).to(device).cos_sin(0, x.shape[1])
    peaks = []
    with torch.no_grad():
        for i in range(parts.cfg.num_layers):
            block = parts.block(i)
            for name, p in block.named_parameters():
                if not all_finite(p):
                    raise MeasureError(f"model.layers.{i}.{name}: NaN or Inf in the checkpoint's weights")
            for spec in MODULES:
                x = run_module(block, spec, x, cos, sin)
            if has_nan(x):
                raise MeasureError(f"preflight: NaN in the output of layer {i} (full precision)")
            peaks.append(float(x.abs().max()))
            del block
    return Preflight(peaks, [i for i, p in enumerate(peaks) if p > FP16_MAX])


def shapes_of(layers: dict) -> dict[str, tuple[int, int, bool]]:
    """(K, padded N, has bias) per projection, as the bit accounting counts them."""
    return {p: (m.in_features, padded_columns(m.out_features), getattr(m, "bias", None) is not None)
            for p, m in layers.items()}


# How the measurement quantizes its variants (only their errors are used; nothing is packed).
MEASURE_GPTQ = gptq.GPTQOptions()

VARIANT_BUDGET = 2 << 30   # bytes of quantized variants one module may keep in memory; past it they go to disk


class Variants:
    """The quantized weights of one module, one per (projection, distinct option).

    Each is ``gptq.quantize(...).weight``: fp16 ``[N, K]``, exactly what the loader reconstructs, so keeping
    it in fp16 loses nothing (the fp32 layer gets the same values back).  A module has 13-15 distinct
    options per projection; on Qwen2-72B's MLP that is 40 x 484 MB = 19 GB, which is why, when the module's
    total exceeds ``budget`` bytes, every variant is written to a temporary safetensors file under
    ``spill_dir`` as soon as it is made and read back (memory-mapped) only while a combination uses it.
    The file round trip is bit-exact, so the measurement is the same either way.
    """

    def __init__(self, total_bytes: int, budget: int | None = None, spill_dir: str | Path | None = None):
        budget = VARIANT_BUDGET if budget is None else budget
        self.spilled = total_bytes > budget
        self._mem: dict[tuple[str, QParams], torch.Tensor] = {}
        self._files: dict[tuple[str, QParams], Path] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="exl2-variants-", dir=spill_dir) if self.spilled else None

    def add(self, p: str, qp: QParams, w: torch.Tensor) -> None:
        if self._tmp is None:
            self._mem[(p, qp)] = w
            return
        path = Path(self._tmp.name) / f"{p}.{len(self._files):03d}.safetensors"
        save_file({"w": w.contiguous()}, str(path))
        self._files[(p, qp)] = path

    def get(self, p: str, qp: QParams) -> torch.Tensor:
        if self._tmp is None:
            return self._mem[(p, qp)]
        with safe_open(str(self._files[(p, qp)]), framework="pt", device="cpu") as f:
            return f.get_tensor("w")

    def close(self) -> None:
        self._mem.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def variant_bytes(layers: dict, spec) -> int:
    """Bytes of all fp16 variants of a module: distinct options x N x K x 2, summed over projections."""
    return sum(len(opts) * layers[p].out_features * layers[p].in_features * 2
               for p, opts in zip(spec.projections, distinct_options(spec.options)))


def measure_module(block, spec, layer: int, states: list[torch.Tensor], cos, sin, device,
                   status: Status | None = None, *, variant_budget: int | None = None,
                   spill_dir: str | Path | None = None, gptq_opts: gptq.GPTQOptions | None = None,
                   stride: int = 1) -> tuple[list[dict], list[torch.Tensor]]:
    """Measure one module; returns (the measurement entries, the reference outputs).  ``gptq_opts``: how the
    variants are quantized (default :data:`MEASURE_GPTQ`); ``stride``: the combinations' errors come from
    :func:`sample_positions` of that stride (1: every token).

    Memory: the block's weights, the states and outputs, one Hessian factor per shared input, and the
    quantized variants (in memory up to ``variant_budget`` bytes, else spilled to ``spill_dir``, see
    :class:`Variants`).  Nothing is held across modules.
    """
    H, ref = collect(block, spec, states, cos, sin, device)
    layers = linears(block, spec)
    # set_weight swaps .data for a new tensor and nothing writes weights in place, so the originals are
    # kept by reference (a clone would double the layer's fp32 weights)
    original = {p: m.weight.data for p, m in layers.items()}
    prepared = {}
    for p, owner in spec.hessian_of.items():
        if owner not in prepared:
            prepared[owner] = gptq.prepare(H[owner].cpu())
    del H
    variants = Variants(variant_bytes(layers, spec), variant_budget, spill_dir)
    try:
        for p, opts in zip(spec.projections, distinct_options(spec.options)):
            w = original[p].float().cpu()
            b = layers[p].bias
            for qp in opts:
                fit_threads()       # fewer threads while other processes keep CPUs busy (core/threads.py)
                variants.add(p, qp, gptq.quantize(w, qp, prepared[spec.hessian_of[p]],
                                                  None if b is None else b.data.float().cpu(),
                                                  gptq_opts or MEASURE_GPTQ, pack=False).weight)
            del w
        del prepared
        shapes = shapes_of(layers)
        positions = sample_positions(states[0].shape[1], stride)
        # A combination that differs from the one before only in the last projection (o_proj, down_proj) finishes
        # each row from the inputs that projection read in the earlier run (kept within the budget).
        last = FINISH_FROM.get(spec.kind)
        sampled = states[0].shape[1] if positions is None else positions.numel()
        can_keep = last in layers and replay_bytes(len(states), sampled, layers[last].in_features) > 0
        front = [tuple(qp for p, qp in zip(spec.projections, c) if p != last) for c in spec.options]
        entries = []
        current: dict[str, QParams] = {}
        kept = None
        for ci, combo in enumerate(spec.options):
            for p, qp in zip(spec.projections, combo):
                if current.get(p) != qp:          # consecutive combinations often share a projection's option
                    set_weight(layers[p], variants.get(p, qp))
                    current[p] = qp
            fit_threads()
            reuse = kept if ci > 0 and front[ci] == front[ci - 1] else None
            keep = [] if (can_keep and reuse is None and ci + 1 < len(front) and front[ci + 1] == front[ci]) else None
            err, tok_err = module_error(block, spec, states, ref, device, cos, sin, positions, reuse, keep)
            kept = reuse if reuse is not None else keep
            acc = max(1e-6, 1.0 - err)
            e = mj.entry(acc, dict(zip(spec.projections, combo)), shapes)
            e["token_err"] = tok_err
            entries.append(e)
            if status:
                status({"stage": "measure", "module": spec.key(layer), "option": ci, "of": len(spec.options),
                        "accuracy": acc})
    finally:
        variants.close()
        for p, w in original.items():
            set_weight(layers[p], w)
    best = max(e["accuracy"] for e in entries)
    if best < MIN_ACCURACY:
        raise MeasureError(f"{spec.key(layer)}: best accuracy {best:.4f} is below {MIN_ACCURACY}; "
                           f"the model cannot be quantized with these options")
    return entries, ref


def run_measurement(model_dir: str | Path, input_ids: torch.Tensor, work: str | Path, *, device="cpu",
                    provenance: dict | None = None, status: Status | None = None, progress=None,
                    variant_budget: int | None = None, modules: tuple[ModuleSpec, ...] = MODULES,
                    layers: tuple[int, int] | None = None, states: list[torch.Tensor] | None = None,
                    gptq_opts: gptq.GPTQOptions | None = None, stride: int = MEASURE_STRIDE) -> dict:
    """Measure every decoder module of ``model_dir`` on calibration rows ``input_ids [R, L]``.

    ``work`` holds the checkpoint (``measure.checkpoint.safetensors``: states and partial measurement); when it
    exists the run resumes after the last finished layer.  Returns the measurement.json data (also written
    to ``work/measurement.json``).  ``progress`` is an optional callable ``(layer_done, layers)``.
    ``variant_budget`` (bytes, default :data:`VARIANT_BUDGET`): a module whose quantized variants exceed it
    spills them to a temporary folder under ``work``, so memory follows one layer, not the option count.
    ``modules``: the attention and MLP specs with their option tables (default: ExLlamaV2's;
    ``layers.stream.module_specs("extended")`` appends our candidates; ``bench/tables.py`` measures the candidates
    alone).  Every module is measured on the FP16 path's states, so entries measured with different tables
    can be concatenated.  ``stride``: the combinations' errors are estimated from the first and every
    ``stride``-th token of each row (:func:`effective_stride` lowers it for short measurements; 1: every token).

    A part of the model (measure/split.py): ``layers=(first, stop)`` with ``states``, the full-precision inputs
    of layer ``first`` (:func:`exl2.measure.split.range_states`), measures those layers only and returns their
    entries, also written to ``work/part.json``; :func:`exl2.measure.split.merge_parts` joins the parts into
    the measurement.json a whole run writes.
    """
    from exl2.runtime.model import Rotary

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("exl2-variants-*"):     # spilled variants of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    parts = ModelParts(model_dir, device=device, dtype=torch.float32)   # the states are fp32 on every device
    n_layers = parts.cfg.num_layers
    first, stop = (0, n_layers) if layers is None else layers
    saved = load_checkpoint(work, "measure")
    if saved:
        (progress_rec, states) = saved
        measurement, start = progress_rec["measurement"], progress_rec["next_layer"]
    else:
        measurement, start = {}, first
        states = embed_rows(parts, input_ids) if layers is None else states
    cos, sin = Rotary(parts.cfg).to(device).cos_sin(0, input_ids.shape[1])
    stride = effective_stride(*input_ids.shape, stride)
    modules = specs_for(parts.cfg, modules)     # a sparse MLP in place of the MLP (layers/moe.py)
    for layer in range(start, stop):
        t0 = time.time()
        block = parts.block(layer)
        for spec in modules:
            if spec.kind == MOE.kind:
                from .moe import measure_moe
                entries, states = measure_moe(block, spec, layer, states, cos, sin, device, status,
                                              variant_budget=variant_budget, spill_dir=work, gptq_opts=gptq_opts,
                                              stride=stride)
            else:
                entries, states = measure_module(block, spec, layer, states, cos, sin, device, status,
                                                 variant_budget=variant_budget, spill_dir=work, gptq_opts=gptq_opts,
                                                 stride=stride)
            measurement[spec.key(layer)] = entries
        del block
        save_checkpoint(work, "measure", {"measurement": measurement, "next_layer": layer + 1}, states)
        if status:
            status({"stage": "measure", "layer": layer, "layers": n_layers, "seconds": round(time.time() - t0, 2)})
        if progress:
            progress(layer + 1 - first, stop - first)
    if layers is not None:
        write_json_atomic(work / PART_FILE, {"layers": [first, stop], "measurement": measurement})
        clear_checkpoint(work, "measure")
        return measurement
    save_measurement(work / "measurement.json", measurement, n_layers, provenance)
    clear_checkpoint(work, "measure")
    return mj.load(work / "measurement.json")


PART_FILE = "part.json"     # a part's entries (run_measurement with layers=...)


def save_measurement(path: Path, measurement: dict, n_layers: int, provenance: dict | None) -> None:
    """The measured decoder modules, in layer order, as ExLlamaV2's measurement.json holds them."""
    measurement = dict(measurement, **{"model.norm.norm": None, "lm_head.linear": None})
    last = 2 * n_layers + 2          # index of the head in ExLlamaV2's module list: embedding, 2 per layer, norm, head
    mj.save(path, measurement, last, provenance)
