"""The benchmark's yardstick computes the layer's function (so its times compare like
with like) and its check catches one that does not."""

import pytest
import torch
from torch import nn

from benchmarks.quant_linear import MinimalHybrid, build, minimal_hybrid, paired_ms


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_minimal_hybrid_matches_the_layer_under_bypass(mode):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.distributions.StudentT(3.0).sample((3, 50, 96))
    with torch.no_grad():
        layer = build(linear, {"scheme": "hybrid"}, mode, x)
        reference = minimal_hybrid(linear, layer, x)  # raises if they differ
        assert isinstance(reference, MinimalHybrid)
        assert reference(x).shape == layer(x).shape == (3, 50, 160)


def test_minimal_hybrid_check_rejects_another_function():
    torch.manual_seed(0)
    linear, other = nn.Linear(96, 160), nn.Linear(96, 160)
    x = torch.distributions.StudentT(3.0).sample((3, 50, 96))
    with torch.no_grad():
        layer = build(linear, {"scheme": "hybrid"}, "static", x)
        with pytest.raises(AssertionError, match="differs from the layer"):
            minimal_hybrid(other, layer, x)  # a yardstick with other weights


def test_paired_ms_reports_the_ratio_of_the_two_calls():
    slow, fast = torch.randn(256, 256), torch.randn(8, 8)
    ms, ratio = paired_ms(lambda: slow @ slow @ slow @ slow, lambda: fast @ fast, runs=5)
    assert ms > 0 and ratio > 1
