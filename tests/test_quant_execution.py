"""Execution plans of the quantized layers: row blocks on the CPU, one kernel per op over
the whole tensor on accelerators (plan.blockwise). Both must
compute the same function; the accelerator plan must not launch more kernels for larger
inputs. The accelerator plan is exercised on the CPU by emptying plan.BLOCKWISE_DEVICE_TYPES."""

import math
from collections import Counter

import pytest
import torch
from test_quant_layers import heavy_tailed
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from jit.quant import adc_bypassed, build_quant_config, plan
from jit.quant.layers import LAYER_CLASSES
from jit.quant.plan import CHUNK_ELEMENTS
from jit.quant.quantizers import percentile_abs


@pytest.fixture
def whole_tensor(monkeypatch):
    monkeypatch.setattr(plan, "BLOCKWISE_DEVICE_TYPES", frozenset())


def layer_for(scheme, in_features=300, out_features=200, **cfg):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features)
    return LAYER_CLASSES[scheme].from_linear(
        lin, build_quant_config({"scheme": scheme, **cfg}), "blocks.0.mlp.w12")


CASES = [
    ("hybrid", {}),
    ("hybrid", {"adc": {"tile_rows": 128}}),
    ("hybrid", {"weight": {"granularity": "channel"}}),
    ("bitserial", {}),
    ("w8a8", {}),
]


@pytest.mark.parametrize("scheme,cfg", CASES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_whole_tensor_plan_gives_the_blocked_results(monkeypatch, scheme, cfg, mode):
    # large enough for several row blocks on the CPU plan, input and output side
    x = heavy_tailed(2, 1500, 300, seed=1)
    assert min(x.numel(), 3000 * 200) >= 2 * CHUNK_ELEMENTS
    cfg = {**cfg, "mode": mode, "adc": {**cfg.get("adc", {}), "noise_sigma_lsb": 0.0}}
    layer = layer_for(scheme, **cfg)
    if mode == "static":
        clips = {path: 3e5 for path in layer.adc_paths}
        layer.set_static(float(percentile_abs(x, 99.8)), clips or None)
    with torch.no_grad():
        blocked = layer(x)
        monkeypatch.setattr(plan, "BLOCKWISE_DEVICE_TYPES", frozenset())
        whole = layer(x)
    assert torch.equal(blocked, whole)


def test_whole_tensor_plan_noise_statistics(whole_tensor):
    """Noise on the accelerator plan: the analog error variance of docs/design.md."""
    sigma, samples, adc_clip = 3.0, 2, 1e9  # a clip far above every sum: no saturation
    layer = layer_for("hybrid", 256, 512, mode="static",
                      adc={"noise_sigma_lsb": sigma, "samples": samples})
    x = heavy_tailed(1024, 256, seed=2)
    act_clip = float(percentile_abs(x, 99.8))
    layer.set_static(act_clip, adc_clip)
    w_step = float(layer._weight_codes(x.device, x.dtype).step)
    with torch.no_grad():
        with adc_bypassed(layer):
            exact = layer(x).double()
        error = (layer(x).double() - exact) / (act_clip / 1023 * w_step)  # accumulation units
    adc_step = adc_clip / 511
    expected = (sigma**2 / samples) * adc_step**2 + adc_step**2 / 12
    assert abs(float(error.var()) / expected - 1) < 6 * math.sqrt(2 / error.numel()) + 0.01


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_call(layer, tokens):
    # One sample: on accelerators each sample's noise is one draw (noise.py), so the
    # launches grow with the samples of a batch but not with their tokens.
    x = heavy_tailed(1, tokens, layer.in_features, seed=3)
    with torch.no_grad():
        layer(x)  # weight codes cached
        with _CountOps() as counter:
            layer(x)
    return sum(counter.ops.values())


@pytest.mark.parametrize("scheme", ["hybrid", "bitserial", "w8a8"])
def test_accelerator_plan_launches_as_many_kernels_for_any_input_size(monkeypatch, scheme):
    layer = layer_for(scheme, 300, 200, mode="dynamic")
    small, large = _ops_per_call(layer, 400), _ops_per_call(layer, 8 * 400)
    assert large > small  # the CPU plan works per row block: the counter sees that
    monkeypatch.setattr(plan, "BLOCKWISE_DEVICE_TYPES", frozenset())
    assert _ops_per_call(layer, 8 * 400) == _ops_per_call(layer, 400)


def test_noisy_output_does_not_depend_on_the_thread_count():
    layer = layer_for("hybrid", 300, 700, mode="dynamic")
    x = heavy_tailed(2000, 300, seed=4)  # several row blocks on both sides
    outputs = []
    with torch.no_grad():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer.reseed(7)
            outputs.append(layer(x))
    assert torch.equal(*outputs)
