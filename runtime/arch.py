"""Architectures as data: one row per supported HF `architectures` name (config.py reads config.json with them).

Nothing here touches torch. The model (model.py) and the loader (loader.py) read these rows; adding a
Llama-layout architecture means adding a row, not code.
"""
from __future__ import annotations

from dataclasses import dataclass

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
