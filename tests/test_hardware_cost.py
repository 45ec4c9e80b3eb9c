"""Hardware cost model: exact operation counts on tiny layers, the ADC energy law, the
digital baseline, presets and bad hardware.* input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jit.hardware import DenseCounts, build_hardware_config, count_dense_macs, estimate
from jit.hardware.cost import layer_costs
from jit.hardware.report import pareto_front
from jit.quant import BitSerialLinear, HybridLinear, W8A8Linear, build_quant_config, enable_stats

NAME = "blocks.0.mlp.w12"


def hardware(**analog):
    """A hand-made AIMC design point with round numbers."""
    return build_hardware_config({
        "name": "test", "kind": "aimc", "node_nm": 40, "rest_precision": "int8",
        "digital": {"int8_mac_pJ": 0.3, "fp16_mac_pJ": 1.5, "fp32_mac_pJ": 4.6, "add32_pJ": 0.1,
                    "mac_units": 10, "clock_MHz": 1000},
        "analog": {"array_mac_fJ": 10.0, "dac_conversion_fJ": 50.0, "adc_walden_fom_fJ_per_step": 10.0,
                   "adc_floor_fJ": 50.0, "adc_conversion_ns_per_bit": 5.0, "read_ns": 100.0,
                   "tile_rows": 4, "tile_cols": 2, "adcs_per_tile": 1, "tile_area_mm2": 0.5, **analog},
    })


def layer_row(cls, x, in_features=10, out_features=3, **quant):
    """One call of a static layer whose activation step is 1 (x_int = round(x)), counted."""
    torch.manual_seed(0)
    cfg = build_quant_config({"scheme": cls.scheme, "mode": "static", **quant})
    layer = cls.from_linear(nn.Linear(in_features, out_features), cfg, NAME)
    code_max = 2 ** (cfg.act.bits - 1) - 1
    adc_clip = {path: 1e6 for path in cls.adc_paths} or None
    layer.set_static(act_clip=float(code_max), adc_clip=adc_clip)
    enable_stats(layer)
    with torch.no_grad():
        layer(x)
    return layer.stats.row(NAME, cls.scheme)


def hybrid_input():
    """5 tokens x 10 inputs; MSB codes non-zero at 4 places in 2 tokens (|x| > 255)."""
    x = torch.arange(50, dtype=torch.float32).reshape(5, 10) - 25
    x[1, 2], x[1, 7], x[3, 0], x[3, 9] = 300, -600, 256, 1000
    return x


def test_hybrid_counts_equal_hand_computed_values_with_tiles_and_reads():
    row = layer_row(HybridLinear, hybrid_input(), adc={"tile_rows": 4, "samples": 2, "noise_sigma_lsb": 0.0})
    tokens, inputs, outputs, tiles, reads = 5, 10, 3, 3, 2  # 10 rows in tiles of 4: 3 tiles
    assert row["tiles"] == tiles
    assert row["dense_macs"] == tokens * inputs * outputs == 150
    assert row["analog_macs"] == tokens * inputs * outputs * reads
    assert row["dac_conversions"] == tokens * inputs * reads
    assert row["array_reads_lsb"] == tokens * reads
    assert row["adc_conversions_lsb"] == tokens * outputs * tiles * reads == 90
    assert row["digital_macs"] == 4 * outputs  # non-zero MSB codes x outputs
    # per output: tiles x reads partial sums, plus the MSB result in the 2 tokens that have one
    assert row["digital_accumulations"] == (90 + 2 * outputs) - tokens * outputs == 81


def test_bitserial_reads_the_msb_path_k_times_and_the_lsb_path_once():
    x = torch.arange(40, dtype=torch.float32).reshape(4, 10) * 7
    row = layer_row(BitSerialLinear, x, adc={"samples": 3, "noise_sigma_lsb": 0.0})
    tokens, inputs, outputs = 4, 10, 3
    assert row["adc_conversions_msb"] == tokens * outputs * 3
    assert row["adc_conversions_lsb"] == tokens * outputs
    assert row["array_reads_msb"] == tokens * 3 and row["array_reads_lsb"] == tokens
    assert row["dac_conversions"] == tokens * inputs * (3 + 1)
    assert row["digital_macs"] == 0
    assert row["digital_accumulations"] == tokens * outputs * (3 + 1 - 1)


def test_w8a8_is_dense_digital_without_conversions():
    row = layer_row(W8A8Linear, hybrid_input().clamp(-127, 127))
    assert row["dense_macs"] == 150 and row["dac_conversions"] == 0 and row["digital_accumulations"] == 0
    assert not any(key.startswith("adc_conversions_") for key in row)
    costs = layer_costs(row, 1, hardware(), "w8a8", 10, (10, 3))
    assert costs["energy_pJ_per_image"] == pytest.approx(150 * 0.3)


def test_doubling_adc_samples_doubles_the_analog_paths_conversions():
    rows = {k: layer_row(HybridLinear, hybrid_input(), adc={"samples": k, "noise_sigma_lsb": 1.0})
            for k in (1, 2)}
    assert rows[2]["adc_conversions_lsb"] == 2 * rows[1]["adc_conversions_lsb"] > 0
    costs = {k: layer_costs(r, 1, hardware(), "hybrid", 10, (10, 3)) for k, r in rows.items()}
    assert costs[2]["energy_adc_pJ_per_image"] == pytest.approx(2 * costs[1]["energy_adc_pJ_per_image"])
    assert costs[2]["energy_digital_msb_pJ_per_image"] == costs[1]["energy_digital_msb_pJ_per_image"]


def test_layer_energy_is_counts_times_the_configured_costs():
    row = layer_row(HybridLinear, hybrid_input(), adc={"tile_rows": 4, "samples": 2, "noise_sigma_lsb": 0.0})
    costs = layer_costs(row, 2, hardware(), "hybrid", 10, (10, 3))  # the counts cover 2 images
    assert costs["energy_adc_pJ_per_image"] == pytest.approx(90 / 2 * 10.24)  # 10 fJ x 2^10
    assert costs["energy_analog_array_pJ_per_image"] == pytest.approx(300 / 2 * 0.010)
    assert costs["energy_dac_pJ_per_image"] == pytest.approx(100 / 2 * 0.050)
    assert costs["energy_digital_msb_pJ_per_image"] == pytest.approx(12 / 2 * 0.3)
    assert costs["energy_digital_rest_pJ_per_image"] == pytest.approx(81 / 2 * 0.1)
    # 3 columns on tiles of 2 with 1 ADC each: 2 conversion rounds of 10 bits per read
    read_ns = 100 + 2 * 10 * 5.0
    assert costs["latency_ns_per_image"] == pytest.approx(10 / 2 * read_ns + 12 / 2 / 10)


@pytest.mark.parametrize("bits", [2, 4, 6, 8, 10, 12])
def test_adc_energy_follows_walden_with_a_floor(bits):
    analog = hardware().analog
    assert analog.adc_conversion_fJ(bits) == max(10.0 * 2**bits, 50.0)
    if bits >= 4:  # above the floor each extra bit doubles the energy
        assert analog.adc_conversion_fJ(bits + 1) == 2 * analog.adc_conversion_fJ(bits)


def _tiny_jit_counts():
    from jit.models import build_jit

    torch.manual_seed(0)
    net = build_jit("JiT-T/4", input_size=16, num_classes=10)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    return net, count_dense_macs(net, lambda: net(x, t, y))


def test_dense_counts_cover_linears_convolutions_and_attention():
    net, dense = _tiny_jit_counts()
    tokens = 16  # 16 px in patches of 4
    block = net.blocks[0]
    width = block.attn.qkv.in_features
    assert dense.linear_macs["blocks.0.attn.qkv"] == 2 * tokens * width * 3 * width
    # Q K^T and A V per image over the tokens each block sees (later blocks add in-context tokens)
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for b in net.blocks]
    count_dense_macs(net, lambda: net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])))
    for hook in hooks:
        hook.remove()
    assert seen[0] == tokens and len(seen) == len(net.blocks)
    assert dense.attention_macs == sum(2 * 2 * n * n * width for n in seen)
    assert dense.conv_macs > 0
    targets = [n for n in dense.linear_macs if n.endswith(("mlp.w12", "mlp.w3"))]
    total = sum(dense.linear_macs.values()) + dense.conv_macs + dense.attention_macs
    assert dense.target_macs(targets) + dense.rest_macs(targets) == total


@pytest.mark.parametrize("rest_precision", ["int8", "fp16"])
def test_quant_fp_gives_the_digital_baseline_exactly(rest_precision):
    _, dense = _tiny_jit_counts()
    targets = [n for n in dense.linear_macs if n.endswith(("mlp.w12", "mlp.w3"))]
    hw = build_hardware_config({**hardware().to_dict(), "rest_precision": rest_precision})
    summary, rows = estimate(hw, "fp", None, dense, targets, [], 1)
    expected = (dense.target_macs(targets) * 0.3
                + dense.rest_macs(targets) * (0.3 if rest_precision == "int8" else 1.5)) / 1e6
    assert summary["energy_per_image_uJ"] == summary["digital_int8_energy_per_image_uJ"] == pytest.approx(expected)
    assert summary["saving_vs_digital_int8"] == 0 and rows == []
    assert summary["energy_adc_uJ"] == summary["energy_analog_array_uJ"] == summary["analog_tiles"] == 0


def test_hybrid_estimate_sums_its_layers_and_counts_tiles():
    row = layer_row(HybridLinear, hybrid_input(), adc={"noise_sigma_lsb": 0.0})
    dense = DenseCounts(linear_macs={NAME: 150, "head": 1000}, linear_shapes={NAME: (10, 3), "head": (10, 100)},
                        attention_macs=500)
    summary, rows = estimate(hardware(), "hybrid", 10, dense, [NAME], [row], 1)
    layer = rows[0]
    assert summary["energy_per_image_uJ"] * 1e6 == pytest.approx(layer["energy_pJ_per_image"] + 1500 * 0.3)
    assert summary["digital_int8_energy_per_image_uJ"] * 1e6 == pytest.approx(1650 * 0.3)
    assert summary["analog_tiles"] == math.ceil(10 / 4) * math.ceil(3 / 2)
    assert summary["analog_area_mm2"] == pytest.approx(summary["analog_tiles"] * 0.5)
    parts = sum(summary[f"energy_{p}_uJ"] for p in ("adc", "analog_array", "dac", "digital_msb", "digital_rest"))
    assert parts == pytest.approx(summary["energy_per_image_uJ"])


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (0.5, 9)]
    assert pareto_front(points) == [4, 0, 1, 3]


@pytest.mark.parametrize("preset", ["nor_flash_40nm", "digital_int8_40nm"])
def test_presets_compose_and_validate(preset, tmp_path):
    from test_run import compose_run

    cfg = compose_run([f"hardware={preset}", f"paths.output_dir={tmp_path}"])
    hw = build_hardware_config(cfg.hardware)
    assert hw.name == preset and hw.node_nm == 40 and hw.digital.int8_mac_pJ > 0
    assert (hw.analog is not None) == (hw.kind == "aimc")


@pytest.mark.parametrize("override, message", [
    ("hardware.analog.array_mac_fJ=-1", "hardware.analog.array_mac_fJ: must be >= 0, got -1"),
    ("hardware.digital.int8_mac_pJ=-0.5", "hardware.digital.int8_mac_pJ: must be >= 0"),
    ("hardware.analog.read_ns=0", "hardware.analog.read_ns: must be > 0"),
    ("hardware.analog.read_ns=???", "hardware.analog.read_ns: missing"),
    ("hardware.digital.clock_MHz=???", "hardware.digital.clock_MHz: missing"),
    ("hardware.analog.tile_rows=0", "hardware.analog.tile_rows: must be an integer >= 1"),
    ("hardware.rest_precision=int4", "hardware.rest_precision='int4'; allowed: int8, fp16, fp32"),
    ("+hardware.analog.leakage_pJ=1", "hardware.analog.leakage_pJ is not a known field"),
])
def test_bad_hardware_values_name_the_key(override, message, tmp_path):
    from test_run import compose_run

    from jit.hardware import HardwareConfigError

    cfg = compose_run([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(HardwareConfigError, match="^" + message.replace("[", r"\[")) as err:
        build_hardware_config(cfg.hardware)
    assert "\n" not in str(err.value)


def test_non_finite_energy_is_refused():
    from jit.hardware import HardwareConfigError

    with pytest.raises(HardwareConfigError, match="hardware.analog.dac_conversion_fJ: must be a finite number"):
        hardware(dac_conversion_fJ=math.inf)
