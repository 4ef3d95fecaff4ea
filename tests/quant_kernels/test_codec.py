"""The EXL2 codec on the torch reference, against data it did not write: golden layers, hand-computed words,
the formula of docs/format.md section 5.

Every test here runs on the forced reference path (``on_reference`` in conftest.py: ``ops`` routed to
``reference.py`` and the native extension never looked up); test_native.py compares ``ops`` on the native
kernels with this reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from exl2.quant_kernels import codec, ops, reference
from exl2.quant_kernels.codec import EXL2FormatError
from exl2.quant_kernels.qparams import QParams, unique_options

pytestmark = pytest.mark.usefixtures("on_reference")

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "exl2_layers.safetensors"  # see tests/data/README.md


def bit_pattern(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.dtype == torch.float16 else x


def u32(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.reshape(-1).tolist()]


# ------------------------------------------------------------------------------------------------
# Golden layers written by an independent writer, with what ExLlamaV2's loader reconstructs
# ------------------------------------------------------------------------------------------------

def golden_cases():
    f = safe_open(str(GOLDEN), "pt")
    meta = json.loads(f.metadata()["cases"])
    for name, info in meta.items():
        t = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
        yield name, info, t


def test_golden_file_has_all_cases():
    names = [n for n, _, _ in golden_cases()]
    assert len(names) == 10
    assert {"w8_g32", "w2_g32", "mix_8_4_3", "mix_6_5_bias_pad"} <= set(names)


@pytest.mark.parametrize("case", ["w8_g32", "w6_g128", "w5_g64", "w4_g128_k576", "w3_g64", "w2_g32",
                                  "mix_8_4_3", "mix_6_5_bias_pad", "mix_5_4_g32", "mix_3_2"])
def test_golden_dequantize_bit_exact(case):
    cases = {n: (i, t) for n, i, t in golden_cases()}
    info, t = cases[case]
    expected = t.pop("expected_weight")
    codec.validate_layer(t, name=case, expect_bias=info["bias"])
    layer = codec.prepare_layer(t, name=case, expect_bias=info["bias"])
    assert ops.backend(layer) == "reference"
    w = reference.dequantize_layer(layer)
    assert w.shape == (info["padded_out"], info["in_features"])
    assert torch.equal(w.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(codec.dequantize_layer(t).view(torch.int16), expected.view(torch.int16))   # via ops


@pytest.mark.parametrize("case", ["w4_g128_k576", "mix_8_4_3", "mix_6_5_bias_pad", "mix_3_2"])
def test_golden_repack_is_byte_identical(case):
    """Unpacking a golden layer and packing it again gives the writer's exact tensors."""
    cases = {n: (i, t) for n, i, t in golden_cases()}
    info, t = cases[case]
    t.pop("expected_weight")
    q, groups, perm = codec.unpack_layer(t)
    n = info["out_features"]
    codes = codec.unpack_scale_codes(t["q_scale"])[:, :n]
    bias = t["bias"][:n] if "bias" in t else None
    again = codec.pack_layer(q[:, :n], [(g.bits, g.rows) for g in groups], codes, t["q_scale_max"], perm, bias)
    assert set(again) == set(t)
    for key in t:
        assert again[key].dtype == t[key].dtype, key
        assert torch.equal(bit_pattern(again[key]), bit_pattern(t[key])), key


def test_golden_group_layout_matches_metadata():
    for name, info, t in golden_cases():
        groups = codec.decode_groups(t["q_groups"], t["q_weight"].shape[0])
        assert sum(g.rows for g in groups) == info["in_features"], name
        assert [g.bits for g in groups] == sorted([g.bits for g in groups], reverse=True), name
        assert {g.bits for g in groups} <= set(info["bits"]), name


# ------------------------------------------------------------------------------------------------
# Hand-computed words, one case per width, from the bit diagrams of docs/format.md section 4
# ------------------------------------------------------------------------------------------------

def column(rows: int, values: dict[int, int]) -> torch.Tensor:
    q = torch.zeros(rows, 1, dtype=torch.int64)
    for r, v in values.items():
        q[r, 0] = v
    return q


def test_pack_2bit_by_hand():
    # 16 rows -> 1 word, row p at bits 2p. Codes 0,1,2,3 repeating: each byte is 0b11_10_01_00 = 0xE4.
    q = torch.tensor([0, 1, 2, 3] * 4).reshape(16, 1)
    assert u32(reference.pack_bits(q, 2)) == [0xE4E4E4E4]


def test_pack_3bit_by_hand():
    # 32 rows -> 3 words.  Row 10 = 0b111: low 2 bits at word0 30..31, high bit at word1 bit 0.
    # Row 21 = 0b101: low bit at word1 bit 31, upper bits 0b10 at word2 bits 0..1.
    # Row 31 = 0b011 at word2 bits 3*(31-22)+2 = 29..31.  Row 0 = 0b110 at word0 bits 0..2.
    q = column(32, {0: 0b110, 10: 0b111, 21: 0b101, 31: 0b011})
    assert u32(reference.pack_bits(q, 3)) == [0xC0000006, 0x80000001, 0x60000002]


def test_pack_4bit_by_hand():
    # 8 rows -> 1 word, row p at bits 4p.
    q = torch.arange(8).reshape(8, 1) + 8
    assert u32(reference.pack_bits(q, 4)) == [0xFEDCBA98]


def test_pack_5bit_by_hand():
    # 32 rows -> 5 words.
    # row 6  = 0b10110: low 2 bits (0b10) word0 30..31 -> 0x80000000; high 3 (0b101) word1 0..2 -> 0x5
    # row 12 = 0b11111: low 4 bits word1 28..31 -> 0xF0000000; top bit word2 bit 0 -> 0x1
    # row 19 = 0b00011: low bit word2 bit 31 -> 0x80000000; high 4 (0b0001) word3 0..3 -> 0x1
    # row 25 = 0b10101: low 3 (0b101) word3 29..31 -> 0xA0000000; high 2 (0b10) word4 0..1 -> 0x2
    # row 31 = 0b00001: word4 bit 5*(31-26)+2 = 27 -> 0x08000000
    q = column(32, {6: 0b10110, 12: 0b11111, 19: 0b00011, 25: 0b10101, 31: 0b00001})
    assert u32(reference.pack_bits(q, 5)) == [0x80000000, 0xF0000005, 0x80000001, 0xA0000001, 0x08000002]


def test_pack_6bit_by_hand():
    # 16 rows -> 3 words.
    # row 0  = 1 -> word0 bit 0
    # row 5  = 0b110101: low 2 (0b01) word0 30..31 -> 0x40000000; high 4 (0b1101) word1 0..3 -> 0xD
    # row 10 = 0b100111: low 4 (0b0111) word1 28..31 -> 0x70000000; high 2 (0b10) word2 0..1 -> 0x2
    # row 15 = 0b111111: word2 bits 6*(15-11)+2 = 26..31 -> 0xFC000000
    q = column(16, {0: 1, 5: 0b110101, 10: 0b100111, 15: 0b111111})
    assert u32(reference.pack_bits(q, 6)) == [0x40000001, 0x7000000D, 0xFC000002]


def test_pack_8bit_by_hand():
    q = torch.tensor([0x12, 0x34, 0x56, 0xF8]).reshape(4, 1)
    assert u32(reference.pack_bits(q, 8)) == [0xF8563412]


def test_scale_codes_by_hand():
    # Column n in word n // 8, nibble n % 8.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 0, 0, 0, 0, 0, 0, 0, 9]])
    assert u32(codec.pack_scale_codes(codes)) == [0xF7654321, 0x90000000]
    assert torch.equal(codec.unpack_scale_codes(codec.pack_scale_codes(codes)), codes)


def test_groups_offsets_by_hand():
    # 32 rows of 8 bits (8 words), 128 rows of 4 bits (16 words), 64 rows of 3 bits (6 words).
    q_groups, _ = codec.encode_groups([(8, 32), (4, 128), (3, 64)])
    assert q_groups.dtype == torch.int16
    assert q_groups.tolist() == [8, 0, 4, 8, 3, 24]
    back = codec.decode_groups(q_groups, 30)
    assert [(g.bits, g.rows, g.row, g.qrow) for g in back] == [(8, 32, 0, 0), (4, 128, 32, 8), (3, 64, 160, 24)]


# ------------------------------------------------------------------------------------------------
# Round trips on random data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_bitstream_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    rows = 96 if bits != 8 else 100
    q = torch.randint(0, 2**bits, (rows, 40), generator=g)
    words = reference.pack_bits(q, bits)
    assert words.shape == (rows * bits // 32, 40) and words.dtype == torch.int32
    assert torch.equal(reference.unpack_bits(words, bits, rows), q)


def random_layer(qp: QParams, k: int, n: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups = qp.row_groups(k)
    q = torch.cat([torch.randint(0, 2**b, (r, n), generator=g) for b, r in groups])
    codes = torch.randint(0, 16, (len(groups), n), generator=g)
    smax = (torch.rand(len(groups), generator=g) * 0.1 + 1e-3).to(torch.float16)
    perm = torch.randperm(k, generator=g)
    b = torch.randn(n, generator=g).to(torch.float16) if bias else None
    return q, groups, codes, smax, perm, b


@pytest.mark.parametrize("qp", unique_options(), ids=lambda qp: qp.desc())
def test_every_option_round_trips(qp):
    # K = 608 is not a multiple of 64 or 128 (short last group); N = 72 needs padding to 96.
    k, n = 608, 72
    q, groups, codes, smax, perm, b = random_layer(qp, k, n, bias=True, seed=len(qp.desc()))
    t = codec.pack_layer(q, groups, codes, smax, perm, b)
    assert t["q_weight"].shape == (sum(r * bb // 32 for bb, r in groups), 96)
    q2, groups2, perm2 = codec.unpack_layer(t)
    assert [(x.bits, x.rows) for x in groups2] == groups
    assert torch.equal(q2[:, :n], q)
    assert torch.equal(perm2, perm)
    # Padded columns hold the zero point and dequantize to exactly zero.
    assert bool((q2[:, n:] == torch.tensor([2 ** (x.bits - 1) for x in groups2 for _ in range(x.rows)]).unsqueeze(1)).all())
    assert torch.equal(codec.unpack_scale_codes(t["q_scale"])[:, :n], codes)
    assert torch.equal(t["bias"][:n], b) and bool((t["bias"][n:] == 0).all())
    w = codec.dequantize_layer(t)
    assert bool((w[n:] == 0).all())


def test_irregular_groups_round_trip():
    groups = [(8, 32), (8, 64), (6, 32), (5, 128), (4, 96), (4, 32), (3, 64), (2, 48)]
    k = sum(r for _, r in groups)
    g = torch.Generator().manual_seed(7)
    q = torch.cat([torch.randint(0, 2**b, (r, 64), generator=g) for b, r in groups])
    t = codec.pack_layer(q, groups, torch.randint(0, 16, (len(groups), 64), generator=g),
                         torch.rand(len(groups), generator=g), torch.randperm(k, generator=g))
    q2, g2, _ = codec.unpack_layer(t)
    assert torch.equal(q2, q) and [(x.bits, x.rows) for x in g2] == groups


# ------------------------------------------------------------------------------------------------
# The dequantization formula, element by element in numpy float16
# ------------------------------------------------------------------------------------------------

def test_dequantize_matches_fp16_formula_elementwise():
    qp = QParams.make([32, 64], [6, 3], [0.25, 0.75])
    q, groups, codes, smax, perm, _ = random_layer(qp, 192, 32, bias=False, seed=3)
    t = codec.pack_layer(q, groups, codes, smax, perm)
    w = codec.dequantize_layer(t).numpy()
    row = 0
    for gi, (bits, rows) in enumerate(groups):
        smax_scaled = np.float16(smax[gi].item()) * np.float16(1 / 256)           # fp16 * fp16 -> fp16
        for r in range(row, row + rows):
            for n in range(32):
                sq = np.float16((codes[gi, n].item() + 1) ** 2)
                s = np.float16(sq * smax_scaled)
                level = np.float16(q[r, n].item() - 2 ** (bits - 1))
                assert w[n, perm[r].item()] == np.float16(level * s)
        row += rows


def test_prescale_multiplies_scale_max():
    qp = QParams.make(64, [4], [1])
    q, groups, codes, smax, perm, _ = random_layer(qp, 128, 32, bias=False, seed=5)
    t = codec.pack_layer(q, groups, codes, smax, perm)
    # A power of two prescale is exact in fp16: the weight doubles exactly.
    assert torch.equal(codec.dequantize_layer(t, prescale=2.0), codec.dequantize_layer(t) * 2)


# ------------------------------------------------------------------------------------------------
# Validation: bad tensors are rejected with the tensor and the rule named
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def good_layer():
    qp = QParams.make(64, [4, 3], [0.5, 0.5])
    q, groups, codes, smax, perm, b = random_layer(qp, 256, 64, bias=True, seed=11)
    return codec.pack_layer(q, groups, codes, smax, perm, b)


def broken(t, **changes):
    t = dict(t)
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    return t


@pytest.mark.parametrize("change, message", [
    (lambda t: broken(t, q_invperm=None), r"layer\.q_invperm: missing"),
    (lambda t: broken(t, q_weight=t["q_weight"].to(torch.int64)), r"q_weight: dtype must be torch\.int32"),
    (lambda t: broken(t, q_scale_max=t["q_scale_max"].float()), r"q_scale_max: dtype must be torch\.float16"),
    (lambda t: broken(t, q_groups=t["q_groups"].to(torch.int32)), r"q_groups: dtype must be torch\.int16"),
    (lambda t: broken(t, q_weight=t["q_weight"][:, :48]), r"q_weight: 48 columns is not a multiple of 32"),
    (lambda t: broken(t, q_scale=t["q_scale"][:, :4]), r"q_scale: shape must be"),
    (lambda t: broken(t, q_scale_max=t["q_scale_max"][:1]), r"q_scale_max: shape must be"),
    (lambda t: broken(t, q_groups=torch.tensor([3, 0, 4, 6, 4, 14, 3, 22], dtype=torch.int16)),
     r"q_groups: group 1 width 4 follows width 3"),
    (lambda t: broken(t, q_groups=torch.tensor([7, 0, 4, 8, 3, 16, 3, 22], dtype=torch.int16)), r"q_groups: group 0 has width 7"),
    (lambda t: broken(t, q_groups=torch.tensor([4, 1, 4, 8, 3, 16, 3, 22], dtype=torch.int16)), r"first group must start at packed row 0"),
    (lambda t: broken(t, q_invperm=t["q_invperm"][:200]), r"q_invperm: shape must be \[256\]"),
    (lambda t: broken(t, q_invperm=torch.zeros(256, dtype=torch.int32)), r"q_invperm: is not a permutation"),
    (lambda t: broken(t, q_invperm=t["q_invperm"] + 1), r"q_invperm: values must lie in \[0, 256\)"),
    (lambda t: broken(t, bias=t["bias"][:32]), r"bias: shape must be \[64\]"),
    (lambda t: broken(t, bias=t["bias"].float()), r"bias: dtype must be torch\.float16"),
    (lambda t: broken(t, q_scale_max=torch.full_like(t["q_scale_max"], float("nan"))), r"q_scale_max: contains NaN"),
])
def test_validation_names_tensor_and_rule(good_layer, change, message):
    # good_layer: K = 256 as 4-bit groups at packed rows 0, 8 and 3-bit groups at 16, 22 (28 rows).
    assert good_layer["q_groups"].tolist() == [4, 0, 4, 8, 3, 16, 3, 22]
    codec.validate_layer(good_layer, name="layer")
    with pytest.raises(EXL2FormatError, match=message):
        codec.validate_layer(change(good_layer), name="layer")


def test_validation_group_rows_rules():
    # One 4-bit group of 48 rows (6 words) followed by another group: not a multiple of 32 rows.
    t = {"q_weight": torch.zeros(6 + 4, 32, dtype=torch.int32), "q_invperm": torch.arange(80, dtype=torch.int32),
         "q_scale": torch.zeros(2, 4, dtype=torch.int32), "q_scale_max": torch.ones(2, dtype=torch.float16),
         "q_groups": torch.tensor([4, 0, 4, 6], dtype=torch.int16)}
    with pytest.raises(EXL2FormatError, match="group 0 has 48 rows; groups must be multiples of 32"):
        codec.validate_layer(t)
    # A 16-row 2-bit tail is allowed (one word of 2-bit codes).
    t = {"q_weight": torch.zeros(4 + 1, 32, dtype=torch.int32), "q_invperm": torch.arange(48, dtype=torch.int32),
         "q_scale": torch.zeros(2, 4, dtype=torch.int32), "q_scale_max": torch.ones(2, dtype=torch.float16),
         "q_groups": torch.tensor([4, 0, 2, 4], dtype=torch.int16)}
    codec.validate_layer(t)


def test_validation_bias_expectation(good_layer):
    with pytest.raises(EXL2FormatError, match="x.bias: present but the architecture has no bias here"):
        codec.validate_layer(good_layer, name="x", expect_bias=False)
    with pytest.raises(EXL2FormatError, match="x.bias: expected by the architecture but missing"):
        codec.validate_layer(broken(good_layer, bias=None), name="x", expect_bias=True)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(EXL2FormatError, match=r"codes must lie in \[0, 7\]"):
        reference.pack_bits(torch.full((32, 1), 8), 3)
    with pytest.raises(EXL2FormatError, match="not a whole number of 32-bit words"):
        reference.pack_bits(torch.zeros(20, 1, dtype=torch.int64), 3)


# ------------------------------------------------------------------------------------------------
# The prepared layer: validated once, decoded once
# ------------------------------------------------------------------------------------------------

def test_prepared_layer_holds_the_decoded_format(good_layer):
    layer = codec.prepare_layer(good_layer, prescale=0.5)
    groups = codec.decode_groups(good_layer["q_groups"], good_layer["q_weight"].shape[0])
    assert layer.group_list() == [(g.bits, g.rows, g.qrow) for g in groups]
    assert layer.groups.dtype == torch.int64 and layer.perm.dtype == torch.int64
    assert torch.equal(layer.perm, codec.unpack_layer(good_layer)[2])
    scales16 = codec.decode_scales(codec.unpack_scale_codes(good_layer["q_scale"]), good_layer["q_scale_max"], 0.5)
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales16.float())
    assert layer.bias is good_layer["bias"] and layer.prescale == 0.5
    assert (layer.in_features, layer.padded_out_features) == codec.layer_shape(good_layer) == (256, 64)
    moved = layer.to("cpu")
    for f in ("q_weight", "groups", "perm", "scales", "bias"):
        assert torch.equal(getattr(moved, f), getattr(layer, f)), f


def test_prepare_validates_and_names_the_layer(good_layer):
    with pytest.raises(EXL2FormatError, match=r"blk\.q_scale_max: dtype must be torch\.float16"):
        codec.prepare_layer({**good_layer, "q_scale_max": good_layer["q_scale_max"].float()}, name="blk")
    with pytest.raises(EXL2FormatError, match=r"blk\.bias: present but the architecture has no bias here"):
        codec.prepare_layer(good_layer, name="blk", expect_bias=False)
    with pytest.raises(TypeError, match="blk.q_weight must be a torch.Tensor"):
        codec.prepare_layer({**good_layer, "q_weight": good_layer["q_weight"].numpy()}, name="blk")
    with pytest.raises(TypeError, match="layer must be a dict"):
        codec.prepare_layer([good_layer])


def test_calls_on_a_prepared_layer_neither_validate_nor_decode_again(good_layer, monkeypatch):
    calls = {"validate_layer": 0, "decode_groups": 0}
    for name in calls:
        real = getattr(codec, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(codec, name, counted)
    layer = codec.prepare_layer(good_layer)
    assert calls == {"validate_layer": 1, "decode_groups": 1}
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    w = ops.dequantize_layer(layer)
    for _ in range(3):
        y = ops.matmul(x, layer)
    assert calls == {"validate_layer": 1, "decode_groups": 1}
    assert torch.equal(y, x @ w.float().t())           # the reference matmul: the fp16 weight, one fp32 matmul
    with pytest.raises(TypeError, match="layer must be a PreparedLayer"):
        ops.matmul(x, good_layer)
    with pytest.raises(TypeError, match="layer must be a PreparedLayer"):
        ops.dequantize_layer(good_layer)
