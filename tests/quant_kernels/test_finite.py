"""all_finite: the sum test agrees with the elementwise one, including sums that overflow from finite terms."""
from __future__ import annotations

import pytest
import torch

from exl2.quant_kernels.finite import all_finite, has_nan


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), float("-inf"), "both"))
def test_one_bad_element_is_found(dtype, bad):
    t = torch.randn(37, 53).to(dtype)
    assert all_finite(t)
    if bad == "both":                         # +inf and -inf: the sum is NaN, not an infinity
        t[3, 4], t[30, 50] = float("inf"), float("-inf")
    else:
        t[11, 7] = bad
    assert not all_finite(t)


def test_finite_terms_whose_sum_overflows():
    big = torch.full((4, 8), 3e38, dtype=torch.float32)          # the fp32 sum is inf, every element finite
    assert all_finite(big)
    big[0, 0] = float("nan")
    assert not all_finite(big)
    half = torch.full((64, 64), 60000.0, dtype=torch.float16)   # an fp16 sum would overflow; summed in fp32
    assert all_finite(half)


def test_empty_tensor_is_finite():
    assert all_finite(torch.empty(0, 5))


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32, torch.float64))
def test_has_nan_finds_nan_and_not_infinities(dtype):
    t = torch.randn(37, 53).to(dtype)
    assert not has_nan(t) and not has_nan(torch.empty(0))
    t[5, 6] = float("inf")
    assert not has_nan(t)
    t[7, 8] = float("-inf")                  # the sum is NaN; no element is
    assert not has_nan(t)
    t[9, 10] = float("nan")
    assert has_nan(t)
