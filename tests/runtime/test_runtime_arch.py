"""config.json parsing and the architecture table."""
import json
import math

import pytest
import torch
from exl2.runtime.arch import ARCHITECTURES, UnsupportedArchitectureError, get_arch
from exl2.runtime.config import ModelConfig
from exl2.runtime.model import rope_inv_freq

BASE = dict(architectures=["LlamaForCausalLM"], hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=512, num_hidden_layers=2, vocab_size=1000)


def test_table_rows():
    assert {"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
            "Gemma2ForCausalLM"} <= set(ARCHITECTURES)
    q = ARCHITECTURES["Qwen2ForCausalLM"]
    assert q.qkv_bias and not q.o_bias and not q.mlp_bias and not q.qk_norm
    q3 = ARCHITECTURES["Qwen3ForCausalLM"]
    assert q3.qk_norm and not (q3.qkv_bias or q3.o_bias or q3.mlp_bias or q3.requires_bos)
    assert q3.bias_from_config == ("attention_bias",)
    assert [a.name for a in ARCHITECTURES.values() if a.qk_norm] == ["Qwen3ForCausalLM",
                                                                     "Gemma3ForConditionalGeneration",
                                                                     "Qwen3MoeForCausalLM"]


def test_qwen3_head_dim_from_config_else_128():
    """transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads (32 here)."""
    q3 = {**BASE, "architectures": ["Qwen3ForCausalLM"]}
    assert ModelConfig.from_dict(q3).head_dim == 128
    c = ModelConfig.from_dict({**q3, "head_dim": 64})
    assert (c.head_dim, c.kv_dim) == (64, 128) and not (c.qkv_bias or c.o_bias or c.mlp_bias)
    assert ModelConfig.from_dict(BASE).head_dim == 32   # the other rows: hidden_size / heads


def test_qwen3_attention_bias_but_never_an_mlp_bias():
    """transformers' Qwen3 reads attention_bias (q, k, v and o) but builds its MLP without bias whatever
    mlp_bias says."""
    c = ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "attention_bias": True,
                               "mlp_bias": True})
    assert c.qkv_bias and c.o_bias and not c.mlp_bias


def test_unknown_architecture():
    """One line naming every row of the table, sorted (the list grows with the table; these are in it)."""
    assert {"Gemma2ForCausalLM", "Gemma3ForConditionalGeneration", "GemmaForCausalLM", "Glm4ForCausalLM",
            "GraniteForCausalLM", "LlamaForCausalLM",
            "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(ARCHITECTURES)
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_arch(["FalconForCausalLM"])
    assert str(e.value) == ("config.json: unsupported architecture ['FalconForCausalLM']; supported: "
                            + ", ".join(sorted(ARCHITECTURES)))
    with pytest.raises(UnsupportedArchitectureError):
        ModelConfig.from_dict({**BASE, "architectures": None})


def test_head_dim_and_defaults():
    c = ModelConfig.from_dict(BASE)
    assert (c.head_dim, c.kv_dim, c.rope_theta, c.rope_scaling) == (32, 64, 10000.0, None)
    assert ModelConfig.from_dict({**BASE, "head_dim": 64}).head_dim == 64
    c = ModelConfig.from_dict({**BASE, "eos_token_id": [5, 7], "bos_token_id": 1, "tie_word_embeddings": True})
    assert c.eos_token_ids == [5, 7] and c.bos_token_id == 1 and c.tie_word_embeddings


def test_llama_attention_bias_from_config():
    c = ModelConfig.from_dict({**BASE, "attention_bias": True})
    assert c.qkv_bias and c.o_bias and not c.mlp_bias


def test_qwen2_sliding_window_read_not_applied():
    c = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                               "use_sliding_window": False, "rope_theta": 1e6})
    assert c.sliding_window == 4096 and c.rope_theta == 1e6 and c.qkv_bias and not c.o_bias


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_rope_layouts(layout):
    """transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters."""
    if layout == "v4":
        d = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}
    else:
        d = {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    c = ModelConfig.from_dict(d)
    assert c.rope_theta == 500000.0 and c.rope_scaling == {"rope_type": "llama3", **LLAMA3}
    old = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic' not supported for LlamaForCausalLM"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


PHI3 = {**BASE, "architectures": ["Phi3ForCausalLM"]}


def test_phi3_row_and_defaults():
    """Phi-3: fused qkv and gate_up in the source, split by the loader; transformers' Phi3Config defaults (eps 1e-5,
    RoPE base 10000, head_dim hidden / heads); no bias, whatever attention_bias or mlp_bias say (transformers' Phi3
    builds none)."""
    a = ARCHITECTURES["Phi3ForCausalLM"]
    assert a.fused == (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))) and a.rope_types == ("default",)
    assert [r.name for r in ARCHITECTURES.values() if r.fused] == ["Phi3ForCausalLM", "Glm4ForCausalLM"]
    assert ARCHITECTURES["Glm4ForCausalLM"].fused == (("gate_up", ("gate", "up")),)
    c = ModelConfig.from_dict({**PHI3, "attention_bias": True, "mlp_bias": True, "rms_norm_eps": None})
    assert (c.rms_norm_eps, c.rope_theta, c.rope_scaling, c.head_dim) == (1e-5, 10000.0, None, 32)
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias or c.arch.requires_bos or c.arch.qk_norm)
    # transformers 5's layout: the RoPE dict carries partial_rotary_factor 1.0
    c = ModelConfig.from_dict({**PHI3, "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0,
                                                           "partial_rotary_factor": 1.0}})
    assert (c.rope_theta, c.rope_scaling) == (250000.0, None)


LONGROPE = {"long_factor": [1.0] * 16, "short_factor": [1.0] * 16}


@pytest.mark.parametrize("extra,match", [
    ({"rope_scaling": {"type": "longrope", **LONGROPE}}, "rope_scaling type 'longrope' not supported"),
    ({"rope_scaling": {"type": "su", **LONGROPE}}, "rope_scaling type 'su' not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, **LONGROPE}},
     "rope_parameters type 'longrope' not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' not supported"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75 not supported"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 not supported"),
])
def test_phi3_plain_rope_only(extra, match):
    """The long-context Phi-3 models' longrope ("su") scaling and a partial rotary factor (Phi-4-mini's 0.75) are
    refused in one line naming the field; so is a scaling transformers' Phi3 does not take (linear)."""
    with pytest.raises(ValueError, match=f"{match} for Phi3ForCausalLM"):
        ModelConfig.from_dict({**PHI3, **extra})


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", **LLAMA3}])
def test_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = {**BASE, "head_dim": 128, "rope_theta": 500000.0, "rope_scaling": scaling,
         "max_position_embeddings": 131072}
    ours = rope_inv_freq(ModelConfig.from_dict(d))
    hf_cfg = LlamaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    if scaling is None:
        ref = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)  # same fp32 recipe: bit-identical


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hidden_size": None}))
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_file(tmp_path)


GEMMA2 = dict(architectures=["Gemma2ForCausalLM"], hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=512, num_hidden_layers=5, vocab_size=1000)


def test_gemma2_defaults_are_transformers():
    """A Gemma2 config.json with no optional field: transformers' Gemma2Config defaults (head_dim 256, caps 50
    and 30, query_pre_attn_scalar 256, window 4096 on even layers, tied head)."""
    c = ModelConfig.from_dict(GEMMA2)
    assert (c.head_dim, c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar) == (256, 50.0, 30.0, 256.0)
    assert c.layer_windows == (4096, None, 4096, None, 4096) and c.tie_word_embeddings
    assert c.attn_scale == 1 / 16 and c.arch.requires_bos and c.arch.norm_offset == 1.0
    c = ModelConfig.from_dict({**GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": 7,
                               "query_pre_attn_scalar": 64, "sliding_window": 8, "head_dim": 32})
    assert (c.attn_softcap, c.final_softcap, c.attn_scale, c.window(0), c.window(1)) == (None, 7.0, 0.125, 8, None)
    other = ModelConfig.from_dict({**BASE, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 64})
    assert other.final_softcap is None and other.attn_scale == 1 / math.sqrt(32) and other.layer_windows == ()


@pytest.mark.parametrize("extra,match", [
    ({"layer_types": ["full_attention"] * 5}, "layer_types differ"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_gemma2_refuses_what_exllamav2_would_run_differently(extra, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**GEMMA2, **extra})
    ok = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    assert ModelConfig.from_dict({**GEMMA2, "layer_types": ok}).window(4) == 4096


GEMMA = {**GEMMA2, "architectures": ["GemmaForCausalLM"]}


GLM4 = {**BASE, "architectures": ["Glm4ForCausalLM"]}


def test_glm4_defaults_are_transformers():
    """Glm4Config's defaults: head_dim 128, RoPE on half of each head, a bias on q, k and v (never o), eps
    1.5625e-7; the factor read from the RoPE dict (transformers 5) or the top level (4.x)."""
    c = ModelConfig.from_dict(GLM4)
    assert (c.head_dim, c.rotary_dim, c.rms_norm_eps, c.qkv_bias, c.o_bias, c.mlp_bias) == \
        (128, 64, 1.5625e-7, True, False, False)
    assert c.arch.rope_interleaved and c.arch.sandwich_norms and c.arch.norm_offset == 0 and not c.tie_word_embeddings
    c = ModelConfig.from_dict({**GLM4, "attention_bias": False, "head_dim": 64, "partial_rotary_factor": 1.0})
    assert (c.qkv_bias, c.o_bias, c.rotary_dim) == (False, False, 64)
    c = ModelConfig.from_dict({**GLM4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5,
                                                          "partial_rotary_factor": 0.25}})
    assert (c.rotary_dim, c.rope_theta) == (32, 5e5)
    with pytest.raises(ValueError, match="partial_rotary_factor 0.01 of head_dim 128 gives 1 rotary"):
        ModelConfig.from_dict({**GLM4, "partial_rotary_factor": 0.01})
    assert ModelConfig.from_dict(BASE).rotary_dim is None


def test_granite_multipliers_read_with_transformers_defaults():
    """GraniteConfig's four multipliers default to 1.0 (the attention scale too, not 1 / sqrt(head_dim)); the
    other rows read none of them, whatever config.json says."""
    g = {**BASE, "architectures": ["GraniteForCausalLM"]}
    c = ModelConfig.from_dict(g)
    assert (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logits_scaling) == (1, 1, 1, 1)
    assert c.attn_scale == 1.0 and not c.arch.requires_bos and not (c.qkv_bias or c.mlp_bias)
    c = ModelConfig.from_dict({**g, "embedding_multiplier": 12, "residual_multiplier": 0.22,
                               "attention_multiplier": 0.0078125, "logits_scaling": 16, "mlp_bias": True})
    assert (c.embedding_multiplier, c.residual_multiplier, c.logits_scaling) == (12.0, 0.22, 16.0)
    assert c.attn_scale == 0.0078125 and c.mlp_bias
    with pytest.raises(ValueError, match="logits_scaling is 0"):
        ModelConfig.from_dict({**g, "logits_scaling": 0})
    other = ModelConfig.from_dict({**BASE, "embedding_multiplier": 12, "attention_multiplier": 0.5})
    assert other.embedding_multiplier == 1.0 and other.attn_scale == 1 / math.sqrt(32)


def test_gemma_defaults_are_transformers():
    """Gemma 1 with no optional field: transformers' GemmaConfig defaults (head_dim 256, tied head) and none of
    Gemma2's caps, scalar or windows, whatever config.json says (transformers' Gemma reads none of them)."""
    c = ModelConfig.from_dict(GEMMA)
    assert (c.head_dim, c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar) == (256, None, None, None)
    assert c.layer_windows == () and c.tie_word_embeddings and c.attn_scale == 1 / 16
    assert c.arch.requires_bos and c.arch.norm_offset == 1.0 and c.arch.embed_scale and not c.arch.sandwich_norms
    c = ModelConfig.from_dict({**GEMMA, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 64,
                               "sliding_window": 8, "head_dim": 32, "attention_bias": True})
    assert (c.final_softcap, c.attn_scale, c.window(0)) == (None, 1 / math.sqrt(32), None) and c.o_bias


@pytest.mark.parametrize("acts,ok", [
    ({"hidden_act": "gelu"}, True),       # the released configs' legacy value: transformers runs tanh GELU
    ({"hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}, True),
    ({"hidden_act": "gelu_pytorch_tanh"}, True),
    ({"hidden_act": "silu"}, False),
    ({"hidden_activation": "gelu"}, False),   # transformers 4.x ran exact GELU for it; ExLlamaV2 runs tanh
])
def test_gemma_activation(acts, ok):
    if ok:
        assert ModelConfig.from_dict({**GEMMA, **acts}).arch.mlp_act == "gelu_tanh"
    else:
        with pytest.raises(ValueError, match="not supported for GemmaForCausalLM"):
            ModelConfig.from_dict({**GEMMA, **acts})
    if acts == {"hidden_act": "gelu"}:       # Gemma2 and Gemma3 have no such legacy value
        with pytest.raises(ValueError, match="hidden_act 'gelu' not supported"):
            ModelConfig.from_dict({**GEMMA2, **acts})


# Gemma3ForConditionalGeneration's config.json: the text fields under text_config, as the real checkpoints
GEMMA3 = dict(architectures=["Gemma3ForConditionalGeneration"], eos_token_id=[1, 106],
              text_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=7, sliding_window=1024,
                               rope_scaling={"rope_type": "linear", "factor": 8.0}, eos_token_id=1),
              vision_config=dict(hidden_size=1152))


def test_gemma3_text_config_and_defaults():
    """text_config's fields are read, with transformers' Gemma3TextConfig defaults where ExLlamaV2's agree (8
    heads, 4 KV heads, vocabulary 262208, head_dim 256); the token ids at the top level (ExLlamaV2 reads them
    there); a full layer every 6th; RoPE 1e6 scaled on the full layers, 10000 on the windowed ones."""
    c = ModelConfig.from_dict(GEMMA3)
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, c.head_dim) == (256, 8, 4, 262208, 256)
    assert c.eos_token_ids == [1, 106] and c.tie_word_embeddings and c.arch.qk_norm
    assert c.layer_windows == (1024,) * 5 + (None, 1024) and c.sliding_window_pattern == 6
    assert (c.rope_theta, c.rope_scaling, c.local_rope_theta) == (1e6, {"rope_type": "linear", "factor": 8.0}, 1e4)
    assert (c.attn_softcap, c.final_softcap, c.query_pre_attn_scalar) == (None, None, 256.0)
    # transformers 5's layout: RoPE per layer type, layer_types stated
    t5 = dict(GEMMA3["text_config"], rope_scaling=None, layer_types=["sliding_attention", "full_attention"] * 3
              + ["sliding_attention"], rope_parameters={
                  "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    c = ModelConfig.from_dict({**GEMMA3, "text_config": t5})
    assert c.sliding_window_pattern == 2 and c.layer_windows == (1024, None) * 3 + (1024,)
    assert (c.rope_theta, c.rope_scaling["factor"]) == (5e5, 4.0)


@pytest.mark.parametrize("text,top,match", [
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention"] + ["sliding_attention"] * 4},
     {}, "layer_types do not follow one sliding_window_pattern"),
    ({"sliding_window_pattern": 1}, {}, "sliding_window_pattern 1 not supported"),
    ({"sliding_window_pattern": 3}, {"sliding_window_pattern": 6}, "differs from text_config's 3"),
    ({"rope_local_base_freq": 20000.0}, {}, "windowed layers' RoPE base 20000 not supported"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling": None},
     {}, "sliding_attention type 'linear' not supported"),
    ({"hidden_activation": "gelu"}, {}, "hidden_activation 'gelu' not supported"),
])
def test_gemma3_refuses_what_exllamav2_would_run_differently(text, top, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**GEMMA3, **top, "text_config": {**GEMMA3["text_config"], **text}})
