"""Executable specification of docs/design.md "AIMC quantization": the hybrid W8A11, legacy
bit-serial and W8A8 forwards as whole-tensor torch, one line per formula; with
"Device non-idealities", the real converters and the devices' read noise at the ADC
input (the programmed arrays themselves: device.py).

Three users:
- the tests, which hold the fast layers (layers.py, with their CPU row blocks and INT8
  digits) to it: integer codes and outputs bitwise with the noise off, the noise in
  distribution (tests/test_quant_reference.py);
- `torch.compile`: a quantized layer traced by Dynamo runs this module, which has no host
  syncs and no Python state, so Inductor fuses the element-wise quantizer, split and ADC
  passes (layers.py, `QuantLinear.forward`);
- the layer benchmark, whose yardstick it is (benchmarks/quant_linear.py).

Scales follow the fast engine's floating-point association so that the two agree to the
bit: the analog conversions are summed in units of the first conversion's step, and the
output scale s_x s_w s_adc multiplies that sum once. A scale that applies to the whole
call (static clips, the seed's whole-call scope) is a Python number, one that differs by
row (the token and sample scopes) a [rows, 1] tensor.

Thermal noise here comes from a counter-based generator written in torch integer ops
(`thermal_noise`): element e of a read with key k gets N(0, 1) from the splitmix64
finaliser of k + e, so it is a pure function of the key on every device and inside a
compiled graph.
The fast CPU engine draws from torch's generator re-seeded per key instead (faster
eagerly); both give N(0, sigma^2 / K) in ADC steps, with different values for one key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .config import AdcConfig, QuantConfig
from .noise import as_int64, mix64, mix_keys, noise_key, shift_right
from .quantizers import percentile_abs, qmax, step_of, weight_clip


def thermal_noise(keys: torch.Tensor, rows_per_sample: int, cols: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1), [len(keys) * rows_per_sample, cols]: sample s's rows from key keys[s].

    Element e (row-major within the sample) takes z = mix64(key + e), the key itself a
    mix64 output; its top 24 bits and the next 24 are two uniforms for the Box-Muller
    transform. (A counter step of 1 rather than splitmix64's gamma: Inductor folds the
    counter into its index arithmetic, which must not overflow int64.)"""
    counters = torch.arange(rows_per_sample * cols, device=keys.device,
                            dtype=torch.int64).reshape(1, rows_per_sample, cols)
    z = mix64(keys.reshape(-1, 1, 1) + counters)
    return _box_muller(z).reshape(-1, cols).to(dtype)


def _uniform_open(z: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of z as a float32 uniform in (0, 1)."""
    return (shift_right(z, 40).to(torch.float32) + 0.5) * 2.0**-24


def _box_muller(z: torch.Tensor) -> torch.Tensor:
    """N(0, 1) from 48 bits of z: the top 24 and the next 24 as two uniforms."""
    u1 = _uniform_open(z)  # in (0, 1): log is finite
    u2 = ((z >> 16) & 0xFFFFFF).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


# Elements per pass of a keyed draw: bounds its int64 temporaries (64 MiB each).
_DRAW_BLOCK = 2**23


def _keyed(key: int, shape: Sequence[int], device: torch.device | str, transform
           ) -> torch.Tensor:
    count = math.prod(shape)
    out = torch.empty(count, dtype=torch.float32, device=device)
    base = as_int64(key)
    for start in range(0, count, _DRAW_BLOCK):
        stop = min(start + _DRAW_BLOCK, count)
        counters = torch.arange(start, stop, device=device, dtype=torch.int64)
        out[start:stop] = transform(mix64(counters + base))
    return out.reshape(tuple(shape))


def keyed_normal(key: int, shape: Sequence[int], device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """float32 N(0, 1) of `shape`: element e (row-major) from mix64(key + e), as
    `thermal_noise`. A pure function of (key, e) on every device: the draws of a
    programmed array (device.py) and of its converters."""
    return _keyed(key, shape, device, _box_muller)


def keyed_uniform(key: int, shape: Sequence[int], device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """float32 uniform in (0, 1) of `shape`, element e from mix64(key + e)."""
    return _keyed(key, shape, device, _uniform_open)


# ----- docs/design.md "Common pieces" -----------------------------------------------------

def quantize(x: torch.Tensor, clip: torch.Tensor | float, step: torch.Tensor | float
             ) -> torch.Tensor:
    """x_int = round(clamp(x, -c, c) / s); the outer clamp to [-2^(b-1), qmax] is implied."""
    return torch.round(torch.clamp(x, -clip, clip) / step)


def weight_codes(weight: torch.Tensor, cfg: QuantConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_int [out, in], s_w: 0-d or [out], the clip: 0-d or [out, 1]) from the float
    weights: clip max|W| or its `clip_pct` percentile, per tensor or per output channel."""
    w = cfg.weight
    if w.granularity == "channel":
        clip = weight_clip(weight, w)
    elif w.clip_pct is None:
        clip = weight.abs().amax()
    else:  # one row: the selection along a dimension, which traces without host syncs
        clip = percentile_abs(weight.reshape(1, -1), w.clip_pct, dim=1).reshape(())
    step = step_of(clip, w.bits)
    return quantize(weight, clip, step), step.reshape(-1) if step.dim() else step, clip


def dynamic_clip(x: torch.Tensor, percentile: float, group_rows: int | None) -> torch.Tensor:
    """The percentile of |x| over each group of `group_rows` rows ([rows, 1]), or over the
    whole call (0-d) for group_rows None."""
    if group_rows is None:
        return x.abs().amax() if percentile == 100.0 else percentile_abs(x, percentile)
    grouped = x.reshape(-1, group_rows * x.shape[1])
    clip = grouped.abs().amax(dim=1) if percentile == 100.0 else percentile_abs(
        grouped, percentile, dim=1)
    return clip.repeat_interleave(group_rows).unsqueeze(1)


def dynamic_adc_step(a: torch.Tensor, bits: int, group_rows: int | None, eps: float
                     ) -> torch.Tensor | float:
    """s_adc = max|a| / qmax_adc (+ eps, the seed's bit-serial form) per group of rows, or
    over the whole call as a host number (one sync: the seed's scope)."""
    if group_rows is None:
        peak = float(a.abs().amax())
        return 1.0 if peak == 0 and eps == 0 else peak / qmax(bits) + eps
    low, high = torch.aminmax(a.reshape(-1, group_rows * a.shape[1]), dim=1)
    peak = torch.maximum(-low, high)
    if eps == 0:
        step = torch.where(peak > 0, peak / qmax(bits), torch.ones_like(peak))
    else:
        step = peak / qmax(bits) + eps
    return step.repeat_interleave(group_rows).unsqueeze(1)


def adc(a: torch.Tensor, step: torch.Tensor | float, bits: int,
        noise_codes: torch.Tensor | None, errors: ConverterErrors | None = None
        ) -> torch.Tensor:
    """ADC codes clamp(Q(a / s_adc + e), -2^(n-1), 2^(n-1) - 1); e is the noise at the
    ADC input already in ADC steps, Q rounding (ideal converters) or `adc_transfer`."""
    scaled = a / step if noise_codes is None else a / step + noise_codes
    codes = torch.round(scaled) if errors is None else adc_transfer(scaled, errors, bits)
    return torch.clamp(codes, -qmax(bits) - 1, qmax(bits))


# ----- docs/design.md "Device non-idealities": the converters and the arrays' reads --------

class ConverterErrors(NamedTuple):
    """The imperfections of one array's column converters (one converter per column)."""

    gain: torch.Tensor | None  # [cols]: 1 + relative gain error
    offset: torch.Tensor | None  # [cols]: offset in LSB
    inl_max_lsb: float  # peak of the INL bow
    edges: torch.Tensor | None  # [cols, 2^n - 1]: sorted code edges in LSB (None: ideal)


# Which converter error a key belongs to.
_ADC_GAIN, _ADC_OFFSET, _ADC_EDGES = 1, 2, 3


def converter_errors(adc_cfg: AdcConfig, key: int, cols: int, device: torch.device,
                     dtype: torch.dtype) -> ConverterErrors:
    """Draw one array's converters from `key` (device seed, layer, path, tile): per
    column a gain 1 + N(0, gain_sigma^2), an offset N(0, offset_sigma^2) LSB, and, for DNL,
    each code edge c + 1/2 (between codes c and c + 1) moved by N(0, dnl_sigma^2) LSB.
    Edges that cross are sorted: the code is the number of edges below the input."""
    def normal(part: int, shape: tuple[int, ...]) -> torch.Tensor:
        return keyed_normal(noise_key(key, part), shape, device).to(dtype)

    gain = 1.0 + adc_cfg.gain_sigma * normal(_ADC_GAIN, (cols,)) if adc_cfg.gain_sigma else None
    offset = adc_cfg.offset_sigma_lsb * normal(_ADC_OFFSET, (cols,)) if adc_cfg.offset_sigma_lsb \
        else None
    edges = None
    if adc_cfg.dnl_sigma_lsb:
        low = -qmax(adc_cfg.bits) - 1
        ideal = torch.arange(low, qmax(adc_cfg.bits), device=device, dtype=dtype) + 0.5
        moved = ideal + adc_cfg.dnl_sigma_lsb * normal(_ADC_EDGES, (cols, ideal.numel()))
        edges = torch.sort(moved, dim=1).values.contiguous()
    return ConverterErrors(gain, offset, float(adc_cfg.inl_max_lsb), edges)


def converter_input(v: torch.Tensor, errors: ConverterErrors, bits: int) -> torch.Tensor:
    """What each column's converter sees of v = a / s_adc + e (LSB, [rows, cols]): its gain
    and offset, then the INL bow inl_max (1 - u^2), u = v / 2^(n-1) clamped to [-1, 1]
    (peak at mid-scale, zero at both ends of the range)."""
    if errors.gain is not None:
        v = v * errors.gain
    if errors.offset is not None:
        v = v + errors.offset
    if errors.inl_max_lsb:
        u = torch.clamp(v / 2 ** (bits - 1), -1.0, 1.0)
        v = v + errors.inl_max_lsb * (1.0 - u * u)
    return v


def adc_transfer(v: torch.Tensor, errors: ConverterErrors, bits: int) -> torch.Tensor:
    """Codes of the real converters for v (LSB, [rows, cols]), before the range clamp:
    rounding of `converter_input`, or with DNL the count of the column's edges at or
    below it, from -2^(n-1)."""
    v = converter_input(v, errors, bits)
    if errors.edges is None:
        return torch.round(v)
    below = torch.searchsorted(errors.edges, v.t().contiguous(), right=True).t()
    return (below - (qmax(bits) + 1)).to(v.dtype)


# The read-noise variance is a second product as large as the array's own; its operands
# in bfloat16 (float32 accumulation) halve its cost on CPUs and GPUs with bf16 units. It only
# sets the std of a Gaussian: <= 0.4% relative error on the variance (8 significant bits of
# x^2, of each device's variance and of the sum), <= 0.2% on the std, far inside the spread
# of the fitted read-noise model itself.
READ_VARIANCE_DTYPE = torch.bfloat16


def read_noise_variance(codes: torch.Tensor, variance_t: torch.Tensor) -> torch.Tensor:
    """Variance ([rows, cols], accumulation units^2, codes' dtype) that the devices' read
    noise adds to one read of a = codes @ W: independent per-device errors add
    sum_i x_i^2 var_i,j to a_j (`variance_t`: per weight and read, [in, out]), computed in
    READ_VARIANCE_DTYPE."""
    squares = codes.square().to(READ_VARIANCE_DTYPE)
    return (squares @ variance_t.to(READ_VARIANCE_DTYPE)).to(codes.dtype)


def read_noise_std_codes(device_variance: torch.Tensor, thermal_sigma: float,
                         step: torch.Tensor | float, reads: int, out: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Std (ADC steps) of the noise at the ADC input: the thermal sigma (already
    / sqrt(K)) and the devices' read noise `read_noise_variance`, averaged over K reads and
    referred to the ADC input (/ s_adc^2). With `out` (which may be `device_variance`
    itself) the same operations run in place there, without temporaries."""
    if out is None:
        return torch.sqrt(device_variance / (reads * step * step) + thermal_sigma * thermal_sigma)
    torch.div(device_variance, reads * step * step, out=out)
    return out.add_(thermal_sigma * thermal_sigma).sqrt_()


class ArrayDevices(NamedTuple):
    """What one layer's analog arrays hold and how they read out (device.py)."""

    weights: torch.Tensor | None  # read-back weights [out, in], code units (None: the codes)
    read_variance: torch.Tensor | None  # per weight and read, code units^2 (None: no noise)
    compensation: float  # digital gain on the analog outputs (global drift compensation)
    converters: dict[tuple[int, int], ConverterErrors]  # (path index, tile) -> converters


# ----- the splits --------------------------------------------------------------------

def center_out_split(x_int: torch.Tensor, lsb_bits: int, radix: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid step 2: (L, M) with M = ceil((x - Lmax) / R) above the LSB range,
    -ceil((Lmin - x) / R) below, 0 inside; L = x - R M."""
    lsb_min, lsb_max = -(2 ** (lsb_bits - 1)), 2 ** (lsb_bits - 1) - 1
    above = torch.ceil((x_int - lsb_max) / radix)
    below = -torch.ceil((lsb_min - x_int) / radix)
    msb = torch.where(x_int > lsb_max, above, torch.where(x_int < lsb_min, below, 0.0))
    return x_int - radix * msb, msb


def bitserial_split(x_int: torch.Tensor, lsb_bits: int, gain_shift: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed split: (LSB * 2^g, MSB) with MSB = floor(x / 2^lb), LSB = x - 2^lb MSB."""
    msb = torch.floor(x_int / 2**lsb_bits)
    return (x_int - 2**lsb_bits * msb) * 2**gain_shift, msb


class Path(NamedTuple):
    name: str
    codes: torch.Tensor
    gain: float  # weight of the path's result in the reconstruction
    reads: int  # K: reads averaged, noise std / sqrt(K)
    noisy: bool


def paths(x_int: torch.Tensor, cfg: QuantConfig
          ) -> tuple[list[Path], torch.Tensor | None, float]:
    """(analog paths, exact digital codes or None, digital gain) of a scheme."""
    split, reads = cfg.split, cfg.adc.samples
    if cfg.scheme == "hybrid":
        lsb, msb = center_out_split(x_int, split.lsb_bits, split.radix)
        return [Path("lsb", lsb, 1.0, reads, True)], msb, float(split.radix)
    if cfg.scheme == "bitserial":
        lsb, msb = bitserial_split(x_int, split.lsb_bits, split.lsb_gain_shift)
        return [Path("msb", msb, float(2**split.lsb_bits), reads, True),
                Path("lsb", lsb, 2.0**-split.lsb_gain_shift, 1, False)], None, 1.0
    if cfg.scheme == "w8a8":
        return [], x_int, 1.0
    raise ValueError(f"quant.scheme={cfg.scheme!r} has no quantized forward")


class Thresholds(NamedTuple):
    """Static thresholds of one layer as host numbers (constants of a compiled graph): the
    activation clip and its step, both exactly representable in the compute dtype, and
    the ADC clip per path."""

    act_clip: float
    act_step: float
    adc_clips: dict[str, float]


def tiles(in_features: int, tile_rows: int | None) -> list[slice]:
    """Input rows of each analog array."""
    if tile_rows is None or tile_rows >= in_features:
        return [slice(None)]
    return [slice(start, start + tile_rows) for start in range(0, in_features, tile_rows)]


def forward(x: torch.Tensor, w_int: torch.Tensor, w_step: torch.Tensor,
            bias: torch.Tensor | None, cfg: QuantConfig, static: Thresholds | None,
            rows_per_sample: int, noise_keys: torch.Tensor | None,
            adc_paths: Sequence[str], dynamic_step_eps: float = 0.0,
            devices: ArrayDevices | None = None) -> torch.Tensor:
    """y [rows, out] of one quantized linear layer on x [rows, in] (float32 or float64).

    `w_int` [out, in] and `w_step` are the weight codes and step; `static` the layer's
    thresholds in static mode (None: dynamic); `rows_per_sample` the rows of one sample
    (the dynamic `sample` scope and the noise); `noise_keys` one int64 key per sample of
    this call (None: no noise). Path p, tile t mixes (p, t) into the keys. `devices`: the
    programmed arrays and their converters (None: ideal); the exact digital path keeps
    the codes."""
    adc_cfg = cfg.adc
    group = None
    if static is None and cfg.dynamic_scope != "batch" and x.shape[0]:
        group = 1 if cfg.dynamic_scope == "token" else rows_per_sample
    # Activations (DESIGN "Activations").
    if static is not None:
        act_step = static.act_step
        x_int = quantize(x, static.act_clip, act_step)
    else:
        act_clip = dynamic_clip(x, cfg.act.percentile, group)
        act_step = step_of(act_clip, cfg.act.bits)
        x_int = quantize(x, act_clip, act_step)
    analog, digital, digital_gain = paths(x_int, cfg)
    w_int_t = w_int.t()
    w_analog_t, variance_t, compensation, converters = w_int_t, None, 1.0, {}
    if devices is not None:
        if devices.weights is not None:
            w_analog_t = devices.weights.t()
        if devices.read_variance is not None:
            variance_t = devices.read_variance.t()
        compensation, converters = devices.compensation, devices.converters
    # Analog paths: per tile a = W_int[tile] @ codes[tile], ADC, summed in units of the
    # first conversion's step.
    acc, unit = None, None
    for path in analog:
        path_index = list(adc_paths).index(path.name)
        sigma = adc_cfg.noise_sigma_lsb / math.sqrt(path.reads) if path.noisy else 0.0
        gain = path.gain if compensation == 1.0 else path.gain * compensation
        for tile_index, rows in enumerate(tiles(x.shape[1], adc_cfg.tile_rows)):
            a = path.codes[:, rows] @ w_analog_t[rows]
            step = 1.0
            if not adc_cfg.bypass:
                if static is not None:
                    step = static.adc_clips[path.name] / qmax(adc_cfg.bits)
                else:
                    step = dynamic_adc_step(a, adc_cfg.bits, group, dynamic_step_eps)
                noise = None
                std = sigma
                if variance_t is not None:
                    variance = read_noise_variance(path.codes[:, rows], variance_t[rows])
                    std = read_noise_std_codes(variance, sigma, step, path.reads)
                if (variance_t is not None or sigma) and noise_keys is not None:
                    keys = mix_keys(mix_keys(noise_keys, path_index), tile_index)
                    noise = thermal_noise(keys, rows_per_sample, a.shape[1], a.dtype) * std
                a = adc(a, step, adc_cfg.bits, noise, converters.get((path_index, tile_index)))
            if acc is None:
                acc, unit = a, step * gain
                continue
            acc = _add_scaled(acc, a, step * gain / unit)
    # Exact digital path, y = s_x s_w s_adc (y_analog + (R / s_adc) W_int @ M) + b.
    if digital is not None:
        product = digital @ w_int_t
        if acc is None:
            acc, unit = product, digital_gain
        else:
            acc = _add_scaled(acc, product, digital_gain / unit)
    scale = w_step * act_step * unit  # s_x s_w s_adc (one rounding per product)
    return acc * scale if bias is None else torch.addcmul(bias, acc, scale)


def _add_scaled(acc: torch.Tensor, other: torch.Tensor, alpha: torch.Tensor | float
                ) -> torch.Tensor:
    """acc + alpha * other, alpha a number or per row: one fused multiply-add, as ATen's
    add(alpha=) and addcmul compute it. A number goes in as a 0-d tensor because Inductor
    (torch 2.14) drops the alpha of an add(alpha=) whose operands are two matmuls."""
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(alpha, dtype=acc.dtype, device=acc.device)
    return torch.addcmul(acc, other, alpha)
