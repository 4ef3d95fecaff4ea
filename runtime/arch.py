"""Architectures as data: one row per supported HF `architectures` name, plus the parsed config.

Nothing here touches torch. The model (model.py) and the loader (loader.py) read these rows; adding a
Llama-layout architecture means adding a row, not code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    """Facts about one architecture that config.json does not state explicitly."""

    name: str
    qkv_bias: bool  # q/k/v projections carry a bias
    o_bias: bool  # o_proj carries a bias
    mlp_bias: bool  # gate/up/down carry a bias
    bias_from_config: bool  # Llama: `attention_bias` / `mlp_bias` in config.json override the row
    default_rope_theta: float
    default_eps: float
    requires_bos: bool  # ExLlamaV2's `requires_bos` (perplexity rows get a BOS prepended)


ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in (
        # EXL2-SPEC 6: q/k/v bias, no o bias; sliding_window read but full causal attention.
        Arch("Qwen2ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False, bias_from_config=False,
             default_rope_theta=10000.0, default_eps=1e-6, requires_bos=False),
        Arch("LlamaForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False, bias_from_config=True,
             default_rope_theta=10000.0, default_eps=1e-6, requires_bos=True),
        Arch("MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False, bias_from_config=False,
             default_rope_theta=10000.0, default_eps=1e-6, requires_bos=True),
    )
}

# HF tensor names (gguf-py style table). `{i}` is the layer index. Linear keys are prefixes: the loader
# appends `.weight`/`.bias` (FP) or `.q_weight`/... (EXL2).
TENSOR_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "norm": "model.norm.weight",
    "head": "lm_head",
}

ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedArchitectureError(ValueError):
    pass


def get_arch(names: list[str] | str | None, where: str = "config.json") -> Arch:
    """The row for the first supported name in `architectures`; a clear error otherwise."""
    if isinstance(names, str):
        names = [names]
    for n in names or []:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    raise UnsupportedArchitectureError(
        f"{where}: unsupported architecture {names!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


@dataclass
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # read, not applied (full causal attention, as ExLlamaV2)
    quantization_config: dict | None = None  # EXL2 output dirs carry one (EXL2-SPEC 2.1)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> ModelConfig:
        arch = get_arch(d.get("architectures"), where)

        def need(key):
            if key not in d or d[key] is None:
                raise ValueError(f"{where}: missing required field {key!r}")
            return d[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = d.get("head_dim") or (hidden // heads)
        if not d.get("head_dim") and hidden % heads:
            raise ValueError(f"{where}: hidden_size {hidden} not divisible by num_attention_heads {heads}")
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"{where}: num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}")

        theta, scaling = _parse_rope(d, arch, where)
        qkv_bias, o_bias, mlp_bias = arch.qkv_bias, arch.o_bias, arch.mlp_bias
        if arch.bias_from_config:  # Llama's attention_bias puts a bias on q, k, v and o (transformers)
            qkv_bias = o_bias = bool(d.get("attention_bias", qkv_bias))
            mlp_bias = bool(d.get("mlp_bias", mlp_bias))
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps") or arch.default_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_list(d.get("eos_token_id")),
            sliding_window=d.get("sliding_window"),
            quantization_config=d.get("quantization_config"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))


def _parse_rope(d: dict, arch: Arch, where: str) -> tuple[float, dict | None]:
    """rope_theta and scaling from either layout: transformers 4.x (`rope_theta`, `rope_scaling`) or
    5.x (`rope_parameters` holding both)."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**params, **scaling}
    theta = merged.get("rope_theta", d.get("rope_theta")) or arch.default_rope_theta
    rtype = merged.get("rope_type", merged.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {rtype!r} not supported; supported: {', '.join(ROPE_TYPES)}")
    if rtype == "default":
        return float(theta), None
    out = {"rope_type": rtype, "factor": float(merged["factor"])}
    if rtype == "llama3":
        out["low_freq_factor"] = float(merged["low_freq_factor"])
        out["high_freq_factor"] = float(merged["high_freq_factor"])
        out["original_max_position_embeddings"] = int(
            merged.get("original_max_position_embeddings") or d.get("max_position_embeddings")
        )
    return float(theta), out
