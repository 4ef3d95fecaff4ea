"""exl2-convert end to end on a tiny random GLM-4 (Glm4ForCausalLM: norms after attention and after the MLP under
GLM's names, gate and up stored as one gate_up_proj, RoPE interleaved on half of each head, q/k/v biases; see
fixtures/tiny.py build_tiny).

The tensor names the output must hold are written out below from ExLlamaV2 0.3.2's own source, by hand, not
from our writer; the written config.json is read by ExLlamaV2's config reader (the ``exllamav2`` fixture).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from tests.convert.arch_e2e import (build_src, check_fp16_copies, check_inspect, check_names, convert_job, EXL2_LINEAR,
                                    exllamav2_config, mean_kl, reload)

LAYERS = 2

# What ExLlamaV2 0.3.2 loads for a Glm4ForCausalLM folder (site-packages/exllamav2/):
# - architecture.py:902-920, the GLM4 entry: layer_keys_glm4_norms (architecture.py:19-22: input_layernorm,
#   post_self_attn_layernorm, post_attention_layernorm, post_mlp_layernorm; its keys norm_1, norm_1_post, norm_2,
#   norm_2_post in that order), layer_keys_llama_attn (architecture.py:23-26: self_attn.q_proj/k_proj/v_proj/
#   o_proj), layer_keys_phi3_mlp (architecture.py:49-51: mlp.down_proj, mlp.gate_up_proj or mlp.gate_proj /
#   up_proj), expect_keys_llama (architecture.py:70-72: lm_head, model.norm, model.embed_tokens); "fused_mlp_12"
#   is "gate_up_proj", and as for Phi-3 (tests/convert/test_convert_phi3.py) its converter quantizes and writes
#   gate and up under their own names, which its loader falls back to; attention_bias_qkv is config.json's
#   attention_bias (architecture.py:920), so q, k and v carry <key>.bias and o none;
# - module.py:118-119: a quantized linear layer is read as <key>.q_weight, q_invperm, q_scale, q_scale_max,
#   q_groups (q_perm is optional); module.py:134-141: an unquantized module (norms, embedding) is <key>.weight.
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
NORMS = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")
EXPECTED = ({f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS}
            | {f"model.layers.{i}.{p}.{s}" for i in range(LAYERS) for p in PROJ for s in EXL2_LINEAR}
            | {f"model.layers.{i}.self_attn.{p}.bias" for i in range(LAYERS) for p in ("q_proj", "k_proj", "v_proj")}
            | {"model.embed_tokens.weight", "model.norm.weight"} | {f"lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw. Measured on this checkpoint (seed 0):
# validation's 2 held-out rows 0.0207, this file's 4 held-out rows 0.0202 (checkpoints of seeds 1-3:
# 0.022-0.033). Bound: about 1.5x the largest of these, for other BLAS builds and thread counts.
KL_BOUND = 0.05


@pytest.fixture(scope="module")
def glm4_src(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    return build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("glm4"), "glm4", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def glm4_job(glm4_src, tmp_path_factory):
    return convert_job(glm4_src, tmp_path_factory.mktemp("glm4_work"))[:2]


def test_source_is_fused(glm4_src):
    with safe_open(str(glm4_src / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys and "model.layers.0.mlp.gate_proj.weight" not in keys


def test_tensor_names_are_those_exllamav2_reads(glm4_job):
    out, _ = glm4_job
    check_names(out, EXPECTED)


def test_norms_are_the_source_in_fp16(glm4_src, glm4_job):
    out, _ = glm4_job
    check_fp16_copies(glm4_src, out, [f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS])


def test_inspect_finds_every_layer_valid(glm4_job):
    out, t = glm4_job
    check_inspect(out, t, 7 * LAYERS + 1)


def test_exllamav2_reads_the_config_as_transformers_does(glm4_job, exllamav2):
    """ExLlamaV2's config reader on the written folder: head_dim 64 (its default hidden / heads = 32), the
    partial_rotary_factor 0.5 (its default 1.0), the q/k/v bias (attention_bias stated: its default is false,
    transformers' true), GPT-J RoPE."""
    out, _ = glm4_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "Glm4ForCausalLM"
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.partial_rotary_factor) == \
        (64, 4, 2, 0.5)
    assert cfg.arch.lm.attention_bias_qkv and not (cfg.arch.lm.attention_bias_o or cfg.arch.lm.mlp_bias)
    assert cfg.arch.lm.rope_style == exllamav2.architecture.RopeStyle.GPTJ and cfg.norm_eps == 1.5625e-7
    assert cfg.query_pre_attn_scalar is None and cfg.attention_multiplier is None
    from transformers import Glm4Config                        # and transformers 5 still reads it
    hf = Glm4Config.from_pretrained(out)
    assert (hf.head_dim, hf.attention_bias, hf.rope_parameters["partial_rotary_factor"]) == (64, True, 0.5)


def test_reloaded_model_is_close_to_the_source(glm4_src, glm4_job):
    out, t = glm4_job
    ids, fp, q = reload(glm4_src, out)     # 4 held-out rows (validation used 2)
    assert type(q.layers[0].mlp.gate_proj).__name__ == "EXL2Linear" and q.cfg.rotary_dim == 32
    kl = mean_kl(fp, q, ids)
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    assert 0 < kl < KL_BOUND
