"""exl2-convert end to end on a tiny random Gemma 1 (GemmaForCausalLM: tied head, (1 + w) norms, GeGLU,
embeddings times sqrt(hidden), head_dim 64 != hidden / heads; see fixtures/tiny.py build_tiny).

The tensor names the output must hold are written out below from ExLlamaV2 0.3.2's own source, by hand, not
from our writer; the written config.json is read by ExLlamaV2's config reader (the ``exllamav2`` fixture).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.convert.arch_e2e import (build_src, check_fp16_copies, check_inspect, check_names, convert_job, EXL2_LINEAR,
                                    exllamav2_config, mean_kl, reload)

LAYERS = 2

# What ExLlamaV2 0.3.2 loads for a GemmaForCausalLM folder (site-packages/exllamav2/):
# - architecture.py:538-552, the Gemma entry: layer_keys_llama_norms (architecture.py:6-7: input_layernorm,
#   post_attention_layernorm), layer_keys_llama_attn (architecture.py:23-26: self_attn.q_proj/k_proj/v_proj/
#   o_proj), layer_keys_llama_mlp (architecture.py:43-45: mlp.down_proj/gate_proj/up_proj), expect_keys_gemma
#   (architecture.py:73-74: model.norm, model.embed_tokens); its "lm_head" key is model.embed_tokens, which
#   model.py:141-153 makes the head's alternative key: "lm_head" is looked for first, so the quantized lm_head.*
#   we write is the head it runs;
# - module.py:118-119: a quantized linear layer is read as <key>.q_weight, q_invperm, q_scale, q_scale_max,
#   q_groups (q_perm is optional) and <key>.bias exactly where the entry expects one (none for Gemma without
#   attention_bias); module.py:134-141: an unquantized module (norms, embedding) is <key>.weight.
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
EXPECTED = ({f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS}
            | {f"model.layers.{i}.{p}.{s}" for i in range(LAYERS) for p in PROJ for s in EXL2_LINEAR}
            | {"model.embed_tokens.weight", "model.norm.weight"} | {f"lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw. Measured on this checkpoint (seed 0):
# validation's 2 held-out rows 0.0367, this file's 4 held-out rows 0.0354 (checkpoints of seeds 1-3:
# 0.032-0.037). Bound: about 1.6x the measured values, for other BLAS builds and thread counts.
KL_BOUND = 0.06


@pytest.fixture(scope="module")
def gemma_src(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    return build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("gemma"),
                     "gemma", num_hidden_layers=LAYERS, tie=True)


@pytest.fixture(scope="module")
def gemma_job(gemma_src, tmp_path_factory):
    return convert_job(gemma_src, tmp_path_factory.mktemp("gemma_work"))[:2]


def test_tensor_names_are_those_exllamav2_reads(gemma_job):
    out, _ = gemma_job
    check_names(out, EXPECTED)


def test_norms_are_the_source_in_fp16(gemma_src, gemma_job):
    """The (1 + w) norms are stored as the source's w (ExLlamaV2 adds the 1 when it loads them, rmsnorm.py:58-59)."""
    out, _ = gemma_job
    src = check_fp16_copies(gemma_src, out, [f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS])
    assert "lm_head.weight" not in src            # tied: the head was quantized from the embedding


def test_inspect_finds_every_layer_valid(gemma_job):
    out, t = gemma_job
    check_inspect(out, t, 7 * LAYERS + 1)


def test_exllamav2_reads_the_config_as_transformers_does(gemma_job, exllamav2):
    """ExLlamaV2's config reader on the written folder finds transformers' values where its own defaults differ
    (head_dim 64, not its default hidden / heads = 32) and none of Gemma2's settings: no caps, no
    query_pre_attn_scalar (so the scale is 1 / sqrt(head_dim), as transformers' Gemma), no window."""
    out, _ = gemma_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "GemmaForCausalLM"
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (None,) * 3
    assert not (cfg.arch.lm.swa or cfg.arch.lm.alternating_swa) and cfg.arch.lm.mlp_act_func == "gelu"
    assert cfg.norm_eps == 1e-6 and cfg.arch.lm.norm_constant_bias == 1 and cfg.arch.lm.normalize_embeddings
    assert (cfg.scale_emb, cfg.scale_depth, cfg.logit_scale) == (1, 1, 1)
    assert not (cfg.arch.lm.attention_bias_qkv or cfg.arch.lm.attention_bias_o or cfg.arch.lm.mlp_bias)
    from transformers import GemmaConfig                       # and transformers 5 still reads it
    hf = GemmaConfig.from_pretrained(out)
    assert (hf.head_dim, hf.hidden_act, hf.tie_word_embeddings) == (64, "gelu_pytorch_tanh", True)


def test_no_kv_profile_and_validation_skips_the_x_modes(gemma_job):
    """exl2's own cache modes are refused for Gemma (their emulation does not scale the embeddings)."""
    out, t = gemma_job
    assert not (out / "exl2_kv.json").exists()
    v = json.loads((out / "validation.json").read_text())
    assert "not supported for GemmaForCausalLM" in v["cache_x_skipped"]
    assert set(v["cache"]) == {"fp16", "q8", "q6", "q4"}


def test_reloaded_model_is_close_to_the_source(gemma_src, gemma_job):
    out, t = gemma_job
    ids, fp, q = reload(gemma_src, out)     # 4 held-out rows (validation used 2)
    assert type(q.layers[0].self_attn.q_proj).__name__ == "EXL2Linear"
    kl = mean_kl(fp, q, ids)
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    assert 0 < kl < KL_BOUND
