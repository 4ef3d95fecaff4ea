"""GPTQ on the torch reference: output error vs round-to-nearest, monotone in bits, exact loader values,
determinism.

Every test runs on the forced reference path (``on_reference`` in conftest.py); test_native.py checks that
the native kernels give the same codes and scales.
"""
from __future__ import annotations

import pytest
import torch

from exl2.quant_kernels import codec, gptq, reference
from exl2.quant_kernels.qparams import QParams

pytestmark = pytest.mark.usefixtures("on_reference")


@pytest.fixture(scope="module")
def problem():
    """A layer whose inputs have correlated features of unequal scale, as real activations do."""
    g = torch.Generator().manual_seed(0)
    k, n = 384, 96
    mix = torch.randn(k, k, generator=g) * 0.1 + torch.eye(k)
    x = (torch.randn(1024, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)       # [tokens, K]
    w = torch.randn(n, k, generator=g) * 0.02
    H = gptq.Hessian(k)
    for chunk in x.split(256):
        H.add(chunk)
    return x, w, H.result()


def out_err(x, w, wq):
    """Relative output error ||X (Wq - W)^T|| / ||X W^T||."""
    return float((x @ (wq.float() - w).t()).norm() / (x @ w.t()).norm())


OPTIONS = [QParams.make(64, [3, 2], [0.1, 0.9]), QParams.make(128, [4, 3], [0.1, 0.9]),
           QParams.make(128, [4], [1]), QParams.make(128, [5, 4], [0.1, 0.9]), QParams.make(128, [6], [1]),
           QParams.make(128, [8], [1])]


@pytest.mark.parametrize("qp", OPTIONS, ids=lambda q: q.desc())
def test_gptq_beats_round_to_nearest(problem, qp):
    x, w, H = problem
    e_gptq = out_err(x, w, gptq.quantize_linear(w, qp, H).weight)
    e_rtn = out_err(x, w, gptq.quantize(w, qp, gptq.prepare(H, invert=False)).weight)
    # Measured ratios e_gptq / e_rtn on this problem lie between 0.6 and 0.75; requiring a 10 % gain
    # leaves room for seeds while still failing if error feedback were missing (ratio 1).
    assert e_gptq < 0.9 * e_rtn


def test_error_shrinks_as_bits_grow(problem):
    x, w, H = problem
    errs = [out_err(x, w, gptq.quantize_linear(w, qp, H).weight) for qp in OPTIONS]
    assert errs == sorted(errs, reverse=True), errs
    # Each extra bit roughly halves the error; from ~2.1 to 8 bits it must drop by well over 10x.
    assert errs[-1] < errs[0] / 10


@pytest.mark.parametrize("qp", OPTIONS + [QParams.make([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])],
                         ids=lambda q: q.desc())
def test_result_is_what_the_loader_reconstructs(problem, qp):
    x, w, H = problem
    bias = torch.randn(w.shape[0])
    r = gptq.quantize_linear(w, qp, H, bias=bias)
    codec.validate_layer(r.tensors, expect_bias=True)
    dq = codec.dequantize_layer(r.tensors)[: w.shape[0]]
    assert torch.equal(dq.view(torch.int16), r.weight.view(torch.int16))
    assert [(g.bits, g.rows) for g in codec.decode_groups(r.tensors["q_groups"], r.tensors["q_weight"].shape[0])] == qp.row_groups(w.shape[1])
    assert torch.equal(r.tensors["bias"], bias.half())


@pytest.mark.parametrize("qp", OPTIONS[:2], ids=lambda q: q.desc())
def test_unpacked_result_has_the_same_weight(problem, qp):
    """pack=False (the measurement's variants) skips packing only: the reconstructed weight is the same bits."""
    x, w, H = problem
    p = gptq.prepare(H)
    packed, bare = gptq.quantize(w, qp, p), gptq.quantize(w, qp, p, pack=False)
    assert bare.tensors == {} and torch.equal(bare.weight.view(torch.int16), packed.weight.view(torch.int16))


def test_act_order_puts_largest_diagonal_first(problem):
    x, w, H = problem
    p = gptq.prepare(H)
    d = torch.diagonal(H)[p.perm]
    assert bool((d[:-1] >= d[1:]).all())
    r = gptq.quantize(w, QParams.make(128, [4], [1]), p)
    assert torch.equal(r.tensors["q_invperm"].long(), torch.argsort(p.perm))


def test_deterministic(problem):
    x, w, H = problem
    qp = QParams.make(128, [4, 3], [0.1, 0.9])
    a = gptq.quantize_linear(w, qp, H).tensors
    b = gptq.quantize_linear(w, qp, H).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scale_search_picks_best_multiplier():
    """find_scales' multiplier is the grid point with the least |error|^3.5 (checked by brute force)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    s = reference.find_scales(w, 4)
    assert s.codes.min() >= 0 and s.codes.max() <= 15
    # The column with the largest |w| has the largest code (15: multiplier 16).
    assert int(s.codes[w.abs().amax(0).argmax()]) == 15

    def err(scale):
        q, deq = reference.quantize_rows(w, scale, 4)
        return float((deq - w).abs().pow(3.5).sum())

    e_best = err(s.scale)
    base = s.scale / float(s.scale_max)      # the quadratic-grid part of the scale
    # Scales 5 % off in either direction are worse (the chosen multiplier is at or near the optimum).
    assert e_best <= err(s.scale * 1.05) and e_best <= err(s.scale * 0.95)
    assert base.max() <= 1.0


def test_zero_group_quantizes_to_zero():
    w = torch.zeros(16, 128)
    w[:, 64:] = torch.randn(16, 64)
    r = gptq.quantize_linear(w, QParams.make(64, [4], [1]))
    assert bool((r.weight[:, :64] == 0).all()) and bool(torch.isfinite(r.weight).all())


def test_damping_retries_and_failure():
    k = 64
    H = torch.zeros(k, k)                       # singular: damping makes it positive definite
    p = gptq.prepare(H)
    assert p.hinv is not None and bool(torch.isfinite(p.hinv).all())
    with pytest.raises(gptq.HessianError, match="NaN or Inf"):
        gptq.prepare(torch.full((k, k), float("nan")))
    H = -torch.eye(k) * 1e6                     # negative definite: 10 damping steps cannot fix it
    with pytest.raises(gptq.HessianError, match="not positive definite"):
        gptq.prepare(H)


def test_hessian_accumulation_averages_rows():
    x1, x2 = torch.randn(10, 8), torch.randn(7, 8)
    H = gptq.Hessian(8)
    H.add(x1)
    H.add(x2.unsqueeze(0))                      # [1, tokens, K] is one row too
    assert H.rows == 2
    torch.testing.assert_close(H.result(), (x1.t() @ x1 + x2.t() @ x2) / 2)
    assert torch.equal(gptq.Hessian(4).result(), torch.eye(4))
    with pytest.raises(ValueError, match="input x has 5 features, expected 8"):
        H.add(torch.randn(3, 5))


@pytest.mark.parametrize("k", [gptq.TRIANGLE_MIN_K, gptq.TRIANGLE_MIN_K + 37])
def test_a_wide_hessian_accumulated_as_a_triangle_is_the_full_product(k):
    """Wide inputs accumulate the upper triangle only: the result is symmetric and equals the full product
    (bit for bit on this machine's BLAS; the test allows rounding), also when rows are added after a result."""
    g = torch.Generator().manual_seed(k)
    xs = [torch.randn(n, k, generator=g) for n in (65, 40, 9)]
    H = gptq.Hessian(k)
    H.add(xs[0])
    H.add(xs[1])
    first = H.result().clone()
    H.add(xs[2])
    for got, used in ((first, xs[:2]), (H.result(), xs)):
        want = sum(x.t() @ x for x in used) / len(used)
        assert torch.equal(got, got.t())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_refine_codes_is_the_least_squared_error_nearby(bits):
    """Each column's refined code is, among the codes within the span of find_scales' choice, one with
    the least squared error of the loader's values, the smallest on ties (checked column by column)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 48, generator=g) * torch.linspace(0.05, 1.0, 48)      # columns of unequal range
    w[:, 0] = 0.0                                                             # an all-zero column
    gs = reference.find_scales(w, bits)
    r = gptq.refine_codes(w, gs, bits, span=2)
    assert torch.equal(r.scale_max, gs.scale_max) and r.codes.min() >= 0 and r.codes.max() <= 15
    torch.testing.assert_close(r.scale, codec.decode_scales(r.codes[None], r.scale_max.reshape(1))[0].float(),
                               rtol=0, atol=0)

    def col_err(scale):
        return (reference.quantize_rows(w, scale, bits)[1] - w).pow(2).sum(0)

    before, after = col_err(gs.scale), col_err(r.scale)
    assert bool((after <= before).all())
    assert float(after.sum()) < float(before.sum())          # it finds something on such columns
    for c in range(w.shape[1]):
        cands = sorted({min(15, max(0, int(gs.codes[c]) + d)) for d in range(-2, 3)})
        errs = [float(col_err(codec.decode_scales(torch.full((1, w.shape[1]), k), gs.scale_max.reshape(1))[0]
                              .float())[c]) for k in cands]
        best = min(errs)
        assert int(r.codes[c]) == cands[errs.index(best)], f"column {c}"


def test_refine_codes_span_zero_and_zero_group_keep_codes():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 16, generator=g)
    gs = reference.find_scales(w, 3)
    assert gptq.refine_codes(w, gs, 3, span=0) is gs
    z = torch.zeros(32, 16)
    gz = reference.find_scales(z, 3)
    assert gptq.refine_codes(z, gz, 3) is gz


def test_refine_span_lowers_gptq_output_error(problem):
    """With refined scales GPTQ's layers come out with lower output error than with find_scales' codes
    alone, at low widths where the max-based scales are furthest from the best (this problem's numbers)."""
    x, w, H = problem
    p = gptq.prepare(H)
    for qp in (QParams.make(64, [3, 2], [0.1, 0.9]), QParams.make(32, [3], [1.0])):
        plain = gptq.quantize(w, qp, p, opts=gptq.GPTQOptions(refine_span=0))
        refined = gptq.quantize(w, qp, p)
        assert out_err(x, w, refined.weight) < out_err(x, w, plain.weight), qp.desc()
        dq = codec.dequantize_layer(refined.tensors)[: w.shape[0]]
        assert torch.equal(dq.view(torch.int16), refined.weight.view(torch.int16))


def test_refine_codes_row_weight_is_the_weighted_least_error_nearby():
    """With row weights each column's code minimises sum_rows weight * (Q - w)^2 among the nearby codes;
    unit weights give the unweighted choice."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 40, generator=g) * torch.linspace(0.05, 1.0, 40)
    rw = torch.rand(64, generator=g) * 10 + 0.1
    gs = reference.find_scales(w, 3)
    assert torch.equal(gptq.refine_codes(w, gs, 3, row_weight=torch.ones(64)).codes, gptq.refine_codes(w, gs, 3).codes)
    r = gptq.refine_codes(w, gs, 3, span=2, row_weight=rw)
    for c in range(w.shape[1]):
        cands = sorted({min(15, max(0, int(gs.codes[c]) + d)) for d in range(-2, 3)})
        errs = []
        for k in cands:
            s = codec.decode_scales(torch.full((1, w.shape[1]), k), gs.scale_max.reshape(1))[0].float()
            errs.append(float((rw * (reference.quantize_rows(w, s, 3)[1] - w).pow(2)[:, c]).sum()))
        assert int(r.codes[c]) == cands[errs.index(min(errs))], f"column {c}"


def gptq_objective(w, wq, p):
    """Per column of the permuted [K, N] error E = W - Wq: diag(E^T H E) with prepare's damped H."""
    E = (w.t().float() - wq.t().float())[p.perm]
    return ((p.h @ E) * E).sum(0)


@pytest.mark.parametrize("qp", [QParams.make(64, [3, 2], [0.1, 0.9]), QParams.make(128, [4], [1])],
                         ids=lambda q: q.desc())
def test_polish_never_raises_the_gptq_objective_and_reloads(problem, qp):
    """Polish lowers GPTQ's objective (no column gets worse), writes codes the loader reconstructs to the
    returned weight bit for bit, and refuses to run without the kept Hessian."""
    x, w, H = problem
    p = gptq.prepare(H, keep_h=True)
    assert p.h is not None and p.h.shape == H.shape
    plain = gptq.quantize(w, qp, p)
    pol = gptq.quantize(w, qp, p, opts=gptq.GPTQOptions(polish_sweeps=2))
    before, after = gptq_objective(w, plain.weight, p), gptq_objective(w, pol.weight, p)
    assert bool((after <= before * (1 + 1e-5)).all())
    assert float(after.sum()) < float(before.sum())
    dq = codec.dequantize_layer(pol.tensors)[: w.shape[0]]
    assert torch.equal(dq.view(torch.int16), pol.weight.view(torch.int16))
    assert gptq.prepare(H).h is None
    with pytest.raises(ValueError, match="keep_h"):
        gptq.quantize(w, qp, gptq.prepare(H), opts=gptq.GPTQOptions(polish_sweeps=1))


def test_asymmetric_target_is_the_least_squares_weight_on_the_perturbed_inputs(problem):
    """``W'`` from CrossHessian + asymmetric_targets solves min ||X_fp W^T - X W'^T|| (up to damping), lowers
    GPTQ's error against the full-precision output, and is W itself when the inputs are not perturbed."""
    x_fp, w, _ = problem
    g = torch.Generator().manual_seed(1)
    x = x_fp + 0.05 * torch.randn(x_fp.shape, generator=g) * x_fp.abs().mean(0)     # the quantized model's inputs
    C = gptq.CrossHessian(x.shape[1])
    for a, b in zip(x.split(256), x_fp.split(256)):
        C.add_pair(a, b)
    H, M = C.result(), C.cross()
    tiny = 1e-9       # (almost) no damping: the exact least-squares solution
    wa = gptq.asymmetric_targets({"p": w}, M, gptq.prepare(H, percdamp=tiny))["p"]
    ls = torch.linalg.lstsq(x.double(), (x_fp @ w.t()).double()).solution.t()
    assert torch.allclose(wa.double(), ls, rtol=0, atol=1e-3 * float(ls.abs().max()))

    def fp_err(wq):
        return float((x @ wq.float().t() - x_fp @ w.t()).norm() / (x_fp @ w.t()).norm())

    # With the converter's damping it is the ridge solution: a smaller step that still fits better than W
    # (W is feasible for the ridge objective at zero penalty).
    p = gptq.prepare(H)
    wd = gptq.asymmetric_targets({"p": w}, M, p)["p"]
    assert 0 < float((wd - w).norm()) < float((wa - w).norm())
    assert fp_err(wa) < fp_err(wd) < fp_err(w)

    qp = QParams.make(128, [4], [1])
    plain, asym = gptq.quantize(w, qp, p).weight, gptq.quantize(wd, qp, p).weight
    # Measured here: 0.0729 against 0.0761; most of what is left is the part no weight on X can fit.
    assert fp_err(asym) < fp_err(plain)
    # The identity the method rests on: ||X_fp W^T - X Q^T||^2 = ||X_fp W^T - X W'^T||^2 + ||X (W' - Q)^T||^2
    # for the exact least-squares W' (here from lstsq, in float64), whatever Q is.
    xd, yd, q = x.double(), (x_fp @ w.t()).double(), plain.double()
    lhs = float((yd - xd @ q.t()).pow(2).sum())
    rhs = float((yd - xd @ ls.t()).pow(2).sum() + (xd @ (ls - q).t()).pow(2).sum())
    assert lhs == pytest.approx(rhs, rel=1e-9)
    same = gptq.CrossHessian(x.shape[1])
    same.add_pair(x_fp, x_fp)
    assert not bool(same.cross().any())
    assert torch.equal(gptq.asymmetric_targets({"p": w}, same.cross(), gptq.prepare(same.result()))["p"], w)
    assert torch.equal(gptq.asymmetric_targets({"p": w}, M, p, alpha=0.0)["p"], w)
    assert torch.equal(gptq.asymmetric_targets({"p": w}, M, gptq.prepare(H, invert=False))["p"], w)
    with pytest.raises(ValueError, match="shapes differ"):
        same.add_pair(x_fp, x_fp[:, :10])


@pytest.mark.parametrize("threads", (1, 2))
def test_update_in_place_is_the_product_then_the_subtraction(threads):
    """quantize's error feedback subtracts Hinv[a:b, b:]^T @ err inside the GEMM (addmm_); on the update's shapes
    that gives the same bits as forming the product and subtracting it, which earlier outputs were made with."""
    g = torch.Generator().manual_seed(threads)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, n, rows in ((576, 576, 32), (1536, 576, 32), (576, 1536, 64), (1024, 333, 128)):
            hinv, W = torch.randn(k, k, generator=g), torch.randn(k, n, generator=g)
            err = torch.randn(rows, n, generator=g)
            a, b = rows, 2 * rows
            want = W.clone()
            want[b:] -= hinv[a:b, b:].t() @ err
            got = W.clone()
            got[b:].addmm_(hinv[a:b, b:].t(), err, alpha=-1)
            assert torch.equal(got, want), (k, n, rows)
    finally:
        torch.set_num_threads(prev)
