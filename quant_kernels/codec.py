"""The EXL2 layer format in code: pack, unpack, dequantize and validate one quantized linear layer.

Pure torch; this module *is* the specification that native kernels are checked against.  See
docs/format.md for the prose version with a bit diagram per width.  Conventions (EXL2-SPEC.md section 1):

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

* Dequantization, exactly as ExLlamaV2's loader rounds it (fp16 at every step)::

    s[g, n]        = fp16( fp16((code[g, n] + 1)^2) * fp16(q_scale_max[g] * prescale / 256) )
    W[perm[k], n]  = fp16( (q[k, n] - 2^(bits_g - 1)) * s[g, n] )     for permuted row k in group g

All products above are of two fp16 numbers, which fp32 holds exactly, so computing them in fp32 and
rounding once to fp16 reproduces the GPU's fp16 multiply bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .qparams import VALID_BITS

SUFFIXES = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "bias")
MAX_K = 65536          # the permutation is read as uint16
MAX_PACKED_ROWS = 32767  # q_groups offsets are int16


class EXL2FormatError(ValueError):
    """A layer's tensors break a rule of the EXL2 format; the message names the tensor and the rule."""


def padded_columns(n: int) -> int:
    """Output columns rounded up to a multiple of 32, as every ExLlamaV2 linear pads them."""
    return (n + 31) // 32 * 32


# ------------------------------------------------------------------------------------------------
# Bitstream packing
# ------------------------------------------------------------------------------------------------
#
# Each column of q_weight is one continuous little-endian bitstream: code i of width b occupies stream
# bits [i*b, (i+1)*b); stream bit j is bit j % 32 of word j // 32.  A code that crosses a word boundary
# keeps its low bits in the earlier word.  The per-width diagrams are in docs/format.md.

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) to int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


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
    nwords = rows * bits // 32
    pos = torch.arange(rows, dtype=torch.int64) * bits      # first stream bit of each code
    word = pos // 32
    shift = (pos % 32).unsqueeze(1)                          # [rows, 1]
    out = torch.zeros(nwords + 1, n, dtype=torch.int64)
    # Low part: the code shifted into its first word (bits beyond 32 are cut below).
    out.index_add_(0, word, (q << shift) & 0xFFFFFFFF)
    # High part of codes that straddle a word boundary.
    spill = (pos % 32) + bits > 32
    if bool(spill.any()):
        s = shift[spill]                                     # [m, 1]
        out.index_add_(0, word[spill] + 1, q[spill] >> (32 - s))
    return _to_int32(out[:nwords])


def unpack_bits(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words ``[rows*bits/32, N]`` to codes ``[rows, N]`` (int64)."""
    if bits not in VALID_BITS:
        raise EXL2FormatError(f"unpack_bits: width {bits} is not one of {VALID_BITS}")
    if words.shape[0] * 32 < rows * bits:
        raise EXL2FormatError(f"unpack_bits: {words.shape[0]} words cannot hold {rows} codes of {bits} bits")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(1, w.shape[1], dtype=torch.int64)])   # room for the spill read
    pos = torch.arange(rows, dtype=torch.int64) * bits
    word = pos // 32
    shift = (pos % 32).unsqueeze(1)
    lo = w[word] >> shift
    hi = w[word + 1] << (32 - shift)       # only matters where the code straddles; masked below
    return (lo | hi) & (2**bits - 1)


def pack_scale_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes ``[G, Np]`` (0..15) to int32 ``[G, Np/8]``: column n in word n//8, nibble n%8."""
    g, n = codes.shape
    if n % 8:
        raise EXL2FormatError(f"pack_scale_codes: {n} columns is not a multiple of 8")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise EXL2FormatError("pack_scale_codes: scale codes must lie in [0, 15]")
    c = c.reshape(g, n // 8, 8)                              # [G, Np/8, 8]
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return _to_int32((c << shifts).sum(dim=2))


def unpack_scale_codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[G, Np/8]`` to scale codes ``[G, Np]`` (int64, 0..15)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    c = (w.unsqueeze(2) >> shifts) & 0xF                     # [G, Np/8, 8]
    return c.reshape(packed.shape[0], -1)


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

def pack_layer(
    q: torch.Tensor,
    groups: list[tuple[int, int]],
    scale_codes: torch.Tensor,
    scale_max: torch.Tensor,
    perm: torch.Tensor,
    bias: torch.Tensor | None = None,
    reference: bool = False,
) -> dict[str, torch.Tensor]:
    """Assemble the tensors of one EXL2 layer (keys without the module prefix).

    q:           unsigned codes ``[K, N]`` in permuted row order
    groups:      ``[(bits, rows), ...]`` covering K, widths non-increasing
    scale_codes: 4-bit codes ``[G, N]`` (stored nibble, i.e. multiplier - 1)
    scale_max:   ``[G]`` per-group max scale (rounded to fp16 here)
    perm:        ``[K]`` permuted row i holds original input feature ``perm[i]``
    bias:        ``[N]`` or None

    Columns are padded to a multiple of 32: padded codes hold the zero point and padded scale codes 0,
    so padded weights dequantize to exactly 0.  Packing runs in the native kernels when available
    (``ops.pack_bits``, same bytes); ``reference=True`` uses :func:`pack_bits` here.
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
        if reference:
            words.append(pack_bits(qg, g.bits))
        else:
            from . import ops
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


def group_scales(scale_codes: torch.Tensor, scale_max: torch.Tensor, prescale: float = 1.0) -> torch.Tensor:
    """Per-(group, column) fp16 scales exactly as the loader computes them.

    ``fp16(fp16((code + 1)^2) * fp16(q_scale_max * prescale / 256))``.
    """
    sq = ((scale_codes.to(torch.int64) + 1) ** 2).to(torch.float32)         # exact, <= 256
    smax = (scale_max.to(torch.float32) * (prescale / 256.0)).to(torch.float16)   # [G]
    return (sq * smax.to(torch.float32).unsqueeze(1)).to(torch.float16)      # [G, Np]


def unpack_layer(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[Group], torch.Tensor]:
    """Codes ``[K, Np]`` (permuted order, int64), the groups and the permutation of a layer."""
    validate_layer(t)
    glist = decode_groups(t["q_groups"], t["q_weight"].shape[0])
    qw = t["q_weight"]
    q = torch.cat([unpack_bits(qw[g.qrow:g.qrow + g.rows * g.bits // 32], g.bits, g.rows) for g in glist], 0)
    perm = torch.argsort(t["q_invperm"].to(torch.int64))
    return q, glist, perm


def dequantize_layer(t: dict[str, torch.Tensor], prescale: float = 1.0, reference: bool = False) -> torch.Tensor:
    """The fp16 weight ExLlamaV2 reconstructs, in ``nn.Linear`` orientation ``[Np, K]``.

    ``prescale`` is the loader's per-layer factor (``logit_scale`` for the head, ``scale_depth`` for
    o_proj/down_proj of some architectures; 1 otherwise).  Runs in the native kernels when available
    (``ops.dequantize_layer``, same bits); ``reference=True`` runs the torch code below, the spec.
    """
    if not reference:
        from . import ops
        return ops.dequantize_layer(t, prescale)
    q, glist, perm = unpack_layer(t)
    scales = group_scales(unpack_scale_codes(t["q_scale"]), t["q_scale_max"], prescale)   # [G, Np]
    gidx = torch.cat([torch.full((g.rows,), i, dtype=torch.int64) for i, g in enumerate(glist)])
    zero = torch.cat([torch.full((g.rows,), 2 ** (g.bits - 1), dtype=torch.int64) for g in glist])
    levels = (q - zero.unsqueeze(1)).to(torch.float32)                          # [K, Np], exact
    w_perm = (levels * scales[gidx].to(torch.float32)).to(torch.float16)       # [K, Np] permuted rows
    w = torch.empty_like(w_perm)
    w[perm] = w_perm                                                            # original row order
    return w.t().contiguous()                                                   # [Np, K]


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
    if not bool(torch.isfinite(qsm).all()):
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
    seen = torch.zeros(k, dtype=torch.bool)
    iv = inv.to(torch.int64)
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
