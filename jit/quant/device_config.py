"""The memory devices of the analog arrays as a validated config (the run's top-level
`device` group, configs/device/; carried as `QuantConfig.device`). The device model's
formulas are in device.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .schema import DeviceSchema
from .validate import (
    check_choice,
    check_coeffs,
    check_int,
    check_known,
    check_non_negative,
    check_number,
    fail,
    to_plain,
)

DRIFT_COMPENSATIONS = ("none", "global")
# The coefficient lists' defaults (jit/quant/schema.py), as the tuples DeviceConfig holds.
_DEFAULT_COEFFS = {f.name: tuple(f.default_factory()) for f in dataclasses.fields(DeviceSchema)
                   if f.default_factory is not dataclasses.MISSING}


@dataclass(frozen=True)
class DeviceConfig:
    """The memory devices of the analog arrays (configs/device/, docs/design.md "Device
    non-idealities"; formulas in jit/quant/device.py). Defaults (jit/quant/schema.py,
    DeviceSchema): ideal devices, whose read-back weight is the INT code exactly.

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

    preset: str = DeviceSchema.preset
    g_max_uS: float = DeviceSchema.g_max_uS
    programming_noise_uS: tuple[float, float, float] = _DEFAULT_COEFFS["programming_noise_uS"]
    drift_t0_s: float = DeviceSchema.drift_t0_s
    drift_nu_mean: tuple[float, float, float, float] = _DEFAULT_COEFFS["drift_nu_mean"]
    drift_nu_std: tuple[float, float, float, float] = _DEFAULT_COEFFS["drift_nu_std"]
    read_noise_q: tuple[float, float, float] = _DEFAULT_COEFFS["read_noise_q"]
    read_time_s: float = DeviceSchema.read_time_s
    t_inference_s: float = DeviceSchema.t_inference_s
    drift_compensation: str = DeviceSchema.drift_compensation
    programming_noise_scale: float = DeviceSchema.programming_noise_scale
    read_noise_scale: float = DeviceSchema.read_noise_scale
    drift_scale: float = DeviceSchema.drift_scale
    stuck_at_zero_fraction: float = DeviceSchema.stuck_at_zero_fraction
    stuck_at_max_fraction: float = DeviceSchema.stuck_at_max_fraction
    seed: int = DeviceSchema.seed

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or not self.preset:
            fail("device.preset", "a preset name", self.preset)
        for name in ("g_max_uS", "drift_t0_s", "read_time_s"):
            if check_number(f"device.{name}", getattr(self, name)) <= 0:
                fail(f"device.{name}", "a finite number > 0", getattr(self, name))
        coeffs = {"programming_noise_uS": 3, "drift_nu_mean": 4, "drift_nu_std": 4,
                  "read_noise_q": 3}
        for name, length in coeffs.items():
            object.__setattr__(self, name, check_coeffs(f"device.{name}", getattr(self, name),
                                                         length))
        for name in ("drift_nu_mean", "drift_nu_std"):
            low, high = getattr(self, name)[2:]
            if not 0 <= low <= high:
                fail(f"device.{name}", "[a, b, low, high] with 0 <= low <= high",
                      list(getattr(self, name)))
        if any(v < 0 for v in self.read_noise_q):
            fail("device.read_noise_q", "three numbers >= 0", list(self.read_noise_q))
        for name in ("t_inference_s", "programming_noise_scale", "read_noise_scale",
                     "drift_scale"):
            check_non_negative(f"device.{name}", getattr(self, name))
        check_choice("device.drift_compensation", self.drift_compensation,
                          DRIFT_COMPENSATIONS)
        for name in ("stuck_at_zero_fraction", "stuck_at_max_fraction"):
            if not 0 <= check_number(f"device.{name}", getattr(self, name)) <= 1:
                fail(f"device.{name}", "a fraction in [0, 1]", getattr(self, name))
        if self.stuck_at_zero_fraction + self.stuck_at_max_fraction > 1:
            fail("device.stuck_at_max_fraction", "at most 1 - device.stuck_at_zero_fraction="
                  f"{1 - self.stuck_at_zero_fraction:g} (the stuck fractions sum to at most 1)",
                  self.stuck_at_max_fraction)
        check_int("device.seed", self.seed, 0)

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


def build_device_config(cfg: Any = None) -> DeviceConfig:
    """DeviceConfig | DictConfig | mapping | None (ideal) -> validated DeviceConfig; an
    unknown field is an error naming it."""
    if isinstance(cfg, DeviceConfig):
        return cfg
    cfg = to_plain(cfg)
    if cfg is None:
        return DeviceConfig()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"device config must be a mapping or DeviceConfig, got {type(cfg).__name__}")
    check_known(DeviceConfig, cfg, "device")
    return DeviceConfig(**cfg)
