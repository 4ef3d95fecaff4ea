"""exl2.runtime.evaluate: perplexity and KL divergence on tiny random checkpoints (CPU, seconds)."""
from __future__ import annotations

import math

import pytest
import torch
from exl2.runtime.evaluate import (EvalConfig, evaluate_rows, kl_divergence, perplexity, prepend_bos)
from exl2.runtime.loader import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_builder, tmp_path_factory):
    """Two tiny Qwen2 models of the same shape (different seeds), kv_dim 64 so Q4/Q6/Q8 apply."""
    d = tmp_path_factory.mktemp("eval_models")
    a = load_model(tiny_builder("qwen2", d / "a", seed=1))
    b = load_model(tiny_builder("qwen2", d / "b", seed=2))
    return a, b


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (3, 32), generator=g)  # [R, L]


def _direct_nll(model, rows):
    with torch.no_grad():
        logits = model(rows)  # [R, L, V]
    lp = logits[:, :-1].double().log_softmax(-1)  # [R, L-1, V]
    return -lp.gather(-1, rows[:, 1:, None])[..., 0]  # [R, L-1]


def test_full_perplexity_equals_direct_computation(models, rows):
    m, _ = models
    nll = _direct_nll(m, rows)
    r = perplexity(m, rows)
    assert r.tokens == 3 * 31 and r.rows == 3 and r.length == 32 and r.mode == "full"
    # fp32 log-softmax per row vs float64 over the batch: agreement to fp32 rounding
    assert r.nll_sum == pytest.approx(float(nll.sum()), rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_cache_mode_fp16_matches_full(models, rows, chunk):
    """The "fp16" cache stores K/V in float16 (as ExLlamaV2's), so cache mode is not bit-equal to full mode:
    measured |rel diff| of ppl 9e-6 (chunk 1), 1.1e-5 (chunk 7), 0 (chunk 64 >= L: no past at all) on this
    model; bound 1e-3 (fp16 has 11 significant bits, 5e-4 relative
    rounding per K/V element, which averages out in attention)."""
    m, _ = models
    full = perplexity(m, rows).ppl
    c = perplexity(m, rows, mode="cache", cache_mode="fp16", chunk=chunk)
    assert c.tokens == 3 * 31 and c.chunk == chunk and c.cache_mode == "fp16"
    assert abs(c.ppl / full - 1) < 1e-3


def test_quantized_caches_close_and_ordered(models, rows):
    """KL divergence of cache-mode runs against the same model in full mode: Q8 small, Q6 (8-bit K,
    4-bit V) and Q4 larger, all finite. Measured on this model (mean KLD, nats): q8 6e-5, q6 7.8e-3,
    q4 1.5e-2; ppl change q8 -0.06%. Bounds: q8 < 1e-3 (15x margin), q8 ppl within 0.5%, and q8 < q6 <=
    q4 * 1.5 (Q6's 4-bit V carries most of Q4's error)."""
    m, _ = models
    res = {mode: kl_divergence(m, m, rows, mode="cache", cache_mode=mode) for mode in ("q8", "q6", "q4")}
    full = perplexity(m, rows).ppl
    print({k: (v.kld_mean, v.ppl / full - 1) for k, v in res.items()})
    for v in res.values():
        assert math.isfinite(v.ppl) and math.isfinite(v.kld_mean)
    assert res["q8"].kld_mean < 1e-3
    assert abs(res["q8"].ppl / full - 1) < 5e-3
    assert res["q8"].kld_mean < res["q6"].kld_mean <= res["q4"].kld_mean * 1.5
    assert res["q4"].kld_mean > res["q8"].kld_mean


def test_kld_of_model_against_itself_is_zero(models, rows):
    m, _ = models
    r = kl_divergence(m, m, rows)
    assert r.kld_mean == pytest.approx(0.0, abs=1e-7)
    assert r.kld_p99 == pytest.approx(0.0, abs=1e-7)
    assert r.top1 == 1.0
    assert r.ppl == pytest.approx(perplexity(m, rows).ppl, rel=1e-12)  # same pass yields the perplexity


def test_kld_equals_direct_computation(models, rows):
    m, ref = models
    r = kl_divergence(m, ref, rows)
    with torch.no_grad():
        lp = m(rows)[:, :-1].double().log_softmax(-1)  # [R, L-1, V]
        lq = ref(rows)[:, :-1].double().log_softmax(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1).flatten()  # [R*(L-1)]
    assert r.kld_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert r.kld_median == pytest.approx(float(kl.median()), rel=1e-4)
    assert r.kld_p99 == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-4)
    top1 = float((lp.argmax(-1) == lq.argmax(-1)).double().mean())
    assert r.top1 == pytest.approx(top1)
    assert r.top1 < 1 and r.kld_mean > 0.01  # two random models do disagree


def test_several_configs_in_one_sweep_equal_separate_runs(models, rows):
    m, ref = models
    configs = [EvalConfig("full"), EvalConfig("cache", "q4", 3)]
    together = evaluate_rows(m, rows, configs, ref_model=ref)
    for c, t in zip(configs, together):
        alone = kl_divergence(m, ref, rows, c.mode, c.cache_mode, c.chunk)
        assert t.ppl == pytest.approx(alone.ppl, rel=1e-12) and t.kld_mean == pytest.approx(alone.kld_mean)


def test_reference_perplexity_and_reused_reference_logprobs(models, rows):
    """With a reference, each result carries the reference's own perplexity on the same tokens; log-probs
    collected in one call and passed to another give the same scores without the reference model."""
    m, ref = models
    lps = []
    first = evaluate_rows(m, rows, [EvalConfig("full"), EvalConfig("cache", "q8", 5)], ref_model=ref, ref_lps=lps)
    assert len(lps) == rows.shape[0] and lps[0].shape == (rows.shape[1] - 1, ref.cfg.vocab_size)
    for r in first:
        assert r.ref_ppl == pytest.approx(perplexity(ref, rows).ppl, rel=1e-6)
    again = evaluate_rows(m, rows, [EvalConfig("full"), EvalConfig("cache", "q8", 5)], ref_lps=lps)
    for a, b in zip(first, again):
        assert a.ppl == b.ppl and a.kld == b.kld and a.top1_hits == b.top1_hits and a.ref_ppl == b.ref_ppl
    assert perplexity(m, rows).ref_ppl is None
    with pytest.raises(ValueError, match="ref_lps"):
        evaluate_rows(m, rows[:2], [EvalConfig("full")], ref_lps=lps)


def test_progress_and_json_record(models, rows):
    m, ref = models
    seen = []
    r = kl_divergence(m, ref, rows, mode="cache", cache_mode="q8", chunk=16, progress=seen.append)
    assert seen == [31, 31, 31]
    d = r.to_dict()
    assert set(d) == {"cache", "mode", "rows", "length", "tokens", "ppl", "kld_mean", "kld_median", "kld_p99",
                      "top1"}
    assert d["cache"] == "q8" and d["mode"] == "cache"
    assert set(perplexity(m, rows).to_dict()) == {"cache", "mode", "rows", "length", "tokens", "ppl"}


def test_bad_inputs_raise(models, rows):
    m, _ = models
    with pytest.raises(ValueError, match="rows must be"):
        perplexity(m, rows[0])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(m, rows + 1000)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(m, rows[:, :1])
    with pytest.raises(ValueError, match="cache mode"):
        perplexity(m, rows, mode="cache", cache_mode="q3")
    with pytest.raises(ValueError, match="mode"):
        perplexity(m, rows, mode="sliding")
    with pytest.raises(ValueError, match="chunk"):
        perplexity(m, rows, mode="cache", chunk=0)


def test_prepend_bos():
    rows = torch.arange(8).view(2, 4)
    assert prepend_bos(rows, 99).tolist() == [[99, 0, 1, 2], [99, 4, 5, 6]]


@pytest.mark.cuda
def test_cuda_fp16_perplexity_close_to_cpu_reference(tiny_builder, tmp_path, rows):
    """fp16 compute on the GPU vs the fp32 CPU reference: ppl within 1% (fp16 rounding of activations;
    not yet measured on a device, bound to be tightened from the first measurement)."""
    d = tiny_builder("qwen2", tmp_path / "m", seed=1)
    cpu = perplexity(load_model(d), rows).ppl
    gpu_model = load_model(d, device="cuda")
    for mode, cache in (("full", "fp16"), ("cache", "q4")):
        r = perplexity(gpu_model, rows, mode=mode, cache_mode=cache, chunk=4)
        assert math.isfinite(r.ppl) and abs(r.ppl / cpu - 1) < (0.01 if cache == "fp16" else 0.05)
