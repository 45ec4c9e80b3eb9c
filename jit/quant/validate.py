"""Field checks shared by the quant and device configs: each error names the key
(`quant.adc.bits`, `device.seed`) and what it allows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


def fail(name: str, allowed: str, value: Any) -> None:
    # Device fields carry their own group name ("device.seed"); the rest are quant's.
    key = name if name.startswith("device.") else f"quant.{name}"
    raise ValueError(f"{key} must be {allowed}, got {value!r}")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, allowed, value)
    if value < low or (high is not None and value > high):
        fail(name, allowed, value)


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(name, "a finite number", value)
    return float(value)


def check_percent(name: str, value: Any) -> None:
    if not 0.0 < check_number(name, value) <= 100.0:
        fail(name, "a percentile in (0, 100]", value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(name, "one of " + ", ".join(choices), value)


def check_non_negative(name: str, value: Any) -> float:
    if check_number(name, value) < 0:
        fail(name, "a number >= 0", value)
    return float(value)


def check_coeffs(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != length:
        fail(name, f"a list of {length} finite numbers", value)
    return tuple(check_number(name, v) for v in value)


def check_known(cls: type, cfg: Mapping, prefix: str, error: type[Exception] = ValueError) -> None:
    """Every key of `cfg` is a field of the dataclass `cls`; else `error` naming the key:
    the one unknown-key check of every config section parsed into a dataclass."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in cfg:
        if key not in known:
            raise error(f"{prefix}.{key} is not a known field (known: {', '.join(sorted(known))})")


def to_plain(cfg: Any) -> Any:
    """DictConfig -> dict without importing omegaconf unless the object is one."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
