"""Our model vs transformers (float32 logits), cache consistency, lower-right mask, fp32 softmax."""
import pytest
import torch
from exl2.runtime.cache import KVCache
from exl2.runtime.loader import load_model
from exl2.runtime.model import attention, lower_right_mask

# Logit tolerance vs transformers, float32. Measured max |ours - transformers| over Qwen2 (tied/untied,
# bf16 source), Llama-3 scaled RoPE (fp16 source) and Mistral, 3 seeds x [2, 200] tokens, logits up to
# |6|: 7.4e-6 (about 10 fp32 ulps at |6|; summation order differs: fused SDPA vs eager matmul); Qwen3
# (q/k norms, head_dim 64 != hidden/heads; tied/untied, bf16 source, 3 seeds): 7.5e-6. Bound
# = ~7x that, for other BLAS builds / thread counts. Real bugs are orders larger: a dropped bias,
# wrong RoPE scaling or a wrong mask moves logits by > 1e-2 (negative controls below).
ATOL = 5e-5
# Chunked prefill / decode through the cache vs one full pass (same model): measured max 6.0e-6; same bound.
CACHE_ATOL = 5e-5


def _ids(seed, B=2, T=200, vocab=512):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,kw", [
    ("qwen2", {}),
    ("qwen2", {"tie": True}),
    ("qwen2", {"dtype": torch.bfloat16}),
    ("llama3", {}),
    ("llama3", {"dtype": torch.float16}),
    ("mistral", {}),
    # Phi-3: fused qkv_proj / gate_up_proj split at load; these 3 x seeds 0-2 x [2, 200] tokens: max 7.4e-6
    ("phi3", {}),
    ("phi3", {"tie": True}),
    ("phi3", {"dtype": torch.bfloat16}),
    ("qwen3", {}),
    ("qwen3", {"tie": True}),
    ("qwen3", {"dtype": torch.bfloat16}),
    ("qwen3", {"attention_bias": True}),   # q, k, v and o biases (randomised)
    # GLM-4: RoPE interleaved on half of each head, output norms under GLM's names, fused gate_up, q/k/v bias
    ("glm4", {}),
    ("glm4", {"tie": True}),
    ("glm4", {"dtype": torch.bfloat16}),
    # Granite: embedding, residual, attention and logits multipliers (3, 0.5, 0.05, 2)
    ("granite", {}),
    ("granite", {"tie": True}),
    ("granite", {"dtype": torch.bfloat16, "attention_bias": True, "mlp_bias": True}),
    # Gemma 1: (1 + w) norms, GeGLU, embeddings times sqrt(hidden), head_dim 64 != hidden / heads
    ("gemma", {"tie": True}),
    ("gemma", {}),
    ("gemma", {"dtype": torch.bfloat16, "attention_bias": True}),
    ("gemma2", {"tie": True}),             # 16-token window on layer 0 (rows of 200), caps 2 and 3, (1 + w) norms
    ("gemma2", {}),
    ("gemma2", {"dtype": torch.bfloat16, "attention_bias": True}),
    # Gemma3ForConditionalGeneration's text model: windowed layers 0 and 2 (16 keys; base 10000), full layer 1
    # (base 1e6, linear x8), q/k norms (1 + w), tensors under language_model.; these 3 x seeds 0-2: max 3.1e-6
    ("gemma3", {"tie": True}),
    ("gemma3", {}),
    ("gemma3", {"dtype": torch.bfloat16, "attention_bias": True}),
])
def test_logits_match_transformers(tiny_checkpoint, hf_logits, kind, kw):
    d = tiny_checkpoint(kind, **kw)
    ids = _ids(0)
    ref = hf_logits(d, ids)
    with torch.no_grad():
        ours = load_model(d)(ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"{kind} {kw}: max |diff| {err:.3g}"


def test_tied_checkpoint_has_no_head_tensor(tiny_checkpoint):
    from safetensors import safe_open

    d = tiny_checkpoint("qwen2", tie=True)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    m = load_model(d)
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.data_ptr()


def test_negative_control_rope_scaling_matters(tiny_checkpoint, hf_logits):
    """The llama3 test exercises the scaling: without it, logits differ far beyond ATOL."""
    d = tiny_checkpoint("llama3")
    ids = _ids(1)
    ref = hf_logits(d, ids)
    m = load_model(d)
    m.cfg.rope_scaling = None
    from exl2.runtime.model import Rotary

    m.rotary = Rotary(m.cfg)
    with torch.no_grad():
        assert (m(ids) - ref).abs().max().item() > 1e-2


def test_negative_control_bias_matters(tiny_checkpoint, hf_logits):
    d = tiny_checkpoint("qwen2")
    ids = _ids(2)
    ref = hf_logits(d, ids)
    m = load_model(d)
    m.layers[0].self_attn.k_proj.bias = None
    with torch.no_grad():
        assert (m(ids) - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("which", ["q_norm", "k_norm"])
def test_negative_control_qk_norm_matters(tiny_checkpoint, hf_logits, which):
    """Qwen3's per-head norms are applied: without one of them, logits differ far beyond ATOL."""
    d = tiny_checkpoint("qwen3")
    ids = _ids(4)
    ref = hf_logits(d, ids)
    m = load_model(d)
    attn = m.layers[1].self_attn
    setattr(attn, which, torch.nn.Identity())
    with torch.no_grad():
        assert (m(ids) - ref).abs().max().item() > 1e-2


def test_qk_norm_one_row_per_head_loads_the_same(tiny_checkpoint):
    """ExLlamaV2's converter stores a q/k norm weight repeated over the heads ([heads, D]); a checkpoint in
    that form gives the same logits as the source's [D] form, bit for bit."""
    from safetensors.torch import load_file, save_file

    d = tiny_checkpoint("qwen3")
    ids = _ids(5, B=1, T=64)
    with torch.no_grad():
        ref = load_model(d)(ids)
    t = load_file(str(d / "model.safetensors"))
    for i in range(2):
        for which, heads in (("q_norm", 4), ("k_norm", 2)):
            key = f"model.layers.{i}.self_attn.{which}.weight"
            t[key] = t[key].repeat(heads, 1).contiguous()  # [heads, D]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = load_model(d)
    assert tuple(m.layers[0].self_attn.q_norm.weight.shape) == (4, 64)
    with torch.no_grad():
        assert torch.equal(m(ids), ref)


@pytest.mark.parametrize("what", ["window", "attn_softcap", "final_softcap", "scale", "embed_scale", "norm_offset",
                                  "out_norms", "gelu"])
def test_gemma2_negative_controls(tiny_checkpoint, hf_logits, what):
    """Each of Gemma2's differences from the Llama layout is exercised by the tiny checkpoint: computing without
    it moves the logits far beyond ATOL."""
    import dataclasses

    d = tiny_checkpoint("gemma2", tie=True)
    ids = _ids(2)
    ref = hf_logits(d, ids)
    m = load_model(d)
    cfg = m.cfg
    if what == "window":
        m.layers[0].self_attn.window = None
    elif what in ("attn_softcap", "scale"):
        for b in m.layers:
            if what == "attn_softcap":
                b.self_attn.softcap = None
            else:
                b.self_attn.scale = cfg.head_dim ** -0.5
    elif what == "final_softcap":
        m.cfg = dataclasses.replace(cfg, final_softcap=None)
    elif what == "embed_scale":
        m.cfg = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, embed_scale=False))
    elif what == "norm_offset":
        for mod in m.modules():
            if hasattr(mod, "offset"):
                mod.offset = 0.0
    elif what == "out_norms":
        for b in m.layers:
            b.attn_out_norm = b.mlp_out_norm = None
    else:
        for b in m.layers:
            b.mlp.act = "silu"
    with torch.no_grad():
        err = (m(ids) - ref).abs().max().item()
    assert err > 1e-2, f"{what}: {err:.3g}"


@pytest.mark.parametrize("what", ["local_rope", "global_scaling", "qk_norm_offset"])
def test_gemma3_negative_controls(tiny_checkpoint, hf_logits, what):
    """Gemma3's differences from Gemma2 are exercised by the tiny checkpoint: the windowed layers' own RoPE,
    the full layers' scaled RoPE and the (1 + w) of the q/k norms each move the logits beyond ATOL when left
    out."""
    from exl2.runtime.model import Rotary

    d = tiny_checkpoint("gemma3", tie=True)
    ids = _ids(2)
    ref = hf_logits(d, ids)
    m = load_model(d)
    assert [b.self_attn.rotary is not None for b in m.layers] == [True, False, True]
    if what == "local_rope":
        for b in m.layers:
            b.self_attn.rotary = None
    elif what == "global_scaling":
        import dataclasses
        m.rotary = Rotary(dataclasses.replace(m.cfg, rope_scaling=None))
    else:
        for b in m.layers:
            b.self_attn.q_norm.offset = b.self_attn.k_norm.offset = 0.0
    with torch.no_grad():
        err = (m(ids) - ref).abs().max().item()
    assert err > 1e-2, f"{what}: {err:.3g}"


@pytest.mark.parametrize("what", ["embed_scale", "norm_offset", "gelu"])
def test_gemma_negative_controls(tiny_checkpoint, hf_logits, what):
    """Each of Gemma 1's differences from the Llama layout is exercised by the tiny checkpoint: computing without
    it moves the logits far beyond ATOL."""
    import dataclasses

    d = tiny_checkpoint("gemma", tie=True)
    ids = _ids(2)
    ref = hf_logits(d, ids)
    m = load_model(d)
    if what == "embed_scale":
        m.cfg = dataclasses.replace(m.cfg, arch=dataclasses.replace(m.cfg.arch, embed_scale=False))
    elif what == "norm_offset":
        for mod in m.modules():
            if hasattr(mod, "offset"):
                mod.offset = 0.0
    else:
        for b in m.layers:
            b.mlp.act = "silu"
    with torch.no_grad():
        err = (m(ids) - ref).abs().max().item()
    assert err > 1e-2, f"{what}: {err:.3g}"


@pytest.mark.parametrize("what", ["embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                  "logits_scaling"])
def test_granite_negative_controls(tiny_checkpoint, hf_logits, what):
    """Each of Granite's multipliers is exercised by the tiny checkpoint: computing without it (1.0, or the
    default 1 / sqrt(head_dim) attention scale) moves the logits far beyond ATOL."""
    import dataclasses

    d = tiny_checkpoint("granite")
    ids = _ids(2)
    ref = hf_logits(d, ids)
    m = load_model(d)
    if what == "residual_multiplier":
        for b in m.layers:
            b.residual_scale = 1.0
    elif what == "attention_multiplier":
        for b in m.layers:
            b.self_attn.scale = m.cfg.head_dim ** -0.5
    else:
        m.cfg = dataclasses.replace(m.cfg, **{what: 1.0})
    with torch.no_grad():
        err = (m(ids) - ref).abs().max().item()
    assert err > 1e-2, f"{what}: {err:.3g}"


@pytest.mark.parametrize("what", ["interleaved", "partial", "out_norms"])
def test_glm4_negative_controls(tiny_checkpoint, hf_logits, what):
    """Each of GLM-4's differences from the Llama layout is exercised by the tiny checkpoint: computing without
    it (RoPE in the rotate-half form, RoPE on the whole head, no output norms) moves the logits beyond ATOL."""
    import dataclasses

    from exl2.runtime.model import Rotary

    d = tiny_checkpoint("glm4")
    ids = _ids(2)
    ref = hf_logits(d, ids)
    m = load_model(d)
    if what == "interleaved":
        for b in m.layers:
            b.self_attn.rope_interleaved = False
        m.rotary.interleaved = False
    elif what == "partial":
        m.rotary = Rotary(dataclasses.replace(m.cfg, rotary_dim=None))
    else:
        for b in m.layers:
            b.attn_out_norm = b.mlp_out_norm = None
    with torch.no_grad():
        err = (m(ids) - ref).abs().max().item()
    assert err > 1e-2, f"{what}: {err:.3g}"


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "qwen3", "granite", "gemma", "gemma2", "gemma3", "glm4"])
def test_chunked_prefill_equals_full_pass(tiny_checkpoint, kind):
    m = load_model(tiny_checkpoint(kind))
    ids = _ids(3)
    with torch.no_grad():
        full = m(ids)  # [2, 200, V]
        cache = KVCache(m.cfg, 256, batch_size=2)
        parts = [m(ids[:, s:s + 37], cache) for s in range(0, 200, 37)]  # uneven chunks, last one short
    assert cache.past_len == 200
    err = (torch.cat(parts, dim=1) - full).abs().max().item()
    assert err < CACHE_ATOL, err


def test_decode_after_prefill_equals_full_pass(tiny_checkpoint):
    m = load_model(tiny_checkpoint("qwen2"))
    ids = _ids(4, T=65)
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.cfg, 65, batch_size=2)
        m(ids[:, :64], cache)
        step = m(ids[:, 64:], cache)  # [2, 1, V]
    err = (step[:, 0] - full[:, 64]).abs().max().item()
    assert err < CACHE_ATOL, err


def test_last_only(tiny_checkpoint):
    m = load_model(tiny_checkpoint("qwen2"))
    ids = _ids(5, T=20)
    with torch.no_grad():
        last, full = m(ids, last_only=True), m(ids)
    assert last.shape == (2, 1, 512)
    # same math on one row instead of 20: GEMM blocking may round differently (measured ~1e-6)
    assert (last[:, 0] - full[:, -1]).abs().max().item() < CACHE_ATOL


def test_lower_right_mask_shape():
    m = lower_right_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(lower_right_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_negative_control_top_left_mask_differs(tiny_checkpoint):
    """With q_len < k_len, SDPA's is_causal=True (top-left) hides past keys: our lower-right result
    equals the full pass, the top-left one does not."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 16, generator=g)  # [B, H, T=3, D]
    k = torch.randn(1, 2, 10, 16, generator=g)  # [B, Hkv, S=10, D]
    v = torch.randn(1, 2, 10, 16, generator=g)
    ours = attention(q, k, v)
    # reference: the last 3 rows of a full causal pass whose queries at 7..9 are q
    q_full = torch.cat([torch.randn(1, 4, 7, 16, generator=g), q], dim=2)  # [1, 4, 10, 16]
    full = attention(q_full, k, v)[:, :, 7:]
    assert (ours - full).abs().max().item() < 1e-6
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    top_left = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert (top_left - full).abs().max().item() > 1e-2


def test_fp16_large_qk_no_overflow():
    """Q.K^T up to ~1e6 overflows fp16 (max 65504) in matmul attention; ours softmaxes in fp32."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 8, 64, generator=g) * 40)  # [B, H, T, D]; |q.k| ~ 40*40*8 = 1.3e4, max ~6e4+
    k = (torch.randn(1, 2, 8, 64, generator=g) * 40)
    v = torch.randn(1, 2, 8, 64, generator=g)
    q[..., 0, :] *= 4  # make sure some raw scores exceed 65504
    q16, k16, v16 = q.half(), k.half(), v.half()
    raw = q16.float() @ k16.float().transpose(-1, -2)
    assert raw.abs().max() > 65504  # the inputs do trigger fp16 overflow in matmul attention
    naive = torch.softmax((q16 @ k16.transpose(-1, -2)) / 8.0, dim=-1)  # the fp16 matmul path
    assert not torch.isfinite(naive).all()
    out = attention(q16, k16, v16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = attention(q16.float(), k16.float(), v16.float())
    # measured 0.0 (softmax this sharp returns stored v values); bound = fp16 rounding of |out| < 4 (2e-3) x2
    assert (out.float() - ref).abs().max().item() < 4e-3


def test_fp16_model_runs_finite(tiny_checkpoint):
    m = load_model(tiny_checkpoint("qwen2"), dtype=torch.float16)
    ref = load_model(tiny_checkpoint("qwen2"))
    ids = _ids(6, T=40)
    with torch.no_grad():
        out, r = m(ids), ref(ids)
    assert torch.isfinite(out).all()
    # fp16 weights/activations through 2 layers: measured max diff 1.06e-2 (3 seeds) on logits
    # |5|; bound 5e-2 (~5x)
    assert (out - r).abs().max().item() < 5e-2


def test_bad_input_ids(tiny_checkpoint):
    m = load_model(tiny_checkpoint("qwen2"))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([1, 2]))
    cache = KVCache(m.cfg, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.tensor([[1, 2, 3, 4, 5]]), cache)
