"""exl2-convert end to end on a tiny random Gemma2 (tied head, (1 + w) norms, post-norms, GeGLU, soft-capping, a
16-token window on layer 0; see tests/conftest.py build_tiny).

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

# What ExLlamaV2 0.3.2 loads for a Gemma2ForCausalLM folder (site-packages/exllamav2/):
# - architecture.py:556-576, the Gemma2 entry: layer_keys_gemma2_norms (architecture.py:13-16: input_layernorm,
#   post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm), layer_keys_llama_attn
#   (architecture.py:23-26: self_attn.q_proj/k_proj/v_proj/o_proj), layer_keys_llama_mlp (architecture.py:43-45:
#   mlp.down_proj/gate_proj/up_proj), expect_keys_gemma (architecture.py:73-74: model.norm, model.embed_tokens);
#   its "lm_head" key is model.embed_tokens, which model.py:141-153 makes the head's alternative key: "lm_head" is
#   looked for first, so the quantized lm_head.* we write is the head it runs;
# - module.py:118-119: a quantized linear layer is read as <key>.q_weight, q_invperm, q_scale, q_scale_max,
#   q_groups (q_perm is optional) and <key>.bias exactly where the entry expects one (none for Gemma2 without
#   attention_bias); module.py:134-141: an unquantized module (norms, embedding) is <key>.weight.
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
EXPECTED = ({f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS}
            | {f"model.layers.{i}.{p}.{s}" for i in range(LAYERS) for p in PROJ for s in EXL2_LINEAR}
            | {"model.embed_tokens.weight", "model.norm.weight"} | {f"lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw. Measured on this checkpoint (seed 0):
# validation's 2 held-out rows 0.0173, this file's 4 held-out rows 0.0168 (checkpoints of seeds 1-3:
# 0.014-0.017; the final cap of 3 squeezes the tiny model's logits, so its KL is small). Bound: about 1.7x the
# measured values, for other BLAS builds and thread counts.
KL_BOUND = 0.03


@pytest.fixture(scope="module")
def gemma2_src(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    return build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("gemma2"),
                     "gemma2", num_hidden_layers=LAYERS, tie=True)


@pytest.fixture(scope="module")
def gemma2_job(gemma2_src, tmp_path_factory):
    return convert_job(gemma2_src, tmp_path_factory.mktemp("gemma2_work"))[:2]


def test_tensor_names_are_those_exllamav2_reads(gemma2_job):
    out, _ = gemma2_job
    check_names(out, EXPECTED)


def test_norms_are_the_source_in_fp16(gemma2_src, gemma2_job):
    """The (1 + w) norms are stored as the source's w (ExLlamaV2 adds the 1 when it loads them, rmsnorm.py:58-59)."""
    out, _ = gemma2_job
    src = check_fp16_copies(gemma2_src, out, [f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS])
    assert "lm_head.weight" not in src            # tied: the head was quantized from the embedding


def test_inspect_finds_every_layer_valid(gemma2_job):
    out, t = gemma2_job
    check_inspect(out, t, 7 * LAYERS + 1)


def test_exllamav2_reads_the_config_as_transformers_does(gemma2_job, exllamav2):
    """ExLlamaV2's config reader on the written folder finds transformers' values where its own defaults differ:
    head_dim 64 (its default hidden / heads = 32), query_pre_attn_scalar 48, both caps, the window."""
    out, _ = gemma2_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "Gemma2ForCausalLM"
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (48, 2.0, 3.0)
    assert cfg.sliding_window == 16 and cfg.sliding_window_pattern == 1 and cfg.arch.lm.alternating_swa
    assert cfg.norm_eps == 1e-6 and cfg.arch.lm.norm_constant_bias == 1 and cfg.arch.lm.normalize_embeddings
    from transformers import Gemma2Config                      # and transformers 5 still reads it
    hf = Gemma2Config.from_pretrained(out)
    assert (hf.query_pre_attn_scalar, hf.attn_logit_softcapping, hf.sliding_window) == (48, 2.0, 16)
    assert not (cfg.arch.lm.attention_bias_qkv or cfg.arch.lm.attention_bias_o or cfg.arch.lm.mlp_bias)


def test_no_kv_profile_and_validation_skips_the_x_modes(gemma2_job):
    """exl2's own cache modes are refused for Gemma2: no exl2_kv.json; validation names why."""
    out, t = gemma2_job
    assert not (out / "exl2_kv.json").exists()
    v = json.loads((out / "validation.json").read_text())
    assert "not supported for Gemma2ForCausalLM" in v["cache_x_skipped"]
    assert set(v["cache"]) == {"fp16", "q8", "q6", "q4"}


def test_reloaded_model_is_close_to_the_source(gemma2_src, gemma2_job):
    out, t = gemma2_job
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    ids, fp, q = reload(gemma2_src, out)     # 4 held-out rows (validation used 2)
    assert type(q.layers[0].self_attn.q_proj).__name__ == "EXL2Linear" and q.layers[0].self_attn.window == 16
    kl = mean_kl(fp, q, ids)
    assert 0 < kl < KL_BOUND


def test_a_cap_that_is_off_stays_off_for_both_readers(exllamav2, tmp_path):
    """A source with attn_logit_softcapping null: the written config says null, which ExLlamaV2 reads as no cap
    and transformers as no cap too (left out, transformers would take its default 50)."""
    from transformers import Gemma2Config

    from exl2.convert.writer import loader_config
    from exl2.runtime.config import ModelConfig

    src = dict(architectures=["Gemma2ForCausalLM"], hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=256, num_hidden_layers=2, vocab_size=512, attn_logit_softcapping=None)
    out = loader_config(src, ModelConfig.from_dict(src), {"quant_method": "exl2"})
    assert out["attn_logit_softcapping"] is None and out["final_logit_softcapping"] == 30.0
    assert (out["head_dim"], out["query_pre_attn_scalar"], out["sliding_window"]) == (256, 256, 4096)
    assert isinstance(out["query_pre_attn_scalar"], int)
    (tmp_path / "config.json").write_text(json.dumps(out))
    cfg = exllamav2.config.ExLlamaV2Config()
    cfg.model_dir = str(tmp_path)
    cfg.prepare(no_tensors=True)
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping == 30.0 and cfg.head_dim == 256
    hf = Gemma2Config.from_pretrained(tmp_path)
    assert hf.attn_logit_softcapping is None and hf.final_logit_softcapping == 30.0
