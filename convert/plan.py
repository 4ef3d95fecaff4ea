"""The feasibility report of a conversion (``exl2-convert --plan``), from config.json and the safetensors headers
alone: which bits per weight are reachable, how much memory each stage needs, how much disk the job and the
output take, and how large the EXL2 model and its KV cache are.

Every number says how it was derived (``how``).  Sizes of tensors are exact arithmetic.  Peak memory is a
model of what each stage keeps alive at its largest moment, built from those sizes and from coefficients
measured once on this code (the ``MEASURED_*`` constants below, each with the measurement that gave it);
tests/convert/test_plan.py checks the predictions against the peaks a conversion measures.

The memory model (CPU device, fp32 compute; all rows' states live in system memory as fp32):

measurement, per module (a layer's attention, then its MLP), at the module's largest phase:
    base  +  layer weights (fp32)  +  2 x states (the rows, and the module's reference outputs)
          +  max( Hessians + per-row activations                              (collect)
                  Hessians + hinv so far + MEASURED_PREPARE x K_max^2 x 4     (gptq.prepare of the largest)
                  hinv + variants kept in memory + gptq_bytes(N, K)           (GPTQ of the largest matrix)
                  variants kept in memory + per-row activations               (the combinations)
                  + the last projection's kept inputs, within layers.stream.REPLAY_BUDGET )
quantization, the same without variants, with 2 copies of the states (3 with asymmetric calibration) and the
    cross-Hessians of asymmetric calibration, and then every row's input of the module's last projection where
    that fits layers.stream.REPLAY_BUDGET; then the head (its Hessian and GPTQ working set).
validation: the streamed FP16 reference (one layer and its head at a time) beside the EXL2 model resident at
    its stored size, and one row's logits.

On CUDA the layer, Hessians and GPTQ run on the GPU (predicted as VRAM, not yet measured on a GPU) and the
states stay in system memory.
"""
from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from exl2.layers.stream import FINISH_FROM, MODULES, module_specs, replay_bytes
from exl2.measure.measure import MEASURE_STRIDE, VARIANT_BUDGET, effective_stride, sample_positions
from exl2.quant_kernels.codec import padded_columns
from exl2.quant_kernels.qparams import HEAD_OPTIONS, distinct_options
from exl2.runtime.arch import TENSOR_NAMES
from exl2.runtime.config import ModelConfig
from exl2.runtime.cache import MODES as CACHE_MODES
from exl2.runtime.cache import bytes_per_token
from exl2.runtime.evaluate import SCORE_CHUNK
from exl2.runtime.tensors import TensorSource

from .accounting import decoder_numel, experts, projection_shapes

GiB = 1 << 30

# Anonymous memory of a converter process besides the model work: Python, torch, the native kernels, the
# tokenizer and calibration text (0.15 GB after the imports alone; 0.22 GB as the difference between the
# measured stage peaks and the rest of this model in a SmolLM2-135M conversion at the demo preset, measure and
# quantize stages alike, 2026-12-05).
MEASURED_BASE = 225 << 20
# gptq.prepare: peak anonymous memory above its input H, in units of one K x K fp32 matrix (sampled every
# 5 ms around prepare(H) at K = 4096 and 8192: 2.65 and 2.78; the LAPACK calls keep workspaces besides the
# two matrices the code holds).
MEASURED_PREPARE = 2.8
# gptq.quantize of an N x K matrix: peak above its inputs in units of N x K x 4 bytes (the permuted W, Q,
# uint8 codes and the [K - b, N] product of the error update; python bench/plan_coefficients.py, sampled
# every 5 ms: 3.12 at 4096 x 4096, 2.96 at 2048 x 8192, 2.85 at 16384 x 2048; 2026-12-05).
MEASURED_GPTQ = 3.2
# ... plus, per element of the group being quantized (rows x N), its int64 codes, errors and the rounding's
# temporaries: bytes per element fitted to the same runs at small K, where a group is a large share of the
# matrix (6.22 units at 65536 x 256, 4.46 at 16384 x 1024, with 128-row groups).
GPTQ_GROUP_BYTES = 32
GROUP_ROWS = 128  # the largest group in the option tables and head options


def gptq_bytes(n: int, k: int) -> int:
    """Predicted peak of gptq.quantize above its inputs for an N x K weight."""
    return int(MEASURED_GPTQ * 4 * n * k + GPTQ_GROUP_BYTES * min(k, GROUP_ROWS) * n)
# Per-row activations of a module's forward, in fp32 values per token (counted from runtime/model.py:
# attention keeps q, k, v, the GQA-expanded k and v and its output; the MLP keeps gate, up and their product).
ATTN_ACT_PER_TOKEN = lambda cfg: 2 * cfg.num_heads * cfg.head_dim + 4 * cfg.kv_dim + 2 * cfg.hidden_size  # noqa: E731
MLP_ACT_PER_TOKEN = lambda cfg: 4 * cfg.intermediate_size + 2 * cfg.hidden_size  # noqa: E731


@dataclass
class Estimate:
    bytes: int
    how: str

    def to_dict(self) -> dict:
        return {"bytes": int(self.bytes), "how": self.how}


@dataclass
class Plan:
    model: str
    bpw_range: tuple[float, float]
    head: dict
    targets: dict[float, dict] = field(default_factory=dict)      # bpw -> {"bits", "model_bytes"}
    ram: dict[str, Estimate] = field(default_factory=dict)         # stage -> peak system memory
    vram: dict[str, Estimate] = field(default_factory=dict)        # stage -> peak GPU memory (cuda only)
    disk: dict[str, Estimate] = field(default_factory=dict)
    kv_per_1k: dict[str, int] = field(default_factory=dict)        # cache mode -> bytes per 1,000 tokens
    limits: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "bpw_range": list(self.bpw_range), "head": self.head,
                "targets": {f"{b:g}": t for b, t in self.targets.items()},
                "ram": {k: v.to_dict() for k, v in self.ram.items()},
                "vram": {k: v.to_dict() for k, v in self.vram.items()},
                "disk": {k: v.to_dict() for k, v in self.disk.items()},
                "kv_cache_per_1k_tokens": self.kv_per_1k, "limits": self.limits, "problems": self.problems}


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 4 else f"{n / 2**20:.1f} MiB"


def _module_bits(spec, shapes) -> list[int]:
    return [sum(qp.total_bits(shapes[p][0], padded_columns(shapes[p][1]), shapes[p][2])
                for p, qp in zip(spec.projections, combo)) for combo in spec.options]


def bpw_range(cfg: ModelConfig, tables: str = "exl2") -> tuple[float, float, int]:
    """(lowest, highest bpw any allocation of the tables can reach, decoder numel)."""
    shapes, numel = projection_shapes(cfg), decoder_numel(cfg)
    lo = hi = 0
    for spec in module_specs(tables):
        bits = _module_bits(spec, shapes)
        copies = experts(cfg, spec.projections[0])       # a sparse MLP: every expert
        lo += min(bits) * cfg.num_layers * copies
        hi += max(bits) * cfg.num_layers * copies
    return lo / numel, hi / numel, numel


def _stored_bytes(src: TensorSource) -> int:
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I16": 2, "I64": 8, "U8": 1, "I8": 1}
    total = 0
    for k in src.keys():
        shape, dt = src.header(k)
        total += math.prod(shape) * size.get(dt, 4)
    return total


def _embedding_stored_bytes(cfg: ModelConfig, src: TensorSource | None) -> int:
    """Bytes of the embedding table as the checkpoint stores it (2 per element when only the config is known)."""
    if src is not None:
        with contextlib.suppress(KeyError, OSError):      # no such tensor: the loader reports it later
            dtype = src.header(TENSOR_NAMES["embed"])[1]
            return cfg.vocab_size * cfg.hidden_size * {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 2)
    return 2 * cfg.vocab_size * cfg.hidden_size


def _layer_weight_bytes(cfg: ModelConfig) -> int:
    return 4 * sum((k * n + (n if b else 0)) * experts(cfg, p) for p, (k, n, b) in projection_shapes(cfg).items()) \
        + 2 * 4 * cfg.hidden_size


def _kept_bytes(cfg: ModelConfig, spec, rows: int, tokens: int) -> int:
    """Every row's input of the module's last projection, where the passes keep it (layers.stream.replay_bytes)."""
    last = FINISH_FROM.get(spec.kind)
    if last is None or experts(cfg, spec.projections[0]) != 1:
        return 0
    return replay_bytes(rows, tokens, projection_shapes(cfg)[last][0])


def _module_peaks(cfg: ModelConfig, length: int, *, variants: bool, tables: str, asym: bool,
                  kept_rows: tuple[int, int] = (0, 0)) -> tuple[int, str]:
    """The largest module's peak above base + layer weights + states, and which module and phase it is.
    ``kept_rows``: (rows, tokens per row) of the last projection's inputs the combinations keep."""
    shapes = projection_shapes(cfg)
    best, what = 0, ""
    for spec in (module_specs(tables) if variants else MODULES):
        owners = sorted(set(spec.hessian_of.values()))
        ks = {o: shapes[o][0] for o in owners}
        copies = experts(cfg, spec.projections[0])      # a sparse MLP: every expert's Hessians and variants
        hess = sum(4 * k * k for k in ks.values()) * (2 if asym else 1) * copies   # asymmetric: M beside each H
        kmax = max(ks.values())
        act = length * (ATTN_ACT_PER_TOKEN(cfg) if spec.kind == "self_attn" else MLP_ACT_PER_TOKEN(cfg)) * 4
        gq = max(gptq_bytes(shapes[p][1], shapes[p][0]) for p in spec.projections)
        var = 0
        if variants:
            total = sum(len(opts) * 2 * shapes[p][0] * shapes[p][1]
                        for p, opts in zip(spec.projections, distinct_options(spec.options))) * copies
            var = total if total <= VARIANT_BUDGET else 0      # over the budget every variant is spilled to disk
        hinv = sum(4 * k * k for k in ks.values())
        phases = {"collect": hess + act, "prepare": hess + MEASURED_PREPARE * 4 * kmax * kmax,
                  "GPTQ": hinv + var + gq + (hess if copies > 1 else 0),
                  "combinations": var + act + _kept_bytes(cfg, spec, *kept_rows)}
        phase = max(phases, key=phases.get)
        if phases[phase] > best:
            best, what = int(phases[phase]), f"{spec.kind} {phase}"
    return best, what


def make_plan(model_dir: str | Path, *, bits: list[float], head_bits: int, rows: int, length: int,
              measurement_rows: int, measurement_length: int, tables: str = "exl2", asym: float = 0.0,
              measure_stride: int = MEASURE_STRIDE,
              device: str = "cpu", measure: bool = True, validation_rows: int = 4, validation_length: int = 512,
              work_dir: str | Path | None = None, out_dir: str | Path | None = None,
              cfg: ModelConfig | None = None) -> Plan:
    """The plan for converting ``model_dir`` with these options (read: config.json and tensor headers).

    With ``cfg`` (a model known only by its config, e.g. to project a checkpoint larger than any at hand) nothing
    is read and the source is counted as fp16."""
    model_dir = Path(model_dir)
    src = None
    if cfg is None:
        cfg = ModelConfig.from_file(model_dir / "config.json")
        src = TensorSource(model_dir, strip=cfg.arch.weight_prefix)
    C, V = cfg.hidden_size, cfg.vocab_size
    lo, hi, numel = bpw_range(cfg, tables)
    head_qp = HEAD_OPTIONS[head_bits]
    head_bits_total = head_qp.total_bits(C, padded_columns(V))
    p = Plan(model=str(model_dir), bpw_range=(lo, hi),
             head={"bits": head_bits, "option": head_qp.desc(), "bytes": head_bits_total // 8})
    fp16_rest = 2 * (V * C + (2 * cfg.num_layers + 1) * C)      # embedding and norms, stored fp16
    for b in bits:
        model_bytes = int(b * numel / 8) + head_bits_total // 8 + fp16_rest
        p.targets[b] = {"model_bytes": model_bytes,
                        "how": f"{b:g} bpw x {numel:,} decoder weights / 8 + head {head_bits_total // 8:,} B "
                               f"+ fp16 embedding and norms {fp16_rest:,} B"}
        if not lo - 1e-9 <= b <= hi + 1e-9:
            p.problems.append(f"--bits {b:g}: outside what the option tables reach for this model "
                              f"({lo:.3f} to {hi:.3f} bpw)")
    for m in CACHE_MODES:
        p.kv_per_1k[m] = bytes_per_token(cfg, m) * 1000

    # -- memory ---------------------------------------------------------------------------------------------
    cuda = device == "cuda"
    layer_w = _layer_weight_bytes(cfg)
    base = MEASURED_BASE
    if measure:
        st = 4 * measurement_rows * measurement_length * C
        stride = effective_stride(measurement_rows, measurement_length, measure_stride)
        sampled = measurement_length if stride == 1 else sample_positions(measurement_length, stride).numel()
        extra, what = _module_peaks(cfg, measurement_length, variants=True, tables=tables, asym=False,
                                    kept_rows=(measurement_rows, sampled))
        on_host = base + 2 * st + (0 if cuda else layer_w + extra)
        how = (f"base {_gib(base)} + states and reference outputs 2 x {_gib(st)}"
               + ("" if cuda else f" + layer weights {_gib(layer_w)} + {what} {_gib(extra)}"))
        # the first step embeds the rows: the table read as stored, its fp32 copy, and the states being made
        embed = base + st + 4 * V * C + _embedding_stored_bytes(cfg, src)
        if embed > on_host:
            on_host, how = embed, (f"base {_gib(base)} + embedding the rows: the table as stored and in fp32 "
                                   f"{_gib(embed - base - st)} + states {_gib(st)}")
        p.ram["measure"] = Estimate(on_host, how)
        if cuda:
            p.vram["measure"] = Estimate(layer_w // 2 + extra, f"layer weights fp16 + {what} (not measured on a GPU)")
    st_q = 4 * rows * length * C
    copies = 3 if asym else 2
    extra, what = _module_peaks(cfg, length, variants=False, tables=tables, asym=bool(asym))
    # asymmetric calibration collects sequentially and keeps each row's input of the module's last projection
    # where it fits the budget (convert/quantize.py): alive from the last collect to the end of the module
    kept = max(_kept_bytes(cfg, s, rows, length) for s in MODULES) if asym else 0
    if kept:
        extra, what = extra + kept, f"{what} + kept last-projection inputs {_gib(kept)}"
    head_h = 4 * C * C * (2 if asym else 1)
    head_w = 4 * V * C
    head_peak = head_h + MEASURED_PREPARE * 4 * C * C + gptq_bytes(V, C)
    extra_q = max(extra + layer_w, head_peak + head_w)
    p.ram["quantize"] = Estimate(int(base + copies * st_q + (0 if cuda else extra_q)),
                                 f"base + {copies} x states {_gib(st_q)}"
                                 + ("" if cuda else f" + the larger of layer weights with {what} and the head's "
                                    f"GPTQ {_gib(extra_q)}"))
    if cuda:
        p.vram["quantize"] = Estimate(int(extra_q / 2), f"layer weights fp16 + {what} (not measured on a GPU)")
    # validation: streamed reference (one fp32 layer + its head), EXL2 model resident at stored size,
    # per-row states and logits
    exl2_bytes = max(t["model_bytes"] for t in p.targets.values()) if p.targets else 0
    st_v = 4 * validation_rows * validation_length * C
    # one row's scoring: the reference's log-probs and the model's logits for the row, and a few fp32 pieces of
    # SCORE_CHUNK tokens (runtime/evaluate.py)
    logits = 4 * V * (2 * validation_length + 4 * min(validation_length, SCORE_CHUNK))
    ref_layer = layer_w + 4 * V * C
    if validation_rows > 0:
        p.ram["validate"] = Estimate(int(base + exl2_bytes + ref_layer + 2 * st_v + logits),
                                     f"base + EXL2 model resident at its stored size {_gib(exl2_bytes)} + streamed "
                                     f"FP16 reference (one fp32 layer and the head, {_gib(ref_layer)}) + states + "
                                     f"one row's logits")

    # -- disk -----------------------------------------------------------------------------------------------
    spill = 0
    for spec in module_specs(tables):
        shapes = projection_shapes(cfg)
        total = sum(len(opts) * 2 * shapes[p_][0] * shapes[p_][1]
                    for p_, opts in zip(spec.projections, distinct_options(spec.options))) \
            * experts(cfg, spec.projections[0])
        if total > VARIANT_BUDGET:
            spill = max(spill, total)
    out_total = sum(t["model_bytes"] for t in p.targets.values())
    job = ((4 * measurement_rows * measurement_length * C + spill) if measure else 0) + copies * st_q + 2 * out_total
    p.disk["job"] = Estimate(job, "measurement checkpoint + spilled variants of the largest module + quantization "
                                  "checkpoint + per target: packed layers and (without -cf) the compiled model")
    p.disk["output"] = Estimate(out_total, "the EXL2 model of each target")
    if src is not None:
        p.disk["source"] = Estimate(_stored_bytes(src), "the checkpoint's tensors, read once per pass")
    else:
        n = 2 * (V * C * (1 if cfg.tie_word_embeddings else 2) + cfg.num_layers * _layer_weight_bytes(cfg) // 4)
        p.disk["source"] = Estimate(n, "the checkpoint's parameters at 2 bytes each (no files read)")

    # -- limits of this machine -------------------------------------------------------------------------------
    from exl2.runtime.memory import available_memory

    avail = available_memory()
    p.limits["memory_available"] = avail
    if avail is not None and not cuda:
        for stage, est in p.ram.items():
            if est.bytes > avail:
                p.problems.append(f"{stage}: needs about {_gib(est.bytes)} of memory, {_gib(avail)} is available "
                                  f"({est.how})")
    for key, folder in (("job", work_dir), ("output", out_dir)):
        if folder is None:
            continue
        f = Path(folder)
        while not f.exists() and f != f.parent:
            f = f.parent
        free = shutil.disk_usage(f).free
        p.limits[f"disk_free_{key}"] = free
        if p.disk[key].bytes > free:
            p.problems.append(f"{key} folder {folder}: needs about {_gib(p.disk[key].bytes)} of disk, "
                              f"{_gib(free)} is free")
    return p


def format_plan(p: Plan) -> str:
    lines = [f"plan for {p.model}",
             f"  reachable: {p.bpw_range[0]:.3f} to {p.bpw_range[1]:.3f} bpw (decoder); head {p.head['bits']} bits "
             f"({p.head['option']}, {p.head['bytes'] / 2**20:.1f} MiB)"]
    for b, t in p.targets.items():
        lines.append(f"  {b:g} bpw: EXL2 model {_gib(t['model_bytes'])}")
    kv = ", ".join(f"{m} {v / 2**20:.1f} MiB" for m, v in p.kv_per_1k.items())
    lines.append(f"  KV cache per 1,000 tokens: {kv}")
    for stage, e in p.ram.items():
        lines.append(f"  memory, {stage}: {_gib(e.bytes)}  ({e.how})")
    for stage, e in p.vram.items():
        lines.append(f"  GPU memory, {stage}: {_gib(e.bytes)}  ({e.how})")
    for k in ("job", "output"):
        lines.append(f"  disk, {k}: {_gib(p.disk[k].bytes)}  ({p.disk[k].how})")
    if p.limits.get("memory_available") is not None:
        lines.append(f"  this machine: {_gib(p.limits['memory_available'])} memory available")
    for problem in p.problems:
        lines.append(f"  DOES NOT FIT: {problem}")
    return "\n".join(lines)
