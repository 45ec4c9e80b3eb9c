"""Quantizer formulas: percentile order statistics, center-out and bit-serial splits."""

import numpy as np
import pytest
import torch

from jit.quant import percentile_abs
from jit.quant.quantizers import bitserial_split_, center_out_split_, stable_seed


@pytest.mark.parametrize("n", [1, 2, 3, 17, 100, 2559, 4096, 100_003])
@pytest.mark.parametrize("pct", [0.5, 50.0, 99.0, 99.5, 99.8, 99.99, 100.0])
def test_percentile_equals_torch_quantile(n, pct):
    x = torch.distributions.StudentT(3.0).sample((n,), ) if n > 1 else torch.tensor([-2.5])
    expected = torch.quantile(x.abs(), pct / 100)
    assert torch.equal(percentile_abs(x, pct), expected)
    assert torch.equal(percentile_abs(x.double(), pct), torch.quantile(x.abs().double(), pct / 100))


def test_percentile_along_a_dim_equals_torch_quantile():
    w = torch.randn(7, 300)
    assert torch.equal(percentile_abs(w, 99.0, dim=1), torch.quantile(w.abs(), 0.99, dim=1))


def test_percentile_above_2_pow_24_elements():
    torch.manual_seed(0)
    x = torch.randn(2**24 + 1001)
    a = x.abs().numpy()
    for pct in (99.8, 50.0):
        # torch.quantile's definition: q rounded to float32, rank in float64, lerp in float32
        rank = float(np.float32(pct / 100)) * (a.size - 1)
        low = int(np.floor(rank))
        part = np.partition(a, [low, low + 1])
        expected = torch.lerp(torch.tensor(part[low]), torch.tensor(part[low + 1]),
                              torch.tensor(rank - low, dtype=torch.float32))
        assert torch.equal(percentile_abs(x, pct), expected)


def test_center_out_split_exhaustive_over_int11():
    codes = torch.arange(-1024, 1024, dtype=torch.float32)
    lsb = codes.clone()
    msb = center_out_split_(lsb, lsb_bits=9, radix=256)
    assert torch.equal(256 * msb + lsb, codes)
    assert lsb.min() >= -256 and lsb.max() <= 255
    assert set(msb.unique().tolist()) == {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}
    in_lsb_range = (codes >= -256) & (codes <= 255)
    assert torch.equal(msb == 0, in_lsb_range)
    assert torch.equal(msb, msb.round()) and torch.equal(lsb, lsb.round())


@pytest.mark.parametrize("bits,lsb_bits,radix", [(11, 9, 2), (11, 9, 64), (12, 9, 512), (8, 3, 8)])
def test_center_out_split_other_radices(bits, lsb_bits, radix):
    codes = torch.arange(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), dtype=torch.float64)
    lsb = codes.clone()
    msb = center_out_split_(lsb, lsb_bits, radix)
    low, high = -(2 ** (lsb_bits - 1)), 2 ** (lsb_bits - 1) - 1
    expected = torch.where(codes > high, torch.ceil((codes - high) / radix),
                           torch.where(codes < low, -torch.ceil((low - codes) / radix), 0 * codes))
    assert torch.equal(msb, expected) and torch.equal(radix * msb + lsb, codes)
    assert lsb.min() >= low and lsb.max() <= high


def test_center_out_split_w8a10_variant():
    codes = torch.arange(-512, 512, dtype=torch.float64)
    lsb = codes.clone()
    msb = center_out_split_(lsb, lsb_bits=8, radix=256)
    assert torch.equal(256 * msb + lsb, codes)
    assert lsb.min() >= -128 and lsb.max() <= 127
    assert torch.equal(msb == 0, (codes >= -128) & (codes <= 127))


def test_bitserial_split_exhaustive_over_int12():
    codes = torch.arange(-2048, 2048, dtype=torch.float32)
    lsb = codes.clone()
    msb = bitserial_split_(lsb, lsb_bits=5, lsb_gain_shift=2)
    assert torch.equal(32 * msb + lsb / 4, codes)
    assert lsb.min() == 0 and lsb.max() == 31 * 4
    assert msb.min() == -64 and msb.max() == 63


def test_stable_seed_is_deterministic_and_name_dependent():
    assert stable_seed(0, "blocks.0.mlp.w12") == stable_seed(0, "blocks.0.mlp.w12")
    assert stable_seed(0, "blocks.0.mlp.w12") != stable_seed(0, "blocks.0.mlp.w3")
    assert stable_seed(1, "a") != stable_seed(0, "a")
    assert 0 <= stable_seed(123, "x") < 2**63


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_matches_torch_round_including_ties(dtype):
    from jit.quant.quantizers import ROUND_EXACT_BELOW, round_
    gen = torch.Generator().manual_seed(0)
    bound = ROUND_EXACT_BELOW[dtype]
    ties = torch.arange(-4096, 4096, dtype=dtype) + 0.5
    small = (torch.rand(100_000, generator=gen, dtype=torch.float64) - 0.5) * 3000
    large = (torch.rand(10_000, generator=gen, dtype=torch.float64) - 0.5) * 1.99 * bound
    x = torch.cat([ties, small.to(dtype), large.to(dtype), torch.tensor([0.0, -0.0, 1.0,
                   -1.0, bound - 1, -bound], dtype=dtype)])
    assert torch.equal(round_(x.clone()), torch.round(x))


@pytest.mark.parametrize("pct", [99.0, 99.5, 99.8, 99.99])
def test_percentile_of_a_large_tensor_equals_torch_quantile(pct):
    """Above 8 row blocks the top order statistics come from a sampled threshold."""
    x = torch.distributions.StudentT(3.0).sample((1_000_003,))
    assert torch.equal(percentile_abs(x, pct), torch.quantile(x.abs(), pct / 100))
    assert torch.equal(percentile_abs(x.double(), pct),
                       torch.quantile(x.abs().double(), pct / 100))


def test_largest_abs_is_exact_when_the_sample_misleads():
    from jit.quant.quantizers import _largest_abs
    x = torch.zeros(1_000_000)
    x[1::16] = torch.arange(62_500.0)  # the strided sample sees zeros only
    assert torch.equal(_largest_abs(x, 3000), x.abs().topk(3000).values)
    x[7] = float("nan")  # ranked largest, as by topk
    torch.testing.assert_close(_largest_abs(x, 3000), x.abs().topk(3000).values, rtol=0,
                               atol=0, equal_nan=True)
