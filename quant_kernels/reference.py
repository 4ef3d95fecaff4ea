"""The torch reference of every kernel: the specification the native CPU/CUDA kernels are checked against.

Each function here has the name and signature of its twin in ``ops.py`` and computes what the native
kernel computes, bit for bit (``matmul`` excepted: the native kernels sum in another order).  Nothing
here dispatches or looks at the native extension, and no module this one imports does (``layout``,
``qparams``, ``kv_quant``), so a call of ``reference.X`` always runs the torch code below.  ``ops.X`` runs
the native kernel when the extension is loaded and this code otherwise, and checks its arguments first;
the functions here check only what the format itself forbids (a width, a code out of range) and trust
tensors that ``ops`` already checked.

Contents:

    pack_bits, unpack_bits        one column bitstream per output column (layout.py describes it)
    group_scales                  packed q_scale + q_scale_max -> fp32 scales [G, Np]
    dequantize_layer, matmul      on a layout.PreparedLayer
    find_scales, gptq_group       GPTQ's scale search for one group and its row loop
    kv_quantize, kv_dequantize    ExLlamaV2's Q4/Q8 KV cache (kv_quant.py holds the code and its derivation)
    quantize_rows                 round rows on a column scale grid (no native twin; gptq.py uses it too)

All functions work on the device of their inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_quant import kv_dequantize, kv_quantize
from .layout import EXL2FormatError, PreparedLayer, decode_scales, to_int32_bits, unpack_scale_codes
from .qparams import VALID_BITS

__all__ = ["pack_bits", "unpack_bits", "group_scales", "dequantize_layer", "matmul", "GroupScales",
           "find_scales", "quantize_rows", "gptq_group", "kv_quantize", "kv_dequantize"]

P_MIN, P_MAX, P_GRID = 0.70, 1.20, 96   # scale multiplier search: 97 values from 0.70 to 1.20
ERR_NORM = 3.5                          # the search minimises sum |error|^3.5


# ------------------------------------------------------------------------------------------------
# Bitstream
# ------------------------------------------------------------------------------------------------

def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``q [rows, N]`` (values < 2^bits) into int32 words ``[rows*bits/32, N]``."""
    if bits not in VALID_BITS:
        raise EXL2FormatError(f"pack_bits: width {bits} is not one of {VALID_BITS}")
    rows, n = q.shape
    if (rows * bits) % 32:
        raise EXL2FormatError(f"pack_bits: {rows} rows x {bits} bits is not a whole number of 32-bit words")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise EXL2FormatError(f"pack_bits: codes must lie in [0, {2**bits - 1}] for {bits}-bit rows")
    dev = q.device
    nwords = rows * bits // 32
    pos = torch.arange(rows, dtype=torch.int64, device=dev) * bits     # first stream bit of each code
    word = pos // 32
    shift = (pos % 32).unsqueeze(1)                                      # [rows, 1]
    out = torch.zeros(nwords + 1, n, dtype=torch.int64, device=dev)
    # Low part: the code shifted into its first word (bits beyond 32 are cut below).
    out.index_add_(0, word, (q << shift) & 0xFFFFFFFF)
    # High part of codes that straddle a word boundary.
    spill = (pos % 32) + bits > 32
    if bool(spill.any()):
        s = shift[spill]                                                 # [m, 1]
        out.index_add_(0, word[spill] + 1, q[spill] >> (32 - s))
    return to_int32_bits(out[:nwords])


def unpack_bits(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words ``[rows*bits/32, N]`` to codes ``[rows, N]`` (int64)."""
    if bits not in VALID_BITS:
        raise EXL2FormatError(f"unpack_bits: width {bits} is not one of {VALID_BITS}")
    if words.shape[0] * 32 < rows * bits:
        raise EXL2FormatError(f"unpack_bits: {words.shape[0]} words cannot hold {rows} codes of {bits} bits")
    dev = words.device
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(1, w.shape[1], dtype=torch.int64, device=dev)])   # room for the spill read
    pos = torch.arange(rows, dtype=torch.int64, device=dev) * bits
    word = pos // 32
    shift = (pos % 32).unsqueeze(1)
    lo = w[word] >> shift
    hi = w[word + 1] << (32 - shift)       # only matters where the code straddles; masked below
    return (lo | hi) & (2**bits - 1)


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

def group_scales(q_scale: torch.Tensor, q_scale_max: torch.Tensor, prescale: float = 1.0) -> torch.Tensor:
    """The loader's scales ``[G, Np]`` from the stored ``q_scale`` / ``q_scale_max``, as fp32 holding the
    fp16 values (:func:`layout.decode_scales`)."""
    return decode_scales(unpack_scale_codes(q_scale), q_scale_max, prescale).to(torch.float32)


def dequantize_layer(layer: PreparedLayer) -> torch.Tensor:
    """The fp16 weight ExLlamaV2 reconstructs, in ``nn.Linear`` orientation ``[Np, K]``."""
    qw, dev = layer.q_weight, layer.q_weight.device
    glist = layer.group_list()
    q = torch.cat([unpack_bits(qw[qrow:qrow + rows * bits // 32], bits, rows) for bits, rows, qrow in glist], 0)
    gidx = torch.cat([torch.full((rows,), i, dtype=torch.int64, device=dev) for i, (_, rows, _) in enumerate(glist)])
    zero = torch.cat([torch.full((rows,), 2 ** (bits - 1), dtype=torch.int64, device=dev) for bits, rows, _ in glist])
    levels = (q - zero.unsqueeze(1)).to(torch.float32)                          # [K, Np], exact
    w_perm = (levels * layer.scales[gidx]).to(torch.float16)                    # [K, Np] permuted rows
    w = torch.empty_like(w_perm)
    w[layer.perm] = w_perm                                                      # original row order
    return w.t().contiguous()                                                   # [Np, K]


def matmul(x: torch.Tensor, layer: PreparedLayer) -> torch.Tensor:
    """``y = x @ W`` for ``x [M, K]`` (fp16 or fp32): the fp16 weight in fp32, one torch matmul, the result
    in x's dtype ``[M, Np]``.  No bias is added."""
    w = dequantize_layer(layer)
    return (x.to(torch.float32) @ w.t().to(torch.float32)).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------

@dataclass
class GroupScales:
    codes: torch.Tensor      # [N] int64, stored nibble = multiplier - 1 (0..15)
    scale_max: torch.Tensor  # [] fp16, the stored q_scale_max
    scale: torch.Tensor      # [N] fp32 holding the exact fp16 scale the loader uses


def find_scales(w: torch.Tensor, bits: int) -> GroupScales:
    """Scales of one group ``w [rows, N]`` (docs/format.md section 6).

    Per column a base scale ``max|w| / ((2^b - 1) / 2)``; a 4-bit code per column on a quadratic grid
    relative to the group maximum; then a common multiplier ``p`` in [0.70, 1.20] chosen to minimise
    ``sum |dequant(quant(w)) - w|^3.5`` over the group.
    """
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    w = w.to(torch.float32)
    xmax = w.abs().amax(dim=0) + 1e-12                        # [N]
    base = xmax / (maxq / 2)
    smax = base.max()
    mult = torch.clamp(torch.round(torch.sqrt(base / smax) * 16), 1, 16)   # [N] 1..16
    s0 = (mult / 16) ** 2 * smax                              # working scale before the multiplier
    best_i, best_err = 0, None
    for i in range(P_GRID + 1):
        pi = i / P_GRID
        p = P_MIN * (1 - pi) + P_MAX * pi
        s = s0 * p
        err = (torch.clamp(torch.round(w / s), -zero, maxq - zero) * s - w).abs().pow(ERR_NORM).sum()
        if best_err is None or err < best_err:
            best_i, best_err = i, err
    pif = best_i / P_GRID
    p = P_MAX * pif + P_MIN * (1 - pif)
    scale_max = (smax * p).to(torch.float16)
    codes = (mult - 1).to(torch.int64)
    scale = decode_scales(codes.unsqueeze(0), scale_max.reshape(1))[0].to(torch.float32)
    return GroupScales(codes, scale_max, scale)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round rows ``w [..., N]`` to codes with per-column ``scale``; returns (codes int64, fp16-exact values).

    ``q = clamp(rint(w / s) + 2^(b-1), 0, 2^b - 1)``; the value is ``fp16((q - 2^(b-1)) * s)``, the
    loader's reconstruction.  A zero scale (an all-zero group) gives the zero code.
    """
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe) + zero, 0, maxq)
    q = torch.where(scale == 0, torch.full_like(q, zero), q)
    deq = ((q - zero) * scale).to(torch.float16).to(torch.float32)
    return q.to(torch.int64), deq


def refine_codes(w: torch.Tensor, gs: GroupScales, bits: int, span: int,
                 row_weight: torch.Tensor | None = None) -> GroupScales:
    """Per column of one group ``w [rows, N]``, the scale code within ``span`` steps of ``gs.codes`` (same
    ``scale_max``) whose rounded column has the least ``sum_rows (Q - w)^2`` (``row_weight [rows]`` weighs
    each row's term); ties keep the smaller code (:func:`exl2.quant_kernels.gptq.refine_codes`)."""
    w = w.to(torch.float32)
    codes = scale = best = None
    for d in range(-span, span + 1):                                   # smallest scale first
        cand = (gs.codes + d).clamp(0, 15)
        s = decode_scales(cand.unsqueeze(0), gs.scale_max.reshape(1))[0].to(torch.float32)
        e2 = (quantize_rows(w, s, bits)[1] - w).pow(2)
        err = (e2 if row_weight is None else e2 * row_weight[:, None]).sum(0)          # [N]
        if best is None:
            codes, scale, best = cand, s, err
            continue
        better = err < best
        best = torch.where(better, err, best)
        codes = torch.where(better, cand, codes)
        scale = torch.where(better, s, scale)
    return GroupScales(codes, gs.scale_max, scale)


def gptq_group(W: torch.Tensor, Hinv: torch.Tensor | None, a: int, scale: torch.Tensor, bits: int,
               codes: torch.Tensor, Q: torch.Tensor, err: torch.Tensor | None) -> None:
    """GPTQ's row loop over one group, the rows ``[a, a + rows)`` of the permuted weight, in place.

    ``W [rows, N]`` those rows (updated as the loop goes), ``Hinv [K, K]`` the upper Cholesky factor of the
    inverse Hessian (None: round to nearest, no error feedback), ``scale [N]`` the group's fp16-exact
    column scales; writes ``codes [rows, N]``, the loader's values ``Q [rows, N]`` and the scaled errors
    ``err [rows, N]``.  Row by row: quantize row c, ``err_c = (W_c - Q_c) / Hinv[c, c]``, and subtract
    ``Hinv[c, c+1:b]^T (x) err_c`` from the group's later rows.  The update of the rows after the group is
    the caller's (one matmul).
    """
    rows = W.shape[0]
    if Hinv is None:
        codes[:], Q[:] = quantize_rows(W, scale, bits)
        return
    for i in range(rows):
        c = a + i
        codes[i], Q[i] = quantize_rows(W[i], scale, bits)
        err[i] = (W[i] - Q[i]) / Hinv[c, c]
        W[i + 1:] -= Hinv[c, c + 1:a + rows].unsqueeze(1) * err[i].unsqueeze(0)    # [rows-i-1, N]
