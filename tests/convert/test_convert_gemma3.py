"""exl2-convert end to end on a tiny random Gemma3ForConditionalGeneration (tied head; its text model: (1 + w)
norms incl. per-head q/k norms, post-norms, GeGLU, a 16-token window on layer 0 with RoPE base 10000, a full
layer 1 with base 1e6 and linear x8 scaling; a one-layer vision tower; see tests/conftest.py build_tiny).

The tensor names the output must hold are written out below from ExLlamaV2 0.3.2's own source, by hand, not
from our writer; the written config.json is read by ExLlamaV2's config reader (the ``exllamav2`` fixture) and
by transformers'.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert.arch_e2e import (EXL2_LINEAR, build_src, check_inspect, convert_job, exllamav2_config, mean_kl,
                                    output_keys, reload)

LAYERS = 2      # sliding_window_pattern 2: layer 0 windowed, layer 1 full

# What ExLlamaV2 0.3.2 loads and writes for a Gemma3ForConditionalGeneration folder (site-packages/exllamav2/):
# - architecture.py:578-652, the Gemma3 entry: lm_prefix "language_model." (:595), so model.py:99, :108, :133-143
#   look for language_model.model.embed_tokens, language_model.model.layers.{i}, language_model.model.norm and
#   language_model.lm_head (its alternative key language_model.model.embed_tokens, model.py:153: "lm_head" is
#   looked for first, so the quantized head we write is the one it runs); layer_keys_gemma2_norms
#   (architecture.py:13-16), layer_keys_llama_attn (:23-26), layer_keys_llama_mlp (:43-45);
#   default_use_qk_norm True (:609), so attn.py:196-198 reads self_attn.q_norm / k_norm (.weight);
# - module.py:118-119: a quantized linear layer is <key>.q_weight, q_invperm, q_scale, q_scale_max, q_groups;
#   module.py:134-141: an unquantized module is <key>.weight;
# - conversion/compile.py:70-74 and :154-172: every tensor under mmp_prefix "multi_modal_projector." (:647) and
#   vt_prefix "vision_tower.vision_model." (:615) is copied as stored, its name passed through google_keymap
#   (architecture.py:105: mm_input_projection_weight -> mm_input_projection.weight; stloader.py:98-110).
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
         "self_attn.q_norm", "self_attn.k_norm")
LM = "language_model."
EXPECTED_TEXT = ({f"{LM}model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in NORMS}
                 | {f"{LM}model.layers.{i}.{p}.{s}" for i in range(LAYERS) for p in PROJ for s in EXL2_LINEAR}
                 | {f"{LM}model.embed_tokens.weight", f"{LM}model.norm.weight"}
                 | {f"{LM}lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw. Measured on this checkpoint (seed 0):
# validation's 2 held-out rows 0.0244, this file's 4 held-out rows 0.0236 (checkpoints of seeds 1-3:
# 0.022-0.030). Bound: about 1.7x the largest of these, for other BLAS builds and thread counts.
KL_BOUND = 0.05


@pytest.fixture(scope="module")
def gemma3_src(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    d = build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("gemma3"),
                  "gemma3", num_hidden_layers=LAYERS, tie=True)
    # transformers 5 writes the vision tower as vision_tower.*; the published Gemma 3 checkpoints (and ExLlamaV2's
    # vt_prefix) have vision_tower.vision_model.*: store it that way
    t = load_file(str(d / "model.safetensors"))
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    # what ExLlamaV2 reads for the vision tower (config.py:524-532), carried over by the converter
    (d / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="Gemma3ImageProcessor", image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
        rescale_factor=1 / 255, size={"height": 28, "width": 28})))
    return d


@pytest.fixture(scope="module")
def gemma3_job(gemma3_src, tmp_path_factory):
    return convert_job(gemma3_src, tmp_path_factory.mktemp("gemma3_work"))[:2]


def test_tensor_names_are_those_exllamav2_reads_and_writes(gemma3_src, gemma3_job):
    out, _ = gemma3_job
    keys = output_keys(out)
    src = load_file(str(gemma3_src / "model.safetensors"))
    vision = {k.replace("mm_input_projection_weight", "mm_input_projection.weight") for k in src
              if k.startswith(("multi_modal_projector.", "vision_tower.vision_model."))}
    assert "multi_modal_projector.mm_input_projection.weight" in vision and len(vision) == 34
    assert keys == EXPECTED_TEXT | vision, (sorted(keys - EXPECTED_TEXT - vision), sorted(EXPECTED_TEXT - keys))
    got = load_file(str(out / "output.safetensors"))
    for k in src:       # the vision tower and projector as stored; the norms as the source's w in fp16
        if k.startswith("vision_tower.") or k.startswith("multi_modal_projector."):
            assert torch.equal(got[k.replace("mm_input_projection_weight", "mm_input_projection.weight")], src[k])
        elif "norm" in k:
            assert got[k].dtype == torch.float16 and torch.equal(got[k], src[k].half())


def test_inspect_finds_every_layer_valid(gemma3_job):
    out, t = gemma3_job
    check_inspect(out, t, 7 * LAYERS + 1)


def test_exllamav2_reads_the_config_as_transformers_does(gemma3_job, exllamav2):
    """ExLlamaV2's config reader on the written folder finds transformers' values where its defaults differ:
    head_dim 64 (its default 256), 4 and 2 heads (its defaults 8 and 4), query_pre_attn_scalar 48, the 16-token
    window, pattern 2 (its default 6; read at the top level only), RoPE base 1e6 with linear x8 on the full
    layers and its fixed 10000 on the windowed ones, no caps."""
    out, _ = gemma3_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "Gemma3ForConditionalGeneration" and cfg.arch.lm_prefix == "language_model."
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (64, 4, 2, 512)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 256, LAYERS)
    assert cfg.query_pre_attn_scalar == 48 and cfg.sliding_window == 16 and cfg.sliding_window_pattern == 2
    assert (cfg.rotary_embedding_base, cfg.scale_pos_emb) == (1e6, 8.0)
    assert (cfg.rotary_embedding_base_alt, cfg.scale_pos_emb_alt) == (10000, 1)
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None and cfg.use_qk_norm
    assert cfg.norm_eps == 1e-6 and cfg.arch.lm.norm_constant_bias == 1 and cfg.arch.lm.normalize_embeddings
    assert not (cfg.arch.lm.attention_bias_qkv or cfg.arch.lm.attention_bias_o or cfg.arch.lm.mlp_bias)
    from transformers import Gemma3Config                      # and transformers 5 reads the same
    hf = Gemma3Config.from_pretrained(out).text_config
    assert (hf.query_pre_attn_scalar, hf.sliding_window, hf.head_dim) == (48, 16, 64)
    assert hf.layer_types == ["sliding_attention", "full_attention"]
    assert hf.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0


def test_no_kv_profile_and_validation_skips_the_x_modes(gemma3_job):
    out, t = gemma3_job
    assert not (out / "exl2_kv.json").exists()
    v = json.loads((out / "validation.json").read_text())
    assert "not supported for Gemma3ForConditionalGeneration" in v["cache_x_skipped"]


def test_reloaded_model_is_close_to_the_source(gemma3_src, gemma3_job):
    out, t = gemma3_job
    ids, fp, q = reload(gemma3_src, out)     # 4 held-out rows (validation used 2)
    assert type(q.layers[0].self_attn.q_proj).__name__ == "EXL2Linear" and q.layers[0].self_attn.window == 16
    assert q.layers[0].self_attn.rotary is not None and q.layers[1].self_attn.rotary is None
    kl = mean_kl(fp, q, ids)
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    assert 0 < kl < KL_BOUND
