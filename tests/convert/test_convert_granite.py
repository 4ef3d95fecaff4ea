"""exl2-convert end to end on a tiny random Granite (GraniteForCausalLM: the Llama layout with embedding,
residual, attention and logits multipliers of 3, 0.5, 0.05 and 2; see fixtures/tiny.py build_tiny).

The tensor names the output must hold are written out below from ExLlamaV2 0.3.2's own source, by hand, not
from our writer; the written config.json is read by ExLlamaV2's config reader (the ``exllamav2`` fixture).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from exl2.calibration import default_rows
from exl2.convert.api import ConvertOptions, convert
from exl2.convert.cli import inspect_main
from exl2.convert.validate import held_out_rows
from exl2.runtime.loader import load_model

# The settings of test_convert.py's tiny end-to-end conversions.
SMALL = dict(rows=4, length=64, measurement_rows=4, measurement_length=64, validation_rows=2)
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
EXL2_LINEAR = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
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
    d = Path(tiny_builder("granite", tmp_path_factory.mktemp("granite") / "model", num_hidden_layers=LAYERS))
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def granite_job(granite_src, tmp_path_factory):
    work = tmp_path_factory.mktemp("granite_work")
    r = convert(ConvertOptions(in_dir=str(granite_src), work_dir=str(work / "job"), bits=[4.0],
                               compile_dir=str(work / "out"), **SMALL))
    return work / "out", r["targets"][0]


def test_tensor_names_are_those_exllamav2_reads(granite_job):
    out, _ = granite_job
    with safe_open(str(out / "output.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == EXPECTED, (sorted(keys - EXPECTED), sorted(EXPECTED - keys))


def test_inspect_finds_every_layer_valid(granite_job):
    out, t = granite_job
    r = CliRunner().invoke(inspect_main, [str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert not rep["errors"] and len(rep["layers"]) == 7 * LAYERS + 1
    assert rep["decoder_bpw"] == pytest.approx(t["bpw"], rel=1e-9) and 3.8 < t["bpw"] <= 4.0
    assert "all layers valid" in CliRunner().invoke(inspect_main, [str(out)]).output


def test_exllamav2_reads_the_multipliers_as_transformers_does(granite_job, exllamav2):
    """ExLlamaV2's config reader on the written folder: the four multipliers as transformers' (logit_scale is
    ExLlamaV2's reciprocal of logits_scaling)."""
    out, _ = granite_job
    cfg = exllamav2.config.ExLlamaV2Config()
    cfg.model_dir = str(out)
    cfg.prepare()
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


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_reloaded_model_is_close_to_the_source(granite_src, granite_job):
    out, t = granite_job
    tok = granite_src / "tokenizer.json"
    used = default_rows(tok, rows=SMALL["rows"], length=SMALL["length"], vocab_size=512).input_ids   # calibration
    ids = held_out_rows(tok, used, 4, 64, None, 512)     # 4 rows the quantizer never saw (validation used 2)
    fp, q = load_model(granite_src), load_model(out)
    assert type(q.layers[0].self_attn.q_proj).__name__ == "EXL2Linear" and q.layers[0].residual_scale == 0.5
    with torch.no_grad():
        kl = _kl(fp(ids), q(ids))
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    assert 0 < kl < KL_BOUND
