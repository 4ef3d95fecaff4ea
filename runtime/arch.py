"""Architectures as data: one row per supported HF `architectures` name, plus the parsed config.

Nothing here touches torch. The model (model.py) and the loader (loader.py) read these rows; adding a
Llama-layout architecture means adding a row, not code.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from exl2.core.errors import UserError


@dataclass(frozen=True)
class Arch:
    """Facts about one architecture that config.json does not state explicitly."""

    name: str
    qkv_bias: bool  # q/k/v projections carry a bias
    o_bias: bool  # o_proj carries a bias
    mlp_bias: bool  # gate/up/down carry a bias
    # config.json fields that override the bias columns: "attention_bias" (q, k, v and o together) and
    # "mlp_bias" (gate, up, down), each only where transformers reads it for this architecture
    bias_from_config: tuple[str, ...]
    default_rope_theta: float
    default_eps: float
    requires_bos: bool  # ExLlamaV2's `requires_bos` (perplexity rows get a BOS prepended)
    # Source tensors that stack several projections along the output dimension, as (fused key, the part keys in
    # stacking order), keys of TENSOR_NAMES: the loader reads each part as its rows of the fused tensor, so the
    # model, the converter and the output see the parts (ExLlamaV2 quantizes and stores them split too).
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rope_types: tuple[str, ...] | None = None  # the RoPE types accepted (None: every one of ROPE_TYPES)
    # transformers reads `partial_rotary_factor` (RoPE on the first part of each head only); exl2 rotates whole
    # heads, so a value other than 1 is refused
    partial_rotary: bool = False
    qk_norm: bool = False  # an RMSNorm over each query and key head (head_dim wide, one weight shared by the
    #                        heads) between the projection and RoPE; ExLlamaV2's `use_qk_norm`
    default_head_dim: int | None = None  # head_dim when config.json has none (None: hidden_size / heads)
    # Granite's: config.json's embedding_multiplier (embeddings times it), residual_multiplier (each module's
    # output times it before the residual add), attention_multiplier (the attention scale) and logits_scaling (the
    # logits divided by it) are read, each 1.0 when absent as in transformers; ExLlamaV2 reads the same four
    # fields for every architecture (config.py: scale_emb, scale_depth, attention_multiplier, logit_scale).
    multipliers: bool = False
    # GLM-4's: RoPE rotates the pairs (2j, 2j + 1) (ExLlamaV2's RopeStyle.GPTJ) instead of (j, j + D/2), on the
    # first partial_rotary_factor of each head only (read from config.json, default_partial_rotary when absent;
    # None: the factor is not run, see partial_rotary).  norm_names: (TENSOR_NAMES key, name) where this
    # architecture's norm has another name than Gemma's.
    rope_interleaved: bool = False
    default_partial_rotary: float | None = None
    norm_names: tuple[tuple[str, str], ...] = ()
    # Gemma's facts (docs/runtime.md section 1).  norm_offset: every RMSNorm scales by (offset + weight), the
    # stored weight being centred on 0 (ExLlamaV2's `norm_constant_bias`).  sandwich_norms: the attention and
    # MLP outputs are normed before their residual add (`post_attention_layernorm`, `post_feedforward_layernorm`)
    # and the MLP's input norm is `pre_feedforward_layernorm`.  mlp_act: the gate's activation ("silu", or
    # "gelu_tanh", GELU's tanh approximation).  embed_scale: embeddings are multiplied by sqrt(hidden_size)
    # (`normalize_embeddings`).  softcap: config.json's attn_logit_softcapping / final_logit_softcapping are
    # read, defaulting to the two values here (None: off); each caps its logits to cap * tanh(x / cap).
    # default_query_pre_attn_scalar: the attention scale is query_pre_attn_scalar ** -0.5 where it is read (not
    # None).  sliding_layers: which layers see only the last `sliding_window` keys: "alternating" (even layer
    # indices, ExLlamaV2's `alternating_swa`), None (none).
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    mlp_act: str = "silu"
    legacy_gelu: bool = False  # config.json's hidden_act "gelu" means mlp_act gelu_tanh (transformers' Gemma 1)
    embed_scale: bool = False
    softcap: tuple[float | None, float | None] | None = None
    default_query_pre_attn_scalar: float | None = None
    sliding_layers: str | None = None
    default_sliding_window: int | None = None
    default_tie_word_embeddings: bool = False  # when config.json does not say (transformers' default)
    # Gemma3's facts.  sliding_layers "pattern": a window on every layer but each sliding_window_pattern-th
    # ((i + 1) % pattern != 0; default default_sliding_window_pattern), ExLlamaV2's alternating_swa with
    # `sliding_window_pattern`.  local_rope_theta: the windowed layers' RoPE base, unscaled (ExLlamaV2's fixed
    # `sliding_rope_theta`, scale 1); rope_theta and its scaling apply to the other layers.  text_config: the
    # text model's fields sit under config.json's "text_config" (a multimodal wrapper).  weight_prefix: the text
    # model's tensor names carry this prefix in the checkpoint (ExLlamaV2's `lm_prefix`); other tensors (the
    # vision tower, the projector) are not the text model's.  config_defaults: (field, value) where config.json
    # may leave a field out and transformers' and ExLlamaV2's defaults agree.
    default_sliding_window_pattern: int | None = None
    local_rope_theta: float | None = None
    text_config: bool = False
    weight_prefix: str = ""
    config_defaults: tuple[tuple[str, object], ...] = ()
    # Tensors the converter carries into the output unquantized, as stored, after the text model's (ExLlamaV2's
    # compile step copies its vision tower's and projector's, `vt_prefix` / `mmp_prefix`): name prefixes, and
    # (old, new) substring renames applied to their names as ExLlamaV2's `keymap` does.
    copied_prefixes: tuple[str, ...] = ()
    copied_renames: tuple[tuple[str, str], ...] = ()
    # Mixture of experts (docs/runtime.md section 1): the key of MOE_NAMES naming the router and the experts'
    # tensors (None: a dense MLP), and the config.json fields of the expert count and of each expert's
    # intermediate size.  Every layer's MLP is sparse (ExLlamaV2 builds no dense layers in these models); the
    # router's softmax weights of the top num_experts_per_tok experts are renormalised to sum to 1 (ExLlamaV2
    # always does; an architecture whose config may say otherwise names that field in moe_renorm_field).
    moe: str | None = None
    moe_experts_field: str = "num_local_experts"
    moe_intermediate_field: str = "intermediate_size"
    moe_renorm_field: str | None = None


ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in (
        # docs/runtime.md section 1: q/k/v bias, no o bias; sliding_window read but full causal attention.
        Arch("Qwen2ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False, bias_from_config=(),
             default_rope_theta=10000.0, default_eps=1e-6, requires_bos=False),
        Arch("LlamaForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias", "mlp_bias"),
             default_rope_theta=10000.0, default_eps=1e-6, requires_bos=True),
        Arch("MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False, bias_from_config=(),
             default_rope_theta=10000.0, default_eps=1e-6, requires_bos=True),
        # q, k and v stored as one qkv_proj, gate and up as one gate_up_proj (gate first); no bias anywhere
        # (transformers' Phi3 builds none and reads no bias field); eps 1e-5; plain RoPE only: the longrope
        # ("su") scaling of the long-context models and a partial rotary factor are refused.
        Arch("Phi3ForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False, bias_from_config=(),
             default_rope_theta=10000.0, default_eps=1e-5, requires_bos=False,
             fused=(("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))), rope_types=("default",),
             partial_rotary=True),
        # q/k norms; `attention_bias` (default false) puts a bias on q, k, v and o, in transformers and in
        # ExLlamaV2 (which reads it for every architecture whose entry has no bias); the MLP never has one;
        # head_dim defaults to 128 as in transformers.
        Arch("Qwen3ForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias",), default_rope_theta=10000.0, default_eps=1e-6, requires_bos=False, qk_norm=True,
             default_head_dim=128),
        # Granite (3.x): the Llama layout with the four multipliers; attention_bias and mlp_bias read, as
        # transformers' GraniteConfig (ExLlamaV2 0.3.2 architecture.py:891-899 reads it as a plain Llama entry).
        Arch("GraniteForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias", "mlp_bias"), default_rope_theta=10000.0, default_eps=1e-6,
             requires_bos=False, multipliers=True),
        # Gemma 1: the Llama layout with Gemma's (1 + w) norms, GeGLU and embeddings times sqrt(hidden); no
        # post-norms, caps or windows, scale 1 / sqrt(head_dim); head_dim 256, a tied head and attention_bias as
        # transformers' GemmaConfig (ExLlamaV2 0.3.2 architecture.py:538-552: Gemma2's entry less the post-norms and
        # the window).
        Arch("GemmaForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias",), default_rope_theta=10000.0, default_eps=1e-6, requires_bos=True,
             default_head_dim=256, norm_offset=1.0, mlp_act="gelu_tanh", legacy_gelu=True, embed_scale=True,
             default_tie_word_embeddings=True),
        # (1 + w) norms, a norm after attention and around the MLP, GeGLU, embeddings times sqrt(hidden),
        # soft-capped attention (50) and final (30) logits, scale query_pre_attn_scalar ** -0.5 (256), a
        # 4096-token window on even layers; head_dim 256 and attention_bias as transformers' Gemma2Config.
        Arch("Gemma2ForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias",), default_rope_theta=10000.0, default_eps=1e-6, requires_bos=True,
             default_head_dim=256, norm_offset=1.0, sandwich_norms=True, mlp_act="gelu_tanh", embed_scale=True,
             softcap=(50.0, 30.0), default_query_pre_attn_scalar=256.0, sliding_layers="alternating",
             default_sliding_window=4096, default_tie_word_embeddings=True),
        # The text model of Gemma 3 (ExLlamaV2 0.3.2 reads this name, not Gemma3ForCausalLM): Gemma2's layout with
        # per-head q/k norms (also 1 + w), no soft-capping by default, a window on five layers of six, RoPE base
        # 1e6 (with the config's scaling, linear x8 in the 4B+ models) on the full layers and 10000 unscaled on
        # the windowed ones; config.json nests the text fields under text_config, tensors under language_model.
        Arch("Gemma3ForConditionalGeneration", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias",), default_rope_theta=1e6, default_eps=1e-6, requires_bos=True,
             qk_norm=True, default_head_dim=256, norm_offset=1.0, sandwich_norms=True, mlp_act="gelu_tanh",
             embed_scale=True, softcap=(None, None), default_query_pre_attn_scalar=256.0, sliding_layers="pattern",
             default_sliding_window=4096, default_tie_word_embeddings=True, default_sliding_window_pattern=6,
             local_rope_theta=10000.0, text_config=True, weight_prefix="language_model.",
             config_defaults=(("vocab_size", 262208), ("num_attention_heads", 8), ("num_key_value_heads", 4)),
             copied_prefixes=("multi_modal_projector.", "vision_tower.vision_model."),
             copied_renames=(("mm_input_projection_weight", "mm_input_projection.weight"),)),
        # GLM-4 (0414): a norm after attention and after the MLP (post_self_attn_layernorm, post_mlp_layernorm; the
        # MLP's input norm is post_attention_layernorm), plain RMSNorm, gate and up fused in gate_up_proj (gate
        # first), SiLU; RoPE interleaved on the first half of each head (partial_rotary_factor 0.5); a bias on
        # q, k and v (never o) from attention_bias, default true; head_dim 128, eps 1.5625e-7, as transformers'
        # Glm4Config (ExLlamaV2 0.3.2 architecture.py:902-920).
        Arch("Glm4ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False, bias_from_config=("attention_bias_qkv",),
             default_rope_theta=10000.0, default_eps=1.5625e-7, requires_bos=False, default_head_dim=128,
             fused=(("gate_up", ("gate", "up")),), sandwich_norms=True, rope_interleaved=True,
             default_partial_rotary=0.5,
             norm_names=(("attn_post_norm", "model.layers.{i}.post_self_attn_layernorm.weight"),
                         ("mlp_pre_norm", "model.layers.{i}.post_attention_layernorm.weight"),
                         ("mlp_post_norm", "model.layers.{i}.post_mlp_layernorm.weight"))),
        # Mistral's layout with a sparse MLP: a router (block_sparse_moe.gate) over num_local_experts SwiGLU
        # experts (w1 gate, w3 up, w2 down), the top num_experts_per_tok weights renormalised; eps 1e-5 and
        # RoPE base 1e6 as transformers' MixtralConfig.
        Arch("MixtralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False, bias_from_config=(),
             default_rope_theta=1e6, default_eps=1e-5, requires_bos=True, moe="mixtral"),
        # Qwen3's attention (q/k norms, attention_bias, head_dim 128) with a sparse MLP in every layer (mlp.gate,
        # mlp.experts.N.gate_proj/up_proj/down_proj), each expert moe_intermediate_size wide; the top-k weights
        # renormalised only where norm_topk_prob is true (transformers' default false; ExLlamaV2 always
        # renormalises, so false is refused); ExLlamaV2 0.3.2 architecture.py:450-466.
        Arch("Qwen3MoeForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False,
             bias_from_config=("attention_bias",), default_rope_theta=10000.0, default_eps=1e-6, requires_bos=False,
             qk_norm=True, default_head_dim=128, moe="qwen3_moe", moe_experts_field="num_experts",
             moe_intermediate_field="moe_intermediate_size", moe_renorm_field="norm_topk_prob"),
    )
}

# The sparse MLP's tensors per Arch.moe (prefixes, as TENSOR_NAMES): `{i}` the layer, `{e}` the expert.
MOE_NAMES = {
    "mixtral": {"router": "model.layers.{i}.block_sparse_moe.gate",
                "gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1",
                "up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3",
                "down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2"},
    "qwen3_moe": {"router": "model.layers.{i}.mlp.gate",
                  "gate": "model.layers.{i}.mlp.experts.{e}.gate_proj",
                  "up": "model.layers.{i}.mlp.experts.{e}.up_proj",
                  "down": "model.layers.{i}.mlp.experts.{e}.down_proj"},
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
    "qkv": "model.layers.{i}.self_attn.qkv_proj",  # fused q, k, v (Arch.fused)
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",  # architectures with qk_norm only
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    # sandwich_norms architectures: the attention output's norm is post_attention_layernorm (above), the MLP's
    # input norm pre_feedforward_layernorm and its output's post_feedforward_layernorm
    "attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp_pre_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "gate_up": "model.layers.{i}.mlp.gate_up_proj",  # fused gate, up (Arch.fused)
    "norm": "model.norm.weight",
    "head": "lm_head",
}

ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(UserError, ValueError):
    """config.json is unreadable or holds a value of the wrong type or range; the message names the field."""


class UnsupportedArchitectureError(ConfigError):
    pass


_REQUIRED, _UNSET = object(), object()


def tensor_name(arch: Arch, key: str) -> str:
    """TENSOR_NAMES[key], or this architecture's own name for it (Arch.norm_names)."""
    return dict(arch.norm_names).get(key) or TENSOR_NAMES[key]


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
    sliding_window: int | None = None  # read; applied only on the layers of layer_windows
    quantization_config: dict | None = None  # EXL2 output dirs carry one (docs/format.md section 10)
    # Gemma (Arch.softcap, default_query_pre_attn_scalar, sliding_layers); the defaults are every other row's
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # None: the attention scale is 1 / sqrt(head_dim)
    layer_windows: tuple[int | None, ...] = ()  # per layer: the window in keys, or None (full causal); () = none
    sliding_window_pattern: int | None = None  # Gemma3: every pattern-th layer is a full one (Arch.sliding_layers)
    local_rope_theta: float | None = None  # Gemma3: the windowed layers' RoPE base, unscaled; None: one RoPE
    # Granite (Arch.multipliers); the defaults change nothing.  attention_multiplier None: the scale as above
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    rotary_dim: int | None = None  # GLM-4: RoPE on each head's first rotary_dim values (None: all head_dim)
    # Mixture of experts (Arch.moe): experts per layer (0: a dense MLP), experts each token is routed to, and
    # whether their router weights are renormalised to sum to 1; intermediate_size is then each expert's
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True

    @property
    def attn_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        s = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return 1.0 / math.sqrt(s)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d, where: str = "config.json") -> ModelConfig:
        """Parse and check a config.json object: every field this project reads is checked for type and range
        here, once, so that every command fails on a bad value with one line naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, found {type(d).__name__}")
        r = _Reader(d, where)
        arch = get_arch(r.architectures(), where)
        if arch.text_config:
            d = _text_fields(d, arch, where)
            r = _Reader(d, where)
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        head_dim = r.int("head_dim", default=arch.default_head_dim)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                                  "(and no head_dim is given)")
            head_dim = hidden // heads
        if head_dim % 2:
            raise ConfigError(f"{where}: head_dim {head_dim} must be even (rotary embeddings pair dimensions)")
        kv_heads = r.int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        max_pos = r.int("max_position_embeddings", default=2048, maximum=MAX_TOKEN_ID)
        theta, scaling = _parse_rope(r, arch, max_pos)
        qkv_bias, o_bias, mlp_bias = arch.qkv_bias, arch.o_bias, arch.mlp_bias
        if "attention_bias" in arch.bias_from_config:  # a bias on q, k, v and o (transformers)
            qkv_bias = o_bias = r.bool("attention_bias", default=qkv_bias)
        if "attention_bias_qkv" in arch.bias_from_config:  # the same field on q, k and v only (GLM-4)
            qkv_bias = r.bool("attention_bias", default=qkv_bias)
        if "mlp_bias" in arch.bias_from_config:
            mlp_bias = r.bool("mlp_bias", default=mlp_bias)
        vocab = r.int("vocab_size")
        bos = r.int("bos_token_id", default=None, minimum=0)
        eos = r.int_list("eos_token_id")
        for name, ids in (("bos_token_id", [] if bos is None else [bos]), ("eos_token_id", eos)):
            if any(t >= vocab for t in ids):
                raise ConfigError(f"{where}: {name} {ids if len(ids) > 1 else ids[0]} is outside the vocabulary "
                                  f"(vocab_size {vocab})")
        qconf = d.get("quantization_config")
        if qconf is not None and not isinstance(qconf, dict):
            raise ConfigError(f"{where}: quantization_config must be an object, found {type(qconf).__name__}")
        return cls(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=r.int(arch.moe_intermediate_field if arch.moe else "intermediate_size"),
            num_layers=r.int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=r.float("rms_norm_eps", default=arch.default_eps, maximum=1.0),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=r.bool("tie_word_embeddings", default=arch.default_tie_word_embeddings),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            bos_token_id=bos,
            **_multiplier_fields(r, arch),
            **_partial_rotary_fields(r, arch, head_dim),
            eos_token_ids=eos,
            sliding_window=r.int("sliding_window", default=arch.default_sliding_window, minimum=0,
                                 maximum=MAX_TOKEN_ID),
            quantization_config=qconf,
            **_gemma_fields(r, arch),
            **_moe_fields(r, arch),
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
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON (nested too deeply)") from None
        return cls.from_dict(d, where=str(path))


# Sizes beyond these are not a model anyone can convert; they stop a corrupt or hostile config.json before any
# allocation is sized from it (the tensors' shapes are checked against the checkpoint separately).
MAX_DIM = 1 << 24           # hidden/intermediate size, head_dim, heads, vocabulary, layers
MAX_TOKEN_ID = (1 << 31) - 1   # token ids and context lengths


class _Reader:
    """Typed access to config.json fields: a wrong type or range raises ConfigError naming the field.

    JSON numbers are accepted in the forms a JSON writer may produce for the same value (``4096`` and ``4096.0``
    for an integer field; an integer for a float field); booleans are never numbers, NaN and infinities never
    valid values."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def _bad(self, key: str, value, what: str) -> ConfigError:
        shown = json.dumps(value, allow_nan=True) if not isinstance(value, (dict, list)) else type(value).__name__
        if len(shown) > 40:
            shown = shown[:37] + "..."
        return ConfigError(f"{self.where}: {key} is {shown}, expected {what}")

    def _get(self, key: str, default):
        v = self.d.get(key)
        return (True, default) if v is None else (False, v)

    def int(self, key: str, default=_REQUIRED, *, minimum: int = 1, maximum: int = MAX_DIM, value=_UNSET):
        if value is _UNSET:
            missing, v = self._get(key, default)
            if missing:
                if v is _REQUIRED:
                    raise ConfigError(f"{self.where}: missing required field {key!r}")
                return v
        else:
            v = value
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, v, "an integer")
        if not minimum <= v <= maximum:
            raise self._bad(key, v, f"an integer from {minimum} to {maximum}")
        return v

    def float(self, key: str, default=_REQUIRED, *, maximum: float = math.inf, source: dict | None = None):
        d = self.d if source is None else source
        v = d.get(key)
        if v is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}: missing required field {key!r}")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(key, v, "a finite number")
        if not 0 < v <= maximum:
            raise self._bad(key, v, "a positive number" + (f" up to {maximum:g}" if maximum != math.inf else ""))
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        missing, v = self._get(key, default)
        if missing:
            return v
        if not isinstance(v, bool):
            raise self._bad(key, v, "true or false")
        return v

    def int_list(self, key: str) -> list[int]:
        """An integer or a list of integers (token ids); absent or null -> []."""
        v = self.d.get(key)
        if v is None:
            return []
        items = v if isinstance(v, list) else [v]
        return [self.int(key, minimum=0, maximum=MAX_TOKEN_ID, value=x) for x in items]

    def architectures(self) -> list[str]:
        v = self.d.get("architectures")
        if v is None:
            return []
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self._bad("architectures", v, "a list of class names")
        return names


def _gemma_fields(r: _Reader, arch: Arch) -> dict:
    """Soft-capping, the attention scale and the per-layer windows of the architectures that have them (the
    other rows: none of these, whatever config.json says, as transformers builds those models)."""
    out: dict = {}
    where = r.where
    if arch.softcap is not None:
        for key, default in zip(("attn_softcap", "final_softcap"), arch.softcap):
            field = {"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping"}[key]
            out[key] = r.float(field, default=None) if field in r.d else default
    if arch.default_query_pre_attn_scalar is not None:
        out["query_pre_attn_scalar"] = r.float("query_pre_attn_scalar", default=arch.default_query_pre_attn_scalar)
    if arch.mlp_act == "gelu_tanh":
        for key in ("hidden_activation", "hidden_act"):
            act = r.d.get(key)
            legacy = arch.legacy_gelu and key == "hidden_act" and act == "gelu"
            if act is not None and act not in ("gelu_pytorch_tanh", "gelu_tanh") and not legacy:
                raise ConfigError(f"{where}: {key} {act!r} not supported for {arch.name}; supported: "
                                  f"gelu_pytorch_tanh (what ExLlamaV2 runs)")
            if act is not None:
                break
    if r.d.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: use_bidirectional_attention is not supported (causal attention only)")
    if arch.sliding_layers == "pattern":
        layers = r.int("num_hidden_layers")
        window = r.int("sliding_window", default=arch.default_sliding_window, maximum=MAX_TOKEN_ID)
        given = r.d.get("layer_types")
        if given is not None:   # transformers 5 states the layer types; they must follow one pattern
            if not isinstance(given, list):
                raise ConfigError(f"{where}: layer_types must be a list, found {type(given).__name__}")
            # the first full layer's position is the pattern (none: any pattern above the depth)
            pattern = given.index("full_attention") + 1 if "full_attention" in given else layers + 1
            expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
            if given != expected:
                raise ConfigError(f"{where}: layer_types do not follow one sliding_window_pattern (a full layer "
                                  f"every n-th), the only layout ExLlamaV2 runs for {arch.name}")
        else:
            pattern = r.int("sliding_window_pattern", default=arch.default_sliding_window_pattern)
        if pattern < 2:
            raise ConfigError(f"{where}: sliding_window_pattern {pattern} not supported for {arch.name} "
                              f"(ExLlamaV2 reads a pattern below 2 as alternating layers)")
        out["sliding_window_pattern"] = pattern
        out["layer_windows"] = tuple(None if (i + 1) % pattern == 0 else window for i in range(layers))
        out["local_rope_theta"] = _local_rope(r, arch)
    if arch.sliding_layers == "alternating":
        layers = r.int("num_hidden_layers")
        window = r.int("sliding_window", default=arch.default_sliding_window, maximum=MAX_TOKEN_ID)
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        given = r.d.get("layer_types")
        if given is not None and given != expected:
            raise ConfigError(f"{where}: layer_types differ from the alternating sliding/full layers ExLlamaV2 "
                              f"runs for {arch.name} (sliding on even layers)")
        out["layer_windows"] = tuple(window if t == "sliding_attention" else None for t in expected)
    return out


EXPERT_FIELDS = ("num_local_experts", "num_experts")   # the expert count's config.json names


def _moe_fields(r: _Reader, arch: Arch) -> dict:
    """The expert count, experts per token and renormalisation of a mixture-of-experts row (none otherwise)."""
    if arch.moe is None:
        return {}
    # either name (transformers 5 writes num_local_experts for every MoE model), in ExLlamaV2's order of reading
    field = next((f for f in EXPERT_FIELDS if r.d.get(f) is not None), arch.moe_experts_field)
    n = r.int(field)
    k = r.int("num_experts_per_tok")
    if k > n:
        raise ConfigError(f"{r.where}: num_experts_per_tok {k} exceeds {field} {n}")
    if r.d.get("mlp_only_layers") or r.int("decoder_sparse_step", default=1) != 1:
        raise ConfigError(f"{r.where}: dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step) are "
                          f"not supported for {arch.name} (ExLlamaV2 builds every layer's MLP sparse)")
    renorm = r.bool(arch.moe_renorm_field, default=False) if arch.moe_renorm_field else True
    if not renorm:
        raise ConfigError(f"{r.where}: {arch.moe_renorm_field} false is not supported for {arch.name} (ExLlamaV2 "
                          f"always renormalises the top-k router weights)")
    return {"num_experts": n, "experts_per_token": k, "norm_topk_prob": renorm}


def _partial_rotary_fields(r: _Reader, arch: Arch, head_dim: int) -> dict:
    """GLM-4's rotary_dim: head_dim times partial_rotary_factor (the RoPE dict's, else the top level's, else the
    row's default), an even number of at least 2; none for other rows."""
    if arch.default_partial_rotary is None:
        return {}
    src = rope_source(r.d)
    prf = src.get("partial_rotary_factor", r.d.get("partial_rotary_factor"))
    prf = arch.default_partial_rotary if prf is None else \
        r.float("partial_rotary_factor", source={"partial_rotary_factor": prf}, maximum=1.0)
    dim = int(head_dim * prf)
    if dim < 2 or dim % 2:
        raise ConfigError(f"{r.where}: partial_rotary_factor {prf:g} of head_dim {head_dim} gives {dim} rotary "
                          f"values; expected an even number of at least 2")
    return {"rotary_dim": dim}


def _multiplier_fields(r: _Reader, arch: Arch) -> dict:
    """Granite's four multipliers (Arch.multipliers), transformers' default 1.0 for each; none for other rows."""
    if not arch.multipliers:
        return {}
    return {"embedding_multiplier": r.float("embedding_multiplier", default=1.0),
            "residual_multiplier": r.float("residual_multiplier", default=1.0),
            "attention_multiplier": r.float("attention_multiplier", default=1.0),
            "logits_scaling": r.float("logits_scaling", default=1.0)}


def _text_fields(d: dict, arch: Arch, where: str) -> dict:
    """config.json of a multimodal wrapper -> one flat dict of the text model's fields: text_config's fields
    over the top level's (as transformers reads the text model), except the token ids, which ExLlamaV2 reads
    from the top level only; then the row's config_defaults where a field is absent.  A top-level
    sliding_window_pattern (what ExLlamaV2 reads) that disagrees with the text model's is refused."""
    text = d.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: text_config must be an object, found {type(text).__name__}")
    flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    flat.update({k: v for k, v in text.items()
                 if not (k in ("bos_token_id", "eos_token_id") and d.get(k) is not None)})
    for k, v in arch.config_defaults:
        if flat.get(k) is None:
            flat[k] = v
    top, inner = d.get("sliding_window_pattern"), text.get("sliding_window_pattern")
    if top is not None and inner is not None and top != inner:
        raise ConfigError(f"{where}: sliding_window_pattern {top} (top level, which ExLlamaV2 reads) differs from "
                          f"text_config's {inner} (which transformers reads)")
    return flat


def _local_rope(r: _Reader, arch: Arch) -> float:
    """The windowed layers' RoPE base (Arch.local_rope_theta), from either layout: transformers 5's
    rope_parameters["sliding_attention"] or 4.x's rope_local_base_freq.  ExLlamaV2 runs them at its fixed base
    without scaling, so any other base or a scaling of these layers is refused."""
    where, src = r.where, r.d.get("rope_parameters")
    local = src.get("sliding_attention") if isinstance(src, dict) else None
    if local is not None:
        if not isinstance(local, dict):
            raise ConfigError(f"{where}: rope_parameters.sliding_attention must be an object")
        rtype = local.get("rope_type") or local.get("type") or "default"
        if rtype != "default":
            raise ConfigError(f"{where}: rope_parameters.sliding_attention type {rtype!r} not supported for "
                              f"{arch.name} (ExLlamaV2 runs the windowed layers' RoPE unscaled)")
        theta = r.float("rope_theta", default=arch.local_rope_theta, source=local)
    else:
        theta = r.float("rope_local_base_freq", default=arch.local_rope_theta)
    if theta != arch.local_rope_theta:
        raise ConfigError(f"{where}: the windowed layers' RoPE base {theta:g} not supported for {arch.name} "
                          f"(ExLlamaV2 runs them at {arch.local_rope_theta:g})")
    return theta


def rope_source(d: dict) -> dict:
    """The dict transformers takes the RoPE settings from: ``rope_scaling`` when present (transformers 4.x
    layout, and 5.x gives it priority), else ``rope_parameters`` (5.x layout)."""
    return d.get("rope_scaling") or d.get("rope_parameters") or {}


def _parse_rope(r: _Reader, arch: Arch, max_pos: int) -> tuple[float, dict | None]:
    """rope_theta and scaling from either layout, with transformers 5's precedence: the RoPE dict
    (:func:`rope_source`) first, then the top-level ``rope_theta``, then the architecture's default."""
    d, where = r.d, r.where
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{where}: {key} must be an object, found {type(d[key]).__name__}")
    src = rope_source(d)
    if arch.local_rope_theta is not None and not d.get("rope_scaling") and \
            {"full_attention", "sliding_attention"} & set(src):
        src = src.get("full_attention") or {}   # transformers 5's RoPE per layer type: the full layers' here,
        if not isinstance(src, dict):            # the windowed layers' in _local_rope
            raise ConfigError(f"{where}: rope_parameters.full_attention must be an object")
    nested = [k for k, v in src.items() if isinstance(v, dict)]
    if nested:      # transformers 5 nests RoPE settings by layer type for models that mix them (Gemma 3)
        raise ConfigError(f"{where}: RoPE settings per layer type ({', '.join(nested)}) are not supported for "
                          f"{arch.name}")
    if "rope_theta" in src and src["rope_theta"] is not None:
        theta = r.float("rope_theta", source=src)
    else:
        theta = r.float("rope_theta", default=arch.default_rope_theta)
    rtype = src.get("rope_type") or src.get("type") or "default"
    supported = arch.rope_types or ROPE_TYPES
    if not isinstance(rtype, str) or rtype not in supported:
        key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        raise ConfigError(f"{where}: {key} type {rtype!r} not supported for {arch.name}; supported: "
                          f"{', '.join(supported)}")
    if arch.partial_rotary:     # transformers reads the RoPE dict's value first, then the top-level one
        prf = src.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if prf is not None and r.float("partial_rotary_factor", source={"partial_rotary_factor": prf}) != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor {prf} not supported for {arch.name}: exl2 applies "
                              f"RoPE to whole heads (1.0)")
    for key in ("rope_type", "type"):       # both present must agree
        if src.get(key) is not None and src[key] != rtype:
            raise ConfigError(f"{where}: RoPE settings name two types ({src.get('rope_type')!r} and {src.get('type')!r})")
    if rtype == "default":
        return theta, None
    out = {"rope_type": rtype, "factor": r.float("factor", source=src)}
    if rtype == "llama3":
        lo = r.float("low_freq_factor", source=src)
        hi = r.float("high_freq_factor", source=src)
        if not hi > lo:
            raise ConfigError(f"{where}: llama3 RoPE needs high_freq_factor > low_freq_factor, found {hi:g} and {lo:g}")
        out["low_freq_factor"], out["high_freq_factor"] = lo, hi
        # transformers gives a top-level original_max_position_embeddings priority, then the RoPE dict's
        if d.get("original_max_position_embeddings") is not None:
            orig = r.int("original_max_position_embeddings", maximum=MAX_TOKEN_ID)
        elif src.get("original_max_position_embeddings") is not None:
            orig = r.int("original_max_position_embeddings", maximum=MAX_TOKEN_ID,
                         value=src["original_max_position_embeddings"])
        else:
            orig = max_pos
        out["original_max_position_embeddings"] = orig
    return theta, out
