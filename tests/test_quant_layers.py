"""Quantized linear layers against docs/design.md: fixture parity, exactness under bypass,
noise statistics, tiling, reproducibility, static mode, gradients, bad input."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jit.quant import (
    BitSerialLinear,
    HybridLinear,
    W8A8Linear,
    adc_bypassed,
    build_quant_config,
    noise_disabled,
    percentile_abs,
)
from jit.quant.quantizers import center_out_split_, quantize_symmetric, weight_clip

FIXTURE = Path(__file__).parent / "fixtures" / "seed_bitserial_w8a12.pt"


def make(cls, in_features=64, out_features=48, init_seed=0, name="blocks.0.mlp.w12", **cfg):
    torch.manual_seed(init_seed)
    lin = nn.Linear(in_features, out_features)
    return cls.from_linear(lin, build_quant_config({"scheme": cls.scheme, **cfg}), name)


def heavy_tailed(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(*shape, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(3, *shape, generator=gen, dtype=torch.float64).square().sum(0)
    return (normal / (chi2 / 3).sqrt()).to(dtype)  # Student-t, 3 degrees of freedom


# ----- seed fixture ----------------------------------------------------------------------
def _fixture_layer(case):
    k, f = case["layer_kwargs"], case["forward_kwargs"]
    cfg = build_quant_config({
        # The seed takes dynamic ranges over the whole call.
        "scheme": "bitserial", "mode": "static" if f else "dynamic", "dynamic_scope": "batch",
        "weight": {"bits": k["weight_nbit"], "clip_pct": k.get("weight_clip_pct") or None},
        "act": {"bits": k["act_bits"]},
        "split": {"lsb_bits": k["lsb_bits"], "lsb_gain_shift": k["lsb_gain_shift"]},
        "adc": {"bits": k["adc_nbit"], "samples": k["msb_samples"],
                "noise_sigma_lsb": k["noise_sigma_lsb"]}})
    lin = nn.Linear(*case["weight"].shape[::-1])
    with torch.no_grad():
        lin.weight.copy_(case["weight"])
        lin.bias.copy_(case["bias"])
    layer = BitSerialLinear.from_linear(lin, cfg, case["name"])
    if f:
        act_clip = f["act_scale"] * (2 ** (k["act_bits"] - 1) - 1)
        if isinstance(f["adc_scale"], (tuple, list)):
            adc_max = 2 ** (k["adc_nbit"] - 1) - 1
            adc_clip = {"msb": f["adc_scale"][0] * adc_max, "lsb": f["adc_scale"][1] * adc_max}
        else:
            adc_clip = layer.adc_clips_from_output_step(f["adc_scale"], act_clip)
        layer.set_static(act_clip, adc_clip)
    return layer


def test_bitserial_matches_the_seed_fixture():
    cases = torch.load(FIXTURE, weights_only=False)
    assert len(cases) == 4
    for case in cases:
        layer = _fixture_layer(case)
        with torch.no_grad():
            y = layer(case["x"])
        expected = case["expected"]
        err = (y - expected).abs()
        tol = 1e-4 * expected.abs().max()
        # README: a few rounding ties may flip one ADC code; at most 0.5% of outputs.
        assert (err > tol).float().mean() <= 0.005, case["name"]
        assert err.max() <= max(tol, _largest_adc_step_in_output(layer, case["x"])), case["name"]


def _largest_adc_step_in_output(layer, x):
    """Output-domain size of one MSB ADC code (the larger of the two paths' steps)."""
    steps = []
    layer.observer = lambda name, kind, t: steps.append((kind, float(t.abs().max())))
    with torch.no_grad(), adc_bypassed(layer):
        layer(x)
    layer.observer = None
    cfg = layer.cfg
    act_clip = percentile_abs(x, cfg.act.percentile) if layer.static is None else layer.static.act_clip
    w_step = float(layer._weight_codes(x.device, torch.float32).step)
    peak = dict(steps)["adc.msb"]
    return 1.01 * float(act_clip) / (2 ** (cfg.act.bits - 1) - 1) * w_step * 2**cfg.split.lsb_bits * (
        peak / (2 ** (cfg.adc.bits - 1) - 1))


# ----- hybrid exactness under bypass -----------------------------------------------------------
def fake_quant_reference(layer, x):
    """INT8 x INT11 fake quantization in float64: s_x s_w (W_int @ x_int) + b, with the
    activation clip taken per sample, per token or over the whole input (dynamic_scope)."""
    x64 = x.double().reshape(-1, layer.in_features)
    w64 = layer.weight.detach().double()
    scope, pct = layer.cfg.dynamic_scope, layer.cfg.act.percentile
    if scope == "batch":
        clip = percentile_abs(x64, pct)
    else:
        group = x64.shape[0] // x.shape[0] if scope == "sample" and x.dim() > 1 else 1
        clip = torch.stack([percentile_abs(rows, pct) for rows in x64.split(group)])
        clip = clip.repeat_interleave(group).unsqueeze(1)
    x_int, s_x = quantize_symmetric(x64, clip, layer.cfg.act.bits)
    w_int, s_w = quantize_symmetric(w64, weight_clip(w64, layer.cfg.weight), layer.cfg.weight.bits)
    y = (x_int @ w_int.t()) * (s_x * s_w.reshape(-1)) + layer.bias.detach().double()
    return y.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("shape,in_features,out_features,granularity", [
    ((1, 1), 1, 1, "tensor"), ((3, 5), 5, 7, "tensor"), ((2, 9, 33), 33, 17, "channel"),
    ((4, 288, 96), 96, 64, "tensor"), ((1000, 257), 257, 31, "channel"),
    ((2, 50, 768), 768, 40, "tensor"),
    # wide outputs: the digital product is added in slabs of output columns
    ((2, 300, 32), 32, 2048, "tensor"), ((600, 96), 96, 1000, "channel"),
])
@pytest.mark.parametrize("scope", ["sample", "batch", "token"])
def test_hybrid_bypass_equals_int8_x_int11_fake_quant(shape, in_features, out_features,
                                                       granularity, scope):
    layer = make(HybridLinear, in_features, out_features, adc={"bypass": True},
                 weight={"granularity": granularity}, dynamic_scope=scope)
    x = heavy_tailed(*shape, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    expected = fake_quant_reference(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def test_hybrid_bypass_equals_fake_quant_above_2_pow_24_elements():
    tokens = 2**24 // 32 + 1000  # 2**24 + 32000 activation values, one percentile
    layer = make(HybridLinear, 32, 3, adc={"bypass": True}, dynamic_scope="batch")
    x = heavy_tailed(tokens, 32, dtype=torch.float64, seed=1)
    assert x.numel() > 2**24
    with torch.no_grad():
        y = layer(x)
    expected = fake_quant_reference(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def test_hybrid_float32_bypass_is_close_to_float64_reference():
    layer = make(HybridLinear, 128, 64, adc={"bypass": True})
    x = heavy_tailed(4, 100, 128)
    with torch.no_grad():
        y = layer(x)
    expected = fake_quant_reference(layer, x)
    rel = (y.double() - expected).abs().max() / expected.abs().max()
    assert rel < 1e-3  # float32 rounding of x/s_x may move a handful of codes by one


def test_hybrid_digital_path_over_few_or_no_msb_columns_is_exact():
    """The digital matmul runs only over input columns holding non-zero MSB codes (or not at
    all): outliers in two channels, then no outliers at all (static clip far above |x|)."""
    layer = make(HybridLinear, 64, 40, adc={"bypass": True})
    x = heavy_tailed(3, 50, 64, dtype=torch.float64).clamp(-1, 1)
    x[..., 5] *= 40.0
    x[..., 17] *= -25.0
    with torch.no_grad():
        y = layer(x)
    expected = fake_quant_reference(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))

    static = make(HybridLinear, 64, 40, mode="static", adc={"bypass": True})
    clip = 5.0 * float(x.abs().max())
    static.set_static(clip)
    x64 = x.reshape(-1, 64)
    x_int, s_x = quantize_symmetric(x64, torch.tensor(clip, dtype=torch.float64), 11)
    assert x_int.abs().max() <= 255  # every code in the LSB range: M == 0
    w_int, s_w = quantize_symmetric(static.weight.detach().double(),
                                    weight_clip(static.weight.detach().double(),
                                                static.cfg.weight), 8)
    expected = (x_int @ w_int.t()) * (s_x * s_w) + static.bias.detach().double()
    with torch.no_grad():
        y = static(x).reshape(-1, 40)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


# ----- noise ----------------------------------------------------------------------------------
def _static_hybrid(sigma, samples, tokens=4096, in_features=64, out_features=64, **adc):
    layer = make(HybridLinear, in_features, out_features, mode="static",
                 adc={"noise_sigma_lsb": sigma, "samples": samples, **adc})
    x = heavy_tailed(tokens, in_features, seed=3)
    act_clip = float(percentile_abs(x, 99.8))
    peaks = []
    layer.observer = lambda name, kind, t: kind == "adc.lsb" and peaks.append(float(t.abs().max()))
    layer.set_static(act_clip)
    with torch.no_grad(), adc_bypassed(layer):
        exact = layer(x).double()
    layer.observer = None
    adc_clip = 2.0 * max(peaks)  # no saturation: the variance formula has no clipping term
    layer.set_static(act_clip, adc_clip)
    w_step = float(layer._weight_codes(x.device, torch.float32).step)
    out_per_acc = act_clip / 1023 * w_step  # output units per unit of analog accumulation
    return layer, x, exact, adc_clip / 511, out_per_acc


@pytest.mark.parametrize("sigma,samples", [(0.0, 1), (2.0, 1), (2.0, 4), (5.0, 2)])
def test_analog_error_variance_matches_noise_plus_rounding(sigma, samples):
    layer, x, exact, adc_step, out_per_acc = _static_hybrid(sigma, samples)
    with torch.no_grad():
        error = (layer(x).double() - exact) / out_per_acc  # in accumulation units
    expected = (sigma**2 / samples) * adc_step**2 + adc_step**2 / 12
    n = error.numel()
    # sample variance of a near-Gaussian error: relative std sqrt(2/n); allow 6 of them
    assert abs(float(error.var()) / expected - 1) < 6 * math.sqrt(2 / n) + 0.01
    assert abs(float(error.mean())) < 6 * math.sqrt(expected / n) + 1e-3 * adc_step


def test_digital_msb_path_is_noiseless():
    layer, _, _, _, _ = _static_hybrid(3.0, 1, tokens=256)
    act_clip = layer.static.act_clip
    s_x = act_clip / 1023
    gen = torch.Generator().manual_seed(5)
    lsb = torch.randint(0, 256, (256, 64), generator=gen).double()
    sign = torch.where(torch.rand(256, 64, generator=gen) < 0.5, -1.0, 1.0)
    # [-255, -1] with a negative MSB ([-1024] would clip), [0, 255] with a positive one
    lsb = torch.where(sign < 0, lsb - 256, lsb).clamp_min(-255)
    msb = sign * torch.randint(0, 4, (256, 64), generator=gen).double()
    x1, x2 = lsb * s_x, (lsb + 256 * msb) * s_x
    clip = torch.tensor(act_clip, dtype=torch.float64)
    for xi, m in ((x1, 0 * msb), (x2, msb)):
        codes = quantize_symmetric(xi, clip, 11)[0]
        assert torch.equal(center_out_split_(codes, 9, 256), m) and torch.equal(codes, lsb)
    outs = []
    for xi in (x1, x2):
        layer.reseed(7)
        with torch.no_grad():
            outs.append(layer(xi).double())
    w_codes = layer._weight_codes(x1.device, torch.float64)
    digital = s_x * float(w_codes.step) * 256 * (msb @ w_codes.codes_t)
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1] - outs[0], digital, rtol=1e-12, atol=1e-12)


def test_noise_is_reproducible_from_the_seed():
    x = heavy_tailed(8, 64)
    runs = []
    for seed in (11, 11, 12):
        layer = make(HybridLinear, adc={"noise_sigma_lsb": 3.0})
        layer.reseed(seed)
        with torch.no_grad():
            runs.append((layer(x), layer(x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # the stream advances between calls
    assert not torch.equal(runs[0][0], runs[2][0])
    from_cfg = make(HybridLinear, adc={"noise_sigma_lsb": 3.0}, seed=11)
    with torch.no_grad():
        assert torch.equal(from_cfg(x), runs[0][0])


def test_noise_disabled_restores_settings_and_leaves_the_stream_alone():
    noisy = make(HybridLinear, adc={"noise_sigma_lsb": 3.0})
    quiet = make(HybridLinear, adc={"noise_sigma_lsb": 0.0})
    x = heavy_tailed(8, 64)
    with torch.no_grad():
        with noise_disabled(noisy):
            assert noisy.cfg.adc.noise_sigma_lsb == 0.0
            assert torch.equal(noisy(x), quiet(x))
        assert noisy.cfg.adc.noise_sigma_lsb == 3.0
        reference = make(HybridLinear, adc={"noise_sigma_lsb": 3.0})
        assert torch.equal(noisy(x), reference(x))


# ----- tiles -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear])
def test_tile_rows_change_nothing_under_bypass(cls):
    x = heavy_tailed(3, 20, 100, dtype=torch.float64)
    outs = []
    for tile_rows in (None, 1, 7, 32, 100, 1000):
        layer = make(cls, 100, 24, adc={"bypass": True, "tile_rows": tile_rows})
        with torch.no_grad():
            outs.append(layer(x))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-12, atol=1e-12)


def test_tiles_are_quantized_per_tile():
    x = heavy_tailed(40, 100, dtype=torch.float64)
    layer = make(HybridLinear, 100, 24, adc={"noise_sigma_lsb": 0.0, "tile_rows": 32},
                 dynamic_scope="batch")
    untiled = make(HybridLinear, 100, 24, adc={"noise_sigma_lsb": 0.0}, dynamic_scope="batch")
    with torch.no_grad():
        y, y_untiled = layer(x), untiled(x)
    assert not torch.allclose(y, y_untiled)
    # reference: each tile's partial sum through its own ADC (dynamic peak per tile)
    clip = percentile_abs(x, 99.8)
    lsb, s_x = quantize_symmetric(x, clip, 11)
    msb = center_out_split_(lsb, 9, 256)
    w = layer._weight_codes(x.device, torch.float64)
    analog = torch.zeros(40, 24, dtype=torch.float64)
    for start in range(0, 100, 32):
        acc = lsb[:, start:start + 32] @ w.codes_t[start:start + 32]
        step = float(acc.abs().max()) / 511
        analog += (acc / step).round().clamp(-512, 511) * step
    expected = s_x * w.step * (256 * (msb @ w.codes_t) + analog) + layer.bias.detach().double()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# ----- static mode -------------------------------------------------------------------------
def test_static_mode_without_thresholds_names_the_layer():
    layer = make(HybridLinear, mode="static", name="blocks.3.mlp.w3")
    with pytest.raises(RuntimeError, match=r"layer 'blocks\.3\.mlp\.w3' is in static mode but "
                                           r"has no thresholds"):
        layer(torch.randn(2, 64))
    layer.set_static(act_clip=2.0)
    with pytest.raises(RuntimeError, match=r"'blocks\.3\.mlp\.w3' .* no ADC clip for path 'lsb'"):
        layer(torch.randn(2, 64))
    with adc_bypassed(layer), torch.no_grad():
        layer(torch.randn(2, 64))
    layer.set_static(act_clip=2.0, adc_clip=5000.0)
    assert layer.static.adc_clips == {"lsb": 5000.0}
    assert (layer.static.act_bits, layer.static.adc_bits) == (11, 10)
    with torch.no_grad():
        layer(torch.randn(2, 64))


def test_static_thresholds_are_what_the_forward_uses():
    x = heavy_tailed(16, 64)
    dynamic = make(HybridLinear, adc={"noise_sigma_lsb": 0.0}, dynamic_scope="batch")
    peaks = {}
    dynamic.observer = lambda name, kind, t: peaks.setdefault(kind, float(t.abs().max()))
    with torch.no_grad():
        y_dynamic = dynamic(x)
    assert sorted(peaks) == ["act", "adc.lsb"]
    static = make(HybridLinear, mode="static", adc={"noise_sigma_lsb": 0.0})
    static.set_static(float(percentile_abs(x, 99.8)), peaks["adc.lsb"])
    with torch.no_grad():
        assert torch.equal(static(x), y_dynamic)


def test_static_imported_integer_weights():
    layer = make(HybridLinear, mode="static", adc={"bypass": True})
    w_int = torch.randint(-128, 128, (48, 64)).float()
    layer.set_static(3.0, weight_int=w_int, weight_scale=0.01)
    x = heavy_tailed(5, 64, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    x_int, s_x = quantize_symmetric(x, torch.tensor(3.0, dtype=torch.float64), 11)
    expected = s_x * 0.01 * (x_int @ w_int.double().t()) + layer.bias.detach().double()
    torch.testing.assert_close(y, expected)


BAD_STATIC = [
    (HybridLinear, {"act_clip": -1.0}, r"layer 'l': act_clip must be a finite number > 0"),
    (HybridLinear, {"act_clip": float("inf")}, r"act_clip must be a finite number > 0"),
    (HybridLinear, {"act_clip": 1.0, "adc_clip": 0.0}, r"adc_clip must be a finite number > 0"),
    (HybridLinear, {"act_clip": 1.0, "adc_clip": {"msb": 1.0}},
     r"adc_clip needs exactly the paths \['lsb'\]"),
    (BitSerialLinear, {"act_clip": 1.0, "adc_clip": 3.0},
     r"bitserial has ADC paths \['msb', 'lsb'\]; give adc_clip as a dict per path"),
    (HybridLinear, {"act_clip": 1.0, "weight_int": torch.zeros(48, 64)},
     r"weight_int and weight_scale go together"),
    (HybridLinear, {"act_clip": 1.0, "weight_int": torch.zeros(64, 48), "weight_scale": 1.0},
     r"weight_int has shape \(64, 48\), expected \(48, 64\)"),
    (HybridLinear, {"act_clip": 1.0, "weight_int": torch.full((48, 64), 128.0),
                    "weight_scale": 1.0}, r"weight_int must hold integers in \[-128, 127\]"),
    (HybridLinear, {"act_clip": 1.0, "weight_int": torch.zeros(48, 64), "weight_scale": -1.0},
     r"weight_scale must be finite and > 0"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_STATIC, ids=[m for _, _, m in BAD_STATIC])
def test_bad_static_thresholds(cls, kwargs, message):
    layer = make(cls, name="l")
    with pytest.raises(ValueError, match=message):
        layer.set_static(**kwargs)


# ----- bad activations -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear, W8A8Linear])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_raise_with_the_layer_name(cls, bad):
    layer = make(cls, name="blocks.7.mlp.w12")
    x = torch.randn(3, 64)
    x[1, 5] = bad
    with pytest.raises(FloatingPointError, match=r"layer 'blocks\.7\.mlp\.w12': NaN or Inf"):
        layer(x)


# ----- gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("cls,cfg", [
    (HybridLinear, {}), (HybridLinear, {"adc": {"tile_rows": 16}}), (BitSerialLinear, {}),
    (W8A8Linear, {}), (HybridLinear, {"weight": {"granularity": "channel", "clip_pct": 99.0}}),
])
def test_backward_is_the_straight_through_gradient(cls, cfg):
    layer = make(cls, dynamic_scope="batch", **cfg)  # the reference clips the whole input
    x = heavy_tailed(4, 10, 64).requires_grad_(True)
    y = layer(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    for grad in (x.grad, layer.weight.grad, layer.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the STE reference: autograd through fake quantization with rounding passed straight
    xr = x.detach().clone().requires_grad_(True)
    wr = layer.weight.detach().clone().requires_grad_(True)
    a_clip = percentile_abs(xr, layer.cfg.act.percentile)
    w_clip = weight_clip(wr, layer.cfg.weight)

    def ste(v, clip, bits):
        # values at the clip itself are not clipped (the max-|W| weight keeps its gradient)
        clipped = torch.where(v.abs() <= clip, v, torch.maximum(torch.minimum(v, clip), -clip))
        codes, step = quantize_symmetric(v.detach(), clip, bits)
        return clipped + (codes * step - clipped).detach()

    w_fq = ste(wr, w_clip, layer.cfg.weight.bits)
    yr = nn.functional.linear(ste(xr, a_clip, layer.cfg.act.bits), w_fq, layer.bias.detach())
    (yr * upstream).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, wr.grad, rtol=1e-5, atol=1e-5)
