"""exl2-convert end to end on a tiny random Granite (GraniteForCausalLM: the Llama layout with embedding,
residual, attention and logits multipliers of 3, 0.5, 0.05 and 2; see fixtures/tiny.py build_tiny).

The tensor names the output must hold are written out below from ExLlamaV2 0.3.2's own source, by hand, not
from our writer; the written config.json is read by ExLlamaV2's config reader (the ``exllamav2`` fixture).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.convert.arch_e2e import (build_src, check_inspect, check_names, convert_job, EXL2_LINEAR, exllamav2_config,
                                    mean_kl, reload)

LAYERS = 2

# What ExLlamaV2 0.3.2 loads for a GraniteForCausalLM folder (site-packages/exllamav2/):
# - architecture.py:891-898, the Granite entry: layer_keys_llama_norms (architecture.py:6-7: input_layernorm,
#   post_attention_layernorm), layer_keys_llama_attn (architecture.py:23-26: self_attn.q_proj/k_proj/v_proj/
#   o_proj), layer_keys_llama_mlp (architecture.py:43-45: mlp.down_proj/gate_proj/up_proj), expect_keys_llama
#   (architecture.py:70-72: lm_head, model.norm, model.embed_tokens);
# - module.py:118-119: a quantized linear layer is read as <key>.q_weight, q_invperm, q_scale, q_scale_max,
#   q_groups (q_perm is optional) and <key>.bias exactly where the entry expects one (none without
#   attention_bias / mlp_bias); module.py:134-141: an unquantized module (norms, embedding) is <key>.weight.
# - config.py:330-346: logits_scaling, embedding_multiplier and residual_multiplier, and config.py:306
#   attention_multiplier, are read for every architecture (as logit_scale = 1 / logits_scaling, scale_emb,
#   scale_depth and the attention scale).
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
EXPECTED = ({f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS}
            | {f"model.layers.{i}.{p}.{s}" for i in range(LAYERS) for p in PROJ for s in EXL2_LINEAR}
            | {"model.embed_tokens.weight", "model.norm.weight"} | {f"lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw. Measured on this checkpoint (seed 0):
# validation's 2 held-out rows 0.0095, this file's 4 held-out rows 0.0082 (checkpoints of seeds 1-3:
# 0.0077-0.0090; logits_scaling 2 halves the logits, so the KL is small). Bound: about 1.7x the measured values,
# for other BLAS builds and thread counts.
KL_BOUND = 0.016


@pytest.fixture(scope="module")
def granite_src(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    return build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("granite"),
                     "granite", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def granite_job(granite_src, tmp_path_factory):
    return convert_job(granite_src, tmp_path_factory.mktemp("granite_work"))[:2]


def test_tensor_names_are_those_exllamav2_reads(granite_job):
    out, _ = granite_job
    check_names(out, EXPECTED)


def test_inspect_finds_every_layer_valid(granite_job):
    out, t = granite_job
    check_inspect(out, t, 7 * LAYERS + 1)


def test_exllamav2_reads_the_multipliers_as_transformers_does(granite_job, exllamav2):
    """ExLlamaV2's config reader on the written folder: the four multipliers as transformers' (logit_scale is
    ExLlamaV2's reciprocal of logits_scaling)."""
    out, _ = granite_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "GraniteForCausalLM"
    assert (cfg.scale_emb, cfg.scale_depth, cfg.attention_multiplier, cfg.logit_scale) == (3.0, 0.5, 0.05, 0.5)
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 4, 2)
    assert not (cfg.arch.lm.attention_bias_qkv or cfg.arch.lm.attention_bias_o or cfg.arch.lm.mlp_bias)
    from transformers import GraniteConfig                     # and transformers 5 still reads it
    hf = GraniteConfig.from_pretrained(out)
    assert (hf.embedding_multiplier, hf.residual_multiplier, hf.attention_multiplier, hf.logits_scaling) == \
        (3.0, 0.5, 0.05, 2.0)


def test_no_kv_profile_and_validation_skips_the_x_modes(granite_job):
    """exl2's own cache modes are refused for Granite (their emulation applies none of the multipliers)."""
    out, t = granite_job
    assert not (out / "exl2_kv.json").exists()
    v = json.loads((out / "validation.json").read_text())
    assert "not supported for GraniteForCausalLM" in v["cache_x_skipped"]


def test_reloaded_model_is_close_to_the_source(granite_src, granite_job):
    out, t = granite_job
    ids, fp, q = reload(granite_src, out)     # 4 held-out rows (validation used 2)
    assert type(q.layers[0].self_attn.q_proj).__name__ == "EXL2Linear" and q.layers[0].residual_scale == 0.5
    kl = mean_kl(fp, q, ids)
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    assert 0 < kl < KL_BOUND
