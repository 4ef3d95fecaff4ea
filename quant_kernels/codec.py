"""One EXL2 layer at the format level: pack it, unpack it, validate it, prepare it for the kernels.

The functions here compose kernels and call them through ``ops`` only, so they run natively when the
extension is loaded and on the torch reference otherwise (``ops.reference_only()`` forces that); they
never choose a path themselves.  The layout of the tensors, the dequantization formula and the validation
rules live in ``layout.py`` and are re-exported here (``validate_layer``, ``decode_groups``,
``padded_columns``, ``EXL2FormatError``, ...), so callers need only this module.

    pack_layer(q, groups, scale_codes, scale_max, perm, bias)  -> the stored tensors (validated)
    prepare_layer(tensors, prescale, name, expect_bias)        -> layout.PreparedLayer (validated once)
    dequantize_layer(tensors, prescale)                        -> fp16 [Np, K], the loader's weight
    unpack_layer(tensors)                                      -> codes [K, Np], groups, perm

A runtime keeps the :class:`PreparedLayer` of each layer and calls ``ops.matmul(x, layer)`` /
``ops.dequantize_layer(layer)``, which do not check the format again (see ``ops.py``).
"""
from __future__ import annotations

import torch

from . import ops
from .layout import (MAX_K, MAX_PACKED_ROWS, SUFFIXES, EXL2FormatError, Group, PreparedLayer,  # noqa: F401
                     decode_groups, decode_scales, encode_groups, layer_shape, pack_scale_codes, padded_columns,
                     unpack_scale_codes, validate_layer)

_REQUIRED = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")


def pack_layer(
    q: torch.Tensor,
    groups: list[tuple[int, int]],
    scale_codes: torch.Tensor,
    scale_max: torch.Tensor,
    perm: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Assemble the tensors of one EXL2 layer (keys without the module prefix), validated.

    q:           unsigned codes ``[K, N]`` in permuted row order
    groups:      ``[(bits, rows), ...]`` covering K, widths non-increasing
    scale_codes: 4-bit codes ``[G, N]`` (stored nibble, i.e. multiplier - 1)
    scale_max:   ``[G]`` per-group max scale (rounded to fp16 here)
    perm:        ``[K]`` permuted row i holds original input feature ``perm[i]``
    bias:        ``[N]`` or None

    Columns are padded to a multiple of 32: padded codes hold the zero point and padded scale codes 0,
    so padded weights dequantize to exactly 0.  The codes are packed by ``ops.pack_bits``.
    """
    k, n = q.shape
    np_ = padded_columns(n)
    pad = np_ - n
    if sum(r for _, r in groups) != k:
        raise EXL2FormatError(f"pack_layer: groups cover {sum(r for _, r in groups)} rows, K is {k}")
    q_groups, glist = encode_groups(groups)
    words = []
    for g in glist:
        qg = q[g.row:g.row + g.rows]
        if pad:
            qg = torch.cat([qg.to(torch.int64), torch.full((g.rows, pad), 2 ** (g.bits - 1), dtype=torch.int64)], 1)
        words.append(ops.pack_bits(qg, g.bits))
    codes = scale_codes.to(torch.int64)
    if pad:
        codes = torch.cat([codes, torch.zeros(codes.shape[0], pad, dtype=torch.int64)], 1)
    out = {
        "q_weight": torch.cat(words, 0),
        "q_invperm": torch.argsort(perm.to(torch.int64)).to(torch.int32),
        "q_scale": pack_scale_codes(codes),
        "q_scale_max": scale_max.to(torch.float16).reshape(-1),
        "q_groups": q_groups,
    }
    if bias is not None:
        b = bias.to(torch.float16).reshape(-1)
        out["bias"] = torch.cat([b, torch.zeros(pad, dtype=torch.float16)]) if pad else b
    validate_layer(out)
    return out


def prepare_layer(t: dict[str, torch.Tensor], prescale: float = 1.0, name: str = "",
                  expect_bias: bool | None = None) -> PreparedLayer:
    """Validate a layer's stored tensors once and decode what the kernels read on every call.

    ``t``: suffix -> tensor (``q_weight``, ``q_invperm``, ``q_scale``, ``q_scale_max``, ``q_groups``, optional
    ``bias``; other keys are ignored), all on one CPU or CUDA device; the result lives there too.
    ``prescale`` is the loader's per-layer factor (``logit_scale`` for the head, ``scale_depth`` for
    o_proj/down_proj of some architectures; 1 otherwise), folded into the scales.  ``name`` prefixes error
    messages and ``expect_bias`` is :func:`validate_layer`'s.  Raises :class:`EXL2FormatError` naming the
    tensor and the rule, or TypeError/ValueError for a tensor the kernels cannot read.
    """
    if not isinstance(t, dict):
        raise TypeError(f"layer must be a dict of tensors, got {type(t).__name__}")
    p = f"{name}." if name else ""
    for key in SUFFIXES:
        if key in t:
            ops.check_tensor(t[key], p + key)
    validate_layer(t, name, expect_bias)
    qw = t["q_weight"]
    dev = qw.device
    for key in (*_REQUIRED[1:], "bias"):
        if key in t and t[key].device != dev:
            raise ValueError(f"{p}{key} is on {t[key].device}, {p}q_weight on {dev}")
    glist = decode_groups(t["q_groups"], qw.shape[0])
    groups = torch.tensor([[g.bits, g.rows, g.qrow] for g in glist], dtype=torch.int64, device=dev)
    perm = torch.argsort(t["q_invperm"].to(torch.int64))
    scales = ops.group_scales(t["q_scale"], t["q_scale_max"], prescale)
    return PreparedLayer(qw.contiguous(), groups, perm, scales, t.get("bias"), float(prescale))


def dequantize_layer(t: dict[str, torch.Tensor], prescale: float = 1.0) -> torch.Tensor:
    """The fp16 weight ExLlamaV2 reconstructs, in ``nn.Linear`` orientation ``[Np, K]``:
    :func:`prepare_layer` (which validates ``t``), then ``ops.dequantize_layer``."""
    return ops.dequantize_layer(prepare_layer(t, prescale))


def unpack_layer(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[Group], torch.Tensor]:
    """Codes ``[K, Np]`` (permuted order, int64), the groups and the permutation of a layer (validated)."""
    validate_layer(t)
    glist = decode_groups(t["q_groups"], t["q_weight"].shape[0])
    qw = t["q_weight"]
    q = torch.cat([ops.unpack_bits(qw[g.qrow:g.qrow + g.rows * g.bits // 32], g.bits, g.rows) for g in glist], 0)
    perm = torch.argsort(t["q_invperm"].to(torch.int64))
    return q, glist, perm
