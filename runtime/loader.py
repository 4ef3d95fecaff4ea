"""Checkpoint loading: config.json + safetensors (single file, sharded with an index, or any *.safetensors
as in EXL2 output dirs). Tensors are read lazily, one at a time, through safetensors.safe_open.

Every linear layer is built by `make_linear(prefix, source, ...)`: FP layers become linear.Linear; a layer
whose `<prefix>.q_weight` exists is routed to linear.load_exl2_linear (the EXL2 swap point).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from exl2.quant_kernels.codec import padded_columns

from . import linear as _linear

from .arch import MOE_NAMES, TENSOR_NAMES, tensor_name
from .config import ModelConfig
from .tensors import CheckpointError, FLOAT_DTYPES, TensorSource, check_finite
from .model import MLP, Attention, Block, Model, RMSNorm, Rotary, SparseMLP

def is_exl2(prefix: str, source: TensorSource) -> bool:
    return f"{prefix}.q_weight" in source


def make_linear(prefix: str, source: TensorSource, *, in_features: int, out_features: int, bias: bool,
                dtype: torch.dtype, device, exl2_mode: str = "packed") -> torch.nn.Module:
    """Build one linear layer: EXL2 when `<prefix>.q_weight` exists, FP (`<prefix>.weight`) otherwise.

    bias: whether the architecture expects one; presence must match exactly (as ExLlamaV2's loader)."""
    has_bias = f"{prefix}.bias" in source
    if has_bias != bias:
        where = source.file_of(f"{prefix}.bias") if has_bias else source.dir
        raise CheckpointError(f"{where}: tensor {prefix}.bias is {'present but not' if has_bias else 'missing but'} "
                              f"expected by the architecture")
    if is_exl2(prefix, source):
        tensors = {s: source.get(f"{prefix}.{s}") for s in _linear.EXL2_REQUIRED}
        tensors.update({s: source.get(f"{prefix}.{s}") for s in _linear.EXL2_OPTIONAL if f"{prefix}.{s}" in source})
        for s, t in tensors.items():
            check_finite(t, f"{prefix}.{s}", source.file_of(f"{prefix}.{s}"))
        # looked up through the module so that a later assignment to linear.load_exl2_linear is honoured
        try:
            return _linear.load_exl2_linear(prefix, tensors, in_features=in_features, out_features=out_features,
                                            dtype=dtype, device=device, mode=exl2_mode)
        except ValueError as e:
            raise CheckpointError(f"{source.file_of(prefix + '.q_weight')}: {e}") from None
    w = source.get_float(f"{prefix}.weight", (out_features, in_features), dtype, device)  # [N, K]
    b = source.get_float(f"{prefix}.bias", (out_features,), dtype, device) if bias else None
    return _linear.Linear(w, b)


LinearFactory = Callable[..., torch.nn.Module]


def load_config(model_dir: str | Path) -> ModelConfig:
    return ModelConfig.from_file(Path(model_dir) / "config.json")


class ModelParts:
    """Builds a model's pieces one at a time from a checkpoint, for streaming work (calibration, conversion).

    `load_model` assembles all of them; the converter keeps only one decoder layer resident.
    """

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype | None = None, device="cpu",
                 linear_factory: LinearFactory | None = None, exl2: str = "packed"):
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype} not supported; use float32 (CPU) or float16 (CUDA)")
        self.dir = Path(model_dir)
        self.cfg = load_config(model_dir)
        self.src = TensorSource(model_dir, strip=self.cfg.arch.weight_prefix)
        self.split_fused()
        if exl2 not in _linear.EXL2_MODES:
            raise ValueError(f"exl2 mode {exl2!r}: use one of {', '.join(_linear.EXL2_MODES)}")
        if linear_factory is None:
            linear_factory = functools.partial(make_linear, exl2_mode=exl2)
        self.dtype, self.device, self.linear_factory, self.exl2 = dtype, device, linear_factory, exl2
        self.check_shapes()

    # -- checks before any work ---------------------------------------------------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """(in features, out features, has bias) of every linear layer's prefix, the head included."""
        cfg = self.cfg
        C, D, H, Hkv, I = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        per_layer = {"q": (C, H * D, cfg.qkv_bias), "k": (C, Hkv * D, cfg.qkv_bias), "v": (C, Hkv * D, cfg.qkv_bias),
                     "o": (H * D, C, cfg.o_bias), "gate": (C, I, cfg.mlp_bias), "up": (C, I, cfg.mlp_bias),
                     "down": (I, C, cfg.mlp_bias)}
        if cfg.arch.moe:   # the router and every expert's gate/up/down in place of the dense MLP's
            for k in ("gate", "up", "down"):
                del per_layer[k]
        out = {TENSOR_NAMES[k].format(i=i): v for i in range(cfg.num_layers) for k, v in per_layer.items()}
        for i in range(cfg.num_layers if cfg.arch.moe else 0):
            out[self.router_prefix(i)] = (C, cfg.num_experts, False)
            for e in range(cfg.num_experts):
                names = self.expert_prefixes(i, e)
                out.update({names["gate"]: (C, I, False), names["up"]: (C, I, False), names["down"]: (I, C, False)})
        if self.has_head():
            out[TENSOR_NAMES["head"]] = (C, cfg.vocab_size, False)
        return out

    def dense_keys(self) -> dict[str, tuple[int, ...]]:
        """Every unquantized tensor the model reads, with its expected shape."""
        cfg = self.cfg
        C = cfg.hidden_size
        out = {TENSOR_NAMES["embed"]: (cfg.vocab_size, C), TENSOR_NAMES["norm"]: (C,)}
        for i in range(cfg.num_layers):
            out[TENSOR_NAMES["attn_norm"].format(i=i)] = (C,)
            out[TENSOR_NAMES["mlp_norm"].format(i=i)] = (C,)
            if cfg.arch.sandwich_norms:
                for key in ("mlp_pre_norm", "mlp_post_norm"):
                    out[tensor_name(cfg.arch, key).format(i=i)] = (C,)
            if cfg.arch.qk_norm:
                for key in ("q_norm", "k_norm"):
                    out[TENSOR_NAMES[key].format(i=i)] = (cfg.head_dim,)
        for prefix, (k, n, bias) in self.linear_shapes().items():
            if not is_exl2(prefix, self.src):
                out[f"{prefix}.weight"] = (n, k)
                if bias:
                    out[f"{prefix}.bias"] = (n,)
        return out

    def check_shapes(self) -> None:
        """Every tensor the model reads exists with the shape config.json implies, checked from the
        safetensors headers alone, so a config that disagrees with its weights fails here, in one line
        naming the tensor, before anything is allocated from its sizes."""
        src = self.src
        if not self.has_head() and not self.cfg.tie_word_embeddings:
            raise CheckpointError(f"{src.dir}: tensor {TENSOR_NAMES['head']}.weight not found and "
                                  f"tie_word_embeddings is false")
        per_head = self.per_head_norm_shapes()
        for key, shape in self.dense_keys().items():
            got, dtype = src.header(key)
            if dtype not in ("F16", "BF16", "F32"):
                raise CheckpointError(f"{src.file_of(key)}: tensor {key} has dtype {dtype}, expected F16, BF16 or F32")
            if got != shape and got != per_head.get(key):
                raise CheckpointError(f"{src.file_of(key)}: tensor {key} has shape {got}, expected {shape} "
                                      f"(from {self.dir / 'config.json'})")
        for prefix, (k, n, bias) in self.linear_shapes().items():
            if f"{prefix}.bias" in src and not bias:
                raise CheckpointError(f"{src.file_of(prefix + '.bias')}: tensor {prefix}.bias is present but not "
                                      f"expected by the architecture")
            if not is_exl2(prefix, src):
                continue
            inv = src.header(f"{prefix}.q_invperm")[0]
            qw = src.header(f"{prefix}.q_weight")[0]
            if inv != (k,) or len(qw) != 2 or qw[1] != padded_columns(n):
                raise CheckpointError(f"{src.file_of(prefix + '.q_weight')}: EXL2 layer {prefix} stores "
                                      f"q_invperm {inv} and q_weight {qw}, expected ({k},) and "
                                      f"[*, {padded_columns(n)}] "
                                      f"(from {self.dir / 'config.json'})")
            if bias and f"{prefix}.bias" not in src:
                raise CheckpointError(f"{src.dir}: tensor {prefix}.bias is missing but expected by the architecture")

    def per_head_norm_shapes(self) -> dict[str, tuple[int, int]]:
        """The other shape a q/k norm weight may have: one row per head ([heads, D]), as ExLlamaV2's converter
        writes it (it stores the weight as its loader holds it, repeated over the heads); ours and the
        source's are [D]."""
        cfg = self.cfg
        if not cfg.arch.qk_norm:
            return {}
        return {TENSOR_NAMES[key].format(i=i): (heads, cfg.head_dim) for i in range(cfg.num_layers)
                for key, heads in (("q_norm", cfg.num_heads), ("k_norm", cfg.num_kv_heads))}

    def split_fused(self) -> None:
        """Where the checkpoint stores a fused projection of the architecture (Arch.fused, e.g. Phi-3's
        qkv_proj), make each part's name a view of its rows: the parts' output features, stacked in the row's
        order (the rows ExLlamaV2 and transformers read for each).  A checkpoint that stores the parts
        themselves (an EXL2 output) is read as it is."""
        cfg, src = self.cfg, self.src
        shapes = self.linear_shapes() if cfg.arch.fused else {}
        for i in range(cfg.num_layers):
            for fused, part_keys in cfg.arch.fused:
                prefix = TENSOR_NAMES[fused].format(i=i)
                parts = [TENSOR_NAMES[p].format(i=i) for p in part_keys]
                rows = [shapes[p][1] for p in parts]
                for suffix in ("weight", "bias"):
                    key = f"{prefix}.{suffix}"
                    if key not in src:
                        continue
                    both = [f"{p}.{suffix}" for p in parts if f"{p}.{suffix}" in src]
                    if both:
                        raise CheckpointError(f"{src.file_of(key)}: tensor {key} and {both[0]} are both stored; "
                                              f"expected one of the two forms")
                    want = (sum(rows), shapes[parts[0]][0])[: 2 if suffix == "weight" else 1]
                    got = src.header(key)[0]
                    if got != want:
                        raise CheckpointError(f"{src.file_of(key)}: tensor {key} has shape {got}, expected {want} "
                                              f"({' + '.join(map(str, rows))} rows of {', '.join(part_keys)}, "
                                              f"from {self.dir / 'config.json'})")
                    start = 0
                    for p, n in zip(parts, rows):
                        src.add_view(f"{p}.{suffix}", key, start, start + n)
                        start += n

    def check_finite(self, progress=None) -> None:
        """Read every tensor the model uses once and fail, naming it, on a NaN or infinity (the converter runs
        this before any work; loading checks each tensor again as it is read).  ``progress(done, total)``."""
        keys = list(self.dense_keys())
        for prefix in self.linear_shapes():
            if is_exl2(prefix, self.src):
                keys += [f"{prefix}.{s}" for s in ("q_scale_max", "bias") if f"{prefix}.{s}" in self.src]
        for j, key in enumerate(keys):
            check_finite(self.src.get(key), self.src.label(key), self.src.file_of(key))
            if progress:
                progress(j + 1, len(keys))

    def linear(self, key: str, i: int, k_in: int, n_out: int, bias: bool) -> torch.nn.Module:
        return self.linear_at(TENSOR_NAMES[key].format(i=i), k_in, n_out, bias)

    def linear_at(self, prefix: str, k_in: int, n_out: int, bias: bool) -> torch.nn.Module:
        return self.linear_factory(prefix, self.src, in_features=k_in, out_features=n_out, bias=bias,
                                   dtype=self.dtype, device=self.device)

    def router_prefix(self, i: int) -> str:
        """Layer i's router (a mixture of experts, Arch.moe)."""
        return MOE_NAMES[self.cfg.arch.moe]["router"].format(i=i)

    def expert_prefixes(self, i: int, e: int) -> dict[str, str]:
        """Layer i's expert e: its "gate", "up" and "down" projections' prefixes."""
        names = MOE_NAMES[self.cfg.arch.moe]
        return {k: names[k].format(i=i, e=e) for k in ("gate", "up", "down")}

    def sparse_mlp(self, i: int) -> SparseMLP:
        cfg = self.cfg
        C, I = cfg.hidden_size, cfg.intermediate_size
        experts = []
        for e in range(cfg.num_experts):
            n = self.expert_prefixes(i, e)
            experts.append(MLP(self.linear_at(n["gate"], C, I, False), self.linear_at(n["up"], C, I, False),
                               self.linear_at(n["down"], I, C, False), act=cfg.arch.mlp_act))
        router = self.linear_at(self.router_prefix(i), C, cfg.num_experts, False)
        return SparseMLP(router, experts, cfg.experts_per_token, cfg.norm_topk_prob)

    def norm(self, key: str, i: int = 0) -> RMSNorm:
        C = self.cfg.hidden_size
        return RMSNorm(self.src.get_float(tensor_name(self.cfg.arch, key).format(i=i), (C,), self.dtype, self.device),
                       self.cfg.rms_norm_eps, self.cfg.arch.norm_offset)

    def head_norm(self, key: str, i: int) -> RMSNorm:
        """A per-head q or k norm: weight [D] (shared by the heads) or [heads, D] (see per_head_norm_shapes)."""
        name = TENSOR_NAMES[key].format(i=i)
        shape = self.src.shape(name)
        if shape != self.per_head_norm_shapes().get(name):
            shape = (self.cfg.head_dim,)
        return RMSNorm(self.src.get_float(name, shape, self.dtype, self.device), self.cfg.rms_norm_eps,
                       self.cfg.arch.norm_offset)

    def embedding(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The embedding table [V, C] in ``dtype`` (default: the compute dtype)."""
        return self.src.get_float(TENSOR_NAMES["embed"], (self.cfg.vocab_size, self.cfg.hidden_size),
                                  dtype or self.dtype, self.device)  # [V, C]

    def embedding_storage_dtype(self) -> torch.dtype:
        """The dtype the embedding table is kept in by a loaded model: its stored 16-bit dtype when no head
        reads it (the rows looked up are converted to the compute dtype exactly: a 7B vocabulary table is
        1 GB smaller than in fp32), else the compute dtype (a tied head multiplies by it)."""
        if not self.has_head():
            return self.dtype
        stored = self.src.header(TENSOR_NAMES["embed"])[1]
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, self.dtype)

    def block(self, i: int) -> Block:
        cfg, src = self.cfg, self.src
        C, D, H, Hkv, I = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        attn_keys = [TENSOR_NAMES[k].format(i=i) for k in ("q", "k", "v", "o")]
        if cfg.arch.moe:
            mlp_keys = [p for e in range(cfg.num_experts) for p in self.expert_prefixes(i, e).values()]
        else:
            mlp_keys = [TENSOR_NAMES[k].format(i=i) for k in ("gate", "up", "down")]
        for group, what in ((attn_keys, "attention"), (mlp_keys, "MLP")):
            kinds = {is_exl2(p, src) for p in group}
            if len(kinds) > 1:
                raise CheckpointError(f"{src.dir}: layer {i}: partially quantized {what} "
                                      f"(EXL2: {[p for p in group if is_exl2(p, src)]})")
        lin = self.linear
        qk_norms = (self.head_norm("q_norm", i), self.head_norm("k_norm", i)) if cfg.arch.qk_norm else ()
        attn = Attention(cfg, lin("q", i, C, H * D, cfg.qkv_bias), lin("k", i, C, Hkv * D, cfg.qkv_bias),
                         lin("v", i, C, Hkv * D, cfg.qkv_bias), lin("o", i, H * D, C, cfg.o_bias), *qk_norms,
                         window=cfg.window(i), rotary=self.local_rotary(i))
        if cfg.arch.moe:
            mlp = self.sparse_mlp(i)
        else:
            mlp = MLP(lin("gate", i, C, I, cfg.mlp_bias), lin("up", i, C, I, cfg.mlp_bias),
                      lin("down", i, I, C, cfg.mlp_bias), act=cfg.arch.mlp_act)
        if cfg.arch.sandwich_norms:   # Gemma: norms after attention and around the MLP (see Block)
            return Block(self.norm("attn_norm", i), attn, self.norm("mlp_pre_norm", i), mlp,
                         self.norm("attn_post_norm", i), self.norm("mlp_post_norm", i))
        return Block(self.norm("attn_norm", i), attn, self.norm("mlp_norm", i), mlp,
                     residual_scale=cfg.residual_multiplier)

    def local_rotary(self, i: int) -> Rotary | None:
        """Layer i's own RoPE where it differs from the model's (Gemma3's windowed layers), else None."""
        if self.cfg.local_rope_theta is None or self.cfg.window(i) is None:
            return None
        return Rotary(self.cfg, local=True).to(self.device)

    def has_head(self) -> bool:
        """Whether the checkpoint stores its own head (FP or EXL2); the ExLlamaV2 loader tries lm_head first."""
        head_prefix = TENSOR_NAMES["head"]
        return f"{head_prefix}.weight" in self.src or is_exl2(head_prefix, self.src)

    def head(self, embed: torch.Tensor | None = None) -> torch.nn.Module:
        if self.has_head():
            return self.linear("head", 0, self.cfg.hidden_size, self.cfg.vocab_size, False)
        if self.cfg.tie_word_embeddings:
            return _linear.Linear(self.embedding() if embed is None else embed)  # shares the tensor, no copy
        raise CheckpointError(f"{self.src.dir}: tensor {TENSOR_NAMES['head']}.weight not found and "
                              f"tie_word_embeddings is false")


def load_model(model_dir: str | Path, *, dtype: torch.dtype | None = None, device="cpu",
               linear_factory: LinearFactory | None = None, exl2: str = "packed") -> Model:
    """Load a model directory (HF FP or EXL2) into the runtime's Model on `device`.

    dtype is the compute dtype; default float32 on CPU (the reference), float16 on CUDA.  ``exl2``: how EXL2
    layers are held, "packed" (default: at about their stored size, computed by the EXL2 kernels) or "dense"
    (rebuilt at load in the compute dtype), see linear.EXL2Linear."""
    parts = ModelParts(model_dir, dtype=dtype, device=device, linear_factory=linear_factory, exl2=exl2)
    embed = parts.embedding(parts.embedding_storage_dtype())
    blocks = [parts.block(i) for i in range(parts.cfg.num_layers)]
    return Model(parts.cfg, embed, blocks, parts.norm("norm"), parts.head(embed), dtype=parts.dtype).eval()
