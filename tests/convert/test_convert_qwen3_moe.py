"""exl2-convert end to end on a tiny random Qwen3-MoE (Qwen3's attention with q/k norms, 4 experts, top 2).

The sparse block is measured, quantized and written as Mixtral's (tests/convert/test_convert_mixtral.py covers the
routing, the accounting and an unrouted expert); this file checks what differs: the names, the config fields and
the q/k norms. The expected names are written out by hand from ExLlamaV2 0.3.2's source, not from our writer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.convert.arch_e2e import (build_src, check_inspect, check_names, convert_job, EXL2_LINEAR, exllamav2_config,
                                    mean_kl, reload)

LAYERS, EXPERTS, C, INTER = 2, 4, 128, 128

# What ExLlamaV2 0.3.2 loads for a Qwen3MoeForCausalLM folder (site-packages/exllamav2/):
# - architecture.py:450-466, the Qwen3MoE entry: layer_keys_llama_norms (architecture.py:5-6: input_layernorm,
#   post_attention_layernorm), layer_keys_llama_attn (architecture.py:23-26: self_attn.q_proj/k_proj/v_proj/
#   o_proj), layer_keys_qwen3moe_mlp (architecture.py:56-59: mlp.experts.*.gate_proj/up_proj/down_proj and
#   mlp.gate), expect_keys_llama (architecture.py:69-71), default_use_qk_norm = True (attn.py:196-198:
#   self_attn.q_norm, self_attn.k_norm); keys mlp_gate/mlp_up/mlp_down = mlp.experts.*.gate_proj/up_proj/
#   down_proj, mlp_expert_gate = mlp.gate;
# - moe_mlp.py:75-87 and conversion/compile.py:117-124: the router written as "<key>.weight" (compile.py:34-45),
#   every expert's projections quantized; module.py:118-119: <key>.q_weight, q_invperm, q_scale, q_scale_max,
#   q_groups; no bias (attention_bias false here).
PROJ = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + tuple(f"mlp.experts.{e}.{w}" for e in range(EXPERTS) for w in ("gate_proj", "up_proj", "down_proj")))
EXPECTED_PER_LAYER = (["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                       "self_attn.k_norm.weight", "mlp.gate.weight"] + [f"{p}.{s}" for p in PROJ for s in EXL2_LINEAR])
EXPECTED = ({f"model.layers.{i}.{k}" for i in range(LAYERS) for k in EXPECTED_PER_LAYER}
            | {"model.embed_tokens.weight", "model.norm.weight"} | {f"lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw (3.977 reached). Measured on this checkpoint
# (seed 0): validation's 2 held-out rows 0.0603 / this file's 4 held-out rows 0.0561; checkpoints of seeds 1-3:
# 0.042-0.056. Bound about 1.7x the largest, for other BLAS builds and thread counts.
KL_BOUND = 0.10


@pytest.fixture(scope="module")
def q3m_src(tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    return build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("q3m"),
                     "qwen3_moe", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def q3m_job(q3m_src, tmp_path_factory):
    return convert_job(q3m_src, tmp_path_factory.mktemp("q3m_work"))


def test_tensor_names_are_those_exllamav2_reads(q3m_job):
    out, _, job = q3m_job
    check_names(out, EXPECTED)
    m = json.loads((job / "measurement.json").read_text())["measurement"]   # ExLlamaV2's MoE module key for it too
    assert {f"model.layers.{i}.block_sparse_moe" for i in range(LAYERS)} <= set(m)


def test_router_and_head_norms_are_the_source_in_fp16(q3m_src, q3m_job):
    out, _, _ = q3m_job
    src, got = load_file(str(q3m_src / "model.safetensors")), load_file(str(out / "output.safetensors"))
    for i in range(LAYERS):
        for key in (f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.self_attn.q_norm.weight",
                    f"model.layers.{i}.self_attn.k_norm.weight"):
            assert got[key].dtype == torch.float16 and torch.equal(got[key], src[key].half())


def test_inspect_finds_every_layer_valid(q3m_job):
    out, t, _ = q3m_job
    check_inspect(out, t, (4 + 3 * EXPERTS) * LAYERS + 1, text=False)


def test_exllamav2_reads_the_config_and_finds_its_tensors(q3m_job, exllamav2):
    out, _, _ = q3m_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "Qwen3MoeForCausalLM" and cfg.arch.lm.is_moe and cfg.use_qk_norm
    assert (cfg.num_experts, cfg.num_experts_per_token, cfg.intermediate_size, cfg.head_dim) == (EXPERTS, 2, INTER, 64)
    assert {f"model.layers.{i}.mlp.gate.weight" for i in range(LAYERS)} <= set(cfg.tensor_file_map)
    written = json.loads((out / "config.json").read_text())
    assert written["norm_topk_prob"] is True and written["moe_intermediate_size"] == INTER


def test_reloaded_model_is_close_to_the_source(q3m_src, q3m_job):
    out, t, _ = q3m_job
    assert 0 < t["validation"]["kld_mean"] < KL_BOUND
    ids, fp, q = reload(q3m_src, out)     # 4 held-out rows (validation used 2)
    assert type(q.layers[1].mlp.experts[2].up_proj).__name__ == "EXL2Linear"
    kl = mean_kl(fp, q, ids)
    assert 0 < kl < KL_BOUND
