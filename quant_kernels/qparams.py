"""Quantization options of an EXL2 matrix, the bit accounting, and ExLlamaV2's option tables.

An option (`QParams`) splits the K input rows of a matrix (in act-order, most important rows first)
into runs of bit widths, e.g. ``0.1:4b_128g/0.9:3b_128g s4``: the first ~10 % of the rows at 4 bits in
groups of 128 rows, the rest at 3 bits in groups of 128.  Widths are listed in descending order, which is
also the order the loader requires along K (docs/format.md section 3).

The option tables below are data: the 19 attention combinations (q, k, v, o), the 17 MLP combinations
(gate, up, down) and the head options keyed by head bits.  They are the candidates the measurement pass
evaluates; their order is ExLlamaV2's, and a `measurement.json` of these tables lists them in it (entry i of
a module's list is combination i), so it must not change.  ``TABLES["extended"]`` appends our candidates
after them (``--tables extended``); such a file lists its entries by cost instead (measure/measurement.py),
every entry naming its own options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

VALID_BITS = (2, 3, 4, 5, 6, 8)
SCALE_BITS = 4


@dataclass(frozen=True)
class QParams:
    """One quantization option for a matrix.

    bits:       widths, non-increasing (e.g. ``(8, 4, 3)``)
    bits_prop:  target share of the K rows per width (sums to 1)
    group_size: rows per group for each width, ``{bits: rows}``
    """

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: dict[int, int] = field(hash=False)
    scale_bits: int = SCALE_BITS

    def __post_init__(self):
        if len(self.bits) == 0 or len(self.bits) != len(self.bits_prop):
            raise ValueError(f"QParams: bits {self.bits} and bits_prop {self.bits_prop} must be non-empty and of equal length")
        for b in self.bits:
            if b not in VALID_BITS:
                raise ValueError(f"QParams: bit width {b} is not one of {VALID_BITS}")
        if any(a <= b for a, b in zip(self.bits, self.bits[1:])):
            raise ValueError(f"QParams: bits {self.bits} must be strictly decreasing")
        if any(p <= 0 for p in self.bits_prop) or abs(sum(self.bits_prop) - 1.0) > 1e-9:
            raise ValueError(f"QParams: bits_prop {self.bits_prop} must be positive and sum to 1")
        for b in self.bits:
            gs = self.group_size.get(b)
            if gs is None or gs <= 0 or gs % 32:
                raise ValueError(f"QParams: group size {gs} for {b}-bit rows must be a positive multiple of 32")
        if self.scale_bits != SCALE_BITS:
            raise ValueError(f"QParams: only {SCALE_BITS}-bit scales exist, got {self.scale_bits}")

    @classmethod
    def make(cls, group_size, bits, bits_prop, scale_bits: int = SCALE_BITS) -> "QParams":
        """Build from ExLlamaV2's argument forms: group_size as int, list (one per width) or dict."""
        bits = tuple(int(b) for b in bits)
        if isinstance(group_size, dict):
            gs = {int(b): int(g) for b, g in group_size.items()}
        elif isinstance(group_size, (list, tuple)):
            if len(group_size) != len(bits):
                raise ValueError(f"QParams: {len(group_size)} group sizes for {len(bits)} widths")
            gs = {b: int(g) for b, g in zip(bits, group_size)}
        else:
            gs = {b: int(group_size) for b in bits}
        return cls(bits, tuple(float(p) for p in bits_prop), gs, int(scale_bits))

    # -- serialisation (measurement.json layout) --------------------------------------------------

    def to_dict(self) -> dict:
        """The per-projection entry of ExLlamaV2's measurement.json (group-size keys become strings in JSON)."""
        return {"group_size": {b: self.group_size[b] for b in self.bits}, "bits": list(self.bits),
                "bits_prop": list(self.bits_prop), "scale_bits": self.scale_bits}

    @classmethod
    def from_dict(cls, d: dict) -> "QParams":
        return cls.make(d["group_size"], d["bits"], d["bits_prop"], d.get("scale_bits", SCALE_BITS))

    def desc(self) -> str:
        """ExLlamaV2's description string, e.g. ``0.1:4b_128g/0.9:3b_128g s4``."""
        return "/".join(f"{p}:{b}b_{self.group_size[b]}g" for b, p in zip(self.bits, self.bits_prop)) + f" s{self.scale_bits}"

    # -- layout and accounting ---------------------------------------------------------------------

    def groups_per_width(self, k: int) -> list[int]:
        """Number of groups of each width for a matrix with K input rows.

        Width i gets ``ceil(min(K * p_i, remaining) / gs_i)`` groups and ``remaining`` drops by
        ``groups * gs_i``; the rounding up means later widths may get fewer rows than their share.
        """
        remaining = k
        counts = []
        for b, p in zip(self.bits, self.bits_prop):
            g = math.ceil(min(k * p, remaining) / self.group_size[b])
            counts.append(g)
            remaining -= g * self.group_size[b]
        if remaining > 0:
            raise ValueError(f"QParams {self.desc()}: groups do not cover K = {k}")
        return counts

    def row_groups(self, k: int) -> list[tuple[int, int]]:
        """The groups of a K-row matrix in storage order, as ``(bits, rows)`` pairs.

        Groups are consecutive; every group has its width's group size except the very last one,
        which is cut at K.  Widths whose rows were all taken by earlier widths get no group.
        """
        out = []
        start = 0
        for b, g in zip(self.bits, self.groups_per_width(k)):
            for _ in range(g):
                if start >= k:
                    break
                rows = min(self.group_size[b], k - start)
                out.append((b, rows))
                start += rows
        return out

    def total_bits(self, k: int, n: int, bias: bool = False) -> int:
        """Storage of a K x N matrix in bits, counted as ExLlamaV2 counts it (docs/options.md section 2).

        packed weights + 16 per group (q_scale_max) + 32 per group (q_groups pair)
        + scale_bits * N per group (q_scale) + 32 * K (q_invperm) [+ 16 * N for a bias].
        Column padding is not counted.
        """
        counts = self.groups_per_width(k)
        groups = sum(counts)
        total = 0
        rows_left = k
        for b, g in zip(self.bits, counts):
            r = min(self.group_size[b] * g, rows_left)
            rows_left -= r
            total += r * n * b
        total += groups * 16 + groups * 32 + groups * n * self.scale_bits + k * 32
        if bias:
            total += 16 * n
        return total

    def bpw(self, k: int, n: int, bias: bool = False) -> float:
        return self.total_bits(k, n, bias) / (k * n + (n if bias else 0))


def _q(group_size, bits, bits_prop) -> QParams:
    return QParams.make(group_size, bits, bits_prop)


# fmt: off
# Attention combinations: (q_proj, k_proj, v_proj, o_proj).
ATTN_OPTIONS: list[tuple[QParams, ...]] = [
    (_q(64, [3, 2], [0.05, 0.95]),) * 4,
    (_q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.25, 0.75]), _q(64, [3, 2], [0.1, 0.9])),
    (_q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.1, 0.9]), _q(128, [4, 3], [0.1, 0.9]), _q(64, [3, 2], [0.1, 0.9])),
    (_q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.1, 0.9]), _q(128, [4, 3], [0.1, 0.9]), _q(128, [4, 3], [0.1, 0.9])),
    (_q(128, [4, 3], [0.1, 0.9]),) * 4,
    (_q(128, [4, 3], [0.1, 0.9]), _q(128, [4, 3], [0.1, 0.9]), _q(64, [4, 3], [0.1, 0.9]), _q(128, [4, 3], [0.1, 0.9])),
    (_q(128, [4], [1]),) * 4,
    (_q(128, [4], [1]), _q(128, [4], [1]), _q(64, [4], [1]), _q(128, [4], [1])),
    (_q(64, [4], [1]), _q(64, [4], [1]), _q(32, [4], [1]), _q(64, [4], [1])),
    (_q(32, [4], [1]),) * 4,
    (_q(128, [5, 4], [0.1, 0.9]), _q(128, [5, 4], [0.1, 0.9]), _q(64, [5, 4], [0.1, 0.9]), _q(128, [5, 4], [0.1, 0.9])),
    (_q(64, [5, 4], [0.1, 0.9]), _q(64, [5, 4], [0.1, 0.9]), _q(32, [5, 4], [0.1, 0.9]), _q(64, [5, 4], [0.1, 0.9])),
    (_q(64, [5, 4], [0.1, 0.9]), _q(64, [5, 4], [0.1, 0.9]), _q(64, [5], [1]), _q(64, [5, 4], [0.1, 0.9])),
    (_q(32, [5, 4], [0.1, 0.9]), _q(32, [5, 4], [0.1, 0.9]), _q(32, [5], [1]), _q(32, [5, 4], [0.1, 0.9])),
    (_q(128, [6, 5], [0.1, 0.9]), _q(128, [6, 5], [0.1, 0.9]), _q(128, [6], [1]), _q(128, [6, 5], [0.1, 0.9])),
    (_q(32, [6, 5], [0.1, 0.9]), _q(32, [6, 5], [0.1, 0.9]), _q(32, [6], [1]), _q(32, [6, 5], [0.1, 0.9])),
    (_q(128, [6], [1]),) * 4,
    (_q(32, [6], [1]), _q(32, [6], [1]), _q(32, [8], [1]), _q(32, [6], [1])),
    (_q(128, [8], [1]),) * 4,
]

# MLP combinations: (gate_proj, up_proj, down_proj).
MLP_OPTIONS: list[tuple[QParams, ...]] = [
    (_q(64, [3, 2], [0.05, 0.95]), _q(64, [3, 2], [0.05, 0.95]), _q([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    (_q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.25, 0.75]), _q([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    (_q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.3, 0.7]), _q(32, [5, 3], [0.05, 0.95])),
    (_q(64, [3, 2], [0.1, 0.9]), _q(64, [3, 2], [0.3, 0.7]), _q(32, [5, 4], [0.05, 0.95])),
    (_q(128, [4, 3], [0.1, 0.9]), _q(128, [4, 3], [0.25, 0.75]), _q([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])),
    (_q(32, [4, 3], [0.1, 0.9]), _q(32, [4, 3], [0.25, 0.75]), _q(32, [8, 4, 3], [0.05, 0.1, 0.85])),
    (_q(32, [4, 3], [0.1, 0.9]), _q(32, [4, 3], [0.25, 0.75]), _q([32, 128], [8, 4], [0.05, 0.95])),
    (_q(128, [4], [1]), _q(32, [4], [1]), _q([32, 128], [8, 4], [0.05, 0.95])),
    (_q(32, [4], [1]), _q(32, [4], [1]), _q(32, [8, 4], [0.05, 0.95])),
    (_q(128, [5, 4], [0.1, 0.9]), _q(128, [5, 4], [0.25, 0.75]), _q([32, 128, 128], [8, 5, 4], [0.05, 0.1, 0.85])),
    (_q(32, [5, 4], [0.1, 0.9]), _q(32, [5, 4], [0.25, 0.75]), _q(32, [8, 5, 4], [0.05, 0.1, 0.85])),
    (_q(128, [6, 5], [0.1, 0.9]), _q(128, [6, 5], [0.25, 0.75]), _q([32, 128, 128], [8, 6, 5], [0.05, 0.1, 0.85])),
    (_q(32, [6, 5], [0.1, 0.9]), _q(32, [6, 5], [0.25, 0.75]), _q(32, [8, 6, 5], [0.05, 0.1, 0.85])),
    (_q(128, [6], [1]), _q(128, [6], [1]), _q([32, 128], [8, 6], [0.05, 0.95])),
    (_q(128, [8, 6], [0.1, 0.9]), _q(128, [8, 6], [0.1, 0.9]), _q(128, [8, 6], [0.15, 0.85])),
    (_q(128, [8, 6], [0.1, 0.9]), _q(128, [8, 6], [0.1, 0.9]), _q(128, [8], [1])),
    (_q(128, [8], [1]),) * 3,
]

# Output head options, keyed by head bits (-hb).
HEAD_OPTIONS: dict[int, QParams] = {
    2: _q(32, [4, 2], [0.3, 0.7]),
    3: _q(32, [4, 3], [0.15, 0.85]),
    4: _q(32, [6, 4], [0.15, 0.85]),
    5: _q(128, [6, 5], [0.15, 0.85]),
    6: _q(128, [8, 6], [0.15, 0.85]),
    8: _q(128, [8], [1.0]),
}

# Candidates beyond ExLlamaV2's tables (``--tables extended``; measured in
# docs/decisions/0006-extended-option-tables-and-norm.md).
# ExLlamaV2's attention combinations give q/k/v/o's first rows in act-order at most one bit more than the
# rest; these give the first 32 rows (the inputs with the largest Hessian diagonal) 8 bits, as its MLP
# table already does for down_proj.  Appended after ExLlamaV2's entries here (indices 0-18 / 0-16 of the
# tables keep their meaning); measurement.json lists a module's entries by cost when these are included.
CANDIDATE_ATTN_OPTIONS: list[tuple[QParams, ...]] = [(qp,) * 4 for qp in (
    _q([32, 128], [8, 3], [0.05, 0.95]),
    _q([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85]),
    _q([32, 128, 128], [8, 4, 3], [0.05, 0.45, 0.5]),
    _q([32, 128], [8, 4], [0.05, 0.95]),
    _q(128, [6, 4], [0.1, 0.9]),
    _q([32, 64], [8, 3], [0.05, 0.95]),
    _q([32, 64, 64], [8, 4, 3], [0.05, 0.1, 0.85]),
    _q([32, 64], [8, 4], [0.05, 0.95]),
)]
CANDIDATE_MLP_OPTIONS: list[tuple[QParams, ...]] = [
    (_q([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85]), _q([32, 128, 128], [8, 4, 3], [0.05, 0.25, 0.7]),
     _q([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])),
    (_q([32, 128], [8, 4], [0.05, 0.95]),) * 3,
    (_q([32, 128, 128], [8, 4, 3], [0.05, 0.45, 0.5]), _q([32, 128, 128], [8, 4, 3], [0.05, 0.45, 0.5]),
     _q([32, 128], [8, 4], [0.05, 0.95])),
]
# fmt: on

# The measurement's option tables by name: (attention combinations, MLP combinations).
TABLES: dict[str, tuple[list, list]] = {
    "exl2": (ATTN_OPTIONS, MLP_OPTIONS),
    "extended": (ATTN_OPTIONS + CANDIDATE_ATTN_OPTIONS, MLP_OPTIONS + CANDIDATE_MLP_OPTIONS),
}

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# a sparse MLP's expert projections as ExLlamaV2 names them in a measurement: gate, up, down (layers/moe.py)
MOE_PROJ = ("w1", "w3", "w2")


def distinct_options(table: list[tuple[QParams, ...]]) -> list[list[QParams]]:
    """Per projection (column of the table), the distinct options in first-seen order.

    The measurement pass quantizes each of these once and reuses the result across combinations.
    """
    cols = len(table[0])
    out: list[list[QParams]] = [[] for _ in range(cols)]
    for row in table:
        for j, qp in enumerate(row):
            if qp not in out[j]:
                out[j].append(qp)
    return out


def unique_options() -> list[QParams]:
    """Every distinct option of the attention, MLP (ExLlamaV2's and our candidates) and head tables, in
    first-seen order."""
    out: list[QParams] = []
    for table in (*TABLES["extended"], [tuple(HEAD_OPTIONS.values())]):
        for row in table:
            for qp in row:
                if qp not in out:
                    out.append(qp)
    return out
