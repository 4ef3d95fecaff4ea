"""The written config.json as ExLlamaV2 0.3.2's own config reader sees it.

The expectation comes from the source checkpoint as transformers (the version installed here, 5.x, which
saves ``rope_parameters`` and no top-level ``rope_theta``) reads it; ExLlamaV2's reader is the ``exllamav2``
fixture (its Python code, run on the written folder).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from exl2.convert.cli import convert_main
from exl2.convert.writer import FOREIGN_FIELDS, loader_config
from exl2.runtime.config import ModelConfig
from click.testing import CliRunner

# (builder kind, extra config) -> one checkpoint per supported architecture and RoPE flavour
CASES = {
    "qwen2": ("qwen2", {}),                                              # theta 1e6
    "qwen3": ("qwen3", {}),                                              # theta 1e6, head_dim 64 != hidden/heads
    "llama3-scaled": ("llama3", {}),                                     # llama3 scaling, theta 5e5
    "llama-linear": ("llama3", {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 250000.0}),
    "mistral": ("mistral", {"rope_theta": 100000.0}),
}


def _build(tiny_builder, tmp_path: Path, case: str) -> Path:
    kind, extra = CASES[case]
    if kind == "llama3" and "rope_scaling" in extra:
        import transformers as tf

        cfg = tf.LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                             num_hidden_layers=1, vocab_size=512, max_position_embeddings=512, **extra)
        torch.manual_seed(0)
        d = tmp_path / case
        tf.LlamaForCausalLM(cfg).save_pretrained(d)
        return d
    return Path(tiny_builder(kind, tmp_path / case, num_hidden_layers=1, **extra))


def _expected(src: Path) -> dict:
    """What transformers reads from the source: RoPE, norm epsilon and the shapes."""
    import transformers as tf

    c = tf.AutoConfig.from_pretrained(src)
    rope = dict(c.rope_parameters)
    return {"theta": float(rope["rope_theta"]), "type": rope.get("rope_type", "default"), "rope": rope,
            "eps": c.rms_norm_eps, "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "ctx": c.max_position_embeddings}


def _exllamav2_reads(exllamav2, folder: Path, tensors: bool = False):
    cfg = exllamav2.config.ExLlamaV2Config()
    cfg.model_dir = str(folder)
    cfg.prepare(no_tensors=not tensors)
    return cfg


def _check(cfg, want: dict) -> None:
    assert cfg.rotary_embedding_base == pytest.approx(want["theta"], rel=1e-12)
    assert cfg.norm_eps == pytest.approx(want["eps"], rel=1e-12)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.max_seq_len) == (want["head_dim"], want["kv_heads"], want["ctx"])
    r = want["rope"]
    if want["type"] == "llama3":
        assert cfg.alt_rope_method == "llama3"
        assert (cfg.l3_rope_factor, cfg.l3_rope_low_freq_factor, cfg.l3_rope_high_freq_factor,
                cfg.l3_rope_original_max_position_embeddings) == (r["factor"], r["low_freq_factor"],
                                                                   r["high_freq_factor"],
                                                                   r["original_max_position_embeddings"])
    elif want["type"] == "linear":
        assert cfg.alt_rope_method is None and cfg.scale_pos_emb == r["factor"]
    else:
        assert want["type"] == "default" and cfg.alt_rope_method is None and cfg.scale_pos_emb == 1.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_config_gives_exllamav2_the_source_rope(case, tiny_builder, tmp_path, exllamav2):
    src = _build(tiny_builder, tmp_path, case)
    raw = json.loads((src / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw            # saved the transformers-5 way
    want = _expected(src)
    # The source config as ExLlamaV2 reads it: base 10000 and no scaling, whatever the model was trained with.
    assert _exllamav2_reads(exllamav2, src).rotary_embedding_base == 10000.0 != want["theta"]
    out = tmp_path / f"{case}-out"
    out.mkdir()
    written = loader_config(raw, ModelConfig.from_dict(raw), {"quant_method": "exl2"})
    (out / "config.json").write_text(json.dumps(written, indent=4))
    _check(_exllamav2_reads(exllamav2, out), want)
    assert "type" not in (written.get("rope_scaling") or {})     # ExLlamaV2 asserts on type + rope_type together
    # transformers still reads the same RoPE from the written file
    back = _expected(out)
    assert (back["theta"], back["type"]) == (want["theta"], want["type"])
    assert {k: v for k, v in back["rope"].items() if k != "type"} == {k: v for k, v in want["rope"].items() if k != "type"}


def test_converted_folder_loads_in_exllamav2_config_with_tensors(tiny_builder, tiny_tokenizer, tmp_path, exllamav2):
    """A real conversion of a transformers-5 llama3-scaled checkpoint: ExLlamaV2's reader, tensor map included
    (it checks that every key its architecture table expects is present), gets the source's RoPE."""
    src = _build(tiny_builder, tmp_path, "llama3-scaled")
    shutil.copy(tiny_tokenizer, src / "tokenizer.json")
    out = tmp_path / "model"
    r = CliRunner().invoke(convert_main, ["-i", str(src), "-o", str(tmp_path / "job"), "-cf", str(out), "-b", "4.0",
                                          "-r", "2", "-l", "32", "-mr", "2", "-ml", "32", "--no-validate"])
    assert r.exit_code == 0, r.output
    assert (out / "exl2_kv.json").is_file()           # exl2's KV profile sits beside the files ExLlamaV2 reads
    cfg = _exllamav2_reads(exllamav2, out, tensors=True)
    _check(cfg, _expected(src))
    assert "lm_head.q_weight" in cfg.tensor_file_map
    assert all(f.endswith(".safetensors") for f in cfg.tensor_files)


def test_fields_exllamav2_would_refuse_or_misread(exllamav2, tmp_path):
    """Several architectures, no rms_norm_eps, a rope_scaling with both type keys, a foreign scale field and a
    pad_token_id list: the written config is one ExLlamaV2 reads, with the values the model runs with."""
    src = dict(architectures=["LlamaForCausalLM", "SomethingElse"], hidden_size=128, num_attention_heads=4,
               intermediate_size=256, num_hidden_layers=1, vocab_size=512, max_position_embeddings=512,
               rope_theta=5e5, rope_scaling={"type": "linear", "rope_type": "linear", "factor": 4.0},
               logit_scale=0.25, pad_token_id=[0, 1], auto_map={"AutoModel": "modeling_x.Model"})
    for d, name in ((src, "src"), (loader_config(src, ModelConfig.from_dict(src), {"quant_method": "exl2"}), "out")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(d))
    with pytest.raises(AssertionError):                       # several architectures
        _exllamav2_reads(exllamav2, tmp_path / "src")
    cfg = _exllamav2_reads(exllamav2, tmp_path / "out")
    assert cfg.architecture == "LlamaForCausalLM" and cfg.norm_eps == 1e-6
    assert cfg.scale_pos_emb == 4.0 and cfg.rotary_embedding_base == 5e5 and cfg.logit_scale == 1
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in written and "pad_token_id" not in written
    assert not set(FOREIGN_FIELDS) & set(written)


def test_qwen3_head_dim_and_qk_norm_as_exllamav2_reads_them(exllamav2, tmp_path):
    """A Qwen3 config.json without head_dim: transformers takes 128, ExLlamaV2 hidden / heads (64 here); the
    written config states 128 and use_qk_norm, and restates attention_bias."""
    src = dict(architectures=["Qwen3ForCausalLM"], hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=256, num_hidden_layers=1, vocab_size=512, rms_norm_eps=1e-6, attention_bias=True,
               use_qk_norm=False)
    for d, name in ((src, "src"), (loader_config(src, ModelConfig.from_dict(src), {"quant_method": "exl2"}), "out")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(d))
    before = _exllamav2_reads(exllamav2, tmp_path / "src")
    assert before.head_dim == 64 and not before.use_qk_norm
    cfg = _exllamav2_reads(exllamav2, tmp_path / "out")
    assert cfg.head_dim == 128 and cfg.use_qk_norm
    assert cfg.arch.lm.attention_bias_qkv and cfg.arch.lm.attention_bias_o and not cfg.arch.lm.mlp_bias
