"""Validated quantization config (the `quant` group of the run config).

`build_quant_config` is the entry point: it accepts a `QuantConfig`, an OmegaConf
`DictConfig` or a plain nested mapping with the user-facing names

    quant.scheme, quant.mode, quant.dynamic_scope, quant.targets, quant.seed,
    quant.calibration_file, quant.allow_foreign_calibration,
    quant.weight.{bits, clip_pct, granularity}, quant.act.{bits, percentile},
    quant.split.{lsb_bits, radix, lsb_gain_shift},
    quant.adc.{bits, bypass, noise_sigma_lsb, samples, tile_rows,
               dnl_sigma_lsb, inl_max_lsb, offset_sigma_lsb, gain_sigma},
    quant.layers (per-layer hardware: glob pattern -> partial override, see below)

plus the memory devices the analog arrays are built from (`DeviceConfig`, the run's
top-level `device` group, carried as `QuantConfig.device`; `build_device_config`).

and fills every missing field with its default: the run schema's (jit/quant/schema.py)
where every scheme shares it, else (missing or null) the *scheme's* (`SCHEME_DEFAULTS`), so
`{"scheme": "bitserial"}` is the seed's W8A12 bit-serial layer and `{"scheme": "hybrid"}`
the docs/design.md hybrid W8A11. Every field is checked once, here; errors name the field
(`quant.adc.bits`) and the allowed range.

Per-layer hardware: `quant.layers` is an ordered mapping from glob patterns on the names
of the targeted layers (`blocks.0.*`, `blocks.*.mlp.w3`) to partial overrides of
`scheme`, `weight.*`, `act.*`, `split.*` and `adc.*`. A layer's own config
(`QuantConfig.layer_config(name)`) is the group's with every matching override merged in,
in order; `scheme: fp` keeps that layer in float (digital). Each override is checked here
against the group; that each pattern matches a targeted layer is checked once the model's
layer names are known (`jit.quant.surgery.layer_configs`).

Constructing `QuantConfig` directly also works: sub-configs left at `None` take the
scheme's defaults, sub-configs given explicitly are used as they are.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .device_config import DeviceConfig, build_device_config
from .schema import DEFAULT_TARGETS, SECTION_SCHEMAS, AdcSchema, QuantSchema, WeightSchema
from .validate import (
    check_choice,
    check_int,
    check_known,
    check_non_negative,
    check_number,
    check_percent,
    fail,
    to_plain,
)

SCHEMES = ("fp", "w8a8", "hybrid", "bitserial")
MODES = ("dynamic", "static")
# What a dynamic activation clip and a dynamic ADC peak are taken over: one token, one
# sample (the leading dimension of the layer input: its tokens), or the whole call (the
# seed's behaviour, which makes results depend on the batch size).
DYNAMIC_SCOPES = ("token", "sample", "batch")
GRANULARITIES = ("tensor", "channel")
BITS_RANGE = (2, 16)
# A gain shift moves the LSB slice up inside the DAC range; beyond 8 it would leave any
# realistic converter.
MAX_LSB_GAIN_SHIFT = 8


@dataclass(frozen=True)
class WeightConfig:
    """Symmetric INT-`bits` weights; `clip_pct` = percentile of |W| used as the clip
    (None: max|W|), per tensor or per output channel."""

    bits: int = WeightSchema.bits
    clip_pct: float | None = WeightSchema.clip_pct
    granularity: str = WeightSchema.granularity

    def __post_init__(self) -> None:
        check_int("weight.bits", self.bits, *BITS_RANGE)
        if self.clip_pct is not None:
            check_percent("weight.clip_pct", self.clip_pct)
        check_choice("weight.granularity", self.granularity, GRANULARITIES)


@dataclass(frozen=True)
class ActConfig:
    """Symmetric INT-`bits` activations clipped at the `percentile` of |x| (dynamic)."""

    bits: int = 11
    percentile: float = 99.8

    def __post_init__(self) -> None:
        check_int("act.bits", self.bits, *BITS_RANGE)
        check_percent("act.percentile", self.percentile)


@dataclass(frozen=True)
class SplitConfig:
    """How an activation code is sliced: `lsb_bits` wide LSB slice, MSB weight `radix`
    (hybrid), DAC gain `2**lsb_gain_shift` on the LSB slice (bit-serial only)."""

    lsb_bits: int = 9
    radix: int = 256
    lsb_gain_shift: int = 0

    def __post_init__(self) -> None:
        check_int("split.lsb_bits", self.lsb_bits, 1, BITS_RANGE[1] - 1)
        check_int("split.radix", self.radix, 2)
        if self.radix & (self.radix - 1):
            fail("split.radix", "a power of two", self.radix)
        check_int("split.lsb_gain_shift", self.lsb_gain_shift, 0, MAX_LSB_GAIN_SHIFT)


@dataclass(frozen=True)
class AdcConfig:
    """Signed `bits` ADC; `bypass` = ideal read-out; thermal noise of `noise_sigma_lsb`
    ADC steps per read, averaged over `samples` reads; analog arrays of at most
    `tile_rows` input rows (None: one array holds the whole input).

    A real converter (docs/design.md "Device non-idealities", reference.adc_transfer), each
    error drawn once per converter (one per output column of each array) from
    device.seed: `dnl_sigma_lsb` moves every code edge by N(0, sigma^2) LSB,
    `inl_max_lsb` bows the transfer curve (peak INL at mid-scale, 0 at both ends),
    `offset_sigma_lsb` and `gain_sigma` (relative) give each column an offset and a gain
    error. All 0: the ideal converter, bit for bit."""

    bits: int = AdcSchema.bits
    bypass: bool = AdcSchema.bypass
    noise_sigma_lsb: float = AdcSchema.noise_sigma_lsb
    samples: int = 1  # the hybrid's; the scheme's default (SCHEME_DEFAULTS)
    tile_rows: int | None = AdcSchema.tile_rows
    dnl_sigma_lsb: float = AdcSchema.dnl_sigma_lsb
    inl_max_lsb: float = AdcSchema.inl_max_lsb
    offset_sigma_lsb: float = AdcSchema.offset_sigma_lsb
    gain_sigma: float = AdcSchema.gain_sigma

    def __post_init__(self) -> None:
        check_int("adc.bits", self.bits, *BITS_RANGE)
        if not isinstance(self.bypass, bool):
            fail("adc.bypass", "true or false", self.bypass)
        check_non_negative("adc.noise_sigma_lsb", self.noise_sigma_lsb)
        check_int("adc.samples", self.samples, 1)
        if self.tile_rows is not None:
            check_int("adc.tile_rows", self.tile_rows, 1)
        for name in ("dnl_sigma_lsb", "offset_sigma_lsb", "gain_sigma"):
            check_non_negative(f"adc.{name}", getattr(self, name))
        # A signed bow: negative INL bends the curve the other way.
        check_number("adc.inl_max_lsb", self.inl_max_lsb)

    @property
    def converter_errors(self) -> bool:
        """Whether the converters differ from the ideal one."""
        return bool(self.dnl_sigma_lsb or self.inl_max_lsb or self.offset_sigma_lsb
                    or self.gain_sigma)


SECTIONS = {"weight": WeightConfig, "act": ActConfig, "split": SplitConfig, "adc": AdcConfig}
# The fields whose default the scheme decides: null in the schema (jit/quant/schema.py,
# "the scheme's"), the hybrid's value in the dataclasses above.
SCHEME_DEPENDENT = {name: frozenset(f.name for f in dataclasses.fields(SECTION_SCHEMAS[name])
                                    if f.default is None and getattr(cls, f.name) is not None)
                    for name, cls in SECTIONS.items()}

# The scheme-dependent defaults: only what differs from the dataclass defaults above
# (which are the hybrid W8A11).
SCHEME_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "hybrid": {},
    # The seed's implemented code path: 7+5 split of INT12, 2 MSB reads, DAC gain 4.
    # radix is implied (2**lsb_bits) and derived in `_scheme_defaults`.
    "bitserial": {
        "act": {"bits": 12, "percentile": 99.5},
        "split": {"lsb_bits": 5, "lsb_gain_shift": 2},
        "adc": {"samples": 2},
    },
    # The seed's single-pass debug path: no slicing, no ADC (split and adc are unused).
    "w8a8": {"act": {"bits": 8, "percentile": 99.5}},
    "fp": {},
}


def _scheme_defaults(scheme: str, section: str, given: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(SCHEME_DEFAULTS[scheme].get(section, {}))
    if scheme == "bitserial" and section == "split":
        values["radix"] = 2 ** given.get("lsb_bits", values["lsb_bits"])
    return values


@dataclass(frozen=True)
class QuantConfig:
    """The whole `quant` config. See the module docstring for field semantics."""

    scheme: str = QuantSchema.scheme
    mode: str = QuantSchema.mode
    dynamic_scope: str = QuantSchema.dynamic_scope
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = QuantSchema.seed
    calibration_file: str | None = QuantSchema.calibration_file
    # Apply a calibration_file made on other weights (jit/quant/artefact.py: weight digests).
    allow_foreign_calibration: bool = QuantSchema.allow_foreign_calibration
    weight: WeightConfig | None = None
    act: ActConfig | None = None
    split: SplitConfig | None = None
    adc: AdcConfig | None = None
    # The run's `device` group: what the analog arrays are made of (ideal by default).
    device: DeviceConfig | None = None
    # Per-layer overrides, in order: ((glob pattern, {scheme?, weight?, act?, split?, adc?}), ...)
    layers: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __post_init__(self) -> None:
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("mode", self.mode, MODES)
        check_choice("dynamic_scope", self.dynamic_scope, DYNAMIC_SCOPES)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            fail("targets", "a non-empty list of glob patterns on module names", self.targets)
        object.__setattr__(self, "targets", targets)
        check_int("seed", self.seed, 0)
        if self.calibration_file is not None and not isinstance(self.calibration_file, str):
            fail("calibration_file", "a path or null", self.calibration_file)
        if not isinstance(self.allow_foreign_calibration, bool):
            fail("allow_foreign_calibration", "true or false", self.allow_foreign_calibration)
        for name, cls in SECTIONS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, cls(**_scheme_defaults(self.scheme, name, {})))
            elif not isinstance(getattr(self, name), cls):
                fail(name, f"a {cls.__name__}", getattr(self, name))
        if self.device is None:
            object.__setattr__(self, "device", DeviceConfig())
        elif not isinstance(self.device, DeviceConfig):
            fail("device", "a DeviceConfig", self.device)
        object.__setattr__(self, "layers", self._checked_layers(self.layers))
        self._check_cross_fields()

    def _checked_layers(self, layers: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
        """`layers` as ((pattern, plain override), ...); every override checked over the
        group (unknown keys and bad values name `quant.layers['<pattern>'].<key>`)."""
        layers = to_plain(layers)
        if layers is None:
            return ()
        if isinstance(layers, Mapping):
            pairs = list(layers.items())
        elif isinstance(layers, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in layers):
            pairs = [tuple(p) for p in layers]
        else:
            fail("layers", "a mapping from layer name patterns to quant overrides", layers)
        checked = []
        for pattern, override in pairs:
            if not isinstance(pattern, str) or not pattern:
                fail("layers", "keyed by non-empty glob patterns on layer names", pattern)
            key = f"layers[{pattern!r}]"
            override = to_plain(override)
            if override is None:
                override = {}
            if not isinstance(override, Mapping):
                fail(key, "a mapping of quant overrides (scheme, weight, act, split, adc)", override)
            for name in override:
                if name not in LAYER_OVERRIDE_KEYS:
                    raise ValueError(f"quant.{key}.{name} is not a per-layer setting (allowed: "
                                     f"{', '.join(LAYER_OVERRIDE_KEYS)})")
            for name, cls in SECTIONS.items():
                if name in override:
                    section = to_plain(override[name])
                    if not isinstance(section, Mapping):
                        fail(f"{key}.{name}", "a mapping", section)
                    check_known(cls, section, f"quant.{key}.{name}")
            plain = _deep_copy(dict(override))
            self._merged_config([(pattern, plain)], f"quant.{key}")  # checks the values
            checked.append((pattern, plain))
        return tuple(checked)

    def _merged_config(self, overrides, where: str) -> QuantConfig:
        """The group merged with `overrides` in order, built and checked; errors name `where`."""
        values = self._group_values()
        for _, override in overrides:
            for name, value in override.items():
                values[name] = {**values[name], **value} if name in SECTIONS else value
        if values["scheme"] == "fp":  # a float layer has no arrays: any device is fine
            values["device"] = {}
        if values["scheme"] == "bitserial" and not any("radix" in o.get("split", {}) for _, o in overrides):
            values["split"]["radix"] = 2 ** values["split"]["lsb_bits"]  # implied by lsb_bits
        try:
            return build_quant_config(values)
        except ValueError as err:
            message = str(err)
            if message.startswith("quant."):
                message = f"{where}.{message[len('quant.'):]}"
            elif not message.startswith(where):
                message = f"{where}: {message}"
            raise ValueError(message) from None

    def layer_config(self, name: str) -> QuantConfig:
        """The config of the targeted layer `name`: the group with every `layers` override
        whose pattern matches `name` merged in, in order (the group itself when none does)."""
        matching = [(p, o) for p, o in self.layers if fnmatch.fnmatchcase(name, p)]
        if not self.layers:
            return self
        return self._merged_config(matching, f"quant.layers (layer {name})")

    @property
    def quantizes(self) -> bool:
        """Whether any layer may be quantized: the group's scheme or a per-layer one."""
        return self.scheme != "fp" or any(o.get("scheme", self.scheme) != "fp" for _, o in self.layers)

    @property
    def analog(self) -> bool:
        """Whether the scheme computes on analog arrays (programmed devices, ADCs)."""
        return self.scheme in ("hybrid", "bitserial")

    def _check_cross_fields(self) -> None:
        analog_layers = any(o.get("scheme") in ("hybrid", "bitserial") for _, o in self.layers)
        if not self.analog and not analog_layers and not self.device.ideal:
            raise ValueError(f"device={self.device.preset}: quant.scheme={self.scheme} has no "
                             "analog array to program (use device=ideal, or an analog scheme: "
                             "quant=hybrid_w8a11 or a bitserial one)")
        if self.scheme not in ("hybrid", "bitserial"):
            return  # no slicing: the split fields are not used
        act_bits, split = self.act.bits, self.split
        if split.lsb_bits >= act_bits:
            fail("split.lsb_bits", f"< quant.act.bits={act_bits} (in [1, {act_bits - 1}])",
                  split.lsb_bits)
        if split.radix > 2**split.lsb_bits:
            fail("split.radix", f"a power of two in [2, 2**quant.split.lsb_bits="
                  f"{2**split.lsb_bits}]", split.radix)
        if self.scheme == "bitserial" and split.radix != 2**split.lsb_bits:
            fail("split.radix", f"2**quant.split.lsb_bits={2**split.lsb_bits} for the "
                  "bit-serial scheme", split.radix)
        if self.scheme != "bitserial" and split.lsb_gain_shift != 0:
            fail("split.lsb_gain_shift", "0 unless quant.scheme is bitserial",
                  split.lsb_gain_shift)

    def _group_values(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(out[name])
        out["targets"] = list(self.targets)
        out["device"] = self.device.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        out = self._group_values()
        out["layers"] = {pattern: _deep_copy(override) for pattern, override in self.layers}
        return out


LAYER_OVERRIDE_KEYS = ("scheme", *SECTIONS)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    return list(value) if isinstance(value, (list, tuple)) else value


def _section_values(name: str, given: Any, scheme: str) -> dict[str, Any]:
    cls = SECTIONS[name]
    if isinstance(given, cls):
        return dataclasses.asdict(given)
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        fail(name, "a mapping", given)
    check_known(cls, given, f"quant.{name}")
    # null in a scheme-dependent field (the schema's default): the scheme's value
    given = {k: v for k, v in given.items() if v is not None or k not in SCHEME_DEPENDENT[name]}
    return {**_scheme_defaults(scheme, name, given), **given}


def build_quant_config(cfg: Any = None, device: Any = None) -> QuantConfig:
    """QuantConfig | DictConfig | nested mapping | None -> validated QuantConfig.

    `device`: the run's `device` group (DeviceConfig, mapping or DictConfig); given, it
    replaces whatever device `cfg` carries."""
    if device is not None:
        quant = build_quant_config(cfg)
        return dataclasses.replace(quant, device=build_device_config(device))
    if isinstance(cfg, QuantConfig):
        return cfg
    cfg = to_plain(cfg)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"quant config must be a mapping or QuantConfig, got {type(cfg).__name__}")
    check_known(QuantConfig, cfg, "quant")
    scheme = cfg.get("scheme", QuantSchema.scheme)
    check_choice("scheme", scheme, SCHEMES)
    values = {k: v for k, v in cfg.items() if k not in SECTIONS}
    if "targets" in values and not isinstance(values["targets"], str):
        values["targets"] = tuple(values["targets"])
    if "device" in values:
        values["device"] = build_device_config(values["device"])
    if "layers" in values:
        values["layers"] = to_plain(values["layers"])
    sections = {name: SECTIONS[name](**_section_values(name, cfg.get(name), scheme))
                for name in SECTIONS}
    return QuantConfig(**values, **sections)
