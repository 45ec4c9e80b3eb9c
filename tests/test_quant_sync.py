"""Host syncs of the quantized forward on the accelerator plan (plan.blockwise off):
every op that copies a device value to the host (`aten._local_scalar_dense`, behind
float(), int(), bool() and .item()) is counted under a TorchDispatchMode on the CPU.

Static mode and the per-sample and per-token dynamic scopes take none: clips, steps and
the NaN/Inf verdict stay on the device, and the sample context reads the verdict once when
it exits. The seed's whole-call scope (dynamic_scope=batch) reads each tile's ADC peak on
the host, one sync per tile, so that its steps equal those of a static clip of that peak.
Statistics (a diagnostic mode) keep their counters on the device and sync only when
they are read."""

from collections import Counter

import pytest
import torch
from test_quant_execution import layer_for
from test_quant_layers import heavy_tailed
from torch.utils._python_dispatch import TorchDispatchMode

from jit.models import Denoiser, build_jit
from jit.quant import collect_stats, enable_stats, quantize_model, quantized_layers, sample_context

HOST_COPIES = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
}


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


def _calibrated(scheme, mode, cfg, x):
    layer = layer_for(scheme, 64, 96, mode=mode, **cfg).to(x.device)
    if mode == "static":
        layer.set_static(float(x.abs().max()) * 0.8,
                         {path: 4e4 for path in layer.adc_paths} or None)
    return layer


SCHEMES = ["hybrid", "bitserial", "w8a8"]
VARIANTS = {
    "plain": {"adc": {"noise_sigma_lsb": 0.0}},
    "noise": {"adc": {"noise_sigma_lsb": 2.0}},
    "tiles+noise": {"adc": {"noise_sigma_lsb": 2.0, "tile_rows": 16}},
    "channel weights": {"weight": {"granularity": "channel"}},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode, scope", [
    ("static", "sample"), ("dynamic", "sample"), ("dynamic", "token"), ("dynamic", "batch")])
def test_forward_host_syncs(accelerator_plan, scheme, variant, mode, scope):
    x = heavy_tailed(3, 10, 64, seed=2).to(accelerator_plan)
    layer = _calibrated(scheme, mode, {**VARIANTS[variant], "dynamic_scope": scope}, x)
    with torch.no_grad():
        layer(x)  # first call: weight codes (and their finiteness check) are cached
        counter = HostSyncs()
        with sample_context(layer, [4, 7, 9]), counter:
            y = layer(x)
        assert torch.isfinite(y).all()
    if scope == "batch" and mode == "dynamic":
        analog = layer.adc_paths and not layer.cfg.adc.bypass
        tiles = len(layer.tiles()) * len(layer.adc_paths) if analog else 0
        assert counter.total == tiles, dict(counter.ops)
    else:
        assert counter.total == 0, dict(counter.ops)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_statistics_sync_only_when_read(accelerator_plan, scheme, mode):
    x = heavy_tailed(3, 10, 64, seed=2).to(accelerator_plan)
    layer = _calibrated(scheme, mode, VARIANTS["tiles+noise"], x)
    enable_stats(layer)
    with torch.no_grad():
        layer(x)
        counter = HostSyncs()
        with sample_context(layer, [4, 7, 9]), counter:
            layer(x)
    assert counter.total == 0, dict(counter.ops)
    with HostSyncs() as reading:
        row = collect_stats(layer)[0]
    assert reading.total > 0 and row["calls"] == 2
    assert isinstance(row["act_clip_rate"], float) and isinstance(row["digital_macs"], int)


def test_nan_input_inside_a_context_is_reported_when_it_exits(accelerator_plan):
    x = heavy_tailed(2, 10, 64, seed=3).to(accelerator_plan)
    layer = _calibrated("hybrid", "static", {}, x)
    bad = x.clone()
    bad[1, 3, 5] = float("nan")
    with torch.no_grad():
        with sample_context(layer, [0, 1]):
            layer(x)
        counter = HostSyncs()
        with (pytest.raises(FloatingPointError, match="blocks.0.mlp.w12.*NaN or Inf"),
              sample_context(layer, [0, 1])):
            with counter:
                layer(bad)  # no error yet, and no sync
            assert counter.total == 0
        with pytest.raises(FloatingPointError, match="blocks.0.mlp.w12"):
            layer(bad)  # outside a context: at once


def test_whole_sampling_run_takes_a_fixed_number_of_host_syncs(accelerator_plan):
    """Static hybrid on a tiny JiT: the syncs of one generate() do not grow with the
    steps (the CFG interval decision and the context's NaN check only)."""
    torch.manual_seed(0)
    net = build_jit("JiT-T/4", input_size=8, in_channels=1, num_classes=3, depth=3)
    net = net.to(accelerator_plan)
    quantize_model(net, {"scheme": "hybrid", "mode": "static"})
    for layer in quantized_layers(net).values():
        layer.set_static(4.0, {path: 3e4 for path in layer.adc_paths})
    denoiser = Denoiser(net, num_classes=3).eval()
    labels = torch.tensor([0, 2], device=accelerator_plan)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(accelerator_plan)
    counts = {}
    with torch.no_grad():
        denoiser.generate(labels, noise=noise, steps=2, cfg_scale=2.0)  # caches
        for steps in (2, 4):
            counter = HostSyncs()
            with counter, sample_context(net, [0, 1]):
                denoiser.generate(labels, noise=noise, steps=steps, cfg_scale=2.0)
            counts[steps] = counter.total
    assert counts[2] == counts[4] <= 2, counts
