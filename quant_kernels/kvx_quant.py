"""exl2's own KV-cache quantizer (the ``q4x``/``q3x`` cache modes; not an ExLlamaV2 format), in pure torch.

The cache modes of ``runtime/kv_x.py`` transform each token's key or value vector per head first (centering, a
calibrated rotation; see there); what reaches this module is a float tensor ``z [..., n]`` whose last dimension
is cut into groups of ``group`` consecutive values (``n % group == 0``, ``group % 8 == 0``).  Per group:

    s     = fp16(max |z|)                              (the stored scale; one fp16 per group)
    q     = the index of the level of LEVELS[b] nearest to z / s   (ties to the lower level)
    z'    = LEVELS[b][q] * s                           (fp32)

``LEVELS[b]`` are 2^b symmetric levels in [-1, 1].  For 2 to 5 bits they are the Lloyd-Max levels of the values
of a group of 64 independent normal numbers divided by the group's largest magnitude (what a whole-head
rotation makes of a key or value vector): on such data their mean squared error is 0.46 / 0.68 / 0.76 / 0.78 of
the uniform levels' (2 / 3 / 4 / 5 bits).  For 6 to 8 bits they are uniform, mid-rise: (j - h) / h with
h = (2^b - 1) / 2, so +-max |z| falls on the outermost levels (above 5 bits Lloyd-Max gains little).  A group of
zeros has s = 0 and decodes to zeros.  Bits ``b`` are 2..8.

Codes are packed 8 at a time into ``b`` bytes, little-endian within the 8 * b bits: code j of a run of 8 starts
at bit b * j.  So ``[..., n]`` codes take ``[..., n * b / 8]`` bytes, and scales ``[..., n / group]`` fp16.

:data:`MSE_FACTOR` gives the quantizer's mean squared error on such Gaussian groups relative to its 4-bit error:
the cache modes use it to predict how a stream's error changes with its width when allocating bits.
"""
from __future__ import annotations

import math

import torch

from .finite import all_finite

__all__ = ["BITS", "LEVELS", "MSE_FACTOR", "hadamard", "kvx_quantize", "kvx_dequantize", "kvx_codes", "kvx_decode",
           "pack_codes", "unpack_codes"]

BITS = (2, 3, 4, 5, 6, 7, 8)

# Positive halves of the Lloyd-Max levels (see the module docstring), 2 to 5 bits; tests re-derive them.
_LLOYD_HALF = {
    2: (0.17297, 0.58849),
    3: (0.09219, 0.28557, 0.51212, 0.83097),
    4: (0.04618, 0.13956, 0.23629, 0.33932, 0.45249, 0.58203, 0.74008, 0.95341),
    5: (0.02408, 0.07229, 0.12092, 0.16996, 0.21968, 0.27037, 0.32234, 0.37590, 0.43185, 0.49062, 0.55309,
        0.62049, 0.69475, 0.77787, 0.87379, 0.98987),
}


def _levels(bits: int) -> torch.Tensor:
    if bits in _LLOYD_HALF:
        half = torch.tensor(_LLOYD_HALF[bits], dtype=torch.float32)
        return torch.cat([-half.flip(0), half])
    h = (2 ** bits - 1) / 2
    return (torch.arange(2 ** bits, dtype=torch.float32) - h) / h


#: bits -> the 2^bits levels, ascending, in units of the group's scale.
LEVELS = {b: _levels(b) for b in range(2, 9)}
_MIDS = {b: (lv[1:] + lv[:-1]) / 2 for b, lv in LEVELS.items()}

#: Mean squared error of the quantizer at b bits divided by its error at 4 bits, on independent standard normal
#: values in groups of 64 (tests/quant_kernels/test_kvx_quant.py recomputes it).
MSE_FACTOR = {2: 15.48, 3: 4.137, 4: 1.0, 5: 0.2411, 6: 0.07507, 7: 0.01846, 8: 0.004581}


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def _check_group(n: int, group) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 8:
        raise ValueError(f"group must be a positive multiple of 8, got {group!r}")
    if n % group:
        raise ValueError(f"the last dimension {n} is not a multiple of the group size {group}")
    return group


def hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of order ``n`` (a power of two), Sylvester order: symmetric, and its
    own inverse (``H @ H == I``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def kvx_codes(z: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [..., n]`` (float) -> (codes uint8 ``[..., n]`` unpacked, scales fp16 ``[..., n / group]``)."""
    _check_bits(bits)
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.dim() < 1:
        raise ValueError("z must be a floating-point tensor with at least one dimension")
    n = z.shape[-1]
    _check_group(n, group)
    if not all_finite(z):
        raise ValueError("z holds inf or NaN")
    g = z.float().reshape(*z.shape[:-1], n // group, group)                 # [..., groups, group]
    s = g.abs().amax(-1, keepdim=True).to(torch.float16)                   # [..., groups, 1]
    if not all_finite(s):
        raise ValueError(f"z: a group's scale overflows fp16 (max |z| = {z.abs().max().item():.4g})")
    sf = s.float()
    u = torch.where(sf == 0, torch.zeros_like(g), g / torch.where(sf == 0, torch.ones_like(sf), sf))
    q = torch.bucketize(u, _MIDS[bits].to(u.device))                       # nearest level; ties to the lower
    return q.to(torch.uint8).reshape(z.shape), s.squeeze(-1)


def kvx_decode(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Unpacked codes ``[..., n]`` and scales ``[..., n / group]`` -> fp32 ``[..., n]``."""
    _check_bits(bits)
    n = codes.shape[-1]
    _check_group(n, group)
    if scales.shape != (*codes.shape[:-1], n // group):
        raise ValueError(f"scales {tuple(scales.shape)} do not match codes {tuple(codes.shape)} in groups of {group}")
    lv = LEVELS[bits].to(codes.device)[codes.long()].reshape(*codes.shape[:-1], n // group, group)
    return (lv * scales.float()[..., None]).reshape(codes.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` (each < 2^bits, n % 8 == 0) -> uint8 ``[..., n * bits / 8]``."""
    _check_bits(bits)
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"the last dimension {n} is not a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8)
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // 8, 8)
    shift = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shift).sum(-1, keepdim=True)                               # [..., n/8, 1]: 8 * bits <= 56 bits
    out = (word >> (torch.arange(bits, device=codes.device, dtype=torch.int64) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*codes.shape[:-1], n * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., n * bits / 8]`` -> uint8 codes ``[..., n]``."""
    _check_bits(bits)
    if n % 8 or packed.shape[-1] != n * bits // 8:
        raise ValueError(f"packed codes {tuple(packed.shape)} do not hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8)
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], n // 8, bits)
    word = (b << (torch.arange(bits, device=packed.device, dtype=torch.int64) * 8)).sum(-1, keepdim=True)
    c = (word >> (torch.arange(8, device=packed.device, dtype=torch.int64) * bits)) & (2 ** bits - 1)
    return c.to(torch.uint8).reshape(*packed.shape[:-1], n)


def kvx_quantize(z: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [..., n]`` -> (packed codes uint8 ``[..., n * bits / 8]``, scales fp16 ``[..., n / group]``)."""
    codes, scales = kvx_codes(z, bits, group)
    return pack_codes(codes, bits), scales


def kvx_dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Inverse of :func:`kvx_quantize` (up to the quantization): -> fp32 ``[..., n]``."""
    _check_bits(bits)
    n = packed.shape[-1] * 8 // bits
    return kvx_decode(unpack_codes(packed, bits, n), scales, bits, group)
