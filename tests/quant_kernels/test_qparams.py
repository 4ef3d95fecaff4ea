"""Option tables and bit accounting against the numbers of docs/options.md section 8 (computed by ExLlamaV2's code)."""
from __future__ import annotations

import pytest

from exl2.quant_kernels.qparams import (ATTN_OPTIONS, HEAD_OPTIONS, MLP_OPTIONS, QParams,
                                        distinct_options)

# Qwen2-7B shapes (K, N, bias): hidden 3584, kv dim 512, intermediate 18944.
QWEN2_7B_ATTN = [(3584, 3584, True), (3584, 512, True), (3584, 512, True), (3584, 3584, False)]
QWEN2_7B_MLP = [(3584, 18944, False), (3584, 18944, False), (18944, 3584, False)]

# docs/options.md section 8: module-level bpw of the 19/17 combinations for Qwen2/Qwen2.5-7B shapes.
SPEC_ATTN_BPW = [2.135, 2.197, 2.249, 2.672, 3.157, 3.159, 4.050, 4.052, 4.085, 4.144, 4.159, 4.192, 4.244,
                 4.307, 5.213, 5.307, 6.050, 6.269, 8.050]
SPEC_MLP_BPW = [2.239, 2.322, 2.592, 2.908, 3.274, 3.367, 3.620, 4.136, 4.197, 4.257, 4.350, 5.241, 5.333,
                6.071, 6.282, 6.845, 8.035]


def module_bpw(row, shapes):
    # The optimizer's view: all bits of the module (biases included) over its weight count (biases not).
    bits = sum(qp.total_bits(k, n, b) for qp, (k, n, b) in zip(row, shapes))
    return bits / sum(k * n for k, n, _ in shapes)


def test_table_sizes_and_distinct_options():
    assert len(ATTN_OPTIONS) == 19 and all(len(r) == 4 for r in ATTN_OPTIONS)
    assert len(MLP_OPTIONS) == 17 and all(len(r) == 3 for r in MLP_OPTIONS)
    assert [len(c) for c in distinct_options(ATTN_OPTIONS)] == [14, 14, 15, 14]
    assert [len(c) for c in distinct_options(MLP_OPTIONS)] == [13, 13, 14]
    assert sorted(HEAD_OPTIONS) == [2, 3, 4, 5, 6, 8]


@pytest.mark.parametrize("i", range(19))
def test_attention_module_bpw_matches_spec(i):
    assert round(module_bpw(ATTN_OPTIONS[i], QWEN2_7B_ATTN), 3) == SPEC_ATTN_BPW[i]


@pytest.mark.parametrize("i", range(17))
def test_mlp_module_bpw_matches_spec(i):
    assert round(module_bpw(MLP_OPTIONS[i], QWEN2_7B_MLP), 3) == SPEC_MLP_BPW[i]


def test_matrix_bpw_examples_from_spec():
    # Bracketed values of docs/options.md sections 4-6: 4096x4096 attention, 4096->14336 / 14336->4096 MLP.
    assert round(ATTN_OPTIONS[0][0].bpw(4096, 4096), 2) == 2.13
    assert round(ATTN_OPTIONS[1][2].bpw(4096, 4096), 2) == 2.32
    assert round(ATTN_OPTIONS[8][2].bpw(4096, 4096), 2) == 4.13
    assert round(ATTN_OPTIONS[17][2].bpw(4096, 4096), 2) == 8.13
    assert round(MLP_OPTIONS[0][2].bpw(14336, 4096), 2) == 2.48
    assert round(MLP_OPTIONS[4][2].bpw(14336, 4096), 2) == 3.41
    assert round(MLP_OPTIONS[14][2].bpw(14336, 4096), 2) == 6.34
    head = [round(HEAD_OPTIONS[h].bpw(4096, 128256), 2) for h in (2, 3, 4, 5, 6, 8)]
    assert head == [2.73, 3.28, 4.44, 5.19, 6.34, 8.03]


def test_total_bits_by_hand():
    # K=256, N=64, 4-bit g128: 2 groups. weights 256*64*4 = 65536; scale_max 2*16 = 32; q_groups 2*32 = 64;
    # q_scale 2*64*4 = 512; q_invperm 256*32 = 8192; bias 16*64 = 1024.
    qp = QParams.make(128, [4], [1])
    assert qp.total_bits(256, 64) == 65536 + 32 + 64 + 512 + 8192
    assert qp.total_bits(256, 64, bias=True) == 65536 + 32 + 64 + 512 + 8192 + 1024
    assert qp.bpw(256, 64, bias=True) == qp.total_bits(256, 64, True) / (256 * 64 + 64)


def test_row_groups_rounding():
    # 0.1 of 1000 rows = 100 -> one 4-bit group of 128 (rounded up); the 3-bit rows take the rest,
    # 872 = 6 full groups of 128 and a short last group of 104.
    qp = QParams.make(128, [4, 3], [0.1, 0.9])
    assert qp.row_groups(1000) == [(4, 128)] + [(3, 128)] * 6 + [(3, 104)]
    # Mixed group sizes: 8-bit g32, 4-bit g128, 3-bit g128 over K = 1536.
    qp = QParams.make([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])
    groups = qp.row_groups(1536)
    assert groups[:3] == [(8, 32), (8, 32), (8, 32)]          # ceil(76.8 / 32) = 3 groups
    assert sum(r for _, r in groups) == 1536


def test_desc_and_dict_round_trip():
    qp = QParams.make([32, 128], [8, 4], [0.05, 0.95])
    assert qp.desc() == "0.05:8b_32g/0.95:4b_128g s4"
    assert QParams.from_dict(qp.to_dict()) == qp
    # measurement.json stores group-size keys as strings.
    assert QParams.from_dict({"group_size": {"8": 32, "4": 128}, "bits": [8, 4], "bits_prop": [0.05, 0.95],
                              "scale_bits": 4}) == qp


@pytest.mark.parametrize("args, message", [
    ((64, [3, 4], [0.5, 0.5]), "strictly decreasing"),
    ((64, [7], [1]), "not one of"),
    ((48, [4], [1]), "multiple of 32"),
    ((64, [4, 3], [0.5, 0.6]), "sum to 1"),
    (([32], [4, 3], [0.5, 0.5]), "1 group sizes for 2 widths"),
])
def test_bad_options_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        QParams.make(*args)
