"""The layer loop's pieces, shared by the measurement and quantization passes.

A decoder layer is two *modules* in ExLlamaV2's sense, each with its residual add:

    self_attn:  y = x + o_proj(attn(q_proj(h), k_proj(h), v_proj(h)))     h = input_layernorm(x)
    mlp:        y = x + down_proj(silu(gate_proj(h)) * up_proj(h))         h = post_attention_layernorm(x)

(Gemma: GELU for silu, h = pre_feedforward_layernorm(x), and each module's output normed before the add;
:class:`~exl2.runtime.model.Block` computes both.)

Calibration states are kept per row as float32 ``[1, L, C]`` tensors on the CPU (:func:`embed_rows` makes
the first ones) and moved to the work device one row at a time, so device memory holds one layer's weights
plus one row's activations.  :func:`collect` runs a module over every row and gathers its Hessians; the
per-layer checkpoints of the loops live in :mod:`exl2.layers.checkpoint`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Collection

import torch
from torch import nn

from exl2.quant_kernels import gptq
from exl2.quant_kernels.finite import has_nan
from exl2.quant_kernels.qparams import ATTN_OPTIONS, ATTN_PROJ, MLP_OPTIONS, MLP_PROJ, TABLES
from exl2.runtime.loader import ModelParts
from exl2.runtime.model import Block, embed_tokens

FP16_MAX = 65504.0
# The most memory spent on keeping every row's input of a module's last projection (o_proj, down_proj) so that
# later runs of the module finish from there (replay_bytes): the quantization pass's advance after its last
# collect, and the measurement's combinations that differ from the one before only in that projection.
REPLAY_BUDGET = 1 << 30


class LayerError(RuntimeError):
    """The work cannot go on: NaN activations or weights, a module no option can represent.

    Measurement raises it as :data:`exl2.measure.measure.MeasureError` (the same class)."""


@dataclass(frozen=True)
class ModuleSpec:
    kind: str                      # "self_attn" or "mlp"
    projections: tuple[str, ...]
    hessian_of: dict[str, str]     # projection -> projection whose input it shares
    options: list                  # the combination table

    def key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.kind}"


ATTN = ModuleSpec("self_attn", ATTN_PROJ, {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj",
                                             "o_proj": "o_proj"}, ATTN_OPTIONS)
MLP = ModuleSpec("mlp", MLP_PROJ, {"gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"},
                 MLP_OPTIONS)
MODULES = (ATTN, MLP)


def module_specs(tables: str = "exl2") -> tuple[ModuleSpec, ...]:
    """The attention and MLP specs measured with the option tables ``qparams.TABLES[tables]``."""
    attn, mlp = TABLES[tables]
    return replace(ATTN, options=attn), replace(MLP, options=mlp)


def embed_rows(parts: ModelParts, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Token rows [R, L] to per-row embeddings [1, L, C] (float32, CPU); ids beyond the table become 0."""
    emb = parts.embedding()
    ids = input_ids.clone()
    ids[(ids < 0) | (ids >= emb.shape[0])] = 0
    with torch.no_grad():
        return [embed_tokens(parts.cfg, ids[r:r + 1].to(emb.device), emb, torch.float32).cpu()
                for r in range(ids.shape[0])]


def linears(block: Block, spec: ModuleSpec) -> dict[str, nn.Module]:
    parent = block.self_attn if spec.kind == "self_attn" else block.mlp
    return {p: getattr(parent, p) for p in spec.projections}


def run_module(block: Block, spec: ModuleSpec, x: torch.Tensor, cos, sin,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """The module's output including its residual add; x [1, L, C] -> [1, L, C], or [1, P, C] at ``positions``
    only (int64 [P], ascending: the MLP runs on those tokens alone, attention makes every token's keys and
    values but only those tokens' queries and outputs)."""
    if spec.kind == "self_attn":
        if positions is not None:
            return block.attn_residual_at(x, cos, sin, positions)
        return block.attn_residual(x, cos, sin)
    return block.mlp_residual(x if positions is None else x[:, positions])


# The projection each module kind can be finished from (finish_module).
FINISH_FROM = {"self_attn": "o_proj", "mlp": "down_proj"}


def finish_module(block: Block, spec: ModuleSpec, x: torch.Tensor, last_input: torch.Tensor) -> torch.Tensor:
    """:func:`run_module`'s output on ``x`` [1, L, C] from ``last_input``, what the module's last projection
    (``FINISH_FROM[spec.kind]``) reads when it runs on x with its current weights: only that projection and the
    residual add run, the same operations as the whole module's from there."""
    if spec.kind == "self_attn":
        return block.attn_finish(x, last_input)
    if spec.kind == "mlp":
        return block.mlp_finish(x, last_input)
    raise ValueError(f"finish_module: a {spec.kind} module has no last projection to finish from")


def run_module_kept(block: Block, spec: ModuleSpec, x: torch.Tensor, cos, sin, positions: torch.Tensor | None,
                    keep: list) -> torch.Tensor:
    """:func:`run_module`, appending to ``keep`` the input of the module's last projection (``FINISH_FROM``), the
    tensor it reads, for :func:`finish_module` on ``x`` (or ``x[:, positions]``) later."""
    lin = linears(block, spec)[FINISH_FROM[spec.kind]]
    hook = lin.register_forward_pre_hook(lambda _m, args: keep.append(args[0]))
    try:
        return run_module(block, spec, x, cos, sin, positions)
    finally:
        hook.remove()


def replay_bytes(rows: int, length: int, k: int) -> int:
    """The memory kept for finishing a module from its last projection's inputs (``rows`` x ``length`` tokens of
    width ``k``, fp32), or 0 where that is over REPLAY_BUDGET and the module runs again instead."""
    n = 4 * rows * length * k
    return n if n <= REPLAY_BUDGET else 0


class _Enough(Exception):
    """Raised by the last wrapper (:class:`_Recorder`, :class:`_Capture`) to see its input when the module's
    output is not wanted."""


def _stop_check(wrapper, stop: list | None) -> None:
    """``stop``: the wrappers still waiting for their input in this run (None: run the module to the end)."""
    if stop is not None:
        if wrapper in stop:
            stop.remove(wrapper)
        if not stop:
            raise _Enough


class _Recorder(nn.Module):
    """Wraps a linear layer and adds every input it sees to a Hessian (one add per calibration row).

    With ``pending`` set (a :class:`gptq.CrossHessian`), the next input is paired with it: the input the same
    layer saw on the same row in the full-precision model.  ``keep`` (a list): every input is appended to it as
    well.  ``stop``: as :func:`_stop_check`.
    """

    def __init__(self, inner: nn.Module, hessian: gptq.Hessian, keep: list | None = None):
        super().__init__()
        self.inner, self.hessian, self.keep = inner, hessian, keep
        self.pending: torch.Tensor | None = None
        self.stop: list | None = None

    def forward(self, x):
        if self.keep is not None:
            self.keep.append(x)
        if self.pending is None:
            self.hessian.add(x)
        else:
            self.hessian.add_pair(x, self.pending)
            self.pending = None
        _stop_check(self, self.stop)
        return self.inner(x)


class _Capture(nn.Module):
    """Wraps a linear layer and keeps the inputs it sees (float32, on their device); ``stop``: as
    :func:`_stop_check`."""

    def __init__(self, inner: nn.Module, store: list[torch.Tensor]):
        super().__init__()
        self.inner, self.store = inner, store
        self.stop: list | None = None

    def forward(self, x):
        self.store.append(x.float())
        _stop_check(self, self.stop)
        return self.inner(x)


@contextmanager
def _wrapped(parent: nn.Module, wrappers: dict[str, nn.Module]):
    """Run with these wrappers in place of the parent's projections of the same names, then put them back."""
    inner = {o: getattr(parent, o) for o in wrappers}
    try:
        for o, w in wrappers.items():
            setattr(parent, o, w)
        yield
    finally:
        for o, m in inner.items():
            setattr(parent, o, m)


def _run_wrapped(block: Block, spec: ModuleSpec, wrappers: dict[str, nn.Module], x: torch.Tensor, cos, sin,
                 output: bool) -> torch.Tensor | None:
    """The module's output on ``x`` with ``wrappers`` (:class:`_Recorder` or :class:`_Capture`) in place of its
    projections; with ``output`` False it stops once every wrapper has seen its input and returns None."""
    parent = block.self_attn if spec.kind == "self_attn" else block.mlp
    waiting = None if output else list(wrappers.values())
    for w in wrappers.values():
        w.stop = waiting
    with _wrapped(parent, wrappers), torch.no_grad():
        try:
            return run_module(block, spec, x, cos, sin)
        except _Enough:
            return None


@contextmanager
def swapped_weights(block: Block, spec: ModuleSpec, weights: dict[str, torch.Tensor]):
    """Run with these projection weights in place of the current ones (tensors swapped, nothing copied)."""
    layers = linears(block, spec)
    saved = {p: layers[p].weight.data for p in weights}
    try:
        for p, w in weights.items():
            layers[p].weight.data = w
        yield
    finally:
        for p, w in saved.items():
            layers[p].weight.data = w


def inputs_of(block: Block, spec: ModuleSpec, owners, x: torch.Tensor, cos, sin, output: bool = True
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The inputs projections ``owners`` read when the module runs once on one row ``x`` with its current
    weights, and the module's output; with ``output`` False the module stops as soon as the last of them has
    its input (the output is then None: the q/k/v or gate/up input costs a norm, not the whole module)."""
    parent = block.self_attn if spec.kind == "self_attn" else block.mlp
    store: dict[str, list[torch.Tensor]] = {o: [] for o in owners}
    y = _run_wrapped(block, spec, {o: _Capture(getattr(parent, o), store[o]) for o in owners}, x, cos, sin, output)
    return {o: store[o][0] for o in owners}, y


def collect(block: Block, spec: ModuleSpec, states: list[torch.Tensor], cos, sin, device,
            max_abs: list | None = None, owners: tuple[str, ...] | None = None,
            fp_input: Callable[[int, list[str]], dict[str, torch.Tensor]] | None = None, cross: dict | None = None,
            output: bool = True, out_rows: Collection[int] | None = None, keep: dict | None = None
            ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run the module over all rows with its current weights: Hessians per projection and the outputs.

    Returns ``(H, outputs)`` with ``H[proj]`` averaged over rows (shared inputs share one matrix) and
    outputs on the CPU.  ``owners`` limits the Hessians to those shared inputs (default: every input of
    the module), and ``H`` to the projections that read them.  NaN in an output raises; ``max_abs``
    (if given) receives the largest |output|.  With ``fp_input`` (row index, owners -> the inputs those
    owners see on that row in the full-precision model; called with no recorder installed),
    ``cross[proj]`` receives :meth:`gptq.CrossHessian.cross` as well.  ``output`` False: the module stops on
    each row once the owners' inputs are recorded, and ``outputs`` is empty (no ``max_abs`` then).
    ``out_rows``: only these rows (indices) run to the end; the others stop as with ``output`` False, and
    ``outputs`` holds the chosen rows' outputs in row order.  ``keep`` (a dict): ``keep[owner]`` receives the
    list of every row's input of each owner, on the device (for :func:`advance`'s ``last_inputs``).
    """
    if max_abs is not None and (not output or out_rows is not None):
        raise ValueError("collect: max_abs needs every output (output=True, out_rows None)")
    owners = sorted(set(spec.hessian_of.values()) if owners is None else owners)
    layers = linears(block, spec)
    kind = gptq.Hessian if fp_input is None else gptq.CrossHessian
    hess = {o: kind(layers[o].in_features, device=device) for o in owners}
    if keep is not None:
        keep.update({o: [] for o in owners})
    rec = {o: _Recorder(layers[o], hess[o], None if keep is None else keep[o]) for o in owners}
    outputs = []
    with torch.no_grad():
        for i, x in enumerate(states):
            if fp_input is not None:
                for o, x_fp in fp_input(i, owners).items():
                    rec[o].pending = x_fp
            y = _run_wrapped(block, spec, rec, x.to(device), cos, sin,
                             output and (out_rows is None or i in out_rows))
            if y is None:
                continue
            if has_nan(y):
                raise LayerError(f"{spec.kind}: NaN in the full-precision output")
            if max_abs is not None:
                max_abs.append(float(y.abs().max()))
            outputs.append(y.cpu())
    H = {p: hess[o].result() for p, o in spec.hessian_of.items() if o in hess}
    if fp_input is not None and cross is not None:
        cross.update({p: hess[o].cross() for p, o in spec.hessian_of.items() if o in hess})
    return H, outputs


def set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Swap a runtime Linear's weight ([N, K]) in place, keeping its dtype and device."""
    layer.weight.data = w.to(layer.weight.device, layer.weight.dtype)


def advance(block: Block, spec: ModuleSpec, states: list, ref: list, device, cos, sin,
            last_inputs: list | None = None) -> float:
    """Run the module (its weights now quantized) over every row: each output replaces its input in ``states``
    and the row's reference is dropped as soon as it is used, so two copies of the states are alive, not three.
    Returns the mean relative output error against the references, over the rows that have one (``ref[i]``
    None: no reference for row i).  NaN in an output raises.  ``last_inputs``: per row, what the module's last
    projection reads with the current weights (collected after every earlier projection was quantized); each
    row is then finished from there (:func:`finish_module`) and its entry dropped."""
    errs = []
    with torch.no_grad():
        for i in range(len(states)):
            x = states[i].to(device)
            if last_inputs is None:
                y = run_module(block, spec, x, cos, sin)
            else:
                y, last_inputs[i] = finish_module(block, spec, x, last_inputs[i]), None
            if has_nan(y):
                raise LayerError(f"{spec.kind}: NaN in the output with the quantized weights (row {i})")
            if ref[i] is not None:
                errs.append(rel_error(y, ref[i].to(device)))
                ref[i] = None
            states[i] = y.float().cpu()
    if not errs:
        raise ValueError("advance: no row has a reference output")
    return sum(errs) / len(errs)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref||_F / ||ref||_F in fp32, with y clamped to the fp16 range first (docs/pipeline.md section 4)."""
    y = y.float().clamp(-FP16_MAX, FP16_MAX)
    ref = ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-20))
