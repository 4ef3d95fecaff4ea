"""Mixture of experts (Mixtral): our runtime's logits against transformers', routing, config checks."""
import pytest
import torch

from exl2.runtime.arch import ConfigError
from exl2.runtime.config import ModelConfig
from exl2.runtime.cache import KVCache
from exl2.runtime.loader import load_model
from exl2.runtime.model import SparseMLP

# The fp32 logit tolerance of tests/runtime/test_runtime_model.py (ATOL there); measured here: tiny Mixtral
# (4 experts, top 2, router and norms randomised), fp32/bf16/tied sources x seeds 0-2 x [2, 200] tokens: max 9.0e-6;
# tiny Qwen3-MoE (also q/k norms), fp32/bf16/attention_bias sources x seeds 0-2: max 7.4e-6
ATOL = 5e-5


def _ids(seed, B=2, T=200, vocab=512):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _routed_counts(model, ids) -> list[list[int]]:
    """Per layer, how many (token, slot) routes each expert received while the model ran on ids."""
    counts = [[0] * len(m.mlp.experts) for m in model.layers]
    hooks = []
    for li, block in enumerate(model.layers):
        mlp = block.mlp
        orig = mlp.route

        def route(x, orig=orig, li=li):
            w, idx = orig(x)
            for e in range(len(counts[li])):
                counts[li][e] += int((idx == e).sum())
            return w, idx
        mlp.route = route
        hooks.append(mlp)
    with torch.no_grad():
        model(ids)
    for mlp in hooks:
        del mlp.route
    return counts


@pytest.mark.parametrize("kind,kw", [("mixtral", {}), ("mixtral", {"tie": True}), ("mixtral", {"dtype": torch.bfloat16}),
                                     ("qwen3_moe", {}), ("qwen3_moe", {"dtype": torch.bfloat16}),
                                     ("qwen3_moe", {"attention_bias": True})])
def test_moe_logits_match_transformers(tiny_checkpoint, hf_logits, kind, kw):
    d = tiny_checkpoint(kind, **kw)
    ids = _ids(0)
    ref = hf_logits(d, ids)
    model = load_model(d)
    assert all(isinstance(b.mlp, SparseMLP) for b in model.layers)
    # every expert of every layer is routed some tokens, so each expert's weights reach the logits
    counts = _routed_counts(model, ids)
    assert all(c > 0 for layer in counts for c in layer), counts
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"{kind} {kw}: max |diff| {err:.3g}"


@pytest.mark.parametrize("what", ["renorm", "top1", "expert"])
def test_mixtral_negative_controls(tiny_checkpoint, hf_logits, what):
    """Without renormalisation, with one expert per token, or with one expert's weights changed, the logits move
    far beyond ATOL: the test above exercises each."""
    d = tiny_checkpoint("mixtral")
    ids = _ids(1)
    ref = hf_logits(d, ids)
    m = load_model(d)
    for b in m.layers:
        if what == "renorm":
            b.mlp.renorm = False
        elif what == "top1":
            b.mlp.top_k = 1
    if what == "expert":
        w = m.layers[0].mlp.experts[3].down_proj.weight
        w.data = w.data * 1.5
    with torch.no_grad():
        err = (m(ids) - ref).abs().max().item()
    assert err > 1e-2, f"{what}: {err:.3g}"


def test_mixtral_chunked_prefill_equals_full_pass(tiny_checkpoint):
    """Routing is per token, so chunks through the cache give the full pass's logits (test_runtime_model's
    CACHE_ATOL)."""
    m = load_model(tiny_checkpoint("mixtral"))
    ids = _ids(3)
    with torch.no_grad():
        full = m(ids)  # [2, 200, V]
        cache = KVCache(m.cfg, 256, batch_size=2)
        parts = [m(ids[:, s:s + 37], cache) for s in range(0, 200, 37)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 5e-5


def _mixtral_cfg(**kw):
    d = {"architectures": ["MixtralForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512,
         "num_local_experts": 8, "num_experts_per_tok": 2}
    d.update(kw)
    return d


def test_mixtral_config_fields():
    cfg = ModelConfig.from_dict(_mixtral_cfg())
    assert (cfg.num_experts, cfg.experts_per_token, cfg.norm_topk_prob) == (8, 2, True)
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (1e6, 1e-5)    # MixtralConfig's defaults
    with pytest.raises(ConfigError, match="num_experts_per_tok 9 exceeds num_local_experts 8"):
        ModelConfig.from_dict(_mixtral_cfg(num_experts_per_tok=9))
    with pytest.raises(ConfigError, match="num_local_experts"):
        ModelConfig.from_dict({k: v for k, v in _mixtral_cfg().items() if k != "num_local_experts"})


def _qwen3_moe_cfg(**kw):
    d = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 256, "moe_intermediate_size": 96, "num_hidden_layers": 2,
         "vocab_size": 512, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True}
    d.update(kw)
    return d


def test_qwen3_moe_config_fields():
    cfg = ModelConfig.from_dict(_qwen3_moe_cfg())
    assert (cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size, cfg.head_dim) == (8, 2, 96, 128)
    assert cfg.arch.qk_norm
    # transformers 5 writes the count as num_local_experts
    d = _qwen3_moe_cfg(num_local_experts=8)
    del d["num_experts"]
    assert ModelConfig.from_dict(d).num_experts == 8
    for bad, needle in (({"norm_topk_prob": False}, "norm_topk_prob false"), ({"mlp_only_layers": [1]}, "dense layers"),
                        ({"decoder_sparse_step": 2}, "dense layers")):
        with pytest.raises(ConfigError, match=needle):
            ModelConfig.from_dict(_qwen3_moe_cfg(**bad))
    with pytest.raises(ConfigError, match="norm_topk_prob false"):      # transformers' default
        ModelConfig.from_dict({k: v for k, v in _qwen3_moe_cfg().items() if k != "norm_topk_prob"})
