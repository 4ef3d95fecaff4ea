"""EXL2-style (ExLlamaV2 Q4/Q6/Q8) KV-cache quantization, in pure torch.

This module is the specification in code (docs/cache.md section 3) that the native CPU/CUDA kernels
are compared against; it dispatches nothing.  ``reference.py`` re-exports :func:`kv_quantize` and
:func:`kv_dequantize` as the torch twins of ``ops.kv_quantize`` / ``ops.kv_dequantize``, which are what
runtime code calls.  It works on one token's K (or V) vector per row: ``x`` is fp16 ``[..., D]`` with
``D = kv_heads * head_dim`` a multiple of 64.  Every 64-element chunk is handled on its own::

    chunk position p     0    1    2    3   ...   62    63
    input                e0   o0   e1   o1  ...   e31   o31        e = chunk[0::2], o = chunk[1::2]
    rotate (fp16)        E = H32 . e      O = H32 . o              unnormalised Walsh-Hadamard, no 1/sqrt(32)
    rotated chunk        E0   O0   E1   O1  ...   E31   O31        E_l, O_l stay where e_l, o_l were
                         |-- scale group 2c: p 0..31 --|-- group 2c+1: p 32..63 --|
                             (E0..E15 and O0..O15)         (E16..E31 and O16..O31)

    codes     4-bit: element p of the row -> byte p // 2, low nibble when p is even, high nibble when odd
              8-bit: element p            -> byte p
    scales    one fp16 per 32 consecutive elements: scales[..., g] covers row elements 32g .. 32g+31

In ExLlamaV2 (``exllamav2_ext/cuda/cache_q.cuh``, ``fp16_to_q`` / ``q_to_fp16``) thread ``t`` of a
256-thread block holds the half2 (2t, 2t+1); the butterfly exchanges half2s between lanes, so the low
halves (even elements) and the high halves (odd elements) are two independent 32-point transforms and
lane ``l`` ends up holding (E_l, O_l).  A scale group is one half-warp (lanes 0-15 or 16-31), i.e. the 32
contiguous positions drawn above.  Blocks of 512 elements do not change any value: every rotation and
group lies inside a 64-element chunk, so quantizing rows of D (D % 64 == 0) equals quantizing the
flattened ``[tokens * D]`` tensor.

Per group with m = max |v| (over the 32 rotated values), bits b, half range c = 2^(b-1):

    q     = clamp(round_half_even(fp16(fp16(v / m) * c + c)), 0, 2c - 1)     (v = +m gives 2c, stored 2c-1)
    scale = fp16(m * (1/c))
    x'    = fp16(fp16(H32 . fp16((q - c) * scale)) * (1/32))                 (H32 . H32 = 32 I)

Arithmetic, as verified in ``cache_q.cuh`` (ExLlamaV2 commit da07fac): every step is an fp16 (half/half2)
intrinsic -- butterfly ``__hadd2`` after a sign-bit flip of the lane whose index has the stage bit set
(stages in the order 1, 2, 4, 8, 16), ``__habs2``/``__hmax``, ``__h2div``, ``__hfma2(w, c, c)``,
``__half2int_rn``, ``__hmul(absmax, 1/c)``; dequantization ``__int2half_rn``, ``__hmul2``, the same
butterfly, ``__hmul2`` by 1/32.  Here each fp16 op is a torch fp16 op, which computes in fp32 and rounds
once to fp16; for +, -, *, / of two fp16 operands that double rounding equals the correctly rounded fp16
result (fp32 has 24 >= 2*11 + 2 bits).  The fma is split into ``w * c`` (exact: c is a power of two) and
``+ c``, so it too rounds once.  The one op that is not correctly rounded on the GPU is ``__hdiv``
(cuda_fp16.hpp: ``rcp.approx.ftz.f32(b) * a`` rounded to fp16, refined only for tiny results).  Given
``rcp.approx``'s stated 1-ulp bound, enumerating all fp16 mantissa pairs shows the quotient can round to
the other fp16 neighbour only where the exact quotient lies within 1.5 * 2^-23 (relative) of a rounding
midpoint, and that this can never change a 4-bit code and can change an 8-bit code in at most 13
(mantissa-pair, exponent-gap) cases, by one (tests/quant_kernels/test_kv_quant.py::test_hdiv_risk).
A port that divides correctly rounded (``__float2half_rn(__half2float(a) / __half2float(b))``) matches
this reference bit for bit.

All-zero group (m = 0): the GPU computes 0/0 = NaN and ``__half2int_rn(NaN)`` = 0 (PTX ``cvt.rni``
converts NaN to 0), so the codes are 0 (not c) and the scale is 0; decoding gives (0 - c) * 0 = -0.
This reference stores the same.  Neither this nor the ``__hdiv`` analysis has been run on a GPU yet.

fp16 range: the forward butterfly reaches 32 * |x|; it cannot overflow when max |x| <= 2047
(32 * 2047 = 65504), and ``kv_quantize`` raises instead of storing an inf scale as the GPU would.  The
inverse butterfly reaches 32 * |x'|; it cannot overflow when max |x| <= ``KV_SAFE_ABS[bits]`` (see there),
and ``kv_dequantize`` raises if it does.
"""
from __future__ import annotations

import torch

from .finite import all_finite

__all__ = ["KV_MODES", "KV_SAFE_ABS", "hadamard32", "kv_quantize", "kv_dequantize", "kv_bytes_per_token"]

#: cache mode -> (key bits, value bits); None = plain fp16 cache.
KV_MODES = {"fp16": None, "q8": (8, 8), "q6": (8, 4), "q4": (4, 4)}

CHUNK = 64   # elements per rotation span (two interleaved 32-point transforms)
GROUP = 32   # elements per scale

#: Largest max |x| for which neither butterfly can overflow fp16, per bit width.  Derivation: the rotated
#: values satisfy |v| <= M <= 32 max|x|; decoding errs by at most one step s = M / 2^(b-1) per rotated value
#: (the clamp of +m), so the inverse butterfly's stage values are at most 32 max|x| + 32 s, i.e.
#: 32 max|x| (1 + 32 / 2^(b-1)) = 160 max|x| (4-bit) or 40 max|x| (8-bit).  65504 / 160 = 409,
#: 65504 / 40 = 1637; rounded down for fp16 rounding in the 10 butterfly stages.
KV_SAFE_ABS = {4: 400.0, 8: 1600.0}

_HALF = torch.float16


def _check_tensor(t, name: str, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")


def _check_dim(D, name: str) -> None:
    if isinstance(D, bool) or not isinstance(D, int) or D <= 0 or D % CHUNK:
        raise ValueError(f"{name} must be a positive multiple of {CHUNK}, got {D!r}")


def hadamard32(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised 32-point Walsh-Hadamard transform (Sylvester order) along the last dim.

    ``out[i] = sum_j (-1)^popcount(i & j) x[j]``, computed as the same radix-2 butterfly the CUDA code
    runs (stage distance 1, 2, 4, 8, 16; index with the stage bit clear gets a + b, set gets a - b), so
    in fp16 it rounds exactly as the GPU does.  Works in the dtype of ``x`` (any floating dtype).
    """
    _check_tensor(x, "x")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != 32:
        raise ValueError(f"x must have last dimension 32, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    for h in (1, 2, 4, 8, 16):
        pairs = x.reshape(*lead, 32 // (2 * h), 2, h)   # [..., block, bit h of the index, low bits]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, 32)   # a - b == a + (-b), bit for bit
    return x


def _rotate_chunks(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D]: rotate the even and the odd elements of every 64-chunk, results stay in place."""
    n, d = x.shape
    lanes = x.reshape(n, d // CHUNK, 32, 2).transpose(-1, -2)      # [N, chunk, even/odd, lane]
    return hadamard32(lanes).transpose(-1, -2).reshape(n, d)


def kv_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp16 K or V rows ``x [..., D]`` to ``bits`` (4 or 8).

    Returns ``q`` uint8 ``[..., D * bits / 8]`` and ``scales`` fp16 ``[..., D / 32]`` in ExLlamaV2's layout.
    Raises ValueError naming ``x`` if it holds inf/NaN or if the fp16 rotation overflows (max |x| > 2047
    can; ExLlamaV2 would silently store an inf scale).
    """
    _check_bits(bits)
    _check_tensor(x, "x", _HALF)
    D = x.shape[-1]
    if D % CHUNK:
        raise ValueError(f"x must have a last dimension that is a multiple of {CHUNK}, "
                         f"got shape {tuple(x.shape)}")
    if not all_finite(x):
        raise ValueError("x holds inf or NaN")
    lead = x.shape[:-1]

    v = _rotate_chunks(x.reshape(-1, D))
    if not all_finite(v):
        raise ValueError(f"x: the fp16 Hadamard rotation overflows (max |x| = {x.abs().max().item()}; "
                         "sums of 32 values must stay <= 65504, which max |x| <= 2047 guarantees)")
    v = v.reshape(-1, D // GROUP, GROUP)                           # [N, group, 32]
    m = v.abs().amax(dim=-1, keepdim=True)                         # fp16, exact

    c = float(2 ** (bits - 1))
    w = v / m                                                      # __h2div: fp16, correctly rounded here
    w = w * c + c                                                  # __hfma2(w, c, c): w * c is exact
    q = torch.round(w)                                             # __half2int_rn: round half to even
    q = torch.where(m == 0, torch.zeros_like(q), q)                # 0/0 = NaN -> __half2int_rn gives 0
    q = q.clamp(0, 2 * c - 1).to(torch.uint8).reshape(-1, D)
    scales = (m * (1.0 / c)).reshape(*lead, D // GROUP)            # __hmul(absmax, 1/c), fp16

    if bits == 4:
        q = q.reshape(-1, D // 2, 2)
        q = q[..., 0] | (q[..., 1] << 4)                           # even element -> low nibble
    return q.reshape(*lead, D * bits // 8), scales


def kv_dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`kv_quantize`: ``q`` uint8 ``[..., D*bits/8]`` and ``scales`` fp16 ``[..., D/32]``
    -> fp16 ``[..., D]``.

    Raises ValueError naming ``q`` if the decoded values overflow the fp16 butterfly (|x'| > ~2047).
    """
    _check_bits(bits)
    _check_dim(D, "D")
    _check_tensor(q, "q", torch.uint8)
    _check_tensor(scales, "scales", _HALF)
    if q.shape[-1] != D * bits // 8:
        raise ValueError(f"q must have last dimension D*bits/8 = {D * bits // 8}, "
                         f"got shape {tuple(q.shape)}")
    if scales.shape[-1] != D // GROUP:
        raise ValueError(f"scales must have last dimension D/32 = {D // GROUP}, "
                         f"got shape {tuple(scales.shape)}")
    if scales.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scales leading shape {tuple(scales.shape[:-1])} does not match "
                         f"q's {tuple(q.shape[:-1])}")
    if not all_finite(scales):
        raise ValueError("scales holds inf or NaN")
    lead = q.shape[:-1]

    codes = q.reshape(-1, q.shape[-1])
    if bits == 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1)    # low nibble = even element
    codes = codes.reshape(-1, D // GROUP, GROUP)
    c = 2 ** (bits - 1)
    d = (codes.to(torch.int16) - c).to(_HALF)                      # __int2half_rn, exact
    d = d * scales.reshape(-1, D // GROUP, 1)                      # __hmul2, fp16
    x = _rotate_chunks(d.reshape(-1, D))                           # same butterfly: H . H = 32 I
    if not all_finite(x):
        raise ValueError("q: the decoded values overflow the fp16 Hadamard butterfly (|x'| > ~2047)")
    x = x * (1.0 / 32.0)                                           # __hmul2 by 1/32, fp16
    return x.reshape(*lead, D)


def kv_bytes_per_token(mode: str, kv_heads: int, head_dim: int, layers: int) -> int:
    """Bytes the cache stores per token over all layers: K and V codes plus their fp16 scales.

    The fp16 working copy that ExLlamaV2 keeps per device is not counted.
    """
    if not isinstance(mode, str) or mode not in KV_MODES:
        raise ValueError(f"mode must be one of {sorted(KV_MODES)}, got {mode!r}")
    for name, val in (("kv_heads", kv_heads), ("head_dim", head_dim), ("layers", layers)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    D = kv_heads * head_dim
    widths = KV_MODES[mode]
    if widths is None:
        return 2 * D * 2 * layers
    if D % CHUNK:
        raise ValueError(f"kv_heads * head_dim must be a multiple of {CHUNK} for mode {mode!r}, got {D}")
    per_layer = sum(D * b // 8 + 2 * (D // GROUP) for b in widths)
    return per_layer * layers
