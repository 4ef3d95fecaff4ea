"""The one-pass emulation of token-by-token cache decoding (runtime/onepass.py): the same logits as feeding the
row through a real cache one token at a time, for every cache mode and for the attention variants it must
carry (sliding windows, soft-capping, per-layer RoPE, q/k norms, fused projections), and scoring through it in
evaluate_rows."""
from __future__ import annotations

import pytest
import torch

from exl2.runtime import kv_calib
from exl2.runtime.cache import KVCache
from exl2.runtime.evaluate import EvalConfig, evaluate_rows
from exl2.runtime.loader import load_model
from exl2.runtime.onepass import OnePassCache


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_builder, tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            m = load_model(tiny_builder(kind, tmp_path_factory.mktemp(kind) / "model", seed=3))
            if kind == "qwen2":          # exl2's own modes need the model's KV profile
                g = torch.Generator().manual_seed(0)
                kv_calib.attach(m, kv_calib.calibrate(m, torch.randint(0, 512, (4, 64), generator=g),
                                                      torch.randint(0, 512, (2, 32), generator=g),
                                                      source="test rows"))
            made[kind] = m
        return made[kind]

    return get


def _rows(n=1, T=40, seed=1):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


class _Rows(torch.nn.Module):
    """A projection replaced by its outputs for the whole row, handed out ``at`` a position: the token-by-token
    pass then sees bit for bit the keys, values and queries of the one-pass (a matmul of one row and of a
    whole row round differently, and a quantized cache turns such a difference into a whole step now and then)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.at = out, 0

    def forward(self, x):
        return self.out[:, self.at:self.at + x.shape[1]]


def _layer_both_ways(m, layer: int, mode: str, T: int = 40, seed: int = 0):
    """One attention layer's output for a random input row [1, T, C], through a one-pass cache and token by token
    through a real cache of ``mode`` (same projections, see _Rows)."""
    attn = m.layers[layer].self_attn
    x = torch.randn(1, T, m.cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    cos, sin = m.rotary.cos_sin(0, T)
    names = ("q_proj", "k_proj", "v_proj")
    saved = {n: getattr(attn, n) for n in names}
    with torch.no_grad():
        rows = {n: _Rows(saved[n](x)) for n in names}
        try:
            for n in names:
                setattr(attn, n, rows[n])
            one = attn(x, cos, sin, OnePassCache(m.cfg, T, mode=mode).layers[layer])
            cache = KVCache(m.cfg, T, mode=mode, storage_dtype=torch.float16 if mode == "fp16" else None)
            steps = []
            for i in range(T):
                for r in rows.values():
                    r.at = i
                steps.append(attn(x[:, i:i + 1], cos[i:i + 1], sin[i:i + 1], cache.layers[layer], i))
            for r in rows.values():
                r.at = 0
            exact = attn(x, cos, sin)
        finally:
            for n in names:
                setattr(attn, n, saved[n])
    return one, torch.cat(steps, 1), exact


@pytest.mark.parametrize("mode", ["fp16", "q8", "q6", "q4", "q4x", "q3x"])
def test_one_pass_layer_is_the_token_by_token_layer(models, mode):
    """Every mode, the same projections: the one-pass layer's output is the token-by-token layer's up to the
    rounding of attention's own products, far below what the cache's rounding or quantization moves."""
    m = models("qwen2")
    for layer in range(m.cfg.num_layers):
        one, tbt, exact = _layer_both_ways(m, layer, mode)
        tol = 1e-5 * float(exact.abs().max())                          # fp32 rounding of attention's products
        moved = float((tbt - exact).abs().max())
        assert moved > 5 * tol, (mode, layer)                         # the cache changes the output
        assert float((tbt - one).abs().max()) < tol, (mode, layer, moved)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "qwen3", "phi3"])
def test_one_pass_carries_the_attention_variants(models, kind):
    """Sliding windows shorter than the row and soft-capped logits (Gemma 2), per-layer RoPE (Gemma 3), per-head
    q/k norms (Qwen3), fused projections (Phi-3): the one-pass layer is still the token-by-token layer."""
    m = models(kind)
    for mode in ("fp16", "q4"):
        for layer in range(m.cfg.num_layers):
            one, tbt, exact = _layer_both_ways(m, layer, mode)
            tol = 1e-5 * float(exact.abs().max())
            moved = float((tbt - exact).abs().max())
            assert moved > 5 * tol, (kind, mode, layer)
            assert float((tbt - one).abs().max()) < tol, (kind, mode, layer, moved)


def test_scoring_in_one_pass(models):
    """evaluate_rows with one_pass scores what chunk-1 cache mode scores; the cache is used once per row and
    refuses a second pass, longer rows and modes that cannot hold the model."""
    m = models("qwen2")
    rows = _rows(2, 33, seed=7)
    with torch.no_grad():
        ref = m                                                    # KL against the model's own full pass
        one, tbt = evaluate_rows(m, rows, [EvalConfig("cache", "q4", 1, one_pass=True), EvalConfig("cache", "q4", 1)],
                                 ref_model=ref)
    assert one.tokens == tbt.tokens == 64 and one.kld_mean > 1e-5
    assert one.kld_mean == pytest.approx(tbt.kld_mean, rel=1e-3)
    assert one.ppl == pytest.approx(tbt.ppl, rel=1e-5)
    with pytest.raises(ValueError, match="one_pass"):
        EvalConfig("cache", "q4", 2, one_pass=True).check()
    with pytest.raises(ValueError, match="one_pass"):
        EvalConfig("full", one_pass=True).check()
    cache = OnePassCache(m.cfg, 16, mode="q8")
    with torch.no_grad():
        m(rows[:1, :16], cache)
        with pytest.raises(ValueError, match="reset"):
            m(rows[:1, :16], cache)
        cache.reset()
        m(rows[:1, :16], cache)
        cache.reset()
        with pytest.raises(ValueError, match="exceed"):
            m(rows[:1, :17], cache)
    with pytest.raises(ValueError, match="q4x"):
        OnePassCache(models("gemma2").cfg, 16, mode="q4x")
