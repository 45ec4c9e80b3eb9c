"""The `hardware` config group (configs/hardware/): per-operation costs of one design point.

Every field carries its unit in its name (`_pJ`, `_fJ`, `_ns`, `_MHz`, `_mm2`). The run
schema types the group with `HardwareSchema` (below): no field has a default, since every
value is a fact of the design point its preset describes (with its source there). Values
are checked once, here: a missing, unknown, negative or non-finite field is an error
naming its `hardware.*` key, raised before any model work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

from omegaconf import MISSING

from jit.quant.validate import check_known, to_plain

KINDS = ("aimc", "digital")
# How the layers outside quant.targets (attention, embeddings, final layer, ...) are costed.
REST_PRECISIONS = ("int8", "fp16", "fp32")


class HardwareConfigError(ValueError):
    """A hardware.* setting is missing or invalid."""


@dataclass(frozen=True)
class DigitalCosts:
    """A digital MAC array at the preset's node: the MSB path, merges and the other layers."""

    int8_mac_pJ: float
    fp16_mac_pJ: float
    fp32_mac_pJ: float
    add32_pJ: float
    mac_units: int
    clock_MHz: float

    def mac_pJ(self, precision: str) -> float:
        return getattr(self, f"{precision}_mac_pJ")

    @property
    def macs_per_ns(self) -> float:
        return self.mac_units * self.clock_MHz / 1000


@dataclass(frozen=True)
class AnalogCosts:
    """An analog in-memory array with its DACs (row drivers) and column ADCs."""

    array_mac_fJ: float
    dac_conversion_fJ: float
    adc_walden_fom_fJ_per_step: float
    adc_floor_fJ: float
    adc_conversion_ns_per_bit: float
    read_ns: float
    tile_rows: int
    tile_cols: int
    adcs_per_tile: int
    tile_area_mm2: float

    def adc_conversion_fJ(self, bits: int) -> float:
        """Walden's law, E = FOM x 2^bits, never below the floor of a converter's fixed
        costs (comparator, logic) that dominate at low resolution."""
        return max(self.adc_walden_fom_fJ_per_step * 2.0**bits, self.adc_floor_fJ)


@dataclass(frozen=True)
class HardwareConfig:
    name: str
    kind: str
    node_nm: float
    rest_precision: str
    digital: DigitalCosts
    analog: AnalogCosts | None = None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("digital", "analog")}
        out["digital"] = {f.name: getattr(self.digital, f.name) for f in fields(DigitalCosts)}
        if self.analog is not None:
            out["analog"] = {f.name: getattr(self.analog, f.name) for f in fields(AnalogCosts)}
        return out


def _open_schema(costs: type, name: str, doc: str) -> type:
    """A copy of a frozen costs dataclass for the run schema: the same fields and types,
    none with a default, and open, so that command-line overrides can set them."""
    types = get_type_hints(costs)
    schema = make_dataclass(name, [(f.name, types[f.name], field(default=MISSING))
                                   for f in fields(costs)])
    schema.__doc__ = doc
    return schema


DigitalSchema = _open_schema(DigitalCosts, "DigitalSchema", "`hardware.digital`: "
                             "configs/hardware_digital_int8_40nm.yaml, shared by the presets.")
AnalogSchema = _open_schema(AnalogCosts, "AnalogSchema",
                            "`hardware.analog`: the analog arrays of an aimc preset.")


@dataclass
class HardwareSchema:
    """The `hardware` group in the run schema (jit/config.py); the fields of HardwareConfig."""

    name: str = MISSING
    kind: str = MISSING  # aimc | digital
    node_nm: float = MISSING
    rest_precision: str = MISSING  # int8 | fp16 | fp32: the layers outside quant.targets
    digital: DigitalSchema = field(default_factory=DigitalSchema)
    analog: AnalogSchema | None = None  # kind=aimc only


# Fields whose value counts things (must be whole numbers >= 1); the rest are costs or times.
_COUNTS = {"mac_units", "tile_rows", "tile_cols", "adcs_per_tile"}
# Times, sizes and rates must be > 0; energies may be 0 (a part left out on purpose).
_POSITIVE_SUFFIXES = ("_ns", "_ns_per_bit", "_MHz", "_mm2")


def _number(key: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HardwareConfigError(f"{key}: must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise HardwareConfigError(f"{key}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _section(cls, node: Any, key: str):
    if not isinstance(node, Mapping):
        raise HardwareConfigError(f"{key}: missing (a section with {[f.name for f in fields(cls)]})")
    known = [f.name for f in fields(cls)]
    check_known(cls, node, key, HardwareConfigError)
    values = {}
    for name in known:
        if node.get(name) in (None, MISSING):
            raise HardwareConfigError(f"{key}.{name}: missing")
        value = node[name]
        if name in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HardwareConfigError(f"{key}.{name}: must be an integer >= 1, got {value!r}")
            values[name] = value
        else:
            values[name] = _number(f"{key}.{name}", value, name.endswith(_POSITIVE_SUFFIXES))
    return cls(**values)


def build_hardware_config(node: Any) -> HardwareConfig:
    """A validated HardwareConfig from the `hardware` node (DictConfig or mapping)."""
    node = to_plain(node)  # a field no preset gave stays MISSING ("???")
    if not isinstance(node, Mapping):
        raise HardwareConfigError("hardware: missing; choose a preset with hardware=<name> (configs/hardware/)")
    check_known(HardwareConfig, node, "hardware", HardwareConfigError)
    for name in ("name", "kind", "node_nm", "rest_precision"):
        if node.get(name) in (None, MISSING):
            raise HardwareConfigError(f"hardware.{name}: missing")
    if node["kind"] not in KINDS:
        raise HardwareConfigError(f"hardware.kind={node['kind']!r}; allowed: {', '.join(KINDS)}")
    if node["rest_precision"] not in REST_PRECISIONS:
        raise HardwareConfigError(f"hardware.rest_precision={node['rest_precision']!r}; "
                                  f"allowed: {', '.join(REST_PRECISIONS)}")
    analog = None
    if node["kind"] == "aimc" or node.get("analog") not in (None, MISSING):
        analog = _section(AnalogCosts, node.get("analog"), "hardware.analog")
    return HardwareConfig(name=str(node["name"]), kind=node["kind"],
                          node_nm=_number("hardware.node_nm", node["node_nm"], True),
                          rest_precision=node["rest_precision"],
                          digital=_section(DigitalCosts, node.get("digital"), "hardware.digital"),
                          analog=analog)
