"""What a quantized layer's analog arrays hold: its INT weight codes, the conductances
they are programmed into (device.py) and each array's column converters.

Its functions take a layers.QuantLinear (typed as nn.Module: layers.py imports this
module). Both forwards read these, the fast path (fast_path.py) and the specification
(reference_call.py), so they compute with the very same codes and devices. Everything
here is cached on the layer and rebuilt when the weight tensor, the imported codes or the
device settings change; a cached entry never changes a result.
"""

from __future__ import annotations

import torch
from torch import nn

from . import device as device_model
from . import reference
from .engine import WeightCodes
from .noise import noise_key
from .quantizers import qmax, stable_seed


def weight_codes(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> WeightCodes:
    """INT weight codes (reference.weight_codes, or the imported ones) and their programmed
    arrays, cached until the weight tensor or the device settings change (in-place updates
    bump its version), so inference neither requantizes nor reprograms per call."""
    static = layer.static
    programming = (layer.cfg.device, layer.programming_draw)
    if static is not None and static.weight_int is not None:
        key = ("import", id(static), device, dtype, programming)
    else:
        w = layer.weight
        key = (w._version, w.data_ptr(), device, dtype, layer.cfg.weight, programming)
    cache = layer._weight_cache
    if cache is not None and cache[0] == key:
        return cache[1]
    if key[0] == "import":
        codes = static.weight_int.to(device=device, dtype=dtype)
        step, clip = static.weight_scale.to(device=device, dtype=dtype), None
    else:
        w = layer.weight.detach().to(dtype)
        if not bool(w.isfinite().all()):  # once per weight version: the codes are cached
            raise FloatingPointError(f"layer '{layer.layer_name}': NaN or Inf in the weights")
        codes, step, clip = reference.weight_codes(w, layer.cfg)
    entry = WeightCodes(codes.t().contiguous(), step, clip)
    if not layer.cfg.device.ideal:
        entry = _programmed(layer, entry, dtype)
    layer._weight_cache = (key, entry)
    return entry


def replace_cached(layer: nn.Module, weights: WeightCodes) -> None:
    """Keep `weights` (the same codes, with more attached) as the cached entry."""
    layer._weight_cache = (layer._weight_cache[0], weights)


def _programmed(layer: nn.Module, weights: WeightCodes, dtype: torch.dtype) -> WeightCodes:
    """The codes programmed into the arrays at device.t_inference_s (device.program)."""
    cfg = layer.cfg.device
    key = device_model.layer_key(cfg.seed, layer.layer_name)
    if layer.programming_draw is not None:
        key = noise_key(key, layer.programming_draw)
    arrays = device_model.program(weights.codes_t.t(), qmax(layer.cfg.weight.bits), cfg, key)
    # Kept in the dtype of its product (reference.read_noise_variance), converted once.
    variance = None if arrays.read_variance is None else (
        arrays.read_variance.t().to(reference.READ_VARIANCE_DTYPE).contiguous())
    return weights._replace(analog_t=arrays.read_back.t().to(dtype).contiguous(),
                            read_variance_t=variance, compensation=arrays.compensation)


def converters(layer: nn.Module, device: torch.device, dtype: torch.dtype
               ) -> dict[tuple[int, int], reference.ConverterErrors]:
    """Each array's column converters, drawn once per (device seed, layer, path, tile)."""
    adc = layer.cfg.adc
    if not layer.adc_paths or adc.bypass or not adc.converter_errors:
        return {}
    key = (adc, layer.cfg.device.seed, layer.layer_name, layer.out_features, device, dtype)
    cache = layer._converter_cache
    if cache is None or cache[0] != key:
        base = stable_seed(layer.cfg.device.seed, f"adc/{layer.layer_name}")
        drawn = {(index, tile): reference.converter_errors(
                     adc, noise_key(base, index, tile), layer.out_features, device, dtype)
                 for index in range(len(layer.adc_paths))
                 for tile in range(len(layer.tiles()))}
        layer._converter_cache = cache = (key, drawn)
    return cache[1]


def array_devices(layer: nn.Module, device: torch.device, dtype: torch.dtype
                  ) -> reference.ArrayDevices | None:
    """The programmed arrays and converters in reference.py's terms (None: all ideal)."""
    drawn = converters(layer, device, dtype)
    if layer.cfg.device.ideal and not drawn:
        return None
    weights = weight_codes(layer, device, dtype)
    return reference.ArrayDevices(
        None if weights.analog_t is None else weights.analog_t.t(),
        None if weights.read_variance_t is None else weights.read_variance_t.t(),
        weights.compensation, drawn)


def read_back_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(INT codes, read-back weights after drift compensation), both [out, in] float32 in
    code units, at the current device.t_inference_s."""
    weights = weight_codes(layer, layer.weight.device, torch.float32)
    codes = weights.codes_t.t()
    if weights.analog_t is None:
        return codes, codes
    return codes, weights.analog_t.t() * weights.compensation
