"""The benchmark's yardstick computes the layer's function (so its times compare like
with like) and its check catches one that does not."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.quant_linear import Reference, build, paired_ms, reference_rows
from jit.models.compile import compile_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(compile_available() is not None, reason="no torch.compile here")
def test_reference_rows_compute_the_layer_function():
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.distributions.StudentT(3.0).sample((3, 50, 96))
    with torch.no_grad():
        layer = build(linear, {"scheme": "hybrid"}, "static", x)
        rows = reference_rows(layer, x)  # raises if they differ
        assert [label for label, _ in rows] == ["reference (whole tensor)", "reference compiled"]
        for _, module in rows:
            assert module(x).shape == layer(x).shape == (3, 50, 160)


def test_reference_row_check_rejects_another_function(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.distributions.StudentT(3.0).sample((3, 50, 96))
    with torch.no_grad():
        layer = build(linear, {"scheme": "hybrid"}, "static", x)
        # a yardstick that computes another function: the check must refuse it
        monkeypatch.setattr(Reference, "forward", lambda self, v: self.call.layer(v) * 1.001)
        with pytest.raises(AssertionError, match="differs from the layer"):
            reference_rows(layer, x)


def test_paired_ms_reports_the_ratio_of_the_two_calls():
    slow, fast = torch.randn(256, 256), torch.randn(8, 8)
    ms, ratio = paired_ms(lambda: slow @ slow @ slow @ slow, lambda: fast @ fast, runs=5)
    assert ms > 0 and ratio > 1


# Every benchmark entry point on tiny shapes, so that none of them rots unnoticed (their
# figures mean nothing here). gpu_check has its own test (tests/test_gpu_check.py).
SMOKE_RUNS = {
    "quant_linear": (["-m", "benchmarks.quant_linear", "--tiny"],
                     "| hybrid | static | tiny 48->80 | 2 x 12 |"),
    "digital_kernels": (["-m", "benchmarks.digital_kernels", "--tiny"], "| 64->96 | 40 |"),
    "kl_search": (["-m", "benchmarks.kl_search", "--tiny"], "| hybrid W8A11 | 4 (act + 1"),
    "feature_extraction": (["-m", "benchmarks.feature_extraction", "--tiny"],
                           "| inception-v3-compat | 256 px |"),
    "end_to_end": (["-m", "benchmarks.end_to_end", "--tiny"], "| hybrid W8A11 static |"),
    "eval_memory": (["benchmarks/eval_memory.py", "--sizes", "8", "--batch-size", "4"],
                    '"num_images": 8'),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE_RUNS))
def test_benchmark_entry_point_runs_on_tiny_shapes(name):
    args, expected = SMOKE_RUNS[name]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert expected in done.stdout, done.stdout[-2000:]
