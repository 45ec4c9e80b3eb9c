"""A quantized layer's forward on the execution engine (engine.py), stage by stage: the
path every eager call takes, and its straight-through gradients (`StraightThrough`).

It computes reference.py's formulas with the same helpers (clips and steps, tiles, weight
codes, noise keys), in row blocks with fewer temporaries, on an INT8 kernel where the CPU
has an exact one (plan.py), with the observers and statistics that calibration and the
energy model read. tests/test_quant_reference.py holds it bitwise to reference.py.

Its functions take a layers.QuantLinear, typed as nn.Module (layers.py imports this
module).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import arrays, engine, reference
from .engine import ArrayCall, RowScale, Slicing, WeightCodes
from .intmm import Int8Weights
from .plan import SampleNoise, use_int8
from .quantizers import qmax, quantize_symmetric, step_of


class StaticAct(NamedTuple):
    """The static activation clip on the device (0-d) and, as host numbers, the clip and
    the step exactly as the device computes them: the quantizer's scalar bounds without
    reading the device."""

    clip: torch.Tensor
    clip_value: float
    step_value: float


def simulate(layer: nn.Module, x: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, WeightCodes]:
    """The hardware forward (no autograd). Returns (y, activation clip, weight codes)."""
    cfg = layer.cfg
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.detach().reshape(-1, layer.in_features).to(dtype)
    # A sample is one entry of the leading dimension (one row of a 2-D input).
    batch = x.shape[0] if x.dim() > 1 else 1
    per_sample = x2.shape[0] // batch if batch else 0
    group = _scope_rows(layer, x2.shape[0], per_sample)
    stats = _observed_stats(layer, x2.shape[0], batch)
    call = _array_call(layer, batch, per_sample, group, x2.device, dtype, stats)
    if layer.observer is not None:
        layer.observer(layer.layer_name, "act", x)
    act_clip = _act_clip(layer, x2, group)
    act_step = step_of(act_clip, cfg.act.bits)
    weights = arrays.weight_codes(layer, x2.device, dtype)
    slicing = layer.slicing()
    backend, as_digits = _int8_kernel(layer, x2, slicing)
    if backend is not None and (weights.int8 is None or weights.int8.backend != backend):
        weights = weights._replace(int8=Int8Weights(weights.codes_t, backend))
        arrays.replace_cached(layer, weights)
    # Static: host numbers, known without reading the device, take ATen's scalar fast
    # path. Dynamic: the clip stays on the device (0-d or per row), no host sync.
    if cfg.mode == "static":
        static = _static_act(layer, dtype, x2.device)
        clip, step = static.clip_value, static.step_value
    else:
        clip, step = act_clip, act_step
    x_int, msb, columns = engine.quantize_dac_input(x2, clip, step, slicing, as_digits, stats)
    # Nothing here may keep a slice alive: accumulate frees each one after its product.
    split = layer._paths(x_int, msb)
    del x_int, msb
    y, unit = engine.accumulate(split, weights, x2.shape[0], call, columns)
    del split
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    engine.reconstruct_(y, act_step, weights.step, unit, bias)
    if stats is not None:
        stats.calls += 1
        stats.observe_output(x2, layer.weight.detach().to(dtype), bias, y)
    y = y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
    return y, act_clip, weights


def _observed_stats(layer: nn.Module, rows: int, batch: int):
    """The layer's statistics if this call has rows to observe (stats.LayerStats.begin_call),
    else None: the call then runs as with statistics off."""
    stats = layer.stats
    if stats is None:
        return None
    context = layer._sample_context
    sample_ids = context.sample_ids if context is not None else None
    if not stats.begin_call(rows, batch, sample_ids, layer.out_features, layer.layer_name):
        return None
    return stats


def _scope_rows(layer: nn.Module, tokens: int, per_sample: int) -> int | None:
    """Rows per dynamic range group (dynamic_scope token/sample), or None for one range
    over the whole call (static mode, scope batch, or an empty input)."""
    cfg = layer.cfg
    if cfg.mode == "static" or cfg.dynamic_scope == "batch" or not tokens:
        return None
    return 1 if cfg.dynamic_scope == "token" else per_sample


def _check_finite(layer: nn.Module, low: torch.Tensor, high: torch.Tensor) -> None:
    """NaN/Inf in the input. Inside a sample_context the verdict stays on the device and
    the context raises when it exits (no host sync per call); outside one it is read at
    once."""
    finite = torch.isfinite(low) & torch.isfinite(high)
    if layer._sample_context is not None:
        layer._sample_context.record_finite(layer.layer_name, finite)
    elif not bool(finite):
        raise FloatingPointError(f"layer '{layer.layer_name}': NaN or Inf in the input "
                                 "activations")


def _static_act(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> StaticAct:
    """The static clip and step for this dtype and device, computed once (on the CPU) per
    clip value."""
    clip_value, step_value = layer.static_act_numbers(dtype)
    key = (clip_value, step_value, dtype, device)
    cache = layer._static_act_cache
    if cache is None or cache[0] != key:
        clip = torch.tensor(clip_value, dtype=dtype, device=device)
        layer._static_act_cache = cache = (key, StaticAct(clip, clip_value, step_value))
    return cache[1]


def _act_clip(layer: nn.Module, x: torch.Tensor, group: int | None) -> torch.Tensor:
    """Activation clip: 0-d, or per row [rows, 1] (equal within each group of rows)."""
    low, high = torch.aminmax(x)
    _check_finite(layer, low, high)
    if layer.cfg.mode == "static":
        return _static_act(layer, x.dtype, x.device).clip
    return reference.dynamic_clip(x, layer.cfg.act.percentile, group)


def _adc_step(layer: nn.Module, path: str, acc: torch.Tensor, group: int | None
              ) -> RowScale:
    """The ADC step: a number, or per row [rows, 1] (dynamic, per group of rows).

    Dynamic peaks are taken per tile (acc is one tile's partial sum): each array's
    converters range on what they convert, as auto-ranging hardware would; a global peak
    would need every tile's result before any tile is converted. Static clips are per
    layer and shared by all tiles (calibration collects every tile's sums)."""
    bits = layer.cfg.adc.bits
    if layer.cfg.mode == "static":
        return layer.static_adc_clip(path) / qmax(bits)
    return reference.dynamic_adc_step(acc, bits, group, layer.dynamic_step_eps)


def _int8_kernel(layer: nn.Module, x2: torch.Tensor, slicing: Slicing
                 ) -> tuple[str | None, tuple[bool, bool]]:
    """The INT8 kernel this call multiplies integer codes on (plan.use_int8), and per slice
    (x_int, MSB) whether its product takes it; (None, (False, False)): all on float32.
    The result is the same either way."""
    cfg = layer.cfg
    tile = min(cfg.adc.tile_rows or layer.in_features, layer.in_features)
    chosen = []
    for (low, high), analog in zip(slicing.ranges, slicing.analog):
        if analog and not cfg.device.ideal:
            chosen.append(None)  # programmed arrays and read noise compute on float codes
            continue
        inner = tile if analog else layer.in_features
        chosen.append(use_int8(low, high, inner, cfg.weight.bits, x2.device, x2.dtype,
                               layer.int8_matmul))
    backends = {backend for backend in chosen if backend is not None}
    if len(backends) != 1:
        return None, (False, False)
    chosen += [None] * (2 - len(chosen))
    return backends.pop(), (chosen[0] is not None, chosen[1] is not None)


def _array_call(layer: nn.Module, batch: int, per_sample: int, group: int | None,
                device: torch.device, dtype: torch.dtype, stats=None) -> ArrayCall:
    """What the engine's array stages need for this call: tiles, ADC steps, hooks, the
    statistics observing it and each sample's noise key (`call_key` checks the batch
    against the context)."""
    call_key, sample_ids = layer.call_key(batch)
    noise = None
    if layer.reads_noisy() and per_sample:
        keys = layer.sample_keys(call_key, sample_ids)
        noise = SampleNoise(layer.generator(device), per_sample, keys)
    observer, name = layer.observer, layer.layer_name
    return ArrayCall(
        layer.out_features, layer.tiles(), layer.cfg.adc,
        lambda path, acc: _adc_step(layer, path, acc, group),
        None if observer is None else lambda kind, acc: observer(name, kind, acc),
        stats, noise, arrays.converters(layer, device, dtype))


class StraightThrough(torch.autograd.Function):
    """Forward: the simulated hardware. Backward: straight-through estimator of
    y = fq(W) fq(x)^T + b, i.e. every rounding (weights, activations, slicing, ADC) passes
    the gradient unchanged, the activation and weight clips block it outside their range,
    and ADC saturation is ignored. Imported integer weights get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        # Integer codes and their products must stay exact: the simulation computes in
        # float32 (float64 for float64 inputs) whatever autocast the caller runs under.
        with torch.autocast(x.device.type, enabled=False):
            y, act_clip, weights = simulate(layer, x)
        ctx.layer = layer
        ctx.weights = weights
        ctx.save_for_backward(x, weight, act_clip)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):
            return StraightThrough._gradients(ctx, grad_y)

    @staticmethod
    def _gradients(ctx, grad_y):
        x, weight, act_clip = ctx.saved_tensors
        layer, weights = ctx.layer, ctx.weights
        dtype = weights.codes_t.dtype
        g = grad_y.reshape(-1, layer.out_features).to(dtype)
        x2 = x.reshape(-1, layer.in_features).to(dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_fq_t = weights.codes_t * weights.step
            grad_x = (g @ w_fq_t.t()).mul_(x2.abs() <= act_clip)
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] and weights.clip is not None:
            x_codes, x_step = quantize_symmetric(x2, act_clip, layer.cfg.act.bits)
            grad_w = (g.t() @ x_codes.mul_(x_step)).mul_(weight.detach().abs() <= weights.clip)
            grad_w = grad_w.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(grad_y.dtype)
        return grad_x, grad_w, grad_b, None
