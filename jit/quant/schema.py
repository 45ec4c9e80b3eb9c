"""The `quant` group's schema in the run config (jit/config.py, RunSchema.quant).

Hydra composes configs/quant/*.yaml onto these dataclasses, so a key they lack fails at
composition and a preset states only what differs from them. Each default is written
once: the fields every scheme shares carry theirs here (the validated dataclasses of
jit/quant/config.py take them from here); the fields whose default depends on the scheme
are `None` here, meaning "the scheme's default", which `build_quant_config` resolves from
the dataclass defaults of jit/quant/config.py (the hybrid W8A11) and `SCHEME_DEFAULTS`
(what the other schemes change). Allowed values are checked by `QuantConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_TARGETS = ("blocks.*.mlp.w12", "blocks.*.mlp.w3")


@dataclass
class WeightSchema:
    bits: int = 8
    clip_pct: float | None = None  # percentile of |W| used as the clip; null: max|W|
    granularity: str = "tensor"  # tensor | channel


@dataclass
class ActSchema:
    bits: int | None = None  # null: the scheme's (hybrid 11, bitserial 12, w8a8 8)
    percentile: float | None = None  # clip at this percentile of |x|; null: the scheme's


@dataclass
class SplitSchema:
    lsb_bits: int | None = None  # width of the analog LSB slice; null: the scheme's
    radix: int | None = None  # MSB weight; null: the scheme's (bitserial: 2**lsb_bits)
    lsb_gain_shift: int | None = None  # LSB DAC gain 2**shift (bitserial); null: the scheme's


@dataclass
class AdcSchema:
    bits: int = 10
    bypass: bool = False  # true: ideal read-out
    noise_sigma_lsb: float = 2.0  # thermal noise per read, in ADC steps
    samples: int | None = None  # reads averaged; null: the scheme's (bitserial 2, else 1)
    tile_rows: int | None = None  # input rows per analog array; null: one array per layer
    # A real converter, drawn per column from device.seed (0: ideal; docs/device.md):
    # DNL code-edge sigma, peak INL bow, offset sigma (LSB) and relative gain sigma.
    dnl_sigma_lsb: float = 0.0
    inl_max_lsb: float = 0.0
    offset_sigma_lsb: float = 0.0
    gain_sigma: float = 0.0


@dataclass
class QuantSchema:
    scheme: str = "hybrid"  # fp | w8a8 | hybrid | bitserial
    mode: str = "dynamic"  # dynamic | static (calibrated ranges)
    dynamic_scope: str = "sample"  # dynamic ranges per token | sample (image) | batch
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = 0
    calibration_file: str | None = None
    allow_foreign_calibration: bool = False  # true: apply a calibration_file made on other weights
    weight: WeightSchema = field(default_factory=WeightSchema)
    act: ActSchema = field(default_factory=ActSchema)
    split: SplitSchema = field(default_factory=SplitSchema)
    adc: AdcSchema = field(default_factory=AdcSchema)
    # Per-layer hardware (docs/exploration.md): glob pattern on layer names -> partial
    # overrides of scheme/weight/act/split/adc, applied in order over the group, e.g.
    # {blocks.0.*: {adc: {bits: 8}}, blocks.*.mlp.w3: {scheme: fp}}; null: none. QuantConfig
    # checks every override against the group. `Any`, not dict[str, Any] | None: OmegaConf
    # merges no mapping into a typed dict that is null, nor new keys into one in struct
    # mode, so `quant.layers={...}` on the command line would fail.
    layers: Any = None


SECTION_SCHEMAS = {"weight": WeightSchema, "act": ActSchema, "split": SplitSchema, "adc": AdcSchema}


@dataclass
class DeviceSchema:
    """The run's `device` group (configs/device/): the memory devices of the analog arrays,
    checked by DeviceConfig (jit/quant/device_config.py, which takes these defaults: ideal
    devices, whose read-back weight is the INT code exactly). A preset states its
    technology's values (each with its source); the knobs below keep these defaults."""

    preset: str = "ideal"
    g_max_uS: float = 25.0  # largest programmed conductance; only ratios to it matter
    programming_noise_uS: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # (c0, c1, c2)
    drift_t0_s: float = 20.0  # drift reference time after programming
    drift_nu_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # [a, b, low, high]
    drift_nu_std: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # [a, b, low, high]
    read_noise_q: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # [q0, k, q_max]
    read_time_s: float = 2.5e-7  # duration of one read
    # Knobs of every preset
    t_inference_s: float = 0.0  # seconds after programming (0: no drift yet)
    drift_compensation: str = "none"  # none | global (rescale analog outputs by a reference read)
    programming_noise_scale: float = 1.0  # 0 turns programming noise off
    read_noise_scale: float = 1.0  # 0 turns read noise off
    drift_scale: float = 1.0  # 0 turns drift off
    stuck_at_zero_fraction: float = 0.0  # share of devices stuck at 0
    stuck_at_max_fraction: float = 0.0  # share of devices stuck at g_max
    seed: int = 0  # keys every device and converter draw
