"""exl2's own cache modes q4x/q3x (runtime/kv_x.py) and their KV profile (runtime/kv_calib.py).

The transforms (centering, pre-RoPE storage, the calibrated KLT, Hadamard) must leave attention unchanged without
the quantizer; the cache must compute what kv_calib's one-pass emulation computes (the benchmark's ablations
rest on it); the profile file must round-trip and refuse bad input in one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from exl2.quant_kernels.kvx_quant import hadamard
from exl2.runtime import kv_calib
from exl2.runtime.config import ModelConfig
from exl2.runtime.cache import KVCache, bytes_per_token, mode_error
from exl2.runtime.kv_profile import PROFILE_FILE, KVProfile, LayerStats, klt_transform
from exl2.runtime.kv_x import (X_MODES, LayerKVX, XScheme, allocate_bits, scheme_variant, stream_bits_total,
                               x_bytes_per_token)
from exl2.runtime.loader import load_model

SMOLLM2 = ModelConfig.from_dict(dict(
    architectures=["LlamaForCausalLM"], hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, num_hidden_layers=30, vocab_size=49152))
QWEN2_7B = ModelConfig.from_dict(dict(
    architectures=["Qwen2ForCausalLM"], hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
    intermediate_size=18944, num_hidden_layers=28, vocab_size=152064))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_builder, tmp_path_factory):
    """A tiny random Qwen2 (k/v biases, head_dim 32, 2 kv heads) with a profile measured on random rows."""
    d = tiny_builder("qwen2", tmp_path_factory.mktemp("kvx") / "model", seed=3)
    m = load_model(d)
    g = torch.Generator().manual_seed(0)
    prof = kv_calib.calibrate(m, torch.randint(0, 512, (4, 64), generator=g),
                              torch.randint(0, 512, (2, 32), generator=g), source="test rows")
    kv_calib.attach(m, prof)
    return m, prof, d


def _rows(n=1, T=40, seed=1):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


def _token_by_token(m, ids, cache):
    with torch.no_grad():
        return torch.cat([m(ids[:, i:i + 1], cache) for i in range(ids.shape[1])], dim=1)


# ---------------------------------------------------------------------------------------------- exactness


def test_transforms_invert_in_float64():
    g = torch.Generator().manual_seed(0)
    D = 64
    X = torch.randn(500, D, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3, D, dtype=torch.float64)
    cov = X.T @ X / 500
    q_energy = torch.rand(D, generator=g, dtype=torch.float64) + 0.1
    A, A_inv = klt_transform(cov, q_energy)
    eye = torch.eye(D, dtype=torch.float64)
    assert torch.allclose(A_inv @ A, eye, atol=1e-10) and torch.allclose(A @ A_inv, eye, atol=1e-10)
    H = hadamard(D)
    assert torch.allclose(H @ H, eye, atol=1e-14) and torch.equal(H, H.T)
    # z = c A has Cov(z) = H^T diag(lambda^1/2) H: lambda, the query-weighted covariance's eigenvalues (none floored here)
    w = ((q_energy[:D // 2] + q_energy[D // 2:]) / 2).repeat(2)
    lam = torch.linalg.eigvalsh(w.sqrt()[:, None] * cov * w.sqrt()[None, :])
    cz = A.T @ cov @ A
    assert torch.allclose(torch.linalg.eigvalsh(cz), lam.clamp_min(0).sqrt().sort().values, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("changes", [
    {},                                                   # q4x's own: centered, KLT, pre-RoPE, Hadamard values
    {"k_transform": "hadamard"},
    {"k_transform": "hadamard", "pre_rope": False},
    {"k_transform": "none", "center_k": False},
    {"center_v": True},
], ids=["klt", "hadamard", "hadamard-post-rope", "none", "center-v"])
def test_unquantized_x_cache_gives_the_uncached_logits(tiny, changes):
    """Every transform without the quantizer (and without the fp16 sink and window): token by token, and chunked
    prefill then decode, the logits are the uncached model's within fp32 rounding."""
    m, _, _ = tiny
    scheme = scheme_variant("q4x", quantize=False, sink=0, recent=0, **changes)
    ids = _rows(2, 40)
    with torch.no_grad():
        ref = m(ids)
        cache = KVCache(m.cfg, 40, batch_size=2, mode="q4x", scheme=scheme)
        tbt = _token_by_token(m, ids, cache)
        cache.reset()
        chunked = torch.cat([m(ids[:, :17], cache)] + [m(ids[:, i:i + 1], cache) for i in range(17, 40)], dim=1)
    tol = 1e-5 * float(ref.abs().max())
    assert float((tbt - ref).abs().max()) < tol
    assert float((chunked - ref).abs().max()) < tol


def test_sink_and_recent_window_hold_fp16_copies():
    """LayerKVX.update_pre_rope with identity transforms and no quantizer, fed in uneven chunks: positions below
    ``sink`` and the ``recent`` positions before the chunk come back as fp16 roundings of the keys and values,
    the rest exactly, the chunk itself exactly."""
    Hkv, D, L, W = 2, 16, 40, 4
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=4 * D, num_attention_heads=4,
                                     num_key_value_heads=Hkv, intermediate_size=8, num_hidden_layers=1,
                                     vocab_size=8))
    z = torch.zeros(Hkv, D, dtype=torch.float64)
    prof = KVProfile(1, Hkv, D, [LayerStats(z, torch.eye(D, dtype=torch.float64).repeat(Hkv, 1, 1), z + 1, z)])
    scheme = XScheme(budget=8.25, min_bits=8, sink=1, recent=W, k_transform="none", v_transform="none",
                     center_k=False, quantize=False)
    layer = LayerKVX(2, L, Hkv, D, scheme, 0, cfg, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, L, Hkv, D, generator=g) * 3
    v = torch.randn(2, L, Hkv, D, generator=g) * 3
    cos, sin = torch.ones(L, D), torch.zeros(L, D)  # RoPE as the identity: pre- and post-RoPE keys agree
    past = 0
    for n in (5, 1, 1, 3, 1, 7, 1, 2, 6, 1):
        ka, va = layer.update_pre_rope(k[:, past:past + n], k[:, past:past + n], v[:, past:past + n], past,
                                       cos[past:past + n], sin[past:past + n], prof)
        for got, want in ((ka, k), (va, v)):
            assert got.shape == (2, past + n, Hkv, D)
            for t in range(past + n):
                rounded = t < 1 or past - W <= t < past
                expect = want[:, t].half().float() if rounded and t < past else want[:, t]
                assert torch.equal(got[:, t], expect), (past, n, t)
        past += n


def test_cache_agrees_with_the_one_pass_emulation(tiny):
    """bench/bench_cache.py's ablations emulate a token-by-token pass in one pass (kv_calib.emulate_logits);
    the cache itself must give the same logits (up to fp32 rounding, which may move a code by one level)."""
    m, prof, _ = tiny
    ids = _rows(1, 48, seed=5)
    with torch.no_grad():
        ref = torch.log_softmax(m(ids)[0], -1)
        for mode in X_MODES:
            tbt = torch.log_softmax(_token_by_token(m, ids, KVCache(m.cfg, 48, mode=mode))[0], -1)
            emu = torch.log_softmax(kv_calib.emulate_logits(m, ids, X_MODES[mode], prof), -1)
            kl_q = float((ref.exp() * (ref - tbt)).sum(-1).mean())
            assert kl_q > 1e-4, mode                       # the quantizer is on: the cache differs from FP
            assert float((tbt - emu).abs().max()) < 1e-3, mode
            assert abs(float((ref.exp() * (ref - emu)).sum(-1).mean()) - kl_q) < 1e-3 * kl_q, mode


def test_qwen3_profile_and_emulation_see_the_normed_keys(tiny_builder, tmp_path):
    """Qwen3 normalizes each query and key head before RoPE: the profile's statistics are of the normed keys
    and queries (the ones the cache stores and reads), and the one-pass emulation applies the norms (exact
    round trips give the model's own logits; q4x gives the cache's)."""
    m = load_model(tiny_builder("qwen3", tmp_path / "q3", seed=3))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 512, (2, 48), generator=g)
    stats = kv_calib.collect_stats(m, rows, sink=1)
    with torch.no_grad():                       # layer 0's keys, computed by hand: norm, project, k_norm
        x = torch.nn.functional.embedding(rows, m.embed_tokens).float()
        _, k_pre, _ = m.layers[0].self_attn.project(m.layers[0].input_layernorm(x))
    k = k_pre[:, 1:].reshape(-1, 2, 64).double()                        # sink dropped; [tokens, Hkv, D]
    assert torch.allclose(stats[0].k_mean, k.mean(0), atol=1e-6)
    raw = m.layers[0].self_attn.k_proj(m.layers[0].input_layernorm(x)).view(2, 48, 2, 64)[:, 1:]
    assert not torch.allclose(stats[0].k_mean, raw.reshape(-1, 2, 64).double().mean(0), atol=1e-2)
    prof = kv_calib.calibrate(m, rows, None, source="test rows")
    kv_calib.attach(m, prof)
    ids = _rows(1, 40, seed=7)
    exact = lambda i: (None, None)  # noqa: E731
    with torch.no_grad():
        full = m(ids)[0]
        assert float((kv_calib.emulate_logits(m, ids, exact, prof) - full).abs().max()) < 1e-4
        tbt = _token_by_token(m, ids, KVCache(m.cfg, 40, mode="q4x"))[0]
        emu = kv_calib.emulate_logits(m, ids, X_MODES["q4x"], prof)
    assert float((tbt - full).abs().max()) > 1e-3          # the quantizer is on
    assert float((tbt - emu).abs().max()) < 1e-3


def test_emulation_of_the_fp16_cache(tiny):
    """The ablations' reference: emulate_logits with keys and values rounded to fp16 is the FP16 cache."""
    m, prof, _ = tiny
    ids = _rows(1, 40, seed=6)
    fp16 = lambda i: (lambda k_pre, k: k.half().to(k.dtype), lambda v: v.half().to(v.dtype))  # noqa: E731
    with torch.no_grad():
        tbt = _token_by_token(m, ids, KVCache(m.cfg, 40, mode="fp16", storage_dtype=torch.float16))[0]
        emu = kv_calib.emulate_logits(m, ids, fp16, prof)
        full = m(ids)[0]
    d_emu, d_full = float((tbt - emu).abs().max()), float((tbt - full).abs().max())
    assert d_emu < 1e-4 * float(tbt.abs().max()) and d_emu < 0.2 * d_full, (d_emu, d_full)


@pytest.mark.parametrize("mode", list(X_MODES))
def test_batch_rows_reset_and_chunking(tiny, mode):
    """A batch of two rows gives each row's batch-1 logits; reset() forgets the earlier row; a chunked prefill's
    later tokens read the same store a token-by-token pass would have written for the prefill."""
    m, _, _ = tiny
    ids = _rows(2, 32, seed=7)
    with torch.no_grad():
        both = _token_by_token(m, ids, KVCache(m.cfg, 32, batch_size=2, mode=mode))
        one = KVCache(m.cfg, 32, mode=mode)
        first = _token_by_token(m, ids[:1], one)
        one.reset()
        second = _token_by_token(m, ids[1:], one)
        fresh = _token_by_token(m, ids[1:], KVCache(m.cfg, 32, mode=mode))
    assert torch.equal(second, fresh)
    # a batched GEMM rounds differently in the last bit, which can move an fp16 rounding (sink, window) or a code
    # by one step: 1e-3 of the largest logit covers that, a mixed-up row would not pass
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-3 * float(both.abs().max()))
    assert float((both[1] - first[0]).abs().max()) > 0.1
    with torch.no_grad():
        c = KVCache(m.cfg, 32, mode=mode)
        pre = m(ids[:1, :12], c)
        rest = torch.cat([m(ids[:1, i:i + 1], c) for i in range(12, 32)], dim=1)
    assert c.past_len == 32 and pre.shape[1] == 12 and torch.isfinite(rest).all()
    assert float((rest - first[:, 12:]).abs().max()) < 0.1 * float(first.abs().max())  # same store, close logits


# ---------------------------------------------------------------------------------------------- sizes, bits


def test_bytes_per_token_within_the_budget():
    for cfg in (SMOLLM2, QWEN2_7B):
        q4 = bytes_per_token(cfg, "q4")
        assert bytes_per_token(cfg, "q4x") <= q4 * 1.05
        assert bytes_per_token(cfg, "q3x") < q4 * 0.85
    # SmolLM2: 30 layers x 2 streams x 192 elements; 268 code bits per element-set + one fp16 scale per 64
    assert stream_bits_total(SMOLLM2, X_MODES["q4x"]) == 268
    assert x_bytes_per_token(SMOLLM2, X_MODES["q4x"]) == 268 * 192 // 8 + 60 * 3 * 2 == 6792


def test_allocate_bits_spends_the_budget_where_it_pays():
    sens = [(1.0, 0.1), (0.01, 0.01), (5.0, 0.2)]
    bits = allocate_bits(sens, 6 * 4, min_bits=3)
    flat = [b for p in bits for b in p]
    assert sum(flat) == 24 and min(flat) >= 3 and max(flat) <= 8
    assert bits[2][0] >= bits[0][0] > bits[1][0] == 3       # the most sensitive stream gets the most bits
    with pytest.raises(ValueError, match="below 3 bits"):
        allocate_bits(sens, 10, min_bits=3)


def test_sensitivity_at_a_stride_is_the_row_mean_of_the_sampled_positions(tiny):
    """measure_sensitivity(stride=s): the KL at positions s-1, 2s-1, ... only, scaled to the row's mean.  The
    reference per-position KL comes from stride-1 runs on rows cut after each position (a position's output
    reads only the tokens up to it): KL_t = (t+1) * mean(0..t) - t * mean(0..t-1)."""
    m, prof, _ = tiny
    rows = _rows(2, 16, seed=9)
    T, s = 16, 4
    means = {n: kv_calib.measure_sensitivity(m, rows[:, :n], prof) for n in range(1, T + 1)}
    got = kv_calib.measure_sensitivity(m, rows, prof, stride=s)
    for i in range(m.cfg.num_layers):
        for j in range(2):
            kl_at = [(t + 1) * means[t + 1][i][j] - t * (means[t][i][j] if t else 0.0) for t in range(T)]
            assert abs(kl_at[0]) < 1e-7                                   # position 0 reads no cache
            want = (T - 1) / T * sum(kl_at[t] for t in range(s - 1, T, s)) / len(range(s - 1, T, s))
            assert got[i][j] == pytest.approx(want, rel=2e-3, abs=1e-9), (i, j)   # rounding, times T
            assert got[i][j] > 0
    assert kv_calib.measure_sensitivity(m, rows, prof, stride=1) == means[T]


def test_head_dim_not_a_power_of_two_is_refused():
    cfg = ModelConfig.from_dict(dict(architectures=["Qwen2ForCausalLM"], hidden_size=192, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=64, num_hidden_layers=1,
                                     vocab_size=64))   # head_dim 48, kv dim 192: ExLlamaV2's modes fit, ours not
    assert mode_error(cfg, "q4") is None
    for m in X_MODES:
        assert "head_dim 48 is not a power of two" in mode_error(cfg, m)
        with pytest.raises(ValueError, match=f"cache mode '{m}': head_dim 48"):
            KVCache(cfg, 8, mode=m)


def test_x_cache_without_a_profile_says_what_to_do(tiny_builder, tmp_path):
    m = load_model(tiny_builder("qwen2", tmp_path / "m"))
    with pytest.raises(ValueError, match="ensure_profile"):
        with torch.no_grad():
            m(_rows(1, 4), KVCache(m.cfg, 4, mode="q4x"))


# ---------------------------------------------------------------------------------------------- the profile file


def test_profile_round_trip(tiny, tmp_path):
    m, prof, _ = tiny
    prof.save(tmp_path)
    back = KVProfile.load(tmp_path, m.cfg)
    assert back.source == prof.source and back.sensitivity == pytest.approx(prof.sensitivity, rel=1e-12)
    for a, b in zip(prof.layers, back.layers):
        for name in ("k_mean", "k_cov", "q_energy", "v_mean"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x.float().double(), y), name       # stored as float32
    assert back.allocation(m.cfg, X_MODES["q4x"]) == prof.allocation(m.cfg, X_MODES["q4x"])
    assert KVProfile.load(tmp_path / "nowhere") is None


def _broken(tmp_path, prof, edit) -> str:
    d = json.loads(json.dumps(prof.to_json()))
    edit(d)
    (tmp_path / PROFILE_FILE).write_text(json.dumps(d))
    return str(tmp_path / PROFILE_FILE)


def _nan_layer(d):
    import base64

    import numpy as np

    a = d["layers"][1]["k_mean"]
    x = np.frombuffer(base64.b64decode(a["f32le"]), dtype="<f4").copy()
    x[3] = np.nan
    a["f32le"] = base64.b64encode(x.tobytes()).decode()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="exl2.kv_profile/0"), "not a KV profile of format"),
    (lambda d: d.update(num_layers=5), "made for layers/kv heads/head_dim (5, 2, 32)"),
    (lambda d: d["layers"][0]["k_cov"].update(shape=[2, 32, 31]), "layer 0 k_cov"),
    (_nan_layer, "layer 1 k_mean holds inf or NaN"),
    (lambda d: d.update(sensitivity=[[1.0, -1.0]] * 2), "sensitivity must be 2 pairs"),
    (lambda d: d.update(sensitivity_bits=3), "sensitivity measured at 3 bits"),
    (lambda d: d.pop("layers"), "'layers'"),
])
def test_profile_refusals_name_the_file_in_one_line(tiny, tmp_path, edit, message):
    m, prof, _ = tiny
    path = _broken(tmp_path, prof, edit)
    with pytest.raises(ValueError) as e:
        KVProfile.load(tmp_path, m.cfg)
    text = str(e.value)
    assert text.startswith(path) and message in text and "\n" not in text


def test_unreadable_profile(tmp_path):
    (tmp_path / PROFILE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{PROFILE_FILE}: not readable JSON"):
        KVProfile.load(tmp_path)


def test_ensure_profile_prefers_the_stored_file(tiny, tmp_path):
    m, prof, d = tiny
    fresh = load_model(d)
    prof.save(tmp_path)
    got = kv_calib.ensure_profile(fresh, tmp_path)
    assert kv_calib.profile_of(fresh) is got and got.source == prof.source
    other = load_model(d)                                   # no file, no tokenizer: the weights' biases as means
    w = kv_calib.ensure_profile(other, tmp_path / "empty")
    assert w.source == {"derived_from": "weights"} and w.sensitivity is None
    bias = other.layers[1].self_attn.k_proj.bias.detach().double().reshape(2, 32)
    assert torch.equal(w.layers[1].k_mean, bias)


def test_calibrate_dir_skips_a_model_that_does_not_fit(tiny, tmp_path, monkeypatch):
    from exl2.runtime import stream

    _, _, d = tiny
    monkeypatch.setattr(stream, "fits", lambda *a, **k: (False, 10 ** 12, 10 ** 9))
    assert kv_calib.calibrate_dir(d, _rows(2, 16)) is None
    assert not (d / PROFILE_FILE).exists()


# ---------------------------------------------------------------------------------------------- exl2-eval

TEXT = ("It was a truth universally acknowledged that a single man in possession of a good fortune must be "
        "in want of a wife.\n\ndef main(argv=None):\n    return 0\n") * 8


def _eval(args):
    from click.testing import CliRunner

    from exl2.runtime import cli

    r = CliRunner().invoke(cli.eval_main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _model_with_tokenizer(tiny_builder, tiny_tokenizer, path, **overrides):
    import shutil

    d = tiny_builder("qwen2", path, seed=3, **overrides)
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    (path.parent / "text.txt").write_text(TEXT, encoding="utf-8")
    return d, path.parent / "text.txt"


def test_eval_cache_all_measures_the_profile_at_load(tiny_builder, tiny_tokenizer, tmp_path):
    d, data = _model_with_tokenizer(tiny_builder, tiny_tokenizer, tmp_path / "model")
    code, out, err = _eval([d, "--data", data, "--rows", 1, "--length", 16, "--cache", "all",
                            "--json", tmp_path / "r.json"])
    assert code == 0, err
    assert f"no {PROFILE_FILE}; measuring the KV profile for q4x, q3x on the default calibration mix" in err
    assert "KV profile: default calibration mix (derived at load)" in err
    recs = json.loads((tmp_path / "r.json").read_text())
    assert [r["cache"] for r in recs] == ["fp16", "q8", "q6", "q4", "q4x", "q3x"]
    assert all(r["mode"] == "cache" and math.isfinite(r["ppl"]) for r in recs)
    assert recs[4]["bytes_per_token"] == x_bytes_per_token(load_model(d).cfg, X_MODES["q4x"])
    assert not (d / PROFILE_FILE).exists()                 # derived for the run, the model folder left as it was


def test_eval_refuses_a_broken_profile_before_loading(tiny_builder, tiny_tokenizer, tmp_path):
    d, data = _model_with_tokenizer(tiny_builder, tiny_tokenizer, tmp_path / "model")
    (d / PROFILE_FILE).write_text('{"format": "something else"}')
    code, out, err = _eval([d, "--data", data, "--rows", 1, "--length", 8, "--cache", "q4,q4x", "-q"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and f"{d / PROFILE_FILE}: not a KV profile" in lines[0]
    code, out, err = _eval([d, "--data", data, "--rows", 1, "--length", 8, "--cache", "q4", "-q"])
    assert code == 0, err                                  # ExLlamaV2's modes never read it


def test_eval_x_modes_on_a_head_dim_that_is_not_a_power_of_two(tiny_builder, tiny_tokenizer, tmp_path):
    d, data = _model_with_tokenizer(tiny_builder, tiny_tokenizer, tmp_path / "model", hidden_size=192,
                                    num_attention_heads=4, num_key_value_heads=4)   # head_dim 48
    code, out, err = _eval([d, "--data", data, "--rows", 1, "--length", 8, "--cache", "q4x", "-q"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--cache q4x: head_dim 48 is not a power of two" in lines[0], err
    code, out, err = _eval([d, "--data", data, "--rows", 1, "--length", 8, "--cache", "all", "-q",
                            "--json", tmp_path / "r.json"])
    assert code == 0, err
    assert "--cache all: leaving out q4x (head_dim 48" in err and "leaving out q3x" in err
    assert [r["cache"] for r in json.loads((tmp_path / "r.json").read_text())] == ["fp16", "q8", "q6", "q4"]


def test_generate_takes_one_x_mode(tiny_builder, tiny_tokenizer, tmp_path):
    from click.testing import CliRunner

    from exl2.runtime import generate_cli

    d, _ = _model_with_tokenizer(tiny_builder, tiny_tokenizer, tmp_path / "model")
    kv_calib.calibrate(load_model(d), _rows(2, 32), None, source="test rows").save(d)
    r = CliRunner().invoke(generate_cli.generate_main, [str(d), "-p", "It was", "--cache", "q4x", "--max-tokens", "4"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(generate_cli.generate_main, [str(d), "-p", "It was", "--cache", "all"])
    assert r.exit_code == 2 and "--cache all: give one mode" in r.stderr


@pytest.mark.parametrize("chunk", [1, 3])
def test_every_cache_mode_in_one_batched_pass_scores_as_each_alone(tiny, chunk):
    """evaluate_rows runs the cache modes of one chunk size as one batch (runtime/cache.py MixedKVCache):
    each mode's scores are those of the mode run alone, up to rounding.  The batch's matmuls round
    differently from one row's, which can move a quantized cache entry by one code: measured on this model,
    perplexity within 2e-5 relative and mean KL within 1e-4 relative (or 1e-8 absolute)."""
    from exl2.runtime.cache import MODES
    from exl2.runtime.evaluate import EvalConfig, evaluate_rows

    m, _, _ = tiny
    ids = _rows(2, 24, seed=9)
    configs = [EvalConfig("full")] + [EvalConfig("cache", mode, chunk) for mode in MODES]
    batches = []
    hook = m.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            ref_lps: list = []
            together = evaluate_rows(m, ids, configs, ref_model=m, ref_lps=ref_lps)
    finally:
        hook.remove()
    steps = len(range(0, 23, chunk))
    assert batches == 2 * ([1, 1] + [len(MODES)] * steps)   # per row: reference, full, then one batched pass
    with torch.no_grad():
        for c, t in zip(configs, together):
            alone = evaluate_rows(m, ids, [c], ref_lps=ref_lps)[0]
            assert t.tokens == alone.tokens == 2 * 23
            assert t.ppl == pytest.approx(alone.ppl, rel=1e-4), c
            assert abs(t.kld_mean - alone.kld_mean) <= 1e-3 * alone.kld_mean + 1e-7, c
            assert abs(t.top1_hits - alone.top1_hits) <= 1, c
    assert together[1 + list(MODES).index("q4")].kld_mean > 1e-3     # the quantized modes are on in the batch
