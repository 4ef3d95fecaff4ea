"""exl2's own KV quantizer (quant_kernels/kvx_quant.py): packing, levels, error bounds, the MSE table."""
import pytest
import torch
from exl2.quant_kernels.kvx_quant import (BITS, LEVELS, MSE_FACTOR, hadamard, kvx_codes, kvx_decode, kvx_dequantize,
                                         kvx_quantize, pack_codes, unpack_codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


def test_pack_layout_is_little_endian_bit_runs():
    # 3-bit codes 0..7: code j starts at bit 3j of a 24-bit little-endian word
    codes = torch.arange(8, dtype=torch.uint8)
    word = sum(j << (3 * j) for j in range(8))
    assert pack_codes(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack_codes(codes, 8).tolist() == list(range(8))


@pytest.mark.parametrize("bits", BITS)
def test_levels_symmetric_ascending_within_unit(bits):
    lv = LEVELS[bits]
    assert lv.shape == (2 ** bits,)
    assert torch.all(lv[1:] > lv[:-1])
    assert torch.equal(lv, -lv.flip(0))
    assert lv.abs().max() <= 1.0


@pytest.mark.parametrize("bits", BITS)
def test_quantize_error_is_within_half_a_gap(bits):
    """Each value decodes to its nearest level: the error is at most half the widest gap between neighbouring
    levels, or the distance from the outermost level to the group's maximum, times the group's scale."""
    g = torch.Generator().manual_seed(100 + bits)
    z = torch.randn(200, 128, generator=g) * torch.rand(200, 1, generator=g) * 10
    q, s = kvx_quantize(z, bits, 64)
    assert q.shape == (200, 128 * bits // 8) and s.shape == (200, 2) and s.dtype == torch.float16
    back = kvx_dequantize(q, s, bits, 64)
    lv = LEVELS[bits]
    gap = max(float((lv[1:] - lv[:-1]).max()) / 2, 1 - float(lv[-1]))
    scale = s.float().repeat_interleave(64, -1)
    # fp16 rounding of the scale: the maximum may sit up to 2^-11 (relative) beyond the stored scale
    assert torch.all((back - z).abs() <= scale * (gap + 2 ** -10) + 1e-6)
    codes, scales = kvx_codes(z, bits, 64)
    assert torch.equal(kvx_decode(codes, scales, bits, 64), back)


def test_zero_group_decodes_to_zero():
    z = torch.zeros(2, 64)
    z[1, 3] = 2.0
    q, s = kvx_quantize(z, 4, 32)
    back = kvx_dequantize(q, s, 4, 32)
    assert s[0].tolist() == [0.0, 0.0] and torch.equal(back[0], torch.zeros(64))
    assert torch.equal(back[1, 32:], torch.zeros(32))


def test_mse_factor_table():
    """MSE_FACTOR is the quantizer's error on Gaussian groups of 64 relative to 4 bits (recomputed)."""
    x = torch.randn(40000, 64, generator=torch.Generator().manual_seed(7))
    err = {b: float(((kvx_dequantize(*kvx_quantize(x, b, 64), b, 64) - x) ** 2).mean()) for b in BITS}
    for b in BITS:
        assert err[b] / err[4] == pytest.approx(MSE_FACTOR[b], rel=0.03), (b, err[b] / err[4])
    # each bit divides the error by 3 to 5.5 (5 -> 6 bits least: Lloyd-Max levels up to 5 bits, uniform above)
    for b in BITS[:-1]:
        assert 3.0 < err[b] / err[b + 1] < 5.5


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_lloyd_levels_are_centroids(bits):
    """Re-derivation of the stored Lloyd-Max levels: on fresh Gaussian groups of 64 divided by their maximum
    magnitude, each level is (within sampling noise) the mean of the values it takes, weighted by the squared
    scale (the error is measured in z, not in z / max), and the levels beat the uniform ones."""
    x = torch.randn(60000, 64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    m = x.abs().amax(-1, keepdim=True)
    u, w = (x / m).flatten(), (m ** 2).expand_as(x).flatten()
    lv = LEVELS[bits].double()
    idx = torch.bucketize(u, (lv[1:] + lv[:-1]) / 2)
    num = torch.zeros(len(lv), dtype=torch.float64).index_add_(0, idx, u * w)
    den = torch.zeros(len(lv), dtype=torch.float64).index_add_(0, idx, w)
    centroid = num / den
    spacing = float((lv[1:] - lv[:-1]).min())
    assert torch.all((centroid - lv).abs() < 0.02 * spacing + 2e-4), (centroid - lv).abs().max()
    h = (2 ** bits - 1) / 2
    uni = (torch.arange(2 ** bits, dtype=torch.float64) - h) / h
    mse = lambda levels: float(((levels[torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)] - u) ** 2 * w).mean())  # noqa: E731
    assert mse(lv) < 0.8 * mse(uni)


def test_hadamard_orthonormal_involution():
    for n in (8, 64, 128):
        h = hadamard(n)
        assert torch.allclose(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-14)
        assert torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(96)


def test_bad_arguments():
    z = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        kvx_quantize(z, 1, 64)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        kvx_quantize(z, 4, 48)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        kvx_quantize(z, 4, 12)
    with pytest.raises(ValueError, match="inf or NaN"):
        kvx_quantize(torch.full((1, 64), float("nan")), 4, 64)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(torch.zeros(2, 10, dtype=torch.uint8), 3, 64)
