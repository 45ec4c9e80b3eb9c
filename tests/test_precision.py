"""Sampling precision: generation and calibration forwards run under the trainer's
precision (bf16-mixed: bf16 autocast, as the official evaluation samples), while the
quantized layers compute in float32 inside it, so their integer codes stay exact."""

import lightning as L
import pytest
import torch
from test_quant_execution import layer_for
from test_quant_layers import heavy_tailed

from jit.module import JiTModule
from jit.quant import quantize_model, quantized_layers, sample_context


@pytest.mark.parametrize("scheme", ["hybrid", "bitserial", "w8a8"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantized_layer_ignores_bf16_autocast(device, scheme, mode):
    x = heavy_tailed(2, 12, 64, seed=4).to(device)
    layer = layer_for(scheme, 64, 96, mode=mode, adc={"noise_sigma_lsb": 2.0, "tile_rows": 32})
    layer = layer.to(device)
    if mode == "static":
        layer.set_static(float(x.abs().max()) * 0.7,
                         {path: 3e4 for path in layer.adc_paths} or None)
    with torch.no_grad():
        with sample_context(layer, [3, 8]):
            reference = layer(x)
        with torch.autocast(device.type, dtype=torch.bfloat16), sample_context(layer, [3, 8]):
            under_autocast = layer(x)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference)


@pytest.mark.parametrize("scheme", ["hybrid", "bitserial", "w8a8"])
def test_reference_path_ignores_bf16_autocast(monkeypatch, scheme):
    """The path compiled layers run (reference.py) computes in float32 under autocast too."""
    from jit.quant.layers import QuantLinear

    monkeypatch.setattr(QuantLinear, "forward", QuantLinear._reference_forward)
    x = heavy_tailed(2, 12, 64, seed=4)
    layer = layer_for(scheme, 64, 96, mode="dynamic", adc={"noise_sigma_lsb": 2.0})
    with torch.no_grad():
        with sample_context(layer, [3, 8]):
            reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), sample_context(layer, [3, 8]):
            under_autocast = layer(x)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference)


def test_quantized_layer_gradients_under_autocast_match_float32():
    x = heavy_tailed(2, 12, 64, seed=5)
    grads = []
    for autocast in (False, True):
        layer = layer_for("hybrid", 64, 96, adc={"noise_sigma_lsb": 0.0})
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        y.square().sum().backward()
        grads.append((xi.grad, layer.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _module_with_trainer(precision):
    module = JiTModule(net={"name": "JiT-T/4", "input_size": 8, "num_classes": 3},
                       sampler={"steps": 2, "method": "euler", "cfg_scale": 1.0})
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    return module


@pytest.mark.parametrize("precision, expected", [("bf16-mixed", torch.bfloat16),
                                                 ("32-true", None)])
def test_generation_runs_under_the_trainers_precision(precision, expected):
    module = _module_with_trainer(precision)
    quantize_model(module.denoiser.net, {"scheme": "hybrid", "mode": "dynamic"})
    seen = {}

    def record(_, args):
        seen["autocast"] = (torch.get_autocast_dtype("cpu")
                            if torch.is_autocast_enabled("cpu") else None)

    module.denoiser.net.register_forward_pre_hook(record)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sample_context(module.denoiser.net, [0, 1]):
        images = module.generate(torch.tensor([0, 2]), noise=noise)
    assert seen["autocast"] == expected
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert len(quantized_layers(module.denoiser.net)) > 0


def test_layer_statistics_do_not_change_under_autocast():
    """The statistics' float reference (sqnr_db) is computed in float32 too."""
    from jit.quant import collect_stats, enable_stats

    x = heavy_tailed(2, 12, 64, seed=6)
    layer = layer_for("hybrid", 64, 96, adc={"noise_sigma_lsb": 0.0})
    rows = []
    for autocast in (False, True):
        enable_stats(layer, True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layer(x)
        rows.append(collect_stats(layer))
        enable_stats(layer, False)
    assert rows[0] == rows[1]
