"""Tests for exl2.quant_kernels.kv_quant, the pure-torch reference of ExLlamaV2's Q4/Q6/Q8 KV cache."""
import numpy as np
import pytest
import torch

from exl2.quant_kernels.kv_quant import (
    KV_MODES, KV_SAFE_ABS, hadamard32, kv_bytes_per_token, kv_dequantize, kv_quantize,
)


def sylvester32() -> torch.Tensor:
    """The explicit +-1 matrix, H[i, j] = (-1)^popcount(i & j), built without any butterfly."""
    return torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(32)] for i in range(32)],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------------------- hadamard32

def test_hadamard32_matches_explicit_matrix():
    H = sylvester32()
    assert torch.equal(H @ H, 32 * torch.eye(32, dtype=torch.float64))
    x = torch.randn(5, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hadamard32(x), x @ H.T, rtol=0, atol=1e-12)
    # small integers are exact in fp16 at every stage
    xi = torch.randint(-8, 9, (7, 32), generator=torch.Generator().manual_seed(2)).to(torch.float64)
    assert torch.equal(hadamard32(xi.half()).double(), xi @ H.T)
    assert torch.equal(hadamard32(hadamard32(xi)), 32 * xi)


def _lane_butterfly(w: torch.Tensor) -> torch.Tensor:
    """The CUDA loop, one lane at a time: take lane l^i's value, negate own if l & i, add (fp16)."""
    w = w.clone()
    for i in (1, 2, 4, 8, 16):
        partner = w[..., [l ^ i for l in range(32)]]
        own = torch.stack([-w[..., l] if l & i else w[..., l] for l in range(32)], dim=-1)
        w = own + partner
    return w


def test_hadamard32_rounds_like_the_lane_loop():
    # Random fp16 data spanning many binades, so most stage sums round: the stage order and operand
    # signs must match the CUDA loop bit for bit (signed zeros included).
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2000, 32, generator=g) * torch.exp(3 * torch.randn(2000, 32, generator=g))).half()
    x[0] = 0.0
    x[1] = -0.0
    out, ref = hadamard32(x), _lane_butterfly(x)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


# ------------------------------------------------------------------------- hand-computed small cases

def _chunk_from_rotated(E: list, O: list) -> torch.Tensor:
    """One 64-element fp16 chunk whose even/odd halves rotate to E/O (x = H.E/32, exact in fp16)."""
    H = sylvester32()
    e = H @ torch.tensor(E + [0] * (32 - len(E)), dtype=torch.float64) / 32
    o = H @ torch.tensor(O + [0] * (32 - len(O)), dtype=torch.float64) / 32
    x = torch.stack((e, o), dim=-1).reshape(64)
    assert torch.equal(x.half().double(), x)                      # representable in fp16
    for half, target in ((x[0::2], E), (x[1::2], O)):             # and the fp16 rotation is exact
        assert hadamard32(half.half()).tolist() == target + [0] * (32 - len(target))
    return x.half()


def test_q4_hand_case():
    # Rotated chunk, by position p: p0 = E0 = 16, p1 = O0 = -16, p2 = E1 = 1, p4 = E2 = 3, p6 = E3 = -5,
    # all others 0.  Group 0 (p 0..31) has m = 16, step 2; group 1 (p 32..63) is all zero.
    # code = rhe(v/16*8 + 8) = rhe(v/2 + 8):  16 -> 16 -> clamp 15;  -16 -> 0;  1 -> 8.5 -> 8 (tie, even);
    # 3 -> 9.5 -> 10 (tie, even);  -5 -> 5.5 -> 6 (tie, even);  0 -> 8.  Zero group: codes 0, scale 0.
    # Bytes p//2 (even p in low nibble): 0x0F, 0x88, 0x8A, 0x86, then 0x88 x 12, then 0x00 x 16.
    x = _chunk_from_rotated([16, 1, 3, -5], [-16])
    q, s = kv_quantize(x, 4)
    expect = [0x0F, 0x88, 0x8A, 0x86] + [0x88] * 12 + [0x00] * 16
    assert q.tolist() == expect
    assert s.tolist() == [2.0, 0.0]


def test_q8_hand_case():
    # Same shape with m = 256, step 2: code = rhe(v/256*128 + 128) = rhe(v/2 + 128):
    # 256 -> 256 -> clamp 255;  -256 -> 0;  1 -> 128.5 -> 128;  3 -> 129.5 -> 130;  -5 -> 125.5 -> 126.
    x = _chunk_from_rotated([256, 1, 3, -5], [-256])
    q, s = kv_quantize(x, 8)
    expect = [255, 0, 128, 128, 130, 128, 126] + [128] * 25 + [0] * 32
    assert q.tolist() == expect
    assert s.tolist() == [2.0, 0.0]


def test_hand_case_decodes():
    # Decoding the q4 case by hand: rotated values (code-8)*2 = 14, -16, 0, 0, 4, 0, -4, 0, ...; group 1
    # decodes to (0-8)*0 = -0.  Then x' = H.d/32 per even/odd half.
    x = _chunk_from_rotated([16, 1, 3, -5], [-16])
    q, s = kv_quantize(x, 4)
    H = sylvester32()
    d_even = torch.tensor([14, 0, 4, -4] + [0] * 28, dtype=torch.float64)
    d_odd = torch.tensor([-16] + [0] * 31, dtype=torch.float64)
    expect = torch.stack((H @ d_even / 32, H @ d_odd / 32), dim=-1).reshape(64)
    assert torch.equal(kv_dequantize(q, s, 4, 64).double(), expect)


# ------------------------------------------------------- independent simulation of the CUDA kernel

def _simulate_cuda_block(x: torch.Tensor, bits: int):
    """fp16_to_q for one 512-element block, thread by thread, packing through the uint32 shuffles."""
    T = x.numel() // 2
    w = x.reshape(T // 32, 32, 2).transpose(1, 2)                 # [warp, half2 component, lane]
    w = _lane_butterfly(w).transpose(1, 2).reshape(T, 2)          # thread t: rotated (2t, 2t+1)
    amax = w.abs().amax(-1)
    for k in (8, 4, 2, 1):                                        # __shfl_xor_sync reduction
        amax = torch.maximum(amax, amax[[t ^ k for t in range(T)]])
    c = 2 ** (bits - 1)
    qs = []
    for t in range(T):
        pair = []
        for v in w[t]:
            if amax[t] == 0:
                pair.append(0)                                    # NaN -> __half2int_rn -> 0
            else:
                f = (v / amax[t]) * c + c                         # fp16 ops
                pair.append(int(min(max(round(float(f)), 0), 2 * c - 1)))  # Python round: half to even
        qs.append(pair)
    words = []
    if bits == 4:
        q = [a | (b << 4) for a, b in qs]
        q = [q[t] | (q[min(t + 1, T - 1)] << 8) for t in range(T)]
        q = [q[t] | (q[min(t + 2, T - 1)] << 16) for t in range(T)]
        words = [q[t] for t in range(0, T, 4)]
    else:
        q = [a | (b << 8) for a, b in qs]
        words = [q[t] | (q[min(t + 1, T - 1)] << 16) for t in range(0, T, 2)]
    data = np.array(words, dtype="<u4").view(np.uint8)
    scales = torch.stack([amax[t] * (1.0 / c) for t in range(0, T, 16)])
    return torch.from_numpy(data.copy()), scales


@pytest.mark.parametrize("bits", [4, 8])
def test_matches_thread_level_simulation(bits):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 512, generator=g).half()
    x[1, 64:96] = 0.0                                             # a zero rotation input half
    x[1, 128:192] = 0.0                                           # a whole zero chunk -> zero groups
    q, s = kv_quantize(x, bits)
    for row in range(2):
        sq, ss = _simulate_cuda_block(x[row], bits)
        assert torch.equal(q[row], sq)
        assert torch.equal(s[row], ss)


# -------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("bits, rel_rms_bound", [(4, 0.10), (8, 0.0065)])
def test_round_trip_error(bits, rel_rms_bound):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=g).half()
    q, s = kv_quantize(x, bits)
    assert q.shape == (4096, 512 * bits // 8) and q.dtype == torch.uint8
    assert s.shape == (4096, 16) and s.dtype == torch.float16
    y = kv_dequantize(q, s, bits, 512)
    err = (y.double() - x.double())

    # Per element: a rotated value errs by at most half a step, or one step for v = +m (the clamp),
    # where the step is the group's scale.  x' - x = H.e/32 and |sum_j +-e_j|/32 <= max|e|, so
    # |x' - x| <= max step over the two groups of the chunk (a 32-point transform feeds both).  fp16
    # slack: 10 butterfly stages, each rounding by <= 2^-11 relative of values that map back to at most
    # m = 2^(b-1) steps, so add 10 * 2^-11 * 2^(b-1) steps (0.04 for 4-bit, 0.63 for 8-bit).
    step = s.double().reshape(4096, 8, 2).amax(-1).repeat_interleave(64, dim=-1)
    bound = step * (1 + 10 * 2.0 ** -11 * 2 ** (bits - 1))
    assert (err.abs() <= bound).all()

    # RMS: ||x' - x||^2 = ||e||^2/32 and ||v||^2 = 32 ||x||^2, so rel RMS(x) = RMS(e)/RMS(v).  With e
    # uniform in +-step/2, RMS(e) = step/sqrt(12), step = m/2^(b-1), m ~ 2.5 sigma_v for 32 Gaussians:
    # ~0.090 (4-bit) and ~0.0056 (8-bit).  Measured on this data: 0.0936 and 0.00594 (the clamp adds a
    # little); bounds = measured + ~7 % margin.
    rel = err.pow(2).mean().sqrt() / x.double().pow(2).mean().sqrt()
    assert rel <= rel_rms_bound


def test_leading_dims_and_rows_are_independent():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 128, generator=g).half()
    for bits in (4, 8):
        q, s = kv_quantize(x, bits)
        qf, sf = kv_quantize(x.reshape(6, 128), bits)
        assert torch.equal(q.reshape(6, -1), qf) and torch.equal(s.reshape(6, -1), sf)
        q1, s1 = kv_quantize(x[1, 2], bits)
        assert torch.equal(q[1, 2], q1) and torch.equal(s[1, 2], s1)
        assert kv_dequantize(q, s, bits, 128).shape == (2, 3, 128)
    xt = x.transpose(0, 1)
    assert torch.equal(kv_quantize(xt, 4)[0], kv_quantize(xt.contiguous(), 4)[0])


# --------------------------------------------------------------------------------------- zeros, range

@pytest.mark.parametrize("bits", [4, 8])
def test_zero_vectors(bits):
    x = torch.zeros(3, 128, dtype=torch.float16)
    x[1] = -0.0
    q, s = kv_quantize(x, bits)
    assert (q == 0).all() and (s == 0).all()                      # as the GPU: NaN code -> 0, scale 0
    y = kv_dequantize(q, s, bits, 128)
    assert not y.isnan().any() and (y == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_extremes(bits):
    # 32 * 2047 = 65504: the largest constant input whose rotation (all mass in E0) is still finite.
    x = torch.full((1, 64), 2047.0, dtype=torch.float16)
    q, s = kv_quantize(x, bits)
    assert s[0, 0] == 65504 / 2 ** (bits - 1) and s[0, 1] == 0
    y = kv_dequantize(q, s, bits, 64)
    c = 2 ** (bits - 1)
    assert torch.equal(y, torch.full_like(y, 2047 * (c - 1) / c))  # E0 = m is clamped to code 2c-1

    with pytest.raises(ValueError, match="x"):                     # rotation sums to 65536 -> inf
        kv_quantize(torch.full((1, 64), 2048.0, dtype=torch.float16), bits)
    with pytest.raises(ValueError, match="x"):
        kv_quantize(torch.tensor([65504.0, -65504.0] * 32, dtype=torch.float16), bits)

    # A lone 65504 rotates to +-65504 (no growth), so it quantizes, but decoding needs 32 * |x'| <= 65504.
    spike = torch.zeros(64, dtype=torch.float16)
    spike[0] = 65504.0
    q, s = kv_quantize(spike, bits)
    with pytest.raises(ValueError, match="q"):
        kv_dequantize(q, s, bits, 64)

    # Up to KV_SAFE_ABS nothing overflows, for the worst shapes: constant, aligned with a Hadamard row
    # (all mass in one rotated value), random signs.
    a = KV_SAFE_ABS[bits]
    H = sylvester32()
    g = torch.Generator().manual_seed(6)
    rows = [torch.full((64,), a, dtype=torch.float64),
            torch.stack((a * H[5], -a * H[31]), dim=-1).reshape(64),
            a * torch.sign(torch.randn(64, generator=g, dtype=torch.float64))]
    for r in rows:
        q, s = kv_quantize(r.half(), bits)
        y = kv_dequantize(q, s, bits, 64)
        assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------------ bytes per token

def test_bytes_per_token():
    # Qwen2-7B-like: 4 KV heads x 128, 28 layers -> D = 512; scales 512/32 = 16 fp16 = 32 bytes per K or V.
    assert kv_bytes_per_token("fp16", 4, 128, 28) == 28 * 2 * 512 * 2          # 57344
    assert kv_bytes_per_token("q8", 4, 128, 28) == 28 * ((512 + 32) * 2)         # 30464
    assert kv_bytes_per_token("q6", 4, 128, 28) == 28 * ((512 + 32) + (256 + 32))  # 23296
    assert kv_bytes_per_token("q4", 4, 128, 28) == 28 * ((256 + 32) * 2)         # 16128
    assert set(KV_MODES) == {"fp16", "q8", "q6", "q4"}
    # consistent with the tensors kv_quantize returns
    x = torch.zeros(1, 2 * 64, dtype=torch.float16)
    for mode in ("q8", "q6", "q4"):
        kb, vb = KV_MODES[mode]
        n = sum(q.numel() + 2 * s.numel() for q, s in (kv_quantize(x, kb), kv_quantize(x, vb)))
        assert kv_bytes_per_token(mode, 2, 64, 1) == n


# ---------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_name_the_argument():
    x = torch.zeros(2, 128, dtype=torch.float16)
    q, s = kv_quantize(x, 4)
    cases = [
        (lambda: kv_quantize(x.float(), 4), "x"),
        (lambda: kv_quantize(torch.zeros(2, 96, dtype=torch.float16), 4), "x"),
        (lambda: kv_quantize(torch.tensor(1.0, dtype=torch.float16), 4), "x"),
        (lambda: kv_quantize(torch.full((64,), float("nan"), dtype=torch.float16), 4), "x"),
        (lambda: kv_quantize(x, 6), "bits"),
        (lambda: kv_dequantize(q.to(torch.int8), s, 4, 128), "q"),
        (lambda: kv_dequantize(q[:, :-1], s, 4, 128), "q"),
        (lambda: kv_dequantize(q, s.float(), 4, 128), "scales"),
        (lambda: kv_dequantize(q, s[:, :-1], 4, 128), "scales"),
        (lambda: kv_dequantize(q, s[:1], 4, 128), "scales"),
        (lambda: kv_dequantize(q, torch.full_like(s, float("inf")), 4, 128), "scales"),
        (lambda: kv_dequantize(q, s, 4, 96), "D"),
        (lambda: kv_dequantize(q, s, 8, 128), "q"),
        (lambda: hadamard32(torch.zeros(31)), "x"),
        (lambda: hadamard32(torch.zeros(32, dtype=torch.int32)), "x"),
        (lambda: kv_bytes_per_token("q5", 4, 128, 28), "mode"),
        (lambda: kv_bytes_per_token("q4", 0, 128, 28), "kv_heads"),
        (lambda: kv_bytes_per_token("q4", 4, 96.0, 28), "head_dim"),
        (lambda: kv_bytes_per_token("q4", 1, 32, 28), "kv_heads"),
        (lambda: kv_bytes_per_token("q4", 4, 128, -1), "layers"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
    with pytest.raises(TypeError, match="x"):
        kv_quantize(np.zeros(64, dtype=np.float16), 4)
    with pytest.raises(TypeError, match="scales"):
        kv_dequantize(q, None, 4, 128)


# ----------------------------------------------------------- the one GPU op that is not correctly rounded

def test_hdiv_risk():
    """ExLlamaV2 divides with __h2div: rcp.approx.ftz.f32(b) * a rounded to fp16 (cuda_fp16.hpp).  With
    rcp.approx within 1 ulp (<= 2^-23 relative) and the fp32 product rounded (<= 2^-24), the quotient
    can only land on the other side of an fp16 rounding midpoint when the exact a/b is within
    1.5 * 2^-23 of it.  Enumerate all mantissa pairs and exponent gaps with a/b in [2^-14, 1] (smaller
    quotients give the middle code either way) and count where that could change a code.  This reference
    divides correctly rounded; the docstring's claim is this count."""
    A = np.arange(1024, 2048, dtype=np.int64)[:, None]
    B = np.arange(1024, 2048, dtype=np.int64)[None, :]
    flips = {4: 0, 8: 0}
    for gap in range(0, 12):                                      # w = A/B * 2^-gap
        w = A / B * 2.0 ** -gap
        E = np.where(A == B, -gap, np.floor(np.log2(w)).astype(np.int64))   # binade of w
        num = A * 2 ** (10 - gap - E)                             # w / ulp(w) = num / B, exact integers
        rel = np.abs(2 * (num % B) - B) / (2.0 * num)             # distance to the nearest midpoint / w
        for i, j in np.argwhere((w <= 1) & (rel <= 1.5 * 2.0 ** -23 + 2.0 ** -40)):
            ulp = 2.0 ** float(E[i, j] - 10)
            lo = float(num[i, j] // B[0, j]) * ulp
            for bits in (4, 8):
                c = 2 ** (bits - 1)
                pair = torch.tensor([lo, lo + ulp], dtype=torch.float16) * c + c
                codes = torch.round(pair).clamp(0, 2 * c - 1)
                flips[bits] += int(codes[0] != codes[1])
    assert flips == {4: 0, 8: 13}
