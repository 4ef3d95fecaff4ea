"""Full-mode forward passes of models larger than memory: one decoder layer resident at a time.

:func:`stream_forward` runs token rows through a checkpoint the way the measurement pass does: the rows'
embeddings first, then for each decoder layer ``ModelParts.block(i)`` is built, every row goes through it
(one row at a time on the device; the row states wait on the CPU in the compute dtype), and the layer is
dropped before the next one is built. After the last layer the final norm is applied and the model's head is
kept, so :class:`StreamedModel` can give each row's logits on demand.

Per row these are the resident :class:`~exl2.runtime.model.Model`'s own operations in its own order (embedding,
each block with the same rotary tables, final norm, head over all L positions, ``.float()``), with the same
shapes. Moving a state to the CPU and back in its own dtype is exact, so the logits are the resident model's
bit for bit wherever the kernels are deterministic for a given shape (the CPU; tests check it there).

The memory held: one decoder layer, the rows' states (rows x length x hidden in the compute dtype), and,
after the pass, the head ``[V, C]`` (a tied head is the embedding table, read again).

:func:`resident_bytes` estimates what a model takes when loaded whole, :func:`available_bytes` what the
device has free, and :func:`plan` decides which of a model under test and its reference are streamed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .arch import TENSOR_NAMES
from .config import ModelConfig
from .loader import ModelParts, is_exl2
from .model import Rotary, embed_tokens, final_softcap

STREAM_CHOICES = ("auto", "always", "never")
FIT_FRACTION = 0.9          # a model is loaded whole only when it needs at most this share of the free memory
HEADROOM = 256 << 20        # bytes kept free beyond the estimate (allocator slack, the runtime itself)

# safetensors dtype name -> bytes per element
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Layer progress: called after each decoder layer with (layers done, layers).
LayerProgress = Callable[[int, int], None]


class StreamedModel:
    """Rows that went through a model layer by layer: their final-norm states and the model's head.

    Stands in for a resident model in full-mode scoring (``evaluate.evaluate_rows``) of exactly these rows:
    ``logits(r)`` is what ``model(rows[r:r + 1])[0]`` gives. It can be scored any number of times."""

    def __init__(self, cfg: ModelConfig, rows: torch.Tensor, states: list[torch.Tensor], head: torch.nn.Module,
                 dtype: torch.dtype, device):
        self.cfg, self.rows, self.states, self.head = cfg, rows, states, head
        self.dtype, self.device = dtype, torch.device(device)

    def logits(self, r: int) -> torch.Tensor:
        """Row r's logits [L, V], float32, on the device."""
        x = self.states[r].to(self.device)                                   # [1, L, C]
        return final_softcap(self.cfg, self.head(x).float())[0]              # [L, V]

    def check_rows(self, rows: torch.Tensor, what: str) -> None:
        if tuple(rows.shape) != tuple(self.rows.shape) or not torch.equal(rows.long(), self.rows):
            raise ValueError(f"{what}: streamed over rows {tuple(self.rows.shape)} that are not the rows "
                             f"{tuple(rows.shape)} being scored")


def _checked(rows: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rows must be an integer tensor [R, L], got "
                         f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    if rows.numel() == 0:
        raise ValueError(f"rows {tuple(rows.shape)}: no tokens")
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"rows: token id {lo if lo < 0 else hi} outside the model's vocabulary [0, {cfg.vocab_size})")
    return rows.long()


def _release(parts: ModelParts) -> None:
    """Unmap the checkpoint files once a layer's tensors are read. The tensors stay valid; what goes are the
    file pages the reads mapped into this process, which would otherwise add up to the whole checkpoint in
    its resident size (reclaimable, but counted in RSS). TensorSource opens a file again when next asked."""
    parts.src.release()


@torch.inference_mode()
def stream_forward(parts: ModelParts, row_sets: Sequence[torch.Tensor], *,
                   progress: LayerProgress | None = None) -> list[StreamedModel]:
    """Run each set of rows ([R_i, L_i] token ids; the lengths may differ between sets) through the model with
    one decoder layer resident at a time; one :class:`StreamedModel` per set, sharing one head."""
    sets = [_checked(rows, parts.cfg) for rows in row_sets]
    device, dtype = torch.device(parts.device), parts.dtype
    cpu = torch.device("cpu")
    emb = parts.embedding()                                                  # [V, C]
    _release(parts)
    states = [[embed_tokens(parts.cfg, rows[r:r + 1].to(device), emb, emb.dtype).to(cpu)
               for r in range(rows.shape[0])] for rows in sets]              # [1, L_i, C] each
    del emb
    rotary = Rotary(parts.cfg).to(device)
    tables = {L: rotary.cos_sin(0, L) for L in {rows.shape[1] for rows in sets}}
    n = parts.cfg.num_layers
    for i in range(n):
        block = parts.block(i)
        _release(parts)
        for rows, st in zip(sets, states):
            cos, sin = tables[rows.shape[1]]
            for r, x in enumerate(st):
                st[r] = block(x.to(device), cos, sin).to(cpu)
        del block
        if progress is not None:
            progress(i + 1, n)
    norm = parts.norm("norm")
    for st in states:
        for r, x in enumerate(st):
            st[r] = norm(x.to(device)).to(cpu)
    head = parts.head()
    _release(parts)
    return [StreamedModel(parts.cfg, rows, st, head, dtype, device) for rows, st in zip(sets, states)]


# ---------------------------------------------------------------------------------------------- sizing


def _stored_bytes(parts: ModelParts, key: str) -> int:
    shape, dt = parts.src.header(key)
    n = 1
    for s in shape:
        n *= s
    return n * _DTYPE_BYTES.get(dt, 4)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors a module holds (parameters, buffers and plain tensor attributes; a storage
    shared by several counts once)."""
    seen: dict[int, int] = {}
    for m in module.modules():
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def _exl2_rule(parts: ModelParts, prefixes: list[str], shapes: dict) -> Callable[[str], int]:
    """How many bytes an EXL2 layer takes once loaded: the smallest one is built and measured, and the loaded
    form it shows (a weight rebuilt in the compute dtype, or the packed tensors kept, scaled by what the probe
    keeps of them) is applied to all."""
    isz = torch.empty((), dtype=parts.dtype).element_size()
    by_prefix: dict[str, int] = {}
    for key in parts.src.keys():
        prefix, _, suffix = key.rpartition(".")
        if suffix.startswith("q_") or suffix == "bias":
            by_prefix[prefix] = by_prefix.get(prefix, 0) + _stored_bytes(parts, key)

    def dense(p):
        k, n, bias = shapes[p]
        return (n * k + (n if bias else 0)) * isz

    probe = min(prefixes, key=lambda p: shapes[p][0] * shapes[p][1])
    k, n, bias = shapes[probe]
    layer = parts.linear_factory(probe, parts.src, in_features=k, out_features=n, bias=bias, dtype=parts.dtype,
                                 device=parts.device)
    got = module_bytes(layer)
    del layer
    if abs(got - dense(probe)) <= abs(got - by_prefix[probe]):
        return dense
    ratio = got / max(1, by_prefix[probe])
    return lambda p: int(by_prefix[p] * ratio)


def resident_bytes(parts: ModelParts) -> int:
    """Estimated bytes of the model loaded whole (``load_model``) at the parts' dtype, from the safetensors
    headers; EXL2 layers as :func:`_exl2_rule` finds them loaded."""
    cfg = parts.cfg
    isz = torch.empty((), dtype=parts.dtype).element_size()
    emb = torch.empty((), dtype=parts.embedding_storage_dtype()).element_size()
    total = cfg.vocab_size * cfg.hidden_size * emb + (2 * cfg.num_layers + 1) * cfg.hidden_size * isz
    shapes = parts.linear_shapes()
    quantized = [p for p in shapes if is_exl2(p, parts.src)]
    rule = _exl2_rule(parts, quantized, shapes) if quantized else None
    for p, (k, n, bias) in shapes.items():
        total += rule(p) if p in quantized else (n * k + (n if bias else 0)) * isz
    return total


def head_bytes(parts: ModelParts) -> int:
    """Bytes of the head a streamed model keeps (a tied head: the embedding table)."""
    cfg = parts.cfg
    isz = torch.empty((), dtype=parts.dtype).element_size()
    prefix = TENSOR_NAMES["head"]
    if is_exl2(prefix, parts.src):
        shapes = parts.linear_shapes()
        return _exl2_rule(parts, [prefix], shapes)(prefix)
    return cfg.vocab_size * cfg.hidden_size * isz


def work_bytes(cfg: ModelConfig, length: int) -> int:
    """Scoring's working set for one row: a handful of fp32 [L, V] tensors (logits, log-probs of the model
    and of the reference, their products)."""
    return 6 * length * cfg.vocab_size * 4 + HEADROOM


def available_bytes(device="cpu") -> int:
    """Free memory where the model's weights would live: the CUDA device's free memory, or on the CPU what
    ``memory.available_memory`` finds (MemAvailable, capped by a cgroup limit); unknown counts as unlimited."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    from .memory import available_memory

    avail = available_memory()
    return 1 << 62 if avail is None else int(avail)


def fmt_bytes(n: int) -> str:
    """A size for messages: GiB, or MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def peak_memory(device="cpu") -> dict:
    """``peak_rss_bytes`` of this process (ru_maxrss) and, on CUDA, ``peak_cuda_bytes`` (the allocator's
    peak)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    return out


@dataclass
class StreamPlan:
    """Which models a run streams, and the numbers the choice was made from (bytes)."""

    model: bool                   # the model under test's full-mode passes are streamed
    ref: bool                     # the reference is streamed (False without one)
    model_bytes: int
    ref_bytes: int | None
    available: int
    mode: str                     # the --stream setting it came from
    model_fits: bool              # whether the model under test fits resident (cache mode, HumanEval need it)

    def describe(self) -> str:
        parts = [f"model {'streamed' if self.model else 'loaded whole'} ({fmt_bytes(self.model_bytes)} whole)"]
        if self.ref_bytes is not None:
            parts.append(f"reference {'streamed' if self.ref else 'loaded whole'} "
                         f"({fmt_bytes(self.ref_bytes)} whole)")
        return f"--stream {self.mode}: " + ", ".join(parts) + f"; {fmt_bytes(self.available)} free"


def fits(parts: ModelParts, length: int, *, beside: int = 0, available: int | None = None,
         need: int | None = None) -> tuple[bool, int, int]:
    """Whether ``parts`` fits loaded whole next to ``beside`` bytes already held, with scoring's working set
    for rows of ``length`` tokens: (fits, its resident bytes, the free bytes it was compared with).
    ``need``: its resident bytes when already known."""
    avail = available_bytes(parts.device) if available is None else available
    need = resident_bytes(parts) if need is None else need
    return need + beside + work_bytes(parts.cfg, length) <= FIT_FRACTION * avail, need, avail


def plan(model: ModelParts, ref: ModelParts | None, length: int, mode: str = "auto", *,
         available: int | None = None) -> StreamPlan:
    """Decide what is streamed. ``always``/``never`` force both ways; ``auto`` loads both whole when both fit
    together, else streams the reference and then the model too if it does not fit beside the reference's
    head. "Fits": estimate + scoring's working set <= FIT_FRACTION x free memory."""
    if mode not in STREAM_CHOICES:
        raise ValueError(f"stream mode {mode!r}: use one of {', '.join(STREAM_CHOICES)}")
    avail = available_bytes(model.device) if available is None else available
    model_fits, m_bytes, _ = fits(model, length, available=avail)
    r_bytes = resident_bytes(ref) if ref is not None else None
    if mode != "auto":
        s = mode == "always"
        return StreamPlan(s, s and ref is not None, m_bytes, r_bytes, avail, mode, model_fits)
    if ref is None:
        return StreamPlan(not model_fits, False, m_bytes, None, avail, mode, model_fits)
    if fits(model, length, beside=r_bytes, available=avail, need=m_bytes)[0]:
        return StreamPlan(False, False, m_bytes, r_bytes, avail, mode, True)
    beside_head = fits(model, length, beside=head_bytes(ref), available=avail, need=m_bytes)[0]
    return StreamPlan(not beside_head, True, m_bytes, r_bytes, avail, mode, model_fits)
