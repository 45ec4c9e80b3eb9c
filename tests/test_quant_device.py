"""Device non-idealities (jit/quant/device.py, the converters in jit/quant/reference.py):
weights as programmed conductance pairs that drift and read noisily, and real ADCs.

- Everything off is bitwise today's layer (exact integer kernels included).
- The statistics of the published PCM model: programming noise sigma(g) per conductance
  level, drift G(t0) (t/t0)^-nu with the fitted exponent, global drift compensation.
- DNL moves the code edges with the stated sigma; INL, offset and gain act per column.
- The fast engine and reference.py compute with the same arrays and converters; every
  draw is keyed, so a sample's output does not depend on the batch around it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from jit.quant import (
    BitSerialLinear,
    DeviceConfig,
    HybridLinear,
    build_device_config,
    build_quant_config,
    collect_stats,
    device,
    enable_stats,
    noise_disabled,
    reference,
    sample_context,
)
from jit.quant.noise import noise_key

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "device"
PCM = build_device_config(OmegaConf.load(CONFIGS / "pcm.yaml"))
NOR = build_device_config(OmegaConf.load(CONFIGS / "nor_flash.yaml"))
ONE_YEAR_S = 31536000.0
CODE_MAX = 127
ADC_ERRORS = {"dnl_sigma_lsb": 0.5, "inl_max_lsb": 0.5, "offset_sigma_lsb": 0.3, "gain_sigma": 0.01}


def layer(cls=HybridLinear, dev: DeviceConfig | None = None, in_features=96, out_features=64,
          name="blocks.0.mlp.w12", **quant):
    torch.manual_seed(0)
    cfg = build_quant_config({"scheme": cls.scheme, **quant}, device=dev)
    return cls.from_linear(nn.Linear(in_features, out_features), cfg, name)


def inputs(samples=4, tokens=12, features=96, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, tokens, features, generator=gen)


def censored_std(mean: float, sigma: float) -> float:
    """Std of max(0, N(mean, sigma^2))."""
    if sigma == 0:
        return 0.0
    a = -mean / sigma
    pdf, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(a / math.sqrt(2)))
    tail = 1 - cdf  # P(X > 0)
    first = mean * tail + sigma * pdf
    second = (mean * mean + sigma * sigma) * tail + mean * sigma * pdf
    return math.sqrt(max(second - first * first, 0.0))


# ----- everything off ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear])
@pytest.mark.parametrize("off", [
    DeviceConfig(),
    dataclasses.replace(PCM, programming_noise_scale=0.0, read_noise_scale=0.0, drift_scale=0.0,
                        t_inference_s=ONE_YEAR_S, drift_compensation="global"),
    dataclasses.replace(PCM, read_noise_scale=0.0, programming_noise_scale=0.0),  # t = t0
])
def test_everything_off_is_bitwise_todays_layer(cls, off):
    x = inputs()
    today = layer(cls)
    with_device = layer(cls, off, adc={"dnl_sigma_lsb": 0.0, "inl_max_lsb": 0.0})
    assert with_device.cfg.device.ideal
    with torch.no_grad(), sample_context(today, range(4)), sample_context(with_device, range(4)):
        assert torch.equal(today(x), with_device(x))
    weights = with_device._weight_codes(x.device, torch.float32)
    assert weights.analog_t is None  # the exact integer kernels stay in use
    assert torch.equal(with_device.read_back_weight(),
                       weights.codes_t.t() * weights.step)


def test_programming_without_effects_reads_back_the_codes():
    codes = torch.arange(-128, 128, dtype=torch.float64).repeat(4, 1)
    arrays = device.program(codes, CODE_MAX, DeviceConfig(), key=7)
    torch.testing.assert_close(arrays.read_back, codes, rtol=0, atol=1e-12)
    assert arrays.read_variance is None and arrays.compensation == 1.0


# ----- the PCM model's statistics ------------------------------------------------------
LEVELS = [1, 5, 13, 26, 38, 51, 64, 80, 100, 127]
PER_LEVEL = 12000  # 120 000 devices in all


def level_codes() -> torch.Tensor:
    return torch.tensor(LEVELS, dtype=torch.float64).repeat_interleave(PER_LEVEL).reshape(
        len(LEVELS), PER_LEVEL)


def test_programming_noise_has_the_models_sigma_per_conductance_level():
    cfg = dataclasses.replace(PCM, read_noise_scale=0.0)  # t_inference 0: no drift
    codes = level_codes()
    arrays = device.program(codes, CODE_MAX, cfg, key=device.layer_key(0, "stats"))
    error_uS = (arrays.read_back - codes) * cfg.g_max_uS / CODE_MAX
    off_device = censored_std(0.0, cfg.programming_noise_uS[0])  # G-: target 0, clamped
    for row, code in enumerate(LEVELS):
        g = code / CODE_MAX * cfg.g_max_uS
        sigma = float(device.programming_sigma_uS(torch.tensor(g, dtype=torch.float64), cfg))
        expected = math.hypot(censored_std(g, sigma), off_device)
        measured = float(error_uS[row].std())
        assert abs(measured / expected - 1) < 0.05, (code, measured, expected)
    # The largest level is hardly clamped: there the spread is the fit itself.
    top = float(device.programming_sigma_uS(torch.tensor(cfg.g_max_uS, dtype=torch.float64), cfg))
    assert abs(top - (0.26348 + 1.9650 - 1.1731)) < 1e-12


def test_drift_alone_is_exactly_the_power_law_of_the_drawn_exponent():
    t = ONE_YEAR_S
    cfg = dataclasses.replace(PCM, programming_noise_scale=0.0, read_noise_scale=0.0,
                              t_inference_s=t)
    codes = level_codes()
    key = device.layer_key(0, "drift")
    at_t = device.program(codes, CODE_MAX, cfg, key).read_back
    at_t0 = device.program(codes, CODE_MAX, dataclasses.replace(cfg, t_inference_s=0.0), key)
    torch.testing.assert_close(at_t0.read_back, codes, rtol=0, atol=1e-12)
    g_t0 = codes / CODE_MAX * cfg.g_max_uS
    normal = reference.keyed_normal(device.draw_key(key, 2, 0), tuple(codes.shape)).double()
    nu = device.drift_exponent(g_t0, cfg, normal)
    expected = g_t0 * ((cfg.drift_t0_s + t) / cfg.drift_t0_s) ** -nu / cfg.g_max_uS * CODE_MAX
    torch.testing.assert_close(at_t, expected, rtol=1e-12, atol=0)
    # The exponents follow the fit: at g_max mu and sigma sit at their clamps (0.049, 0.008).
    measured_nu = -torch.log(at_t[-1] / at_t0.read_back[-1]) / math.log((20 + t) / 20)
    assert abs(float(measured_nu.mean()) / 0.049 - 1) < 0.01
    assert abs(float(measured_nu.std()) / 0.008 - 1) < 0.05
    # Lower conductances drift faster (mu = -0.0155 ln(g/g_max) + 0.0244, up to 0.1).
    assert float((at_t[0] / codes[0]).mean()) < float((at_t[-1] / codes[-1]).mean())


def test_global_compensation_restores_the_output_scale_at_one_year():
    x = inputs(8, 32, 256, seed=3)
    scales = {}
    for name, dev in (("ideal", None),
                      ("none", dataclasses.replace(PCM, t_inference_s=ONE_YEAR_S, read_noise_scale=0.0)),
                      ("global", dataclasses.replace(PCM, t_inference_s=ONE_YEAR_S, read_noise_scale=0.0,
                                                     drift_compensation="global"))):
        lay = layer(HybridLinear, dev, 256, 512, adc={"noise_sigma_lsb": 0.0})
        lay.bias = None
        with torch.no_grad():
            scales[name] = float(lay(x).abs().mean())
    assert abs(scales["global"] / scales["ideal"] - 1) < 0.02, scales
    assert scales["none"] / scales["ideal"] < 0.9, scales  # what compensation corrects


def test_read_noise_has_the_models_variance():
    """With thermal noise and ADC rounding out of the way (bypass would skip the reads'
    noise, so a fine static ADC), the output error of one read is the sum over inputs of
    x_i^2 var(W_ij)."""
    cfg = dataclasses.replace(PCM, programming_noise_scale=0.0, t_inference_s=3600.0,
                              drift_scale=0.0)
    lay = layer(HybridLinear, cfg, 128, 256, mode="static", adc={"noise_sigma_lsb": 0.0, "bits": 16})
    lay.bias = None
    x = inputs(16, 64, 128, seed=5)
    lay.set_static(float(x.abs().max()), 1e7)
    with torch.no_grad(), sample_context(lay, range(16)):
        noisy = lay(x).double()
    with torch.no_grad(), noise_disabled(lay), sample_context(lay, range(16)):
        exact = lay(x).double()
    weights = lay._weight_codes(x.device, torch.float64)
    act_step = float(x.abs().max()) / 1023
    codes = reference.center_out_split(torch.round(x.double().reshape(-1, 128) / act_step), 9,
                                       256)[0]  # the analog LSB slice
    expected_var = codes.square() @ weights.read_variance_t.double() * (act_step * float(weights.step)) ** 2
    z = (noisy - exact).reshape(-1, 256) / expected_var.sqrt()
    assert abs(float(z.var()) - 1) < 0.03, float(z.var())
    # The model's spread: q(g) sqrt(ln((t + t_read) / (2 t_read))) |G| per device.
    g = torch.tensor([PCM.g_max_uS])
    sigma = device.read_noise_sigma_uS(g, g, cfg)
    assert abs(float(sigma) - 25 * 0.0088 * math.sqrt(math.log((3620 + 2.5e-7) / 5e-7))) < 1e-9


def test_stuck_devices_hold_zero_or_g_max_in_their_shares():
    cfg = dataclasses.replace(PCM, programming_noise_scale=0.0, read_noise_scale=0.0,
                              stuck_at_zero_fraction=0.1, stuck_at_max_fraction=0.05)
    codes = torch.full((200, 1000), 64.0, dtype=torch.float64)
    read = device.program(codes, CODE_MAX, cfg, key=3).read_back
    # G+ stuck at 0 reads 0 (or -127 with G- stuck at g_max); G- stuck at g_max: 64 - 127.
    share_zero = float((read == 0).double().mean())
    share_max_plus = float((read == 127).double().mean())
    assert abs(share_zero - 0.1 * 0.95) < 0.005 and abs(share_max_plus - 0.05 * 0.95) < 0.004


def test_nor_flash_preset_loses_charge_slowly():
    codes = level_codes()
    one_year = dataclasses.replace(NOR, programming_noise_scale=0.0, read_noise_scale=0.0,
                                   t_inference_s=ONE_YEAR_S)
    factor = float(device.program(codes, CODE_MAX, one_year, key=1).read_back.sum() / codes.sum())
    assert 0.93 < factor < 0.96


# ----- converters ----------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_dnl_moves_transition_levels_with_the_stated_sigma(sigma):
    """Each edge is drawn with the stated sigma. Edges that cross (adjacent draws 1 LSB
    apart: P = Phi(-1 / (sqrt(2) sigma)), 0.2% at 0.25 LSB, 8% at 0.5) are sorted, which
    narrows the spread of the measured levels: at 0.25 LSB they keep the stated sigma."""
    bits, cols = 10, 48
    adc_cfg = build_quant_config({"adc": {"dnl_sigma_lsb": sigma}}).adc
    errors = reference.converter_errors(adc_cfg, key=11, cols=cols, device=torch.device("cpu"),
                                        dtype=torch.float64)
    # A ramp over the whole range in 1/64 LSB steps through every column's converter.
    ramp = torch.arange(-520 * 64, 520 * 64, dtype=torch.float64) / 64
    codes = reference.adc(ramp.reshape(-1, 1).expand(-1, cols), 1.0, bits, None, errors)
    changes = (codes[1:] != codes[:-1])
    levels, ideal = [], torch.arange(-512, 511, dtype=torch.float64) + 0.5
    for col in range(cols):
        at = ramp[1:][changes[:, col]]
        jumps = (codes[1:, col] - codes[:-1, col])[changes[:, col]]
        # An edge level per code step (a missing code repeats the level).
        levels.append(at.repeat_interleave(jumps.long()))
    measured = torch.stack(levels)  # [cols, 1023], within 1/64 LSB of each edge
    assert torch.all((measured - errors.edges).abs() <= 1 / 64 + 1e-9)
    drawn = reference.keyed_normal(noise_key(11, 3), (cols, 1023)).double() * sigma
    assert abs(float(drawn.std()) / sigma - 1) < 0.02
    torch.testing.assert_close(errors.edges, torch.sort(ideal + drawn, dim=1).values)
    deviation = measured - ideal
    assert abs(float(deviation.mean())) < 0.02
    if sigma <= 0.25:
        assert abs(float(deviation.std()) / sigma - 1) < 0.03


def test_inl_offset_and_gain_act_per_column_as_stated():
    bits, cols = 10, 4096
    adc_cfg = build_quant_config({"adc": {"inl_max_lsb": 2.0, "offset_sigma_lsb": 0.5,
                                          "gain_sigma": 0.02}}).adc
    errors = reference.converter_errors(adc_cfg, 5, cols, torch.device("cpu"), torch.float64)
    assert abs(float(errors.offset.std()) / 0.5 - 1) < 0.05
    assert abs(float((errors.gain - 1).std()) / 0.02 - 1) < 0.05
    v = torch.tensor([[-512.0], [0.0], [256.0], [511.0]]).expand(-1, cols)
    seen = reference.converter_input(v, errors, bits)
    bow = 2.0 * (1 - torch.tensor([1.0, 0.0, 0.5, 511 / 512]) ** 2)
    expected = v * errors.gain + errors.offset
    expected = expected + 2.0 * (1 - (expected / 512).clamp(-1, 1) ** 2)
    torch.testing.assert_close(seen, expected)
    # Mid-scale input: the offset plus the peak INL (the offset moves u off 0 by < 1e-2).
    assert float((seen[1] - errors.offset - bow[1]).abs().max()) < 1e-4


def test_ideal_converter_settings_are_bitwise_todays_adc():
    x = inputs()
    today = layer()
    zero = layer(adc={"dnl_sigma_lsb": 0.0, "inl_max_lsb": 0.0, "offset_sigma_lsb": 0.0,
                      "gain_sigma": 0.0})
    with torch.no_grad(), sample_context(today, range(4)), sample_context(zero, range(4)):
        assert torch.equal(today(x), zero(x))


# ----- fast engine against the specification ---------------------------------------------
@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("tiles", [None, 32])
def test_fast_engine_equals_the_reference_with_devices_and_converters(cls, mode, tiles):
    dev = dataclasses.replace(PCM, t_inference_s=86400.0, drift_compensation="global",
                              stuck_at_zero_fraction=0.01, read_noise_scale=0.0)
    lay = layer(cls, dev, mode=mode, adc={"noise_sigma_lsb": 0.0, "tile_rows": tiles, **ADC_ERRORS})
    x = inputs()
    if mode == "static":
        lay.set_static(float(x.abs().max()) * 0.5, {p: 3e3 for p in lay.adc_paths})
    with torch.no_grad():
        fast, spec = lay(x), lay._reference_forward(x)
    assert torch.equal(fast, spec)


@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear])
def test_noisy_reads_match_the_reference_in_distribution(cls):
    """Thermal and read noise come from different generators in the two paths (as today's
    thermal noise): their errors against the noiseless output have the same spread."""
    dev = dataclasses.replace(PCM, t_inference_s=3600.0)
    lay = layer(cls, dev, 128, 256, adc={"noise_sigma_lsb": 1.0, **ADC_ERRORS})
    x = inputs(16, 32, 128, seed=2)
    with torch.no_grad(), sample_context(lay, range(16)):
        fast = lay(x)
    with torch.no_grad(), sample_context(lay, range(16)):
        lay(x[:1].expand(16, -1, -1))  # the context's keys need one call of the module
    with torch.no_grad(), noise_disabled(lay):
        exact = lay(x)
    lay._noise_calls = 0
    with torch.no_grad():
        spec = lay._reference_forward(x)
    fast_spread, spec_spread = float((fast - exact).std()), float((spec - exact).std())
    assert fast_spread > 0 and abs(fast_spread / spec_spread - 1) < 0.05


@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_every_effect_on_a_sample_alone_equals_it_in_a_batch(cls, mode):
    dev = dataclasses.replace(PCM, t_inference_s=86400.0, drift_compensation="global",
                              stuck_at_zero_fraction=0.01, stuck_at_max_fraction=0.01)
    lay = layer(cls, dev, mode=mode, adc={"noise_sigma_lsb": 2.0, **ADC_ERRORS})
    x = inputs(6)
    if mode == "static":
        lay.set_static(float(x.abs().max()) * 0.5, {p: 3e3 for p in lay.adc_paths})
    with torch.no_grad(), sample_context(lay, range(50, 56)):
        together = [lay(x) for _ in range(2)]
    for row in (0, 4):
        with torch.no_grad(), sample_context(lay, [50 + row]):
            alone = [lay(x[row:row + 1]) for _ in range(2)]
        for call in range(2):
            assert torch.equal(alone[call][0], together[call][row])
    assert not torch.equal(together[0], together[1])


def test_draws_are_keyed_by_device_seed_and_layer():
    x = inputs()
    dev = dataclasses.replace(PCM, read_noise_scale=0.0)
    outs = {}
    for seed, name in ((0, "a"), (0, "a"), (1, "a"), (0, "b")):
        lay = layer(HybridLinear, dataclasses.replace(dev, seed=seed), name=name,
                    adc={"noise_sigma_lsb": 0.0})
        with torch.no_grad():
            outs.setdefault((seed, name), []).append(lay(x))
    assert torch.equal(*outs[(0, "a")])
    assert not torch.equal(outs[(0, "a")][0], outs[(1, "a")][0])
    assert not torch.equal(outs[(0, "a")][0], outs[(0, "b")][0])


def test_programmed_arrays_are_computed_once_per_t_inference(monkeypatch):
    calls = []
    program = device.program
    monkeypatch.setattr(device, "program", lambda *a, **k: calls.append(1) or program(*a, **k))
    lay = layer(HybridLinear, dataclasses.replace(PCM, t_inference_s=10.0))
    x = inputs()
    with torch.no_grad():
        for _ in range(3):
            lay(x)
        assert len(calls) == 1
        lay.cfg = dataclasses.replace(lay.cfg, device=dataclasses.replace(lay.cfg.device,
                                                                          t_inference_s=100.0))
        lay(x)
    assert len(calls) == 2


# ----- analysis ---------------------------------------------------------------------------
def test_read_back_weight_and_weight_statistics():
    dev = dataclasses.replace(PCM, t_inference_s=ONE_YEAR_S, read_noise_scale=0.0)
    lay = layer(HybridLinear, dev, adc={"noise_sigma_lsb": 0.0})
    weights = lay._weight_codes(torch.device("cpu"), torch.float32)
    read = lay.read_back_weight()
    assert read.shape == lay.weight.shape
    torch.testing.assert_close(read, weights.analog_t.t() * weights.step)
    enable_stats(lay)
    with torch.no_grad():
        lay(inputs())
    row = collect_stats(lay)[0]
    codes = weights.codes_t.t().double()
    back = weights.analog_t.t().double() * weights.compensation
    snr = 10 * math.log10(float(codes.square().sum() / (back - codes).square().sum()))
    assert row["weight_snr_db"] == pytest.approx(snr, rel=1e-6)
    assert row["weight_drift_factor"] == pytest.approx(
        float(back.abs().sum() / codes.abs().sum()), rel=1e-6)
    assert row["weight_drift_factor"] < 0.9  # one year without compensation


# ----- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("t_inference_s", -1.0, "device.t_inference_s must be a number >= 0"),
    ("read_noise_scale", float("nan"), "device.read_noise_scale must be a finite number"),
    ("programming_noise_scale", -0.5, "device.programming_noise_scale must be a number >= 0"),
    ("stuck_at_zero_fraction", 1.5, "device.stuck_at_zero_fraction must be a fraction in [0, 1]"),
    ("drift_compensation", "local", "device.drift_compensation must be one of none, global"),
    ("g_max_uS", 0.0, "device.g_max_uS must be a finite number > 0"),
    ("programming_noise_uS", [1.0, 2.0], "device.programming_noise_uS must be a list of 3"),
    ("seed", -1, "device.seed must be an integer >= 0"),
])
def test_bad_device_values_name_the_key(field, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_device_config({**PCM.to_dict(), field: value})


def test_stuck_fractions_above_one_and_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"^device\.stuck_at_max_fraction must be at most 1 - "
                       r"device\.stuck_at_zero_fraction=0\.4"):
        build_device_config({"stuck_at_zero_fraction": 0.6, "stuck_at_max_fraction": 0.5})
    with pytest.raises(ValueError, match=r"^device\.t_inference is not a known field"):
        build_device_config({"t_inference": 1.0})


@pytest.mark.parametrize("field", ["dnl_sigma_lsb", "offset_sigma_lsb", "gain_sigma"])
def test_bad_adc_error_values_name_the_key(field):
    with pytest.raises(ValueError, match=f"^quant.adc.{field} must be a number >= 0"):
        build_quant_config({"adc": {field: -0.1}})


@pytest.mark.parametrize("scheme", ["fp", "w8a8"])
def test_device_effects_need_an_analog_scheme(scheme):
    with pytest.raises(ValueError, match=f"^device=pcm: quant.scheme={scheme} has no analog"):
        build_quant_config({"scheme": scheme}, device=PCM)
    build_quant_config({"scheme": scheme}, device=DeviceConfig())  # ideal: nothing to program



# ----- calibration and hardware-aware training -------------------------------------------
def _calibrated_clips(dev, on_device):
    from jit.quant import quantize_model
    from jit.quant.calibration import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    quantize_model(model, build_quant_config({"scheme": "hybrid", "mode": "static",
                                              "targets": ["0", "2"]}, device=dev))
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 8, 64, generator=gen),) for _ in range(2)]
    artefact = calibrate(model, batches, method="minmax", on_device=on_device)
    return {name: (entry["act_clip"], entry["adc_clip"]["lsb"])
            for name, entry in artefact["layers"].items()}


def test_calibration_uses_ideal_devices_unless_on_device():
    ideal = _calibrated_clips(None, False)
    aged = dataclasses.replace(PCM, t_inference_s=ONE_YEAR_S)
    assert _calibrated_clips(aged, False) == ideal  # the design's thresholds, as the seed
    on_device = _calibrated_clips(aged, True)
    # Through the arrays one year after programming: drifted weights give smaller sums.
    assert on_device["0"][0] == ideal["0"][0]  # the first layer's input is the data
    assert on_device["0"][1] < 0.9 * ideal["0"][1]


def test_hardware_aware_training_injects_fresh_programming_noise_each_step():
    from jit.settings import FinetuneSettings, training_quant_config

    settings = FinetuneSettings("model", ("*",), True, None, None, 0, ())
    quant = build_quant_config({"scheme": "hybrid"},
                               device=dataclasses.replace(PCM, t_inference_s=ONE_YEAR_S,
                                                          stuck_at_zero_fraction=0.1))
    train = training_quant_config(quant, settings)
    dev = train.device
    assert dev.programming_noise and not (dev.drifts or dev.read_noise or dev.stuck)
    lay = HybridLinear.from_linear(nn.Linear(96, 64), train, "blocks.0.mlp.w12")
    draws = []
    for step in (0, 1, 1):
        lay.programming_draw = step
        draws.append(lay.read_back_weight())
    assert torch.equal(draws[1], draws[2]) and not torch.equal(draws[0], draws[1])
    weights = lay._weight_codes(torch.device("cpu"), torch.float32)
    error = (draws[2] / weights.step - weights.codes_t.t()).std()
    assert 0.5 < float(error) * PCM.g_max_uS / CODE_MAX < 2.0  # uS: the preset's spread
