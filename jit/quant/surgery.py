"""Model surgery and model-wide switches: replace target nn.Linear modules by quantized
layers, reseed their noise, and switch noise or ADC off temporarily (calibration)."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import DeviceConfig, QuantConfig, build_quant_config
from .layers import LAYER_CLASSES, QuantLinear, quantized_layers

# How many candidate names an error message lists.
_LISTED_NAMES = 8


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def target_names(linears: Any, targets: tuple[str, ...]) -> list[str]:
    """Names among `linears` (names of nn.Linear modules, or a model) that `targets` select.

    A pattern that matches none is an error naming it and listing some available names.
    """
    if isinstance(linears, nn.Module):
        linears = _float_linears(linears)
    linears = list(linears)
    for pattern in targets:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
            raise ValueError(f"quant.targets pattern {pattern!r} matches no nn.Linear module "
                             f"(available: {_listed(linears) or 'none'})")
    return [name for name in linears if _matches(name, targets)]


def _float_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)}


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_LISTED_NAMES]) + (", ..." if len(names) > _LISTED_NAMES else "")


def layer_configs(linears: Any, cfg: Any) -> dict[str, QuantConfig]:
    """Every layer `cfg.targets` selects among `linears` (a model, or nn.Linear names),
    with its own config (`QuantConfig.layer_config`: the group with the matching
    `quant.layers` overrides); scheme `fp` marks a layer that stays float.

    A `quant.layers` pattern that matches no targeted layer is an error naming it.
    """
    cfg = build_quant_config(cfg)
    names = target_names(linears, cfg.targets)
    for pattern, _ in cfg.layers:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"quant.layers[{pattern!r}]: matches no quantized layer "
                             f"(targeted: {_listed(names) or 'none'})")
    return {name: cfg.layer_config(name) for name in names}


def quantize_model(model: nn.Module, cfg: Any, only: Any = None) -> list[str]:
    """Replace the nn.Linear modules whose names match `cfg.targets` (glob patterns) by
    the quantized layer of their own scheme (`layer_configs`: the group's, or a
    `quant.layers` override's), in place; return the replaced names.

    The new layers share the original weight/bias Parameters, so `state_dict()` keys and
    values are unchanged and checkpoints still load strictly. A layer of scheme `fp` (the
    group's, or its override's) stays the float nn.Linear; the targets and `quant.layers`
    patterns are checked all the same. A pattern that matches no nn.Linear is an error
    listing some available names. `only`: replace just these targeted layers (the rest
    stay float), e.g. one unit of a sensitivity analysis.
    """
    linears = _float_linears(model)
    configs = layer_configs(linears, cfg)
    if only is not None:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise ValueError(f"layers {unknown} are not targeted by quant.targets")
        configs = {name: c for name, c in configs.items() if name in set(only)}
    replaced = []
    for name, layer_cfg in configs.items():
        if layer_cfg.scheme == "fp":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LAYER_CLASSES[layer_cfg.scheme].from_linear(linears[name], layer_cfg, name))
        replaced.append(name)
    return replaced


def restore_float(model: nn.Module) -> list[str]:
    """Undo `quantize_model`: every quantized layer back to a plain nn.Linear holding the
    same weight and bias Parameters; returns the names."""
    names = list(quantized_layers(model))
    for name, layer in quantized_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        linear.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return names


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every quantized layer's noise stream from `seed` (see layers.py)."""
    for layer in quantized_layers(model).values():
        layer.reseed(seed)


def _adc_overridden(model: nn.Module, **changes: Any) -> contextlib.AbstractContextManager[None]:
    return _overridden(model, lambda cfg: dataclasses.replace(
        cfg, adc=dataclasses.replace(cfg.adc, **changes)))


@contextlib.contextmanager
def _overridden(model: nn.Module, change) -> Iterator[None]:
    """Every quantized layer's config replaced by change(cfg) inside the block."""
    layers = quantized_layers(model).values()
    prior = [(layer, layer.cfg) for layer in layers]
    try:
        for layer, cfg in prior:
            layer.cfg = change(cfg)
        yield
    finally:
        for layer, cfg in prior:
            layer.cfg = cfg


def noise_disabled(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Thermal noise and the devices' read noise off in every quantized layer inside the
    block (settings restored on exit, also on error). Noise generators are not advanced
    while it is off."""
    return _overridden(model, lambda cfg: dataclasses.replace(
        cfg, adc=dataclasses.replace(cfg.adc, noise_sigma_lsb=0.0),
        device=dataclasses.replace(cfg.device, read_noise_scale=0.0)))


def ideal_devices(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Ideal devices and converters inside the block: the arrays hold the INT codes
    exactly and the ADCs have no DNL, INL, offset or gain error (calibration's default,
    which calibrates the design, not one programmed chip)."""
    ideal_adc = {"dnl_sigma_lsb": 0.0, "inl_max_lsb": 0.0, "offset_sigma_lsb": 0.0,
                 "gain_sigma": 0.0}
    return _overridden(model, lambda cfg: dataclasses.replace(
        cfg, adc=dataclasses.replace(cfg.adc, **ideal_adc), device=DeviceConfig()))


def adc_bypassed(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Ideal read-out (no noise, no ADC rounding) inside the block: what a calibration
    pass uses while collecting pre-ADC accumulations before ADC clips exist."""
    return _adc_overridden(model, bypass=True)
