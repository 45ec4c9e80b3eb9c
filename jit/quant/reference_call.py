"""A quantized layer's forward through reference.py, the executable specification:
whole-tensor ops, no host syncs in static mode or the token and sample scopes, no Python
state read per call. torch.compile traces this path for inference (no straight-through
gradients); eagerly it is what the tests hold the fast path (fast_path.py) to.

Its functions take a layers.QuantLinear, typed as nn.Module (layers.py imports this
module).
"""

from __future__ import annotations

import torch
from torch import nn

from . import arrays, reference
from .noise import mix_keys, noise_key, noise_keys


def reference_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y of `layer` on x through reference.forward.

    Noise keys: inside a sample_context the call's keys (noise.SampleContext.call_keys)
    mixed with this layer and its use in the call; outside one the row index and the
    layer's own count of noisy forwards, as the fast path (eager only: a compiled graph
    would bake the count in)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.detach().reshape(-1, layer.in_features).to(dtype)
    batch = x.shape[0] if x.dim() > 1 else 1
    per_sample = x2.shape[0] // batch if batch else 0
    static = _thresholds(layer, dtype)
    w_int, w_step = _weights(layer, dtype, x2.device)
    finite = torch.isfinite(x2).all()
    context = layer._sample_context
    keys = None
    if layer.reads_noisy() and per_sample:
        keys = _keys(layer, batch, x2.device)
    if context is not None:
        context.record_finite(layer.layer_name, finite)
    elif not bool(finite):
        raise FloatingPointError(f"layer '{layer.layer_name}': NaN or Inf in the input "
                                 "activations")
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    # Integer codes must stay exact: float32 whatever autocast the caller runs under.
    with torch.autocast(x.device.type, enabled=False):
        y = reference.forward(x2, w_int, w_step, bias, layer.cfg, static, per_sample, keys,
                              layer.adc_paths, layer.dynamic_step_eps,
                              arrays.array_devices(layer, x2.device, dtype))
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


def _thresholds(layer: nn.Module, dtype: torch.dtype) -> reference.Thresholds | None:
    if layer.cfg.mode != "static":
        return None
    clip, step = layer.static_act_numbers(dtype)
    clips = {} if layer.cfg.adc.bypass else {
        path: layer.static_adc_clip(path) for path in layer.adc_paths}
    return reference.Thresholds(clip, step, clips)


def _weights(layer: nn.Module, dtype: torch.dtype, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_int, s_w): the imported codes of static mode, else from the float weights."""
    static = layer.static
    if layer.cfg.mode == "static" and static is not None and static.weight_int is not None:
        return (static.weight_int.to(device=device, dtype=dtype),
                static.weight_scale.to(device=device, dtype=dtype))
    codes, step, _ = reference.weight_codes(layer.weight.detach().to(dtype), layer.cfg)
    return codes, step


def _keys(layer: nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    """int64 noise keys of this call's samples for reference.py."""
    base = layer.seed_base()
    context = layer._sample_context
    if context is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(f"layer '{layer.layer_name}': a compiled noisy layer needs a "
                               "jit.quant.sample_context around the network call")
        keys = noise_keys(layer._noise_calls, range(batch)) if batch else []
        layer._noise_calls += 1
        call_keys = torch.tensor(keys, dtype=torch.int64, device=device)
    else:
        context.check(layer.layer_name, batch)
        if context.call_keys is None:
            raise RuntimeError(f"layer '{layer.layer_name}': the sample_context has no call "
                               "keys yet (its network was not called with a tensor)")
        call_keys = context.call_keys.to(device)
        base = noise_key(base, context.next_use(layer))
    return mix_keys(call_keys, base)
