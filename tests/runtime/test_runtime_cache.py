"""KV cache: FP and quantized (Q8/Q6/Q4) modes, ExLlamaV2 semantics (docs/cache.md sections 3-4)."""
import pytest
import torch
from exl2.runtime.config import ModelConfig
from exl2.runtime.cache import EXL2_MODES, MODES, KVCache, LayerKV, bytes_per_token
from exl2.runtime.kv_x import X_MODES
from exl2.quant_kernels import kv_quant
from exl2.runtime.loader import load_model

QWEN2_7B = ModelConfig.from_dict(dict(
    architectures=["Qwen2ForCausalLM"], hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
    intermediate_size=18944, num_hidden_layers=28, vocab_size=152064))


def test_modes_agree_with_kv_quant():
    assert EXL2_MODES == kv_quant.KV_MODES                    # ExLlamaV2's modes, unchanged
    assert list(MODES) == [*EXL2_MODES, *X_MODES]             # exl2's own after them


@pytest.mark.parametrize("mode,expected", [
    # Qwen2-7B: kv dim 4*128 = 512, 28 layers. fp16: 2 (K,V) * 512 * 2 bytes; q8: 2 * (512 + 16 scales * 2)
    ("fp16", 2 * 512 * 2 * 28), ("q8", 2 * (512 + 32) * 28), ("q6", (512 + 32 + 256 + 32) * 28),
    ("q4", 2 * (256 + 32) * 28),
])
def test_bytes_per_token(mode, expected):
    assert bytes_per_token(QWEN2_7B, mode) == expected
    assert expected == kv_quant.kv_bytes_per_token(mode, 4, 128, 28)


def test_bytes_per_token_fp_storage_dtype():
    c = KVCache(QWEN2_7B, 4, mode="fp16", dtype=torch.float32)  # default storage = compute dtype
    assert c.bytes_per_token() == 2 * 512 * 4 * 28
    c = KVCache(QWEN2_7B, 4, mode="fp16", dtype=torch.float32, storage_dtype=torch.float16)
    assert c.bytes_per_token() == 2 * 512 * 2 * 28


def test_unknown_mode():
    with pytest.raises(ValueError, match="'q5' not supported"):
        KVCache(QWEN2_7B, 4, mode="q5")


@pytest.mark.parametrize("mode", ["q8", "q6", "q4"])
def test_layer_semantics_past_dequantized_chunk_unquantized(mode):
    """Past = dequantize(quantize(past)); the chunk's own K/V come back untouched."""
    kb, vb = MODES[mode]
    g = torch.Generator().manual_seed(0)
    layer = LayerKV(1, 16, 2, 32, mode, torch.float32, "cpu")
    k1, v1 = torch.randn(1, 5, 2, 32, generator=g), torch.randn(1, 5, 2, 32, generator=g)  # [B, T, Hkv, D]
    k2, v2 = torch.randn(1, 3, 2, 32, generator=g), torch.randn(1, 3, 2, 32, generator=g)
    ka, va = layer.update(k1, v1, 0)
    assert torch.equal(ka, k1) and torch.equal(va, v1)
    kb_all, vb_all = layer.update(k2, v2, 5)  # [1, 8, 2, 32]
    for x, bits, got in ((k1, kb, kb_all), (v1, vb, vb_all)):
        rows = x.reshape(1, 5, 64).half()  # [B, T, Hkv*D]
        ref = kv_quant.kv_dequantize(*kv_quant.kv_quantize(rows, bits), bits, 64).float().view(1, 5, 2, 32)
        assert torch.equal(got[:, :5], ref)
        assert not torch.equal(got[:, :5], x)  # really went through the quantizer
    assert torch.equal(kb_all[:, 5:], k2) and torch.equal(vb_all[:, 5:], v2)


def test_each_token_quantized_once(tiny_checkpoint, monkeypatch):
    m = load_model(tiny_checkpoint("qwen2"))
    rows = []
    from exl2.quant_kernels import ops

    real = ops.kv_quantize   # the cache's front door (native or reference)

    def spy(x, bits):
        rows.append(x.shape[1])  # tokens in this call
        return real(x, bits)

    monkeypatch.setattr(ops, "kv_quantize", spy)
    cache = KVCache(m.cfg, 64, mode="q4")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(ids[:, :7], cache)  # chunks of odd sizes, then single-token steps
        m(ids[:, 7:30], cache)
        for i in range(30, 40):
            m(ids[:, i:i + 1], cache)
    # per layer, K and V: each of the 40 tokens quantized exactly once
    assert sum(rows) == 40 * 2 * m.cfg.num_layers


def test_fp16_storage_chunk_uses_own_kv_unrounded(tiny_checkpoint):
    m = load_model(tiny_checkpoint("qwen2"))
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.cfg, 32, mode="fp16", storage_dtype=torch.float16)
        first = m(ids, cache)
    assert torch.equal(first, full)  # nothing was rounded for the chunk's own attention
    assert cache.layers[0].k.dtype == torch.float16


# KL(full fp32 pass || token-by-token pass through the cache), mean over 96 positions. Measured max over
# Qwen2 and Llama-3 tiny models x 3 seeds: fp16 storage 1.95e-7, q8 1.6e-4, q6 1.8e-2, q4 3.6e-2 (random
# tiny models have unstructured K/V, so 4-bit V hurts more than on trained models). Bounds ~5x measured.
KL_BOUND = {"fp16": 1e-6, "q8": 1e-3, "q6": 0.1, "q4": 0.2}


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_token_by_token_kl_per_mode(tiny_checkpoint, kind):
    m = load_model(tiny_checkpoint(kind))
    ids = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(0))
    kls = {}
    with torch.no_grad():
        ref = m(ids).log_softmax(-1)  # [1, 96, V]
        for mode in KL_BOUND:
            cache = KVCache(m.cfg, 96, mode=mode, storage_dtype=torch.float16 if mode == "fp16" else None)
            out = torch.cat([m(ids[:, i:i + 1], cache) for i in range(96)], dim=1).log_softmax(-1)
            kls[mode] = (ref.exp() * (ref - out)).sum(-1).mean().item()
    for mode, bound in KL_BOUND.items():
        assert kls[mode] < bound, kls
    assert kls["fp16"] < kls["q8"] < kls["q6"] < kls["q4"], kls


def test_quantized_cache_needs_kv_dim_multiple_of_64():
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=96, num_attention_heads=3,
                                     num_key_value_heads=1, intermediate_size=64, num_hidden_layers=1,
                                     vocab_size=10))
    with pytest.raises(ValueError, match="kv_heads\\*head_dim = 32 is not a multiple of 64"):
        KVCache(cfg, 8, mode="q8")
    KVCache(cfg, 8, mode="fp16")


def test_reset_and_batch_check(tiny_checkpoint):
    m = load_model(tiny_checkpoint("qwen2"))
    cache = KVCache(m.cfg, 16, mode="q8", batch_size=2)
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = m(ids, cache)
        cache.reset()
        b = m(ids, cache)
        assert torch.equal(a, b) and cache.past_len == 5
        with pytest.raises(ValueError, match="batch 1 != cache batch_size 2"):
            m(ids[:1], cache)


@pytest.mark.parametrize("mode", ["q4", "q8"])
def test_reset_cache_equals_fresh_cache(tiny_checkpoint, mode):
    """The dequantized working copy must not leak tokens of an earlier row after reset()."""
    m = load_model(tiny_checkpoint("qwen2"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 512, (1, 24), generator=g), torch.randint(0, 512, (1, 24), generator=g)

    def token_by_token(ids, cache):
        with torch.no_grad():
            return torch.cat([m(ids[:, i:i + 1], cache) for i in range(ids.shape[1])], dim=1)

    reused = KVCache(m.cfg, 64, mode=mode)
    token_by_token(a, reused)
    reused.reset()
    got = token_by_token(b, reused)
    want = token_by_token(b, KVCache(m.cfg, 64, mode=mode))
    assert torch.equal(got, want)
