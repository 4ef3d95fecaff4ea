"""The EXL2 layer format as data: tensor names, groups, scale codes, validation, the prepared layer.

Nothing here computes a kernel or dispatches to one: this module is the common ground of the torch
reference (``reference.py``), the dispatcher (``ops.py``) and the format-level functions (``codec.py``,
``gptq.py``).  docs/format.md describes the format in prose with a bit diagram per width; the conventions
(docs/format.md sections 1-5) in short:

* A layer computes ``y = x @ W + bias`` with ``W`` stored as ``[K, N]`` (K = in_features, N = out_features),
  the transpose of ``nn.Linear.weight``.  Rows are input features, in act-order ("permuted") order.
* ``N`` is padded to ``Np``, a multiple of 32, in every stored tensor.
* Tensors of a layer with prefix ``P``::

    P.q_weight     int32 [Q, Np]    packed unsigned codes, one little-endian bitstream per column
    P.q_invperm    int32 [K]        q_invperm[j] = permuted row of original input feature j
    P.q_scale      int32 [G, Np/8]  4-bit scale codes, column n in word n//8, bits 4*(n%8) .. +3
    P.q_scale_max  fp16  [G]        per-group maximum scale (raw; the loader divides it by 256)
    P.q_groups     int16 [2G]       per group: bit width, first packed row of the group in q_weight
    P.bias         fp16  [Np]       optional

* Bitstream: code i of width b in a column occupies stream bits ``[i*b, (i+1)*b)``; stream bit j is bit
  ``j % 32`` of word ``j // 32``.  A code that crosses a word boundary keeps its low bits in the earlier word.
* Dequantization, exactly as ExLlamaV2's loader rounds it (fp16 at every step)::

    s[g, n]        = fp16( fp16((code[g, n] + 1)^2) * fp16(q_scale_max[g] * prescale / 256) )
    W[perm[k], n]  = fp16( (q[k, n] - 2^(bits_g - 1)) * s[g, n] )     for permuted row k in group g

All products above are of two fp16 numbers, which fp32 holds exactly, so computing them in fp32 and
rounding once to fp16 reproduces the GPU's fp16 multiply bit for bit.

:class:`PreparedLayer` is a layer after :func:`codec.prepare_layer` has validated it once and decoded what
every call of ``ops.matmul`` / ``ops.dequantize_layer`` needs (group table, permutation, fp32 scales), so
those calls neither validate nor decode again.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from exl2.core.errors import UserError

from .finite import all_finite
from .qparams import VALID_BITS

SUFFIXES = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "bias")
MAX_K = 65536          # the permutation is read as uint16
MAX_PACKED_ROWS = 32767  # q_groups offsets are int16


class EXL2FormatError(UserError, ValueError):
    """A layer's tensors break a rule of the EXL2 format; the message names the tensor and the rule."""


def padded_columns(n: int) -> int:
    """Output columns rounded up to a multiple of 32, as every ExLlamaV2 linear pads them."""
    return (n + 31) // 32 * 32


# ------------------------------------------------------------------------------------------------
# Scale codes
# ------------------------------------------------------------------------------------------------

def to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) to int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_scale_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes ``[G, Np]`` (0..15) to int32 ``[G, Np/8]``: column n in word n//8, nibble n%8."""
    g, n = codes.shape
    if n % 8:
        raise EXL2FormatError(f"pack_scale_codes: {n} columns is not a multiple of 8")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise EXL2FormatError("pack_scale_codes: scale codes must lie in [0, 15]")
    c = c.reshape(g, n // 8, 8)                              # [G, Np/8, 8]
    shifts = torch.arange(8, dtype=torch.int64, device=c.device) * 4
    return to_int32_bits((c << shifts).sum(dim=2))


def unpack_scale_codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[G, Np/8]`` to scale codes ``[G, Np]`` (int64, 0..15)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * 4
    c = (w.unsqueeze(2) >> shifts) & 0xF                     # [G, Np/8, 8]
    return c.reshape(packed.shape[0], -1)


def decode_scales(scale_codes: torch.Tensor, scale_max: torch.Tensor, prescale: float = 1.0) -> torch.Tensor:
    """Per-(group, column) fp16 scales from unpacked 4-bit codes ``[G, Np]`` and ``scale_max [G]``, exactly
    as the loader computes them: ``fp16(fp16((code + 1)^2) * fp16(q_scale_max * prescale / 256))``.
    """
    sq = ((scale_codes.to(torch.int64) + 1) ** 2).to(torch.float32)         # exact, <= 256
    smax = (scale_max.to(torch.float32) * (prescale / 256.0)).to(torch.float16)   # [G]
    return (sq * smax.to(torch.float32).unsqueeze(1)).to(torch.float16)      # [G, Np]


# ------------------------------------------------------------------------------------------------
# Groups
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    bits: int
    rows: int      # input rows of the group (permuted order)
    row: int       # first input row
    qrow: int      # first packed row in q_weight


def encode_groups(groups: list[tuple[int, int]]) -> tuple[torch.Tensor, list[Group]]:
    """``[(bits, rows), ...]`` in storage order to the ``q_groups`` tensor and the group list."""
    flat = []
    out = []
    row = qrow = 0
    for bits, rows in groups:
        flat += [bits, qrow]
        out.append(Group(bits, rows, row, qrow))
        row += rows
        qrow += rows * bits // 32
    return torch.tensor(flat, dtype=torch.int16), out


def decode_groups(q_groups: torch.Tensor, packed_rows: int) -> list[Group]:
    """Recover the groups from ``q_groups`` and ``q_weight.shape[0]`` as the loader does.

    Row counts are not stored: group g spans packed rows ``[offset_g, offset_{g+1})`` (the last one up to
    ``packed_rows``), and holds ``packed_rows_g * 32 / bits_g`` input rows.
    """
    qg = q_groups.to(torch.int64).tolist()
    n = len(qg) // 2
    out = []
    row = 0
    for g in range(n):
        bits, off = qg[2 * g], qg[2 * g + 1]
        end = qg[2 * g + 3] if g + 1 < n else packed_rows
        rows = (end - off) * 32 // bits
        out.append(Group(bits, rows, row, off))
        row += rows
    return out




# ------------------------------------------------------------------------------------------------
# Whole layers
# ------------------------------------------------------------------------------------------------

def layer_shape(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(K, Np) of a layer's tensors."""
    return int(t["q_invperm"].shape[0]), int(t["q_weight"].shape[1])


def validate_layer(t: dict[str, torch.Tensor], name: str = "", expect_bias: bool | None = None) -> None:
    """Check every rule the ExLlamaV2 loader relies on; raise :class:`EXL2FormatError` naming the tensor.

    ``name`` is the module prefix used in messages; ``expect_bias`` (if given) must match the presence of
    a bias, as the loader asserts per architecture.
    """
    p = f"{name}." if name else ""

    def fail(key, rule):
        raise EXL2FormatError(f"{p}{key}: {rule}")

    for key in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"):
        if key not in t:
            fail(key, "missing")
    dtypes = {"q_weight": torch.int32, "q_scale": torch.int32, "q_scale_max": torch.float16, "q_groups": torch.int16}
    for key, dt in dtypes.items():
        if t[key].dtype != dt:
            fail(key, f"dtype must be {dt}, got {t[key].dtype}")
    if t["q_invperm"].dtype not in (torch.int16, torch.int32, torch.int64):
        fail("q_invperm", f"dtype must be an integer type, got {t['q_invperm'].dtype}")

    qw, inv, qs, qsm, qg = (t[k] for k in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"))
    if qw.dim() != 2:
        fail("q_weight", f"must be 2-D [Q, Np], got shape {tuple(qw.shape)}")
    packed_rows, np_ = qw.shape
    if np_ % 32:
        fail("q_weight", f"{np_} columns is not a multiple of 32 (output columns must be padded)")
    if packed_rows > MAX_PACKED_ROWS:
        fail("q_weight", f"{packed_rows} packed rows exceeds {MAX_PACKED_ROWS} (int16 group offsets)")
    if qg.dim() != 1 or qg.numel() == 0 or qg.numel() % 2:
        fail("q_groups", f"must be 1-D with an even, non-zero length, got shape {tuple(qg.shape)}")
    ngroups = qg.numel() // 2
    if qsm.shape != (ngroups,):
        fail("q_scale_max", f"shape must be [{ngroups}] (one per group), got {tuple(qsm.shape)}")
    if not all_finite(qsm):
        fail("q_scale_max", "contains NaN or Inf")
    if qs.shape != (ngroups, np_ // 8):
        fail("q_scale", f"shape must be [{ngroups}, {np_ // 8}], got {tuple(qs.shape)}")

    vals = qg.to(torch.int64).tolist()
    prev_bits = 99
    for g in range(ngroups):
        bits, off = vals[2 * g], vals[2 * g + 1]
        if bits not in VALID_BITS:
            fail("q_groups", f"group {g} has width {bits}; widths are {VALID_BITS}")
        if bits > prev_bits:
            fail("q_groups", f"group {g} width {bits} follows width {prev_bits}; widths must not increase along K")
        prev_bits = bits
        end = vals[2 * g + 3] if g + 1 < ngroups else packed_rows
        if g == 0 and off != 0:
            fail("q_groups", f"first group must start at packed row 0, got {off}")
        if end <= off or end > packed_rows:
            fail("q_groups", f"group {g} spans packed rows [{off}, {end}), outside [0, {packed_rows}]")
        rows = (end - off) * 32
        if rows % bits:
            fail("q_groups", f"group {g}: {end - off} packed rows is not a whole number of {bits}-bit rows")
        rows //= bits
        # The kernels step through K 32 rows at a time (16 for 2-bit), checking for a new group only at
        # step starts: every group must be a multiple of 32 rows, except a 16-row tail of 2-bit rows.
        if rows % 32 and not (g + 1 == ngroups and bits == 2 and rows % 16 == 0):
            fail("q_groups", f"group {g} has {rows} rows; groups must be multiples of 32 rows")

    k = sum(g.rows for g in decode_groups(qg, packed_rows))
    if inv.shape != (k,):
        fail("q_invperm", f"shape must be [{k}] (rows covered by the groups), got {tuple(inv.shape)}")
    if k > MAX_K:
        fail("q_invperm", f"K = {k} exceeds {MAX_K} (permutation read as uint16)")
    iv = inv.to(torch.int64)
    seen = torch.zeros(k, dtype=torch.bool, device=iv.device)
    if int(iv.min()) < 0 or int(iv.max()) >= k:
        fail("q_invperm", f"values must lie in [0, {k})")
    seen[iv] = True
    if not bool(seen.all()):
        fail("q_invperm", "is not a permutation (repeated entries)")

    if "bias" in t:
        b = t["bias"]
        if b.dtype != torch.float16:
            fail("bias", f"dtype must be torch.float16, got {b.dtype}")
        if b.shape != (np_,):
            fail("bias", f"shape must be [{np_}] (padded output columns), got {tuple(b.shape)}")
    if expect_bias is True and "bias" not in t:
        fail("bias", "expected by the architecture but missing")
    if expect_bias is False and "bias" in t:
        fail("bias", "present but the architecture has no bias here")


@dataclass(frozen=True, eq=False)
class PreparedLayer:
    """One EXL2 layer, validated once, in the form the kernels take: what ``ops.matmul(x, layer)`` and
    ``ops.dequantize_layer(layer)`` read on every call, without checking or decoding the format again.

    Made by :func:`codec.prepare_layer` (which validates the stored tensors and decodes the rest through
    ``ops``); a hand-built instance is trusted as it is.  All tensors live on one device; :meth:`to` moves
    them together.

    q_weight  int32 [Q, Np]   the packed codes as stored, contiguous
    groups    int64 [G, 3]    per group in storage order: bit width, input rows, first packed row
    perm      int64 [K]       act-order: permuted row i holds input feature ``perm[i]`` (argsort of q_invperm)
    scales    fp32  [G, Np]   each group's column scales, fp16 values (the loader's), ``prescale`` applied
    bias      fp16  [Np]      as stored, or None; ``ops.matmul`` does not add it
    prescale  float           the loader's per-layer factor the scales were decoded with
    """

    q_weight: torch.Tensor
    groups: torch.Tensor
    perm: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None
    prescale: float = 1.0

    @property
    def in_features(self) -> int:
        """K, the layer's input features."""
        return int(self.perm.shape[0])

    @property
    def padded_out_features(self) -> int:
        """Np, the output columns of every stored tensor (a multiple of 32)."""
        return int(self.q_weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.q_weight.device

    def group_list(self) -> list[tuple[int, int, int]]:
        """``[(bits, rows, first packed row), ...]`` as Python ints."""
        return [tuple(g) for g in self.groups.tolist()]

    def to(self, device) -> "PreparedLayer":
        """The same layer with every tensor on ``device`` (values unchanged)."""
        move = {"q_weight": self.q_weight, "groups": self.groups, "perm": self.perm, "scales": self.scales}
        if self.bias is not None:
            move["bias"] = self.bias
        return replace(self, **{k: v.to(device) for k, v in move.items()})
