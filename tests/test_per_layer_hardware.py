"""Per-layer hardware (quant.layers): overrides reach the right layers, a layer on fp
stays float bit for bit and costs digital energy, calibration and statistics follow each
layer's own config, and bad overrides are one line naming the key."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from test_hardware_cost import hardware
from test_quant_surgery import Net
from test_run import run
from torch import nn

from jit.hardware import DenseCounts, estimate
from jit.quant import (
    HybridLinear,
    W8A8Linear,
    build_quant_config,
    collect_stats,
    enable_stats,
    layer_configs,
    quantize_model,
    quantized_layers,
    restore_float,
)
from jit.quant import artefact as art
from jit.quant.calibration import calibrate

LAYERS = {"blocks.0.*": {"adc": {"bits": 8}},
          "blocks.*.mlp.w3": {"adc": {"noise_sigma_lsb": 4.0}},
          "blocks.1.mlp.w12": {"scheme": "w8a8"}}


def test_overrides_reach_the_right_layers_in_order():
    net = Net()
    names = quantize_model(net, {"scheme": "hybrid", "layers": LAYERS})
    layers = quantized_layers(net)
    assert names == ["blocks.0.mlp.w12", "blocks.0.mlp.w3", "blocks.1.mlp.w12", "blocks.1.mlp.w3"]
    got = {name: (type(layer), layer.cfg.adc.bits, layer.cfg.adc.noise_sigma_lsb) for name, layer in layers.items()}
    assert got == {
        "blocks.0.mlp.w12": (HybridLinear, 8, 2.0),
        "blocks.0.mlp.w3": (HybridLinear, 8, 4.0),  # both patterns, in order
        "blocks.1.mlp.w12": (W8A8Linear, 10, 2.0),
        "blocks.1.mlp.w3": (HybridLinear, 10, 4.0),
    }
    # later patterns win over earlier ones
    net = Net()
    quantize_model(net, {"layers": {"blocks.*": {"adc": {"bits": 6}}, "blocks.1.*": {"adc": {"bits": 12}}}})
    assert {n: layer.cfg.adc.bits for n, layer in quantized_layers(net).items()} == {
        "blocks.0.mlp.w12": 6, "blocks.0.mlp.w3": 6, "blocks.1.mlp.w12": 12, "blocks.1.mlp.w3": 12}


def test_a_layer_on_fp_runs_the_float_path_bitwise():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 32)
    reference = Net()
    net = Net()
    quantize_model(net, {"scheme": "hybrid", "layers": {"blocks.0.*": {"scheme": "fp"}}})
    assert type(net.blocks[0].mlp.w12) is nn.Linear and type(net.blocks[0].mlp.w3) is nn.Linear
    assert isinstance(net.blocks[1].mlp.w12, HybridLinear)
    with torch.no_grad():
        h = x + net.blocks[0].attn(x)
        assert torch.equal(net.blocks[0].mlp(h), reference.blocks[0].mlp(h))
    # every targeted layer on fp: the float model, bit for bit
    net = Net()
    assert quantize_model(net, {"scheme": "hybrid", "layers": {"blocks.*": {"scheme": "fp"}}}) == []
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))
    # and a per-layer hybrid inside a float group quantizes just that layer
    net = Net()
    assert quantize_model(net, {"scheme": "fp", "layers": {"blocks.1.mlp.w3": {"scheme": "hybrid"}}}) == [
        "blocks.1.mlp.w3"]
    # restore_float puts the float layers back, sharing the parameters
    weight = net.blocks[1].mlp.w3.weight
    assert restore_float(net) == ["blocks.1.mlp.w3"]
    assert type(net.blocks[1].mlp.w3) is nn.Linear and net.blocks[1].mlp.w3.weight is weight
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))


def _calibrated(layers):
    net = Net()
    quantize_model(net, {"scheme": "hybrid", "mode": "static", "layers": layers})
    torch.manual_seed(2)
    batches = [torch.randn(4, 6, 32) for _ in range(2)]
    return net, calibrate(net, batches, method="minmax")


def test_calibration_and_its_artefact_follow_each_layers_config():
    net, artefact = _calibrated(LAYERS)
    made_for = {name: entry["made_for"] for name, entry in artefact["layers"].items()}
    assert made_for["blocks.0.mlp.w12"]["adc_bits"] == 8 and made_for["blocks.1.mlp.w3"]["adc_bits"] == 10
    assert made_for["blocks.1.mlp.w12"]["scheme"] == "w8a8" and made_for["blocks.1.mlp.w12"]["adc_bits"] is None
    assert artefact["scheme"] == "hybrid+w8a8"
    assert set(artefact["layers"]["blocks.1.mlp.w12"]["adc_clip"]) == set()  # W8A8 has no ADC
    art.apply(artefact, net)  # the same per-layer design: fits
    other = Net()
    quantize_model(other, {"scheme": "hybrid", "mode": "static",
                           "layers": {**LAYERS, "blocks.0.*": {"adc": {"bits": 9}}}})
    with pytest.raises(art.ArtefactError, match=r"blocks\.0\.mlp\.w12 was calibrated for adc_bits=8 \(model: 9\)"):
        art.apply(artefact, other)


def test_statistics_and_energy_follow_each_layers_config():
    net = Net()
    quantize_model(net, {"scheme": "hybrid", "mode": "dynamic",
                         "layers": {"blocks.0.*": {"adc": {"bits": 6}}, "blocks.1.mlp.w12": {"scheme": "fp"}}})
    enable_stats(net)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        net(x)
    rows = collect_stats(net)
    assert {r["layer"]: (r["scheme"], r["adc_bits"]) for r in rows} == {
        "blocks.0.mlp.w12": ("hybrid", 6), "blocks.0.mlp.w3": ("hybrid", 6), "blocks.1.mlp.w3": ("hybrid", 10)}
    hw = hardware(tile_rows=256, tile_cols=256)
    targets = list(layer_configs(Net(), {"scheme": "hybrid"}))
    shapes = {"blocks.0.mlp.w12": (32, 128), "blocks.0.mlp.w3": (64, 32), "blocks.1.mlp.w12": (32, 128),
              "blocks.1.mlp.w3": (64, 32)}
    macs = {name: 8 * shape[0] * shape[1] for name, shape in shapes.items()}
    dense = DenseCounts(linear_macs=dict(macs), linear_shapes=shapes)
    summary, out = estimate(hw, "hybrid", 10, dense, targets, rows, 1)
    by_layer = {row["layer"]: row for row in out}
    assert [row["layer"] for row in out] == targets  # every targeted layer, the float one included
    fp_row = by_layer["blocks.1.mlp.w12"]
    assert fp_row["scheme"] == "fp"
    assert fp_row["energy_pJ_per_image"] == pytest.approx(macs["blocks.1.mlp.w12"] * hw.digital.int8_mac_pJ)
    # the 6-bit layers' ADC conversions cost the 6-bit price, the 10-bit layer's the 10-bit price
    for name, bits in (("blocks.0.mlp.w3", 6), ("blocks.1.mlp.w3", 10)):
        row = by_layer[name]
        conversions = sum(v for k, v in row.items() if k.startswith("adc_conversions_per_image_"))
        assert conversions > 0
        assert row["energy_adc_pJ_per_image"] == pytest.approx(conversions * hw.analog.adc_conversion_fJ(bits) / 1000)
    total = sum(row["energy_pJ_per_image"] for row in out)
    assert summary["energy_per_image_uJ"] * 1e6 == pytest.approx(total)
    assert summary["adc_conversion_pJ"] is None  # two resolutions: see the layer rows
    # a float group with one hybrid layer (quant.layers) is costed by its rows too
    fp_group, _ = estimate(hw, "fp", None, dense, targets, [r for r in rows if r["adc_bits"] == 10], 1)
    assert fp_group["energy_adc_uJ"] > 0 and fp_group["analog_tiles"] > 0


@pytest.mark.parametrize("layers, message", [
    ({"blocks.9.*": {"adc": {"bits": 8}}},
     r"^quant.layers\['blocks.9.\*'\]: matches no quantized layer \(targeted: blocks.0.mlp.w12, "),
    ({"blocks.0.*": {"adc": {"bitz": 8}}}, r"^quant.layers\['blocks.0.\*'\].adc.bitz is not a known field"),
    ({"blocks.0.*": {"adc": {"bits": 40}}}, r"^quant.layers\['blocks.0.\*'\].adc.bits must be an integer in \[2, 16\]"),
    ({"blocks.0.*": {"mode": "static"}}, r"^quant.layers\['blocks.0.\*'\].mode is not a per-layer setting"),
    ({"blocks.0.*": {"scheme": "analog"}}, r"^quant.layers\['blocks.0.\*'\].scheme must be one of fp, "),
    ({"blocks.0.*": 3}, r"^quant.layers\['blocks.0.\*'\] must be a mapping of quant overrides"),
    ({"blocks.0.*": {"split": {"lsb_bits": 11}}}, r"^quant.layers\['blocks.0.\*'\].split.lsb_bits must be < "),
])
def test_bad_overrides_are_one_line_naming_the_key(layers, message):
    with pytest.raises(ValueError, match=message) as info:
        layer_configs(Net(), build_quant_config({"scheme": "hybrid", "layers": layers}))
    assert "\n" not in str(info.value)


def test_layers_round_trip_through_to_dict_in_order():
    cfg = build_quant_config({"scheme": "hybrid", "layers": LAYERS})
    assert list(cfg.to_dict()["layers"]) == list(LAYERS)
    assert build_quant_config(cfg.to_dict()) == cfg
    assert cfg.layer_config("head") == build_quant_config({"scheme": "hybrid"})


# The shipped digits model (no ckpt_path), a few images: the real entry point with Hydra's CLI.
SHORT_DIGITS = ["sampler.steps=2", "sampler.method=euler", "fid.num_images=10", "fid.chunk_size=10",
                "calibration.num_images=8", "calibration.batch_size=8", "eval.layer_stats_images=2",
                "compare_fp=false"]


def test_run_py_takes_per_layer_overrides_from_the_command_line(tmp_path):
    out = tmp_path / "eval"
    run(["experiment=digits_demo", "quant.layers={blocks.0.*: {adc: {bits: 8}}, blocks.1.mlp.w3: {scheme: fp}}",
         *SHORT_DIGITS, f"hydra.run.dir={out}"], tmp_path)
    with open(out / "layer_stats.csv") as f:
        rows = {row["layer"]: row for row in csv.DictReader(f)}
    assert (rows["blocks.0.mlp.w3"]["scheme"], rows["blocks.0.mlp.w3"]["adc_bits"]) == ("hybrid", "8")
    assert (rows["blocks.2.mlp.w3"]["scheme"], rows["blocks.2.mlp.w3"]["adc_bits"]) == ("hybrid", "10")
    assert rows["blocks.1.mlp.w3"]["scheme"] == "fp" and float(rows["blocks.1.mlp.w3"]["energy_pJ_per_image"]) > 0
    results = json.loads((out / "results.json").read_text())
    assert results["quant_per_layer"]["blocks.0.mlp.w12"] == {"adc.bits": 8}
    assert results["quant_per_layer"]["blocks.1.mlp.w3"] == {"scheme": "fp"}
    assert results["energy"]["energy_per_image_uJ"] * 1e6 == pytest.approx(
        sum(float(r["energy_pJ_per_image"]) for r in rows.values()) + results["energy"]["energy_digital_rest_uJ"] * 1e6
        - sum(float(r.get("energy_digital_rest_pJ_per_image") or 0) for r in rows.values()), rel=1e-6)
    artefact = torch.load(out / "calibration.pt", weights_only=True)
    assert "blocks.1.mlp.w3" not in artefact["layers"]
    assert artefact["layers"]["blocks.0.mlp.w12"]["made_for"]["adc_bits"] == 8


@pytest.mark.parametrize("override, message", [
    ("quant.layers={blocks.9.*: {adc: {bits: 8}}}",
     "error: quant.layers['blocks.9.*']: matches no quantized layer (targeted: blocks.0.mlp.w12, "),
])
def test_run_py_refuses_bad_per_layer_overrides_in_one_line(override, message, tmp_path):
    out = tmp_path / "out"
    proc = run([override, f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "calibration.pt").exists()


def test_a_float_group_with_analog_layers_takes_real_devices():
    pcm = {"preset": "pcm", "programming_noise_uS": [0.1, 0.2, 0.0]}
    cfg = build_quant_config({"scheme": "fp", "layers": {"blocks.0.*": {"scheme": "hybrid"}}}, device=pcm)
    assert cfg.quantizes and cfg.layer_config("blocks.0.mlp.w3").device.preset == "pcm"
    assert cfg.layer_config("blocks.1.mlp.w3").scheme == "fp"
    with pytest.raises(ValueError, match="device=pcm: quant.scheme=fp has no analog array"):
        build_quant_config({"scheme": "fp"}, device=pcm)
