"""GPTQ for EXL2 layers: act-order, damping, mixed widths per matrix, searched scales.

Names follow the GPTQ paper (Frantar et al., 2022): ``H`` is the Hessian proxy ``2 X^T X`` of the layer's
input (the factor 2 drops out), ``Hinv`` the upper Cholesky factor of ``H^-1``, ``W`` the weight in EXL2
orientation ``[K, N]`` (rows = input features) and ``err`` the scaled quantization error of one row.

The procedure (docs/format.md section 6, docs/pipeline.md section 6):

1. ``H = sum over calibration rows of X^T X`` in fp32, divided by the number of rows.
2. Act-order: ``perm = argsort(diag H, descending)``; rows of ``W`` and of ``H`` are permuted.
3. Damping: add ``max(1e-5, 0.12 * mean(diag H))`` to the diagonal, again if the Cholesky factorisation
   fails or yields NaN (at most 10 times).  ``Hinv = cholesky(cholesky_inverse(cholesky(H)), upper)``.
4. Rows are split into groups by the option (widths descending, so the most active inputs get the most
   bits).  For each group ``[a, b)``: choose scales from the current, already error-compensated rows
   (``find_scales``, then :func:`refine_codes`); then for each row ``c``: quantize,
   ``err_c = (W_c - Q_c) / Hinv[c, c]``, and ``W[c:b] -= Hinv[c, c:b]^T (x) err_c``; after the group,
   ``W[b:] -= Hinv[a:b, b:]^T @ err[a:b]``.
5. ``Q`` is the exact fp16 value the loader dequantizes, so the error feedback sees the real weight.

The per-group kernels (the scale search, its refinement and the row loop of step 4) are called through
``ops`` (``ops.find_scales``, ``ops.refine_codes``, ``ops.gptq_group``): native when the extension is loaded,
the torch twins in ``reference.py`` otherwise or under ``ops.reference_only()``.  The rest (Hessians,
act-order, damping, :func:`polish`, the update after each group) is torch here, the same on either path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from exl2.core.errors import UserError
from exl2.core.threads import fixed_threads

from . import codec, ops
from .finite import all_finite
from .qparams import QParams
from .reference import GroupScales, quantize_rows  # noqa: F401  (GroupScales: ops.find_scales' result)

REFINE_SPAN = 2                         # refine_codes tries each column's scale code +- this many steps
PERCDAMP = 0.12
DAMP_TRIES = 10


@dataclass(frozen=True)
class GPTQOptions:
    """How the quantizer runs; the defaults are the converter's.

    ``percdamp``: :func:`prepare`'s damping fraction; ``refine_span``: :func:`refine_codes`' span (0 keeps
    ExLlamaV2's scale codes).  The other fields are levers that were measured and not adopted
    (docs/decisions/0005-quantizer-levers-not-adopted.md); only bench/levers.py turns them on:

    - ``sequential``: the quantization pass collects each shared input's Hessian after the projections
      before it are quantized (o_proj sees quantized q/k/v, down_proj quantized gate/up); asymmetric
      calibration collects them so in any case;
    - ``polish_sweeps``: sweeps of :func:`polish` after GPTQ (the pass then asks :func:`prepare` to keep H);
    - ``refine_weighted``: :func:`refine_codes` weighs each row's squared error by GPTQ's row weight
      ``1 / Hinv[r, r]^2``.
    """

    percdamp: float = PERCDAMP
    refine_span: int = REFINE_SPAN
    sequential: bool = False
    polish_sweeps: int = 0
    refine_weighted: bool = False


class HessianError(UserError, RuntimeError):
    """The Hessian could not be made positive definite with the allowed damping."""


# From this width on (CPU tensors), Hessian.add computes the upper triangle only (in TRIANGLE_BLOCKS column
# blocks: about 56 % of the products) and result() mirrors it (measured: docs/decisions/0017-measure-stride.md).
TRIANGLE_MIN_K = 2048
TRIANGLE_BLOCKS = 8


def _column_blocks(k: int) -> list[tuple[int, int]]:
    """TRIANGLE_BLOCKS ranges (j0, j1) covering 0..k."""
    step = -(-k // TRIANGLE_BLOCKS)
    return [(j0, min(k, j0 + step)) for j0 in range(0, k, step)]


class Hessian:
    """Accumulates ``H = sum X^T X`` over calibration rows in fp32, then averages over rows.

    One :meth:`add` call is one calibration row (all its tokens), as ExLlamaV2 counts it.  Wide CPU inputs
    (``TRIANGLE_MIN_K``) accumulate the upper triangle only; :meth:`result` fills in the lower one.
    """

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0
        self._lower_stale = False       # the lower triangle lags the upper one (wide inputs)

    def add(self, x: torch.Tensor) -> None:
        k = self.H.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"Hessian.add: input x has {x.shape[-1]} features, expected {k}")
        x = x.reshape(-1, k).to(self.H.device, torch.float32)   # [tokens, K]
        if k < TRIANGLE_MIN_K or self.H.device.type != "cpu":      # the blocks were measured on the CPU only
            self.H.addmm_(x.t(), x)
        else:
            for j0, j1 in _column_blocks(k):                      # rows 0..j1 of columns j0..j1
                self.H[:j1, j0:j1].addmm_(x[:, :j1].t(), x[:, j0:j1])
            self._lower_stale = True
        self.rows += 1

    def _mirror(self) -> None:
        """Copy the upper triangle onto the lower one, a column block at a time (no K x K temporary)."""
        for j0, j1 in _column_blocks(self.H.shape[0]):
            self.H[j0:j1, :j0] = self.H[:j0, j0:j1].t()
            d = self.H[j0:j1, j0:j1]
            d.copy_(d.triu() + d.triu(1).t())
        self._lower_stale = False

    def result(self) -> torch.Tensor:
        """The averaged Hessian, or the identity when no data was added."""
        if self.rows == 0:
            return torch.eye(self.H.shape[0], dtype=torch.float32, device=self.H.device)
        if self._lower_stale:
            self._mirror()
        return self.H / self.rows


class CrossHessian(Hessian):
    """``H = sum X^T X`` of the inputs a layer sees in the quantized model, and beside it
    ``M = sum (X_fp - X)^T X``, with ``X_fp`` the input the same layer sees in the full-precision model
    (same rows, same tokens).  Both are averaged over rows.  :func:`asymmetric_targets` turns them into the
    weight whose GPTQ solution matches the full-precision model's output.
    """

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        super().__init__(k, device)
        self.M = torch.zeros(k, k, dtype=torch.float32, device=device)

    def add_pair(self, x: torch.Tensor, x_fp: torch.Tensor) -> None:
        if x_fp.shape != x.shape:
            raise ValueError(f"CrossHessian.add_pair: shapes differ: {tuple(x.shape)} vs {tuple(x_fp.shape)}")
        k = self.H.shape[0]
        xq = x.reshape(-1, k).to(self.M.device, torch.float32)
        self.M.addmm_((x_fp.reshape(-1, k).to(self.M.device, torch.float32) - xq).t(), xq)
        self.add(x)

    def cross(self) -> torch.Tensor:
        """The averaged ``M`` (zeros when no data was added)."""
        return self.M / max(self.rows, 1)


def asymmetric_targets(weights: dict[str, torch.Tensor], M: torch.Tensor, prepared: "Prepared",
                       alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """The weights to give GPTQ so that it matches the full-precision output (asymmetric calibration).

    GPTQ on ``H = X^T X`` minimises ``||X (W - Q)^T||^2`` with ``X`` the quantized model's inputs to the
    layer, so errors of the earlier layers are taken as they come.  The full-precision model computes
    ``X_fp W^T``.  With ``M = (X_fp - X)^T X`` (:class:`CrossHessian`), the least-squares weight on the
    quantized inputs is ``W' = W + W M H^-1``, and
    ``||X_fp W^T - X Q^T||^2 = ||X (W' - Q)^T||^2 + const``, so GPTQ run on ``W'`` with the same ``H``
    minimises the error against the full-precision output (the objective of Li et al., 2025, "GPTAQ").
    ``H^-1`` is the damped inverse :func:`prepare` made for GPTQ itself (``prepared.hinv^T prepared.hinv``
    in act-order), so this is the ridge solution, which stays at ``W`` when ``X = X_fp``; ``alpha`` scales
    the correction (1: that solution).  ``weights``: name -> ``[N, K]`` of every projection that reads this
    input; returns fp32 ``[N, K]`` per name (unchanged without ``prepared.hinv``, i.e. round-to-nearest).
    """
    out = {n: w.to(torch.float32) for n, w in weights.items()}
    U = prepared.hinv
    if alpha == 0 or U is None or not bool(M.any()):
        return {n: w.clone() for n, w in out.items()}
    perm = prepared.perm
    M = M.to(torch.float32)
    for n, W in out.items():
        corr = torch.empty_like(W)
        corr[:, perm] = ((W @ M)[:, perm] @ U.t()) @ U                                # W M H_d^-1
        out[n] = W + alpha * corr
    return out


@dataclass
class Prepared:
    """What one Hessian yields, shared by every projection that reads the same input."""

    perm: torch.Tensor         # [K] act-order: permuted row i is input feature perm[i]
    hinv: torch.Tensor | None  # [K, K] upper Cholesky factor of the damped inverse (None: round-to-nearest)
    h: torch.Tensor | None = None   # [K, K] the damped, permuted Hessian (kept only with keep_h=True)


def prepare(H: torch.Tensor | None, k: int | None = None, percdamp: float = PERCDAMP, invert: bool = True,
            keep_h: bool = False) -> Prepared:
    """Act-order permutation and ``Hinv`` from a Hessian (identity if ``H`` is None, then ``k`` is needed).

    ``invert=False`` skips the inverse (round-to-nearest with act-order, used for very large heads).
    ``keep_h=True`` also keeps the damped, permuted Hessian (one more K x K matrix) for :func:`polish`.
    """
    if H is None:
        if k is None:
            raise ValueError("prepare: need H or k")
        H = torch.eye(k, dtype=torch.float32)
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"prepare: H must be square, got shape {tuple(H.shape)}")
    H = H.to(torch.float32)
    if not all_finite(H):
        raise HessianError("prepare: H contains NaN or Inf (calibration activations overflowed?)")
    diag = torch.diagonal(H)
    perm = torch.argsort(diag, descending=True, stable=True)   # stable: ties keep input order (determinism)
    if not invert:
        return Prepared(perm, None)
    # Memory: besides the caller's H, at most two K x K matrices are alive at any point (a Qwen2-72B down_proj
    # Hessian is 3.5 GB in fp32): the damped permuted copy and its Cholesky factor, then the factor and the
    # inverse, then the inverse and its factor.  A retry rebuilds the permuted copy and adds ``damp`` once per
    # try so far, the same float additions as damping one matrix repeatedly.
    damp = None
    for tries in range(1, DAMP_TRIES + 1):
        Hp = H.index_select(0, perm).index_select(1, perm)      # [K, K], a new tensor
        dg = torch.diagonal(Hp)                                 # a view: damping is added in place
        if damp is None:   # the mean of the strided diagonal view (its summation order fixes the last bit)
            damp = max(1e-5, percdamp * float(dg.mean()))
        for _ in range(tries):
            dg += damp
        del dg
        with fixed_threads():           # their last bits depend on the thread count (core/threads.py)
            L, info = torch.linalg.cholesky_ex(Hp)
        kept = Hp if keep_h else None
        del Hp
        if int(info) != 0:
            continue
        with fixed_threads():
            Hi = torch.cholesky_inverse(L)
        del L
        if not all_finite(Hi):
            continue
        with fixed_threads():
            U, info = torch.linalg.cholesky_ex(Hi, upper=True)
        del Hi
        if int(info) != 0 or not all_finite(U):
            continue
        return Prepared(perm, U.contiguous(), kept)     # U.contiguous(): a no-op when U is already contiguous
    raise HessianError(f"prepare: Hessian not positive definite after {DAMP_TRIES} damping steps")


def refine_codes(w: torch.Tensor, gs: GroupScales, bits: int, span: int = REFINE_SPAN,
                 row_weight: torch.Tensor | None = None) -> GroupScales:
    """Per column, the scale code within ``span`` steps of ``find_scales``' choice (same ``scale_max``) whose
    rounded column has the least squared error ``sum_rows (Q - w)^2``, Q the loader's fp16 value
    (``row_weight [rows]``: ``sum_rows row_weight * (Q - w)^2``).

    ``find_scales`` rounds every column's scale from its own maximum on a coarse quadratic grid (neighbouring
    codes differ by about 14 % at the top and far more below), so the chosen scale need not be the one with
    the least error, least of all at 2 and 3 bits.  ExLlamaV2 stops at ``find_scales``; this step is ours, changes only which valid codes
    are written, and so stays within the format.  Ties go to the smaller scale: a column that rounds the
    same way under several scales keeps the finest, which the group's later, error-compensated rows
    still use.  What it gains, measured: docs/decisions/0004-refined-scale-codes.md.
    """
    if span <= 0 or float(gs.scale_max) == 0.0:
        return gs
    return ops.refine_codes(w, gs, bits, span, row_weight)


def polish(W0: torch.Tensor, Q: torch.Tensor, codes: torch.Tensor, H: torch.Tensor, row_scale: torch.Tensor,
           row_bits: torch.Tensor, sweeps: int = 1, block: int = 128) -> None:
    """Coordinate descent on GPTQ's objective ``tr((W0 - Q)^T H (W0 - Q))`` over the codes, scales fixed.

    ``W0, Q, codes, row_scale [K, N]`` in permuted row order (``Q`` and ``codes`` are updated in place),
    ``H [K, K]`` the damped, permuted Hessian, ``row_bits [K]``.  Row by row, the continuous optimum of row
    k given the others is ``Q_k + (H E)_k / H_kk`` (E = W0 - Q); it is rounded on the row's grid and taken
    in the columns where it lowers the objective, so no step raises any column's error.
    """
    K = W0.shape[0]
    E = W0 - Q
    for _ in range(sweeps):
        for a in range(0, K, block):
            b = min(a + block, K)
            G = H[a:b] @ E                                            # [B, N]: (H E) of this block's rows
            for i in range(b - a):
                k = a + i
                hkk = H[k, k]
                c, v = quantize_rows(Q[k] + G[i] / hkk, row_scale[k], int(row_bits[k]))
                d = Q[k] - v                                          # change of E[k] per column
                take = 2 * d * G[i] + hkk * d * d < 0                 # the objective of that column falls
                if not bool(take.any()):
                    continue
                d = torch.where(take, d, torch.zeros_like(d))
                E[k] += d
                Q[k] = torch.where(take, v, Q[k])
                codes[k] = torch.where(take, c, codes[k])
                if i + 1 < b - a:
                    G[i + 1:] += H[a + i + 1:b, k:k + 1] * d.unsqueeze(0)


@dataclass
class QuantResult:
    tensors: dict[str, torch.Tensor]   # the layer's EXL2 tensors (no prefix)
    weight: torch.Tensor               # [N, K] fp16: exactly what the loader reconstructs (unpadded)
    groups: list[tuple[int, int]]      # (bits, rows) in storage order


def quantize(weight: torch.Tensor, qparams: QParams, prepared: Prepared, bias: torch.Tensor | None = None,
             opts: GPTQOptions = GPTQOptions(), pack: bool = True) -> QuantResult:
    """Quantize ``weight [N, K]`` (``nn.Linear`` orientation) to an EXL2 layer.

    With ``prepared.hinv`` None this is round-to-nearest (act-order kept, no error feedback).
    Per group: ``ops.find_scales``, :func:`refine_codes`, ``ops.gptq_group`` (the row loop), then one matmul
    carries the group's errors to the later rows; the layer is packed by :func:`codec.pack_layer`.  Which
    kernels run is ``ops``' choice (``ops.reference_only()`` forces the torch twins; the codes and values are
    the same bit for bit).  ``opts``: :class:`GPTQOptions` (``refine_span``, and the levers not adopted;
    ``polish_sweeps`` needs ``prepare(keep_h=True)``).  ``pack=False`` skips packing (``tensors`` is empty):
    for callers that only need the reconstructed weight, which is the same either way.
    """
    n, k = weight.shape
    if prepared.perm.shape != (k,):
        raise ValueError(f"quantize: perm has shape {tuple(prepared.perm.shape)}, weight has K = {k}")
    if not all_finite(weight):
        raise ValueError("quantize: weight contains NaN or Inf")
    perm = prepared.perm
    Hinv = prepared.hinv
    # Working set, in units of N x K fp32 besides the caller's weight: W and Q (1 each), the codes as uint8
    # (0.25; int64 only for polish), one group's int64 codes and errors (the update writes into W in place).
    W = weight.t().to(torch.float32)[perm]             # [K, N] permuted rows (indexing copies)
    polish_sweeps = opts.polish_sweeps
    if polish_sweeps and (prepared.h is None or Hinv is None):
        raise ValueError("quantize: polish_sweeps needs prepare(..., keep_h=True) on a Hessian")
    W0 = W.clone() if polish_sweeps else None
    Q = torch.empty_like(W)                            # dequantized values (fp16-exact)
    codes = torch.empty(k, n, dtype=torch.int64 if polish_sweeps else torch.uint8, device=W.device)  # < 2^8
    groups = qparams.row_groups(k)
    scale_codes, scale_max, scales_rows = [], [], []
    group_codes = err = None
    a = 0
    for bits, rows in groups:
        b = a + rows
        rw = Hinv.diagonal()[a:b].pow(-2) if opts.refine_weighted and Hinv is not None else None
        gs = refine_codes(W[a:b], ops.find_scales(W[a:b], bits), bits, opts.refine_span, rw)
        scale_codes.append(gs.codes)
        scale_max.append(gs.scale_max)
        scales_rows.append(gs.scale)
        group_codes = torch.empty(rows, n, dtype=torch.int64, device=W.device)
        err = torch.empty(rows, n, dtype=torch.float32, device=W.device) if Hinv is not None else None
        ops.gptq_group(W[a:b], Hinv, a, gs.scale, bits, group_codes, Q[a:b], err)
        codes[a:b] = group_codes
        if Hinv is not None and b < k:
            # W[b:] -= Hinv[a:b, b:]^T @ err, the product subtracted inside the GEMM (no [K-b, N] temporary;
            # the same bits as the product then the subtraction in tests/quant_kernels/test_gptq.py)
            W[b:].addmm_(Hinv[a:b, b:].t(), err, alpha=-1)
        a = b
    del W, group_codes, err
    if W0 is not None:
        row_scale = torch.cat([sc.unsqueeze(0).expand(r, -1) for sc, (_, r) in zip(scales_rows, groups)])
        row_bits = torch.cat([torch.full((r,), bt) for bt, r in groups])
        polish(W0, Q, codes, prepared.h, row_scale, row_bits, polish_sweeps)
        del W0
    tensors = (codec.pack_layer(codes, groups, torch.stack(scale_codes), torch.stack(scale_max), perm, bias)
               if pack else {})
    del codes
    # the loader's weight in nn.Linear orientation: Q holds fp16-exact values, so casting before un-permuting
    # gives the same halves; Q is freed before the transposed copy is made
    q16 = Q.to(torch.float16)
    del Q
    w_out = q16[torch.argsort(perm.to(torch.int64))]   # row j of the original order
    del q16
    return QuantResult(tensors, w_out.t().contiguous(), groups)


def quantize_linear(weight: torch.Tensor, qparams: QParams, H: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> QuantResult:
    """Convenience: :func:`prepare` then :func:`quantize` for one matrix."""
    return quantize(weight, qparams, prepare(H, k=weight.shape[1]), bias)
