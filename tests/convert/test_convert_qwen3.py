"""exl2-convert end to end on a tiny random Qwen3 (q/k norms per head, head_dim 64 != hidden/heads = 32).

The tensor names the output must hold are written out below from ExLlamaV2 0.3.2's own source, by hand, not
from our writer; the written config.json is read by ExLlamaV2's config reader (the ``exllamav2`` fixture).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.convert.arch_e2e import (EXL2_LINEAR, build_src, check_inspect, convert_job, exllamav2_config, mean_kl,
                                    output_keys, reload)

LAYERS = 2

# What ExLlamaV2 0.3.2 loads for a Qwen3ForCausalLM folder (site-packages/exllamav2/):
# - architecture.py:437-446, the Qwen3 entry: layer_keys_llama_norms (architecture.py:5-6: input_layernorm,
#   post_attention_layernorm), layer_keys_llama_attn (architecture.py:23-26: self_attn.q_proj/k_proj/v_proj/
#   o_proj), layer_keys_llama_mlp (architecture.py:43-45: mlp.down_proj/gate_proj/up_proj), expect_keys_llama
#   (architecture.py:69-71: lm_head, model.norm, model.embed_tokens), and default_use_qk_norm = True;
# - attn.py:196-198: with use_qk_norm, the head norms are "<layer>.self_attn.q_norm" and "<layer>.self_attn.k_norm";
# - module.py:118-119: a quantized linear layer is read as <key>.q_weight, q_invperm, q_scale, q_scale_max,
#   q_groups (q_perm is optional and rebuilt from q_invperm at module.py:120) and <key>.bias exactly where the
#   entry expects one (linear.py:136-138): none for Qwen3, unless config.json's attention_bias is true, which
#   puts one on q, k, v and o (the "Arch overrides", architecture.py:939-941); module.py:134-141: an unquantized
#   module (norms, embedding) is <key>.weight.
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
EXPECTED_PER_LAYER = (
    ["input_layernorm.weight", "post_attention_layernorm.weight",
     "self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    + [f"{proj}.{s}" for proj in ATTN + ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj") for s in EXL2_LINEAR]
)


def expected_names(attention_bias: bool) -> set[str]:
    per_layer = EXPECTED_PER_LAYER + ([f"{proj}.bias" for proj in ATTN] if attention_bias else [])
    return ({f"model.layers.{i}.{k}" for i in range(LAYERS) for k in per_layer}
            | {"model.embed_tokens.weight", "model.norm.weight"} | {f"lm_head.{s}" for s in EXL2_LINEAR})

# KL(FP16 source || reloaded EXL2 model), mean over tokens, at 4.0 bpw, keyed by attention_bias. Measured on these
# checkpoints (seed 0), validation's 2 held-out rows / this file's 4 held-out rows: without bias 0.0609 / 0.0616
# (checkpoints of seeds 1-3: 0.039-0.063); with bias 0.0132 / 0.0123 (the large random biases, which are not
# quantized, dominate the attention outputs). Bounds: about 1.6x and 2x the measured values, for other BLAS builds
# and thread counts. They do not tell whether the layer loop ran the q/k norms (a conversion made with them switched
# off measured 0.052 without bias, on a random model whose attention barely depends on them); the runtime tests
# check the norms against transformers, and measurement and quantization run the runtime's attention module.
KL_BOUND = {False: 0.10, True: 0.025}


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "attention-bias"])
def qwen3_src(request, tmp_path_factory, tiny_builder, tiny_tokenizer) -> Path:
    """The tiny Qwen3; the second one with attention_bias (random biases on q, k, v and o)."""
    return build_src(tiny_builder, tiny_tokenizer, tmp_path_factory.mktemp("qwen3"), "qwen3", num_hidden_layers=LAYERS,
                     attention_bias=request.param)


@pytest.fixture(scope="module")
def qwen3_job(qwen3_src, tmp_path_factory):
    return convert_job(qwen3_src, tmp_path_factory.mktemp("qwen3_work"))[:2]


def test_tensor_names_are_those_exllamav2_reads(qwen3_src, qwen3_job):
    out, _ = qwen3_job
    keys = output_keys(out)
    want = expected_names(json.loads((qwen3_src / "config.json").read_text())["attention_bias"])
    assert keys == want, (sorted(keys - want), sorted(want - keys))


def test_head_norms_are_the_source_in_fp16(qwen3_src, qwen3_job):
    out, _ = qwen3_job
    src = load_file(str(qwen3_src / "model.safetensors"))
    got = load_file(str(out / "output.safetensors"))
    for i in range(LAYERS):
        for which in ("q_norm", "k_norm"):
            key = f"model.layers.{i}.self_attn.{which}.weight"
            assert got[key].dtype == torch.float16 and got[key].shape == (64,)
            assert torch.equal(got[key], src[key].half())
            assert not torch.equal(src[key], torch.ones(64))        # randomised, so a swap would show


def test_inspect_finds_every_layer_valid(qwen3_job):
    out, t = qwen3_job
    check_inspect(out, t, 7 * LAYERS + 1)


def test_exllamav2_reads_the_config_and_finds_its_tensors(qwen3_job, exllamav2):
    """ExLlamaV2's config reader on the written folder: the architecture, head_dim 64 (its own default would be
    hidden / heads = 32), q/k norms on, and every key its architecture table expects present."""
    out, _ = qwen3_job
    cfg = exllamav2_config(exllamav2, out)
    assert cfg.architecture == "Qwen3ForCausalLM"
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert cfg.use_qk_norm and cfg.norm_eps == 1e-6 and cfg.rotary_embedding_base == 1e6
    bias = json.loads((out / "config.json").read_text())["attention_bias"]
    assert cfg.arch.lm.attention_bias_qkv == cfg.arch.lm.attention_bias_o == bias and not cfg.arch.lm.mlp_bias
    assert {f"model.layers.{i}.self_attn.{w}.weight" for i in range(LAYERS) for w in ("q_norm", "k_norm")} \
        <= set(cfg.tensor_file_map)


def test_reloaded_model_is_close_to_the_source(qwen3_src, qwen3_job):
    out, t = qwen3_job
    bound = KL_BOUND[json.loads((qwen3_src / "config.json").read_text())["attention_bias"]]
    assert 0 < t["validation"]["kld_mean"] < bound
    ids, fp, q = reload(qwen3_src, out)     # 4 held-out rows (validation used 2)
    stored = load_file(str(out / "output.safetensors"))
    for i, layer in enumerate(q.layers):           # the runtime runs the head norms the folder holds
        assert type(layer.self_attn.q_proj).__name__ == "EXL2Linear"
        for which in ("q_norm", "k_norm"):
            w = getattr(layer.self_attn, which).weight
            assert torch.equal(w, stored[f"model.layers.{i}.self_attn.{which}.weight"].float())
    kl = mean_kl(fp, q, ids)
    assert 0 < kl < bound
