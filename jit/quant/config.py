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

and fills every missing field with the *scheme's* default (`SCHEME_DEFAULTS`), so
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
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEMES = ("fp", "w8a8", "hybrid", "bitserial")
MODES = ("dynamic", "static")
# What a dynamic activation clip and a dynamic ADC peak are taken over: one token, one
# sample (the leading dimension of the layer input: its tokens), or the whole call (the
# seed's behaviour, which makes results depend on the batch size).
DYNAMIC_SCOPES = ("token", "sample", "batch")
GRANULARITIES = ("tensor", "channel")
DEFAULT_TARGETS = ("blocks.*.mlp.w12", "blocks.*.mlp.w3")
BITS_RANGE = (2, 16)
# A gain shift moves the LSB slice up inside the DAC range; beyond 8 it would leave any
# realistic converter.
MAX_LSB_GAIN_SHIFT = 8


def _fail(name: str, allowed: str, value: Any) -> None:
    # Device fields carry their own group name ("device.seed"); the rest are quant's.
    key = name if name.startswith("device.") else f"quant.{name}"
    raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, allowed, value)
    if value < low or (high is not None and value > high):
        _fail(name, allowed, value)


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, "a finite number", value)
    return float(value)


def _check_percent(name: str, value: Any) -> None:
    if not 0.0 < _check_number(name, value) <= 100.0:
        _fail(name, "a percentile in (0, 100]", value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, "one of " + ", ".join(choices), value)


@dataclass(frozen=True)
class WeightConfig:
    """Symmetric INT-`bits` weights; `clip_pct` = percentile of |W| used as the clip
    (None: max|W|), per tensor or per output channel."""

    bits: int = 8
    clip_pct: float | None = None
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        _check_int("weight.bits", self.bits, *BITS_RANGE)
        if self.clip_pct is not None:
            _check_percent("weight.clip_pct", self.clip_pct)
        _check_choice("weight.granularity", self.granularity, GRANULARITIES)


@dataclass(frozen=True)
class ActConfig:
    """Symmetric INT-`bits` activations clipped at the `percentile` of |x| (dynamic)."""

    bits: int = 11
    percentile: float = 99.8

    def __post_init__(self) -> None:
        _check_int("act.bits", self.bits, *BITS_RANGE)
        _check_percent("act.percentile", self.percentile)


@dataclass(frozen=True)
class SplitConfig:
    """How an activation code is sliced: `lsb_bits` wide LSB slice, MSB weight `radix`
    (hybrid), DAC gain `2**lsb_gain_shift` on the LSB slice (bit-serial only)."""

    lsb_bits: int = 9
    radix: int = 256
    lsb_gain_shift: int = 0

    def __post_init__(self) -> None:
        _check_int("split.lsb_bits", self.lsb_bits, 1, BITS_RANGE[1] - 1)
        _check_int("split.radix", self.radix, 2)
        if self.radix & (self.radix - 1):
            _fail("split.radix", "a power of two", self.radix)
        _check_int("split.lsb_gain_shift", self.lsb_gain_shift, 0, MAX_LSB_GAIN_SHIFT)


def _check_non_negative(name: str, value: Any) -> float:
    if _check_number(name, value) < 0:
        _fail(name, "a number >= 0", value)
    return float(value)


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

    bits: int = 10
    bypass: bool = False
    noise_sigma_lsb: float = 2.0
    samples: int = 1
    tile_rows: int | None = None
    dnl_sigma_lsb: float = 0.0
    inl_max_lsb: float = 0.0
    offset_sigma_lsb: float = 0.0
    gain_sigma: float = 0.0

    def __post_init__(self) -> None:
        _check_int("adc.bits", self.bits, *BITS_RANGE)
        if not isinstance(self.bypass, bool):
            _fail("adc.bypass", "true or false", self.bypass)
        _check_non_negative("adc.noise_sigma_lsb", self.noise_sigma_lsb)
        _check_int("adc.samples", self.samples, 1)
        if self.tile_rows is not None:
            _check_int("adc.tile_rows", self.tile_rows, 1)
        for name in ("dnl_sigma_lsb", "offset_sigma_lsb", "gain_sigma"):
            _check_non_negative(f"adc.{name}", getattr(self, name))
        # A signed bow: negative INL bends the curve the other way.
        _check_number("adc.inl_max_lsb", self.inl_max_lsb)

    @property
    def converter_errors(self) -> bool:
        """Whether the converters differ from the ideal one."""
        return bool(self.dnl_sigma_lsb or self.inl_max_lsb or self.offset_sigma_lsb
                    or self.gain_sigma)


DRIFT_COMPENSATIONS = ("none", "global")


def _check_coeffs(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != length:
        _fail(name, f"a list of {length} finite numbers", value)
    return tuple(_check_number(name, v) for v in value)


@dataclass(frozen=True)
class DeviceConfig:
    """The memory devices of the analog arrays (configs/device/, docs/design.md "Device
    non-idealities"; formulas in jit/quant/device.py). Defaults: ideal devices, whose
    read-back weight is the INT code exactly.

    Model (conductances in uS, g_rel = g / g_max_uS):
    - programming: g_prog = max(0, g + programming_noise_scale * sigma_prog(g) N(0, 1)),
      sigma_prog(g) = c0 + c1 g_rel + c2 g_rel^2 with programming_noise_uS = (c0, c1, c2);
    - drift: g(t) = g_prog ((t0 + t_inference) / t0)^-nu, t0 = drift_t0_s, nu per device
      = drift_scale * max(0, |mu(g) + sigma_nu(g) N(0, 1)|), mu(g) = clamp(a ln g_rel + b,
      low, high) with drift_nu_mean = (a, b, low, high), sigma_nu likewise with drift_nu_std;
    - read noise (every read): g(t) + read_noise_scale |g(t)| q(g_prog) sqrt(ln((t + t_read)
      / (2 t_read))) N(0, 1), q(g) = min(q0 / max(g_rel^k, 1e-3), q_max) with
      read_noise_q = (q0, k, q_max), t_read = read_time_s;
    - stuck devices: a share stuck_at_zero_fraction holds 0, stuck_at_max_fraction g_max;
    - drift_compensation global: analog outputs times sum|W(programmed)| / sum|W(t)|.
    """

    preset: str = "ideal"
    g_max_uS: float = 25.0
    programming_noise_uS: tuple[float, float, float] = (0.0, 0.0, 0.0)
    drift_t0_s: float = 20.0
    drift_nu_mean: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    drift_nu_std: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    read_noise_q: tuple[float, float, float] = (0.0, 0.0, 0.0)
    read_time_s: float = 250e-9
    t_inference_s: float = 0.0
    drift_compensation: str = "none"
    programming_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0
    stuck_at_zero_fraction: float = 0.0
    stuck_at_max_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or not self.preset:
            _fail("device.preset", "a preset name", self.preset)
        for name in ("g_max_uS", "drift_t0_s", "read_time_s"):
            if _check_number(f"device.{name}", getattr(self, name)) <= 0:
                _fail(f"device.{name}", "a finite number > 0", getattr(self, name))
        coeffs = {"programming_noise_uS": 3, "drift_nu_mean": 4, "drift_nu_std": 4,
                  "read_noise_q": 3}
        for name, length in coeffs.items():
            object.__setattr__(self, name, _check_coeffs(f"device.{name}", getattr(self, name),
                                                         length))
        for name in ("drift_nu_mean", "drift_nu_std"):
            low, high = getattr(self, name)[2:]
            if not 0 <= low <= high:
                _fail(f"device.{name}", "[a, b, low, high] with 0 <= low <= high",
                      list(getattr(self, name)))
        if any(v < 0 for v in self.read_noise_q):
            _fail("device.read_noise_q", "three numbers >= 0", list(self.read_noise_q))
        for name in ("t_inference_s", "programming_noise_scale", "read_noise_scale",
                     "drift_scale"):
            _check_non_negative(f"device.{name}", getattr(self, name))
        _check_choice("device.drift_compensation", self.drift_compensation,
                          DRIFT_COMPENSATIONS)
        for name in ("stuck_at_zero_fraction", "stuck_at_max_fraction"):
            if not 0 <= _check_number(f"device.{name}", getattr(self, name)) <= 1:
                _fail(f"device.{name}", "a fraction in [0, 1]", getattr(self, name))
        if self.stuck_at_zero_fraction + self.stuck_at_max_fraction > 1:
            _fail("device.stuck_at_max_fraction", "at most 1 - device.stuck_at_zero_fraction="
                  f"{1 - self.stuck_at_zero_fraction:g} (the stuck fractions sum to at most 1)",
                  self.stuck_at_max_fraction)
        _check_int("device.seed", self.seed, 0)

    @property
    def programming_noise(self) -> bool:
        return self.programming_noise_scale > 0 and any(self.programming_noise_uS)

    @property
    def drifts(self) -> bool:
        """Whether conductances have moved by t_inference."""
        return (self.drift_scale > 0 and self.t_inference_s > 0
                and any(self.drift_nu_mean[1:] + self.drift_nu_std[1:]))

    @property
    def read_noise(self) -> bool:
        return self.read_noise_scale > 0 and self.read_noise_q[0] > 0 and self.read_noise_q[2] > 0

    @property
    def stuck(self) -> bool:
        return self.stuck_at_zero_fraction > 0 or self.stuck_at_max_fraction > 0

    @property
    def programs_exactly(self) -> bool:
        """Whether the read-back weight is the INT code itself at t_inference."""
        return not (self.programming_noise or self.drifts or self.stuck)

    @property
    def ideal(self) -> bool:
        """Nothing to simulate: exact weights and noiseless reads."""
        return self.programs_exactly and not self.read_noise

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _check_known(cls: type, cfg: Mapping, prefix: str) -> None:
    """Every key of `cfg` is a field of the dataclass `cls`; else an error naming the key."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in cfg:
        if key not in known:
            raise ValueError(f"{prefix}.{key} is not a known field (known: {', '.join(sorted(known))})")


def build_device_config(cfg: Any = None) -> DeviceConfig:
    """DeviceConfig | DictConfig | mapping | None (ideal) -> validated DeviceConfig; an
    unknown field is an error naming it."""
    if isinstance(cfg, DeviceConfig):
        return cfg
    cfg = _to_plain(cfg)
    if cfg is None:
        return DeviceConfig()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"device config must be a mapping or DeviceConfig, got {type(cfg).__name__}")
    _check_known(DeviceConfig, cfg, "device")
    return DeviceConfig(**cfg)


SECTIONS = {"weight": WeightConfig, "act": ActConfig, "split": SplitConfig, "adc": AdcConfig}

# Only what differs from the dataclass defaults above (which are the hybrid W8A11).
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

    scheme: str = "hybrid"
    mode: str = "dynamic"
    dynamic_scope: str = "sample"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    calibration_file: str | None = None
    # Apply a calibration_file made on other weights (jit/quant/artefact.py: weight digests).
    allow_foreign_calibration: bool = False
    weight: WeightConfig | None = None
    act: ActConfig | None = None
    split: SplitConfig | None = None
    adc: AdcConfig | None = None
    # The run's `device` group: what the analog arrays are made of (ideal by default).
    device: DeviceConfig | None = None
    # Per-layer overrides, in order: ((glob pattern, {scheme?, weight?, act?, split?, adc?}), ...)
    layers: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __post_init__(self) -> None:
        _check_choice("scheme", self.scheme, SCHEMES)
        _check_choice("mode", self.mode, MODES)
        _check_choice("dynamic_scope", self.dynamic_scope, DYNAMIC_SCOPES)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            _fail("targets", "a non-empty list of glob patterns on module names", self.targets)
        object.__setattr__(self, "targets", targets)
        _check_int("seed", self.seed, 0)
        if self.calibration_file is not None and not isinstance(self.calibration_file, str):
            _fail("calibration_file", "a path or null", self.calibration_file)
        if not isinstance(self.allow_foreign_calibration, bool):
            _fail("allow_foreign_calibration", "true or false", self.allow_foreign_calibration)
        for name, cls in SECTIONS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, cls(**_scheme_defaults(self.scheme, name, {})))
            elif not isinstance(getattr(self, name), cls):
                _fail(name, f"a {cls.__name__}", getattr(self, name))
        if self.device is None:
            object.__setattr__(self, "device", DeviceConfig())
        elif not isinstance(self.device, DeviceConfig):
            _fail("device", "a DeviceConfig", self.device)
        object.__setattr__(self, "layers", self._checked_layers(self.layers))
        self._check_cross_fields()

    def _checked_layers(self, layers: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
        """`layers` as ((pattern, plain override), ...); every override checked over the
        group (unknown keys and bad values name `quant.layers['<pattern>'].<key>`)."""
        layers = _to_plain(layers)
        if layers is None:
            return ()
        if isinstance(layers, Mapping):
            pairs = list(layers.items())
        elif isinstance(layers, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in layers):
            pairs = [tuple(p) for p in layers]
        else:
            _fail("layers", "a mapping from layer name patterns to quant overrides", layers)
        checked = []
        for pattern, override in pairs:
            if not isinstance(pattern, str) or not pattern:
                _fail("layers", "keyed by non-empty glob patterns on layer names", pattern)
            key = f"layers[{pattern!r}]"
            override = _to_plain(override)
            if override is None:
                override = {}
            if not isinstance(override, Mapping):
                _fail(key, "a mapping of quant overrides (scheme, weight, act, split, adc)", override)
            for name in override:
                if name not in LAYER_OVERRIDE_KEYS:
                    raise ValueError(f"quant.{key}.{name} is not a per-layer setting (allowed: "
                                     f"{', '.join(LAYER_OVERRIDE_KEYS)})")
            for name, cls in SECTIONS.items():
                if name in override:
                    section = _to_plain(override[name])
                    if not isinstance(section, Mapping):
                        _fail(f"{key}.{name}", "a mapping", section)
                    _check_known(cls, section, f"quant.{key}.{name}")
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
            _fail("split.lsb_bits", f"< quant.act.bits={act_bits} (in [1, {act_bits - 1}])",
                  split.lsb_bits)
        if split.radix > 2**split.lsb_bits:
            _fail("split.radix", f"a power of two in [2, 2**quant.split.lsb_bits="
                  f"{2**split.lsb_bits}]", split.radix)
        if self.scheme == "bitserial" and split.radix != 2**split.lsb_bits:
            _fail("split.radix", f"2**quant.split.lsb_bits={2**split.lsb_bits} for the "
                  "bit-serial scheme", split.radix)
        if self.scheme != "bitserial" and split.lsb_gain_shift != 0:
            _fail("split.lsb_gain_shift", "0 unless quant.scheme is bitserial",
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


def _to_plain(cfg: Any) -> Any:
    """DictConfig -> dict without importing omegaconf unless the object is one."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _section_values(name: str, given: Any, scheme: str) -> dict[str, Any]:
    cls = SECTIONS[name]
    if isinstance(given, cls):
        return dataclasses.asdict(given)
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        _fail(name, "a mapping", given)
    _check_known(cls, given, f"quant.{name}")
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
    cfg = _to_plain(cfg)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"quant config must be a mapping or QuantConfig, got {type(cfg).__name__}")
    _check_known(QuantConfig, cfg, "quant")
    scheme = cfg.get("scheme", "hybrid")
    _check_choice("scheme", scheme, SCHEMES)
    values = {k: v for k, v in cfg.items() if k not in SECTIONS}
    if "targets" in values and not isinstance(values["targets"], str):
        values["targets"] = tuple(values["targets"])
    if "device" in values:
        values["device"] = build_device_config(values["device"])
    if "layers" in values:
        values["layers"] = _to_plain(values["layers"])
    sections = {name: SECTIONS[name](**_section_values(name, cfg.get(name), scheme))
                for name in SECTIONS}
    return QuantConfig(**values, **sections)
