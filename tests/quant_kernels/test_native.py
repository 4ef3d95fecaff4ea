"""``ops`` on the native kernels (quant_kernels/csrc) against ``reference.py``: bit for bit.

Expected values come from ``reference.<op>`` called directly, or from composers run inside
``paths.reference()``; the calls under test run inside ``paths.native()``, where an op that fell back to its
torch twin would raise (conftest.py), so a pass means the native kernel ran.  The extension is built once per
session by the ``native`` fixture (first build about 30 s on two cores, then loaded from the cache in ~1 s);
an extension that fails to build fails these tests (they are skipped only where ``EXL2_NO_EXT`` turns the
native kernels off on purpose).  The CUDA tests at the end carry the ``cuda`` marker: tests/conftest.py skips
them where torch sees no device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exl2.quant_kernels import codec, ext, gptq, ops, reference
from exl2.quant_kernels.codec import EXL2FormatError
from exl2.quant_kernels.qparams import QParams

WIDTHS = (2, 3, 4, 5, 6, 8)
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "exl2_layers.safetensors"  # see tests/data/README.md


@pytest.fixture(scope="session")
def native():
    if ext.disabled():
        pytest.skip("EXL2_NO_EXT is set: native kernels disabled")
    m = ext.get()
    if m is None:
        pytest.fail(f"the native extension did not build: {ext.failure()}")
    return m


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (dtype, shape and every bit, so -0 != +0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def make_layer(k, n, groups, seed=0, bias=False):
    """A random valid EXL2 layer with the given [(bits, rows), ...] groups (N padded to Np)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.cat([torch.randint(0, 2**b, (r, n), generator=g) for b, r in groups])
    codes = torch.randint(0, 16, (len(groups), n), generator=g)
    smax = torch.rand(len(groups), generator=g) * 0.1 + 1e-3
    perm = torch.randperm(k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    with ops.reference_only():
        return codec.pack_layer(q, groups, codes, smax, perm, b)


# ------------------------------------------------------------------------------------------------
# fp16 conversions of exl2_math.h
# ------------------------------------------------------------------------------------------------

def test_half_to_float_all_65536(native):
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    got = native.half_bits_to_float(h)
    ref = h.view(torch.float16).to(torch.float32)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert same(got[~nan], ref[~nan])


def test_float_to_half_exhaustive(native):
    """Every half, every midpoint between neighbours (ties to even) and +-1 fp32 ulp around it."""
    h = torch.arange(0, 0x7C01, dtype=torch.int32).to(torch.int16)       # +0 .. +inf
    f = h.view(torch.float16).to(torch.float64)
    mids = ((f[:-1] + f[1:]) / 2).to(torch.float32)                        # exact in fp32
    mids = torch.cat([mids, torch.tensor([65520.0])])                      # the overflow tie
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))])
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(200_000, generator=g) * torch.logspace(-9, 6, 200_000)
    vals = torch.cat([f.to(torch.float32), near, rnd, torch.tensor([1e30, float("inf"), 2.0**-25, 2.0**-26])])
    vals = torch.cat([vals, -vals])
    got = native.float_to_half_bits(vals.contiguous())
    assert torch.equal(got, vals.to(torch.float16).view(torch.int16))
    nan = native.float_to_half_bits(torch.tensor([float("nan")]))
    assert torch.isnan(nan.view(torch.float16)).all()


# ------------------------------------------------------------------------------------------------
# Bitstream and layers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rows_mult,n", [(1, 1), (1, 33), (3, 70), (4, 256)])
def test_pack_unpack_bit_exact(native, paths, bits, rows_mult, n):
    rows = rows_mult * 32 // {2: 2, 3: 1, 4: 4, 5: 1, 6: 2, 8: 8}[bits]   # includes minimal whole-word runs
    g = torch.Generator().manual_seed(bits * 100 + n)
    q = torch.randint(0, 2**bits, (rows, n), generator=g)
    q[0] = 2**bits - 1                                                     # all ones crossing word edges
    ref = reference.pack_bits(q, bits)
    with paths.native():
        assert ops.backend(q) == "cpu"
        words = ops.pack_bits(q, bits)
        back = ops.unpack_bits(words, bits, rows)
    assert same(words, ref)
    assert same(back, reference.unpack_bits(ref, bits, rows))
    assert torch.equal(back, q)


LAYERS = [
    (128, 32, [(4, 128)]),
    (304, 70, [(8, 32), (6, 64), (5, 64), (3, 96), (2, 48)]),      # K % 128 != 0, N padded, 2-bit tail
    (416, 33, [(8, 32), (4, 128), (4, 128), (3, 128)]),
    (112, 100, [(2, 64), (2, 32), (2, 16)]),                       # 16-row 2-bit tail
]


@pytest.mark.parametrize("k,n,groups", LAYERS)
@pytest.mark.parametrize("prescale", [1.0, 0.7])
def test_dequantize_layer_bit_exact(native, paths, k, n, groups, prescale):
    t = make_layer(k, n, groups, seed=k + n, bias=True)
    with paths.reference():
        ref_layer = codec.prepare_layer(t, prescale)
    ref = reference.dequantize_layer(ref_layer)
    ref_scales = reference.group_scales(t["q_scale"], t["q_scale_max"], prescale)
    assert same(ref_layer.scales, ref_scales)
    with paths.native():
        layer = codec.prepare_layer(t, prescale)                   # scales decoded by the native kernel
        assert ops.backend(layer) == "cpu"
        got = ops.dequantize_layer(layer)
        via_codec = codec.dequantize_layer(t, prescale)
        scales = ops.group_scales(t["q_scale"], t["q_scale_max"], prescale)
    assert same(layer.scales, ref_scales) and same(scales, ref_scales)
    assert same(got, ref) and same(via_codec, ref)


def golden_layers():
    f = safe_open(str(GOLDEN), "pt")
    for name in json.loads(f.metadata()["cases"]):
        t = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
        yield name, t


def test_golden_layers_native_equals_reference(native, paths):
    """The golden layers (another writer's) through the native dequantize and matmul: equal to the reference
    (test_codec.py checks the reference against the loader's expected weights)."""
    for name, t in golden_layers():
        expected = t.pop("expected_weight")
        with paths.reference():
            ref = reference.dequantize_layer(codec.prepare_layer(t))
        with paths.native():
            layer = codec.prepare_layer(t)
            got = ops.dequantize_layer(layer)
            x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(1))
            y = ops.matmul(x, layer)
        assert same(got, ref) and same(got, expected), name
        r = x @ ref.float().t()
        assert bool(((y - r).abs() <= 1.5e-6 * (x.abs() @ ref.float().abs().t()) + 1e-30).all()), name


@pytest.mark.parametrize("k,n,groups", LAYERS)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_within_tolerance(native, paths, k, n, groups, m, dtype):
    t = make_layer(k, n, groups, seed=7)
    with paths.reference():
        w = reference.dequantize_layer(codec.prepare_layer(t)).to(torch.float32)   # [Np, K]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    with paths.native():
        y = ops.matmul(x, codec.prepare_layer(t))
    assert y.dtype == dtype and y.shape == (m, w.shape[0])
    ref = x.to(torch.float32) @ w.t()
    mag = x.to(torch.float32).abs() @ w.abs().t()
    # Both sides sum the same fp32 products in another order.  Measured max |y - ref| / (|x| @ |W|)
    # is 3.1e-7 (K up to 2048, M up to 64); the bound 1.5e-6 gives ~5x margin.  fp16 outputs add
    # their own rounding (2^-11 relative).
    bound = 1.5e-6 * mag + (ref.abs() * 2.0**-11 if dtype == torch.float16 else 0)
    assert bool(((y.to(torch.float32) - ref).abs() <= bound + 1e-30).all())
    assert bool((y[:, n:] == 0).all())                                     # padded columns


# K x N of the layers the runtime decodes: SmolLM2-135M (q/o, k/v, gate/up, down) and Qwen2-7B (k/v; N cut
# to 64 for down_proj's K = 18944), plus a wide one (9216 columns: several column strips per thread).
MODEL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (3584, 512), (18944, 64), (576, 9216)]


@pytest.mark.parametrize("k,n", MODEL_SHAPES)
@pytest.mark.parametrize("bits", WIDTHS)
def test_matmul_every_width_model_shapes(native, paths, k, n, bits):
    """Each width alone in 128-row groups (a short last group where K % 128), through each path of the
    packed kernel: one row of x; 2, 7 (blocks of 4 + 3) and 9 (8 + 1) rows; the panel path from 10 rows
    (16 = 6 + 6 + 4, 40 = 6 x 6 + 4)."""
    groups = [(bits, 128)] * (k // 128) + ([(bits, k % 128)] if k % 128 else [])
    t = make_layer(k, n, groups, seed=k + n + bits)
    with paths.reference():
        w = reference.dequantize_layer(codec.prepare_layer(t)).to(torch.float32)   # [Np, K]
    with paths.native():
        layer = codec.prepare_layer(t)
        for m in (1, 2, 7, 9, 16, 40):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = ops.matmul(x, layer)
            ref = x @ w.t()
            mag = x.abs() @ w.abs().t()
            # The bound of test_matmul_within_tolerance; measured max |y - ref| / (|x| @ |W|) here 4.1e-7.
            assert bool(((y - ref).abs() <= 1.5e-6 * mag + 1e-30).all()), (m, float(((y - ref).abs() / mag).max()))
            assert bool((y[:, n:] == 0).all())


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rows,n", [(32, 1), (128, 70), (64, 257)])
def test_find_scales_bit_exact(native, paths, bits, rows, n):
    g = torch.Generator().manual_seed(bits + rows + n)
    w = torch.randn(rows, n, generator=g) * torch.rand(n, generator=g) * 0.05
    if n > 2:
        w[:, 1] = 0.0                                                      # an all-zero column
    ref = reference.find_scales(w, bits)
    with paths.native():
        got = ops.find_scales(w, bits)
    assert same(got.codes, ref.codes)
    assert same(got.scale_max, ref.scale_max)
    assert same(got.scale, ref.scale)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rows,n", [(32, 1), (128, 70), (64, 257), (32, 576)])
def test_refine_codes_bit_exact(native, paths, bits, rows, n):
    """The native refinement (vector and scalar columns, an all-zero column) picks the reference's codes."""
    g = torch.Generator().manual_seed(3 * bits + rows + n)
    w = torch.randn(rows, n, generator=g) * torch.rand(n, generator=g) * 0.05
    if n > 2:
        w[:, 1] = 0.0
    gs = reference.find_scales(w, bits)
    ref = reference.refine_codes(w, gs, bits, 2)
    assert not same(ref.codes, gs.codes) or n == 1                     # the refinement moves some codes
    with paths.native():
        got = ops.refine_codes(w, gs, bits, 2)
    assert same(got.codes, ref.codes)
    assert same(got.scale, ref.scale)
    assert got.scale_max is gs.scale_max


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("first", ("zero", "uniform"))
@pytest.mark.parametrize("threads", (1, 2))
def test_find_scales_skipping_keeps_the_choice(native, paths, bits, first, threads):
    """The native search drops a grid point once its running total passes a finished total, taking the points in
    the order of their first column tile.  With many tiles and a first tile that says nothing (all zero) or that
    prefers another point (uniform columns among heavy-tailed ones) it still picks the reference's point."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 20 * 64 + 5, generator=g).pow(3) * torch.rand(20 * 64 + 5, generator=g)
    w[:, :64] = 0.0 if first == "zero" else torch.rand(32, 64, generator=g) - 0.5
    ref = reference.find_scales(w, bits)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with paths.native():
            got = ops.find_scales(w, bits)
    finally:
        torch.set_num_threads(prev)
    assert same(got.codes, ref.codes) and same(got.scale_max, ref.scale_max) and same(got.scale, ref.scale)


def test_find_scales_all_zero_group(native, paths):
    w = torch.zeros(32, 40)
    ref = reference.find_scales(w, 4)
    with paths.native():
        got = ops.find_scales(w, 4)
    assert same(got.codes, ref.codes) and same(got.scale_max, ref.scale_max) and same(got.scale, ref.scale)


def _hinv(k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.1 + torch.eye(k))
    x = x * torch.linspace(0.2, 3.0, k)
    return gptq.prepare(x.t() @ x / x.shape[0])


@pytest.mark.parametrize("bits", WIDTHS)
def test_gptq_group_step_bit_exact(native, paths, bits):
    """One group [a, b) of a K=256 matrix, given scales: same codes, values, errors and updated rows from
    the loop written out here, reference.gptq_group and the native kernel (and, without Hinv, rounding)."""
    k, n, a, b = 256, 70, 64, 192
    prep = _hinv(k, bits)
    g = torch.Generator().manual_seed(bits)
    W0 = torch.randn(k, n, generator=g) * 0.02
    scale = reference.find_scales(W0[a:b], bits).scale
    W_ref = W0.clone()
    codes_ref, Q_ref, err_ref = (torch.empty(b - a, n, dtype=torch.int64), torch.empty(b - a, n), torch.empty(b - a, n))
    Hinv = prep.hinv
    for c in range(a, b):                    # GPTQ's row loop, docs/pipeline.md section 6
        i = c - a
        codes_ref[i], Q_ref[i] = reference.quantize_rows(W_ref[c], scale, bits)
        err_ref[i] = (W_ref[c] - Q_ref[i]) / Hinv[c, c]
        W_ref[c + 1:b] -= Hinv[c, c + 1:b].unsqueeze(1) * err_ref[i].unsqueeze(0)

    def run(fn, hinv):
        W = W0.clone()
        codes, Q, err = torch.empty_like(codes_ref), torch.empty_like(Q_ref), torch.empty_like(err_ref)
        fn(W[a:b], hinv, a, scale, bits, codes, Q, None if hinv is None else err)
        return W, codes, Q, err

    W, codes, Q, err = run(reference.gptq_group, Hinv)
    assert same(codes, codes_ref) and same(Q, Q_ref) and same(err, err_ref) and same(W, W_ref)
    with paths.native():
        W, codes, Q, err = run(ops.gptq_group, Hinv)
        rtn = run(ops.gptq_group, None)
    assert same(codes, codes_ref) and same(Q, Q_ref) and same(err, err_ref) and same(W, W_ref)
    rtn_ref = run(reference.gptq_group, None)
    assert all(same(x, y) for x, y in zip(rtn[:3], rtn_ref[:3]))
    assert same(rtn[0], W0)                  # round to nearest leaves W as it was


RUNS = [   # (option, K, N): mixed widths and group sizes, K % 128 != 0, N needing padding
    (QParams.make([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85]), 384, 70),
    (QParams.make(64, [6, 5, 2], [0.2, 0.3, 0.5]), 304, 70),
    (QParams.make(128, [4], [1]), 320, 96),
    (QParams.make(32, [8, 2], [0.5, 0.5]), 160, 33),
]


@pytest.mark.parametrize("qp,k,n", RUNS, ids=lambda v: v.desc() if isinstance(v, QParams) else str(v))
def test_whole_gptq_run_bit_exact(native, paths, qp, k, n):
    """gptq.quantize on the native kernels vs on the reference: same tensors (codes, scales, groups) and
    the same weight."""
    cuts = qp.row_groups(k)
    assert not any(r % (16 if b == 2 else 32) for b, r in cuts), f"RUNS entry cuts K={k} mid-word: {cuts}"
    prep = _hinv(k, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.02
    bias = torch.randn(n)
    for p in (prep, gptq.Prepared(prep.perm, None)):                     # GPTQ and round-to-nearest
        with paths.reference():
            ref = gptq.quantize(w, qp, p, bias)
        with paths.native():
            got = gptq.quantize(w, qp, p, bias)
        assert ref.tensors.keys() == got.tensors.keys()
        for key in ref.tensors:
            assert same(got.tensors[key], ref.tensors[key]), key
        assert same(got.weight, ref.weight)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 128), (7, 512)])
def test_kv_bit_exact(native, paths, bits, shape):
    g = torch.Generator().manual_seed(bits + shape[-1])
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 1.5, shape[-1])).to(torch.float16)
    x.reshape(-1, shape[-1])[0, :32] = 0                                  # zero inputs
    x.reshape(-1, 64)[-1] = 0                                             # an all-zero chunk (m = 0 groups)
    q_ref, s_ref = reference.kv_quantize(x, bits)
    with paths.native():
        q, s = ops.kv_quantize(x, bits)
        back = ops.kv_dequantize(q, s, bits, shape[-1])
    assert same(q, q_ref) and same(s, s_ref)
    assert same(back, reference.kv_dequantize(q_ref, s_ref, bits, shape[-1]))


def test_kv_overflow_raises_like_reference(native, paths):
    x = torch.full((1, 64), 3000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="overflows"):
        reference.kv_quantize(x, 4)
    with paths.native(), pytest.raises(ValueError, match="overflows"):
        ops.kv_quantize(x, 4)


# ------------------------------------------------------------------------------------------------
# Front doors, fallback, lazy build
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["native", "reference"])
def test_front_doors_name_bad_tensors(native, paths, path):
    """The same checks, and messages, whichever path the op would then take."""
    t = make_layer(128, 32, [(4, 128)])
    with getattr(paths, path)():
        _bad_tensors(t)


def _bad_tensors(t):
    q = torch.zeros(32, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="q must have dtype"):
        ops.pack_bits(q.float(), 4)
    with pytest.raises(ValueError, match="q must be 2-D"):
        ops.pack_bits(q.reshape(-1), 4)
    with pytest.raises(EXL2FormatError, match="q: codes must lie"):
        ops.pack_bits(q + 16, 4)
    with pytest.raises(EXL2FormatError, match="bits must be one of"):
        ops.pack_bits(q, 7)
    with pytest.raises(TypeError, match="words must have dtype"):
        ops.unpack_bits(q, 4, 32)
    W = torch.zeros(64, 16)
    codes, Q, err = torch.zeros(32, 16, dtype=torch.int64), torch.zeros(32, 16), torch.zeros(32, 16)
    H = torch.eye(64)
    with pytest.raises(ValueError, match="W must be contiguous"):
        ops.gptq_group(torch.zeros(16, 32).t(), H, 0, torch.ones(16), 4, codes, Q, err)
    with pytest.raises(TypeError, match="Hinv must have dtype"):
        ops.gptq_group(W[:32], H.double(), 0, torch.ones(16), 4, codes, Q, err)
    with pytest.raises(ValueError, match="scale has 8 columns"):
        ops.gptq_group(W[:32], H, 0, torch.ones(8), 4, codes, Q, err)
    with pytest.raises(ValueError, match="Q must have W's shape"):
        ops.gptq_group(W[:32], H, 0, torch.ones(16), 4, codes, Q[:16], err)
    with pytest.raises(ValueError, match="rows \\[a, a \\+ 32\\) must lie inside"):
        ops.gptq_group(W[:32], H, 40, torch.ones(16), 4, codes, Q, err)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.find_scales(W.half(), 4)
    for bad in (float("nan"), float("inf")):
        w = torch.ones(32, 70)
        w[3, 5] = bad
        with pytest.raises(ValueError, match="w holds inf or NaN"):
            ops.find_scales(w, 4)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.kv_quantize(torch.zeros(1, 64), 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.kv_quantize(torch.zeros(1, 48, dtype=torch.float16), 4)
    with pytest.raises(ValueError, match="scales must have last dimension"):
        ops.kv_dequantize(torch.zeros(1, 32, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.float16), 4, 64)
    layer = codec.prepare_layer(t)
    with pytest.raises(ValueError, match="x has 100 features"):
        ops.matmul(torch.zeros(1, 100), layer)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.matmul(torch.zeros(1, 128, dtype=torch.float64), layer)
    with pytest.raises(TypeError, match="layer must be a PreparedLayer"):
        ops.matmul(torch.zeros(1, 128), t)
    with pytest.raises(EXL2FormatError, match="q_scale_max"):
        codec.prepare_layer({**t, "q_scale_max": t["q_scale_max"].float()})
    with pytest.raises(ValueError, match="q_weight is not aligned"):
        codec.prepare_layer({**t, "q_weight": _misaligned(t["q_weight"])})


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of int32 ``x`` whose data starts 2 bytes past a 4-byte boundary."""
    buf = bytearray(x.numel() * 4 + 2)
    y = torch.frombuffer(buf, dtype=torch.int32, offset=2, count=x.numel()).reshape(x.shape)
    y.copy_(x)
    return y


class Recorder:
    """Stands in for ``ops.reference`` and notes which torch twins ops called."""

    def __init__(self):
        self.called = []

    def __getattr__(self, name):
        self.called.append(name)
        return getattr(reference, name)


def test_no_ext_env_forces_reference(native, paths, monkeypatch):
    t = make_layer(304, 70, LAYERS[1][2], seed=3)
    x = torch.randn(3, 304)
    w = torch.randn(128, 70) * 0.02
    with paths.native():
        layer = codec.prepare_layer(t)
        native_out = (ops.dequantize_layer(layer), ops.find_scales(w, 4).scale_max)
    monkeypatch.setenv("EXL2_NO_EXT", "1")
    rec = Recorder()
    monkeypatch.setattr(ops, "reference", rec)
    assert ops.backend(x) == "reference" and ops.backend(layer) == "reference" and ext.get() is None
    assert same(ops.dequantize_layer(layer), native_out[0])
    assert same(ops.find_scales(w, 4).scale_max, native_out[1])
    assert same(ops.matmul(x, layer), x @ native_out[0].float().t())
    q, s = ops.kv_quantize(torch.ones(2, 64, dtype=torch.float16), 8)
    assert q.shape == (2, 64)
    assert rec.called == ["dequantize_layer", "find_scales", "matmul", "kv_quantize"]


def test_reference_only_switch(native, monkeypatch):
    x = torch.zeros(2, 8, dtype=torch.int64)
    assert ops.backend(x) == "cpu"
    rec = Recorder()
    monkeypatch.setattr(ops, "reference", rec)
    with ops.reference_only():
        assert ops.backend(x) == "reference"
        with ops.reference_only():
            words = ops.pack_bits(torch.ones(8, 3, dtype=torch.int64), 4)
        assert ops.backend(x) == "reference"                  # the inner block restored the outer setting
    assert ops.backend(x) == "cpu" and rec.called == ["pack_bits"]
    assert same(words, ops.pack_bits(torch.ones(8, 3, dtype=torch.int64), 4)) and rec.called == ["pack_bits"]
    assert ops.force_reference(True) is False
    try:
        assert ops.backend(x) == "reference"
    finally:
        assert ops.force_reference(False) is True
    assert ops.backend(x) == "cpu"

    @ops.reference_only()
    def decorated():
        return ops.backend(x)
    assert decorated() == "reference" and ops.backend(x) == "cpu"
    with pytest.raises(RuntimeError), ops.reference_only():
        raise RuntimeError("an error inside still restores the setting")
    assert ops.backend(x) == "cpu"


def test_build_failure_falls_back_with_one_line(monkeypatch, capsys):
    def boom():
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(ext, "_build", boom)
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_failed", None)
    monkeypatch.delenv("EXL2_NO_EXT", raising=False)
    assert ext.get() is None and ext.get() is None          # second call does not retry
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no compiler here" in err[0] and "reference" in err[0]
    assert ops.backend(torch.zeros(1)) == "reference"
    ones = torch.ones(8, 3, dtype=torch.int64)
    assert same(ops.pack_bits(ones, 4), reference.pack_bits(ones, 4))


def test_import_never_builds(tmp_path):
    env = {**os.environ, "EXL2_EXT_DIR": str(tmp_path / "ext")}
    env.pop("EXL2_NO_EXT", None)
    code = ("import exl2.quant_kernels.ops, exl2.quant_kernels.gptq, exl2.quant_kernels.codec, exl2.quant_kernels.ext, "
            "exl2.quant_kernels.reference, exl2.quant_kernels.layout")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert not (tmp_path / "ext").exists()


# ------------------------------------------------------------------------------------------------
# CUDA (run only with a device and an extension built with CUDA): CUDA == reference, bit for bit
# ------------------------------------------------------------------------------------------------

def _cuda(native):
    """Without a device the `cuda` hook in tests/conftest.py has skipped the test already; with one, an
    extension without its CUDA kernels is a broken build, not a reason to skip."""
    if not ext.want_cuda():      # e.g. a ROCm build of torch: the extension compiles its CPU kernels only
        pytest.skip(f"torch {torch.__version__} sees a device but is not a CUDA build (torch.version.cuda is None)")
    assert getattr(native, "has_cuda", False), f"a CUDA device but the extension has no CUDA kernels: {native}"
    return torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("bits", WIDTHS)
def test_cuda_pack_unpack(native, paths, bits):
    dev = _cuda(native)
    q = torch.randint(0, 2**bits, (96, 70), generator=torch.Generator().manual_seed(bits))
    with paths.native():
        assert ops.backend(q.to(dev)) == "cuda"
        words = ops.pack_bits(q.to(dev), bits)
        back = ops.unpack_bits(words, bits, 96).cpu()
    assert same(words.cpu(), reference.pack_bits(q, bits))
    assert torch.equal(back, q)


@pytest.mark.cuda
@pytest.mark.parametrize("k,n,groups", LAYERS)
def test_cuda_dequantize_and_matmul(native, paths, k, n, groups):
    dev = _cuda(native)
    t = make_layer(k, n, groups, seed=1)
    with paths.reference():
        ref_layer = codec.prepare_layer(t)
    ref = reference.dequantize_layer(ref_layer)
    td = {key: v.to(dev) for key, v in t.items()}
    with paths.native():
        layer = codec.prepare_layer(td)                    # validated and decoded on the device
        assert ops.backend(layer) == "cuda"
        assert same(layer.scales.cpu(), ref_layer.scales)
        assert same(ops.dequantize_layer(layer).cpu(), ref)
        moved = ref_layer.to(dev)                          # prepared on the CPU, then moved
        assert ops.backend(moved) == "cuda" and same(ops.dequantize_layer(moved).cpu(), ref)
        for m in (1, 8, 32, 40):                           # fused small-M kernel and the large-M path
            x = torch.randn(m, k)
            y = ops.matmul(x.to(dev), layer).cpu()
            r = x @ ref.float().t()
            assert bool(((y - r).abs() <= 1.5e-6 * (x.abs() @ ref.float().abs().t()) + 1e-30).all())


@pytest.mark.cuda
@pytest.mark.parametrize("bits", WIDTHS)
def test_cuda_find_scales_and_group_step(native, paths, bits):
    dev = _cuda(native)
    k, n, a, b = 256, 70, 64, 192
    prep = _hinv(k, bits)
    W0 = torch.randn(k, n, generator=torch.Generator().manual_seed(bits)) * 0.02
    ref = reference.find_scales(W0[a:b], bits)
    outs = []
    with paths.native():
        got = ops.find_scales(W0[a:b].to(dev), bits)
        for d in ("cpu", dev):
            W = W0.clone().to(d)
            codes = torch.empty(b - a, n, dtype=torch.int64, device=d)
            Q, err = torch.empty(b - a, n, device=d), torch.empty(b - a, n, device=d)
            ops.gptq_group(W[a:b], prep.hinv.to(d), a, ref.scale.to(d), bits, codes, Q, err)
            outs.append([t.cpu() for t in (W, codes, Q, err)])
    assert same(got.codes.cpu(), ref.codes) and same(got.scale_max.cpu(), ref.scale_max)
    assert same(got.scale.cpu(), ref.scale)
    assert all(same(x, y) for x, y in zip(*outs))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_kv(native, paths, bits):
    dev = _cuda(native)
    x = (torch.randn(9, 256, generator=torch.Generator().manual_seed(bits)) * 5).to(torch.float16)
    q_ref, s_ref = reference.kv_quantize(x, bits)
    with paths.native():
        q, s = ops.kv_quantize(x.to(dev), bits)
        back = ops.kv_dequantize(q, s, bits, 256).cpu()
    assert same(q.cpu(), q_ref) and same(s.cpu(), s_ref)
    assert same(back, reference.kv_dequantize(q_ref, s_ref, bits, 256))
