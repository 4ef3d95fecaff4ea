"""Layer-by-layer machinery shared by the measurement and quantization passes.

A decoder layer is two *modules* in ExLlamaV2's sense, each with its residual add:

    self_attn:  y = x + o_proj(attn(q_proj(h), k_proj(h), v_proj(h)))     h = input_layernorm(x)
    mlp:        y = x + down_proj(silu(gate_proj(h)) * up_proj(h))         h = post_attention_layernorm(x)

Calibration states are kept per row as float32 ``[1, L, C]`` tensors on the CPU and moved to the work
device one row at a time, so device memory holds one layer's weights plus one row's activations.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from exl2.quant_kernels import gptq
from exl2.runtime.files import save_safetensors
from exl2.quant_kernels.qparams import ATTN_OPTIONS, ATTN_PROJ, MLP_OPTIONS, MLP_PROJ, TABLES
from exl2.runtime.model import Block

FP16_MAX = 65504.0


class MeasureError(RuntimeError):
    """The work cannot go on: NaN activations or weights, a module no option can represent."""


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


def linears(block: Block, spec: ModuleSpec) -> dict[str, nn.Module]:
    parent = block.self_attn if spec.kind == "self_attn" else block.mlp
    return {p: getattr(parent, p) for p in spec.projections}


def run_module(block: Block, spec: ModuleSpec, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """The module's output including its residual add; x [1, L, C] -> [1, L, C]."""
    if spec.kind == "self_attn":
        return x + block.self_attn(block.input_layernorm(x), cos, sin)
    return x + block.mlp(block.post_attention_layernorm(x))


class _Recorder(nn.Module):
    """Wraps a linear layer and adds every input it sees to a Hessian (one add per calibration row).

    With ``pending`` set (a :class:`gptq.CrossHessian`), the next input is paired with it: the input the same
    layer saw on the same row in the full-precision model.
    """

    def __init__(self, inner: nn.Module, hessian: gptq.Hessian):
        super().__init__()
        self.inner, self.hessian = inner, hessian
        self.pending: torch.Tensor | None = None

    def forward(self, x):
        if self.pending is None:
            self.hessian.add(x)
        else:
            self.hessian.add_pair(x, self.pending)
            self.pending = None
        return self.inner(x)


class _Capture(nn.Module):
    """Wraps a linear layer and keeps the inputs it sees (float32, on their device)."""

    def __init__(self, inner: nn.Module, store: list[torch.Tensor]):
        super().__init__()
        self.inner, self.store = inner, store

    def forward(self, x):
        self.store.append(x.float())
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


def inputs_of(block: Block, spec: ModuleSpec, owners, x: torch.Tensor, cos, sin
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inputs projections ``owners`` read when the module runs once on one row ``x`` with its current
    weights, and the module's output."""
    parent = block.self_attn if spec.kind == "self_attn" else block.mlp
    store: dict[str, list[torch.Tensor]] = {o: [] for o in owners}
    with _wrapped(parent, {o: _Capture(getattr(parent, o), store[o]) for o in owners}), torch.no_grad():
        y = run_module(block, spec, x, cos, sin)
    return {o: store[o][0] for o in owners}, y


def collect(block: Block, spec: ModuleSpec, states: list[torch.Tensor], cos, sin, device,
            max_abs: list | None = None, owners: tuple[str, ...] | None = None,
            fp_input: Callable[[int, list[str]], dict[str, torch.Tensor]] | None = None, cross: dict | None = None
            ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run the module over all rows with its current weights: Hessians per projection and the outputs.

    Returns ``(H, outputs)`` with ``H[proj]`` averaged over rows (shared inputs share one matrix) and
    outputs on the CPU.  ``owners`` limits the Hessians to those shared inputs (default: every input of
    the module), and ``H`` to the projections that read them.  NaN in an output raises; ``max_abs``
    (if given) receives the largest |output|.  With ``fp_input`` (row index, owners -> the inputs those
    owners see on that row in the full-precision model; called with no recorder installed),
    ``cross[proj]`` receives :meth:`gptq.CrossHessian.cross` as well.
    """
    parent = block.self_attn if spec.kind == "self_attn" else block.mlp
    owners = sorted(set(spec.hessian_of.values()) if owners is None else owners)
    layers = linears(block, spec)
    kind = gptq.Hessian if fp_input is None else gptq.CrossHessian
    hess = {o: kind(layers[o].in_features, device=device) for o in owners}
    rec = {o: _Recorder(layers[o], hess[o]) for o in owners}
    outputs = []
    with torch.no_grad():
        for i, x in enumerate(states):
            if fp_input is not None:
                for o, x_fp in fp_input(i, owners).items():
                    rec[o].pending = x_fp
            with _wrapped(parent, rec):
                y = run_module(block, spec, x.to(device), cos, sin)
            if bool(torch.isnan(y).any()):
                raise MeasureError(f"{spec.kind}: NaN in the full-precision output")
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


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref||_F / ||ref||_F in fp32, with y clamped to the fp16 range first (EXL2-SPEC.md 3.4)."""
    y = y.float().clamp(-FP16_MAX, FP16_MAX)
    ref = ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-20))


# ------------------------------------------------------------------------------------------------
# Checkpoint files: one file per loop, replaced in one rename
# ------------------------------------------------------------------------------------------------

CHECKPOINT_KEY = "exl2.progress"       # safetensors metadata key holding the progress record (JSON)


def checkpoint_path(work: Path, name: str) -> Path:
    return Path(work) / f"{name}.checkpoint.safetensors"


def load_checkpoint(work: Path, name: str) -> tuple[dict, list[torch.Tensor]] | None:
    """The progress record and states of an interrupted layer loop, or None to start from scratch.

    Both live in one file (the record in its metadata), written by one rename, so a kill at any moment
    leaves either the previous checkpoint or the new one, never a record from one layer with the states of
    another.  Files of the earlier two-file layout (``*.progress.json`` beside ``*.states.safetensors``) could
    be such a mix, so they are not trusted: the loop starts over.
    """
    path = checkpoint_path(work, name)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt", device="cpu") as f:
        record = json.loads((f.metadata() or {})[CHECKPOINT_KEY])
        states = [f.get_tensor(k) for k in sorted(f.keys())]
    return record, states


def checkpoint_progress(work: Path, name: str) -> dict | None:
    """The progress record alone (read from the file's header), or None without a checkpoint."""
    path = checkpoint_path(work, name)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {})[CHECKPOINT_KEY])


def save_checkpoint(work: Path, name: str, progress: dict, states: list[torch.Tensor]) -> None:
    """States and progress record together, atomically."""
    save_safetensors(checkpoint_path(work, name), {f"row.{i:05d}": s for i, s in enumerate(states)},
                     metadata={CHECKPOINT_KEY: json.dumps(progress)})


def clear_checkpoint(work: Path, name: str) -> None:
    checkpoint_path(work, name).unlink(missing_ok=True)
    for suffix in (".progress.json", ".states.safetensors"):      # the earlier layout
        (Path(work) / f"{name}{suffix}").unlink(missing_ok=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_safetensors(path, tensors)
