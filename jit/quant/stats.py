"""Per-layer statistics of docs/design.md "Statistics per layer".

A layer owns a `LayerStats` only while statistics are enabled (`enable_stats`); when
it is None the forward pass does no extra work at all. Counters known from shapes are
Python numbers; counters of values (clipped activations, MSB codes, saturated
conversions, energies) accumulate as 0-d tensors on the layer's device, so collecting
costs no host sync per call; `collect_stats` reads them once and turns them into one row
per layer.

Statistics may be limited to the samples whose id (jit.quant.sample_context) lies below
`sample_limit`: an evaluation observes its first N images inside the very forwards that
generate them for FID, whatever else the batch holds. The rows of one call are then
observed up to `rows` (the samples below the limit lead every batch of a sample plan);
a call with no such sample is not observed at all, and runs as with statistics off.
`snapshot_stats` reads the counters as plain numbers (one chunk's part, kept with the
chunk) and `merge_stats` adds such parts up, in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import device
from .layers import quantized_layers

# A counter: a Python number, or a 0-d device tensor while values are being added.
Count = int | torch.Tensor
Energy = float | torch.Tensor
# Fields that say how a layer is observed, not what it saw: never added up.
_SETTINGS = ("sample_limit", "rows", "out_features")


@dataclass
class LayerStats:
    calls: int = 0
    act_values: int = 0
    act_clipped: Count = 0
    msb_nonzero: Count = 0
    in_lsb_range: Count = 0
    in_int8_range: Count = 0
    adc_conversions: int = 0
    adc_saturated: Count = 0
    signal_energy: Energy = 0.0
    error_energy: Energy = 0.0
    digital_macs: Count = 0
    analog_macs: int = 0
    has_split: bool = False
    has_adc: bool = False
    # Operation counts for the hardware cost model (jit/hardware): exact, from the calls.
    dense_macs: int = 0  # tokens x in x out: what a digital INT8 layer would compute
    tiles: int = 1  # analog arrays the input rows are split over (quant.adc.tile_rows)
    dac_conversions: int = 0  # input codes driven onto array rows, once per read
    array_reads: dict = field(default_factory=dict)  # {path: input vectors x reads}
    path_conversions: dict = field(default_factory=dict)  # {path: ADC conversions}
    digital_accumulations: Count = 0  # adds that merge partial results of one output
    # Observe only samples with id < sample_limit (None: every row of every call).
    sample_limit: int | None = None
    rows: int = 0  # leading rows of the current call that are observed (begin_call)
    out_features: int = 0  # of the layer of the current call

    def begin_call(self, rows: int, batch: int, sample_ids: Sequence[int] | None,
                   out_features: int, layer_name: str = "") -> bool:
        """Set the observed rows of a call of `rows` rows and `batch` samples with
        `sample_ids` (None outside a sample_context); False when none is observed."""
        self.out_features = out_features
        if self.sample_limit is None:
            self.rows = rows
            return True
        if sample_ids is None:
            raise RuntimeError(f"layer '{layer_name}': statistics of the samples below id "
                               f"{self.sample_limit} need the sample ids of a "
                               "jit.quant.sample_context around the call")
        below = sum(1 for sample in sample_ids if sample < self.sample_limit)
        if any(sample < self.sample_limit for sample in sample_ids[below:]):
            raise ValueError(f"layer '{layer_name}': the samples below id {self.sample_limit} "
                             "must lead the batch to be observed, got ids "
                             f"{list(sample_ids)[:8]}...")
        self.rows = below * (rows // batch) if batch else 0
        return below > 0

    def _observed(self, values: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The observed rows of `values`, whose first row is row `start` of the call."""
        return values[:max(0, min(values.shape[0], self.rows - start))]

    def observe_paths(self, analog: list, in_features: int, out_features: int,
                      tiles: int) -> None:
        """Count one call's operations on its observed rows. Each analog path converts
        every output of every tile once per read; each input code is driven once per
        read. An output's partial results (tiles x reads per path, plus the digital MSB
        result of a token that has one, `observe_digital`) are merged by adds; a
        digital-only layer (W8A8) accumulates inside its MACs."""
        tokens = self.rows
        self.dense_macs += tokens * in_features * out_features
        self.tiles = tiles
        partials = 0
        for path in analog:
            self.array_reads[path.name] = self.array_reads.get(path.name, 0) + tokens * path.reads
            conversions = tokens * out_features * tiles * path.reads
            self.path_conversions[path.name] = self.path_conversions.get(path.name, 0) + conversions
            self.dac_conversions += tokens * in_features * path.reads
            self.analog_macs += tokens * in_features * out_features * path.reads
            partials += conversions
        if analog:
            self.digital_accumulations += partials - tokens * out_features

    def observe_activations(self, x: torch.Tensor, clip: torch.Tensor | float,
                            x_int: torch.Tensor, start: int = 0) -> None:
        """Clip rate and coverage of x_int by [-128, 127], on a block of rows starting
        at row `start` (`clip`: a number, 0-d, or per row)."""
        x, x_int = self._observed(x, start), self._observed(x_int, start)
        if isinstance(clip, torch.Tensor) and clip.dim() == 2:
            clip = self._observed(clip, start)
        self.act_values += x.numel()
        self.act_clipped = self.act_clipped + (x.abs() > clip).sum()
        self.in_int8_range = self.in_int8_range + ((x_int >= -128) & (x_int <= 127)).sum()

    def observe_msb(self, msb: torch.Tensor, start: int = 0) -> None:
        """MSB density; a code lies in the LSB slice's range exactly when its MSB is 0
        (center-out split: [Lmin, Lmax]; bit-serial: [0, 2^lb - 1])."""
        msb = self._observed(msb, start)
        self.has_split = True
        nonzero = torch.count_nonzero(msb)
        self.msb_nonzero = self.msb_nonzero + nonzero
        self.in_lsb_range = self.in_lsb_range + (msb.numel() - nonzero)

    def observe_digital(self, digital: torch.Tensor, with_analog: bool, start: int = 0) -> None:
        """The exact digital path's MACs (its non-zero codes); beside analog paths, the
        outputs whose token has a digital partial result to add."""
        digital = self._observed(digital, start)
        self.digital_macs = self.digital_macs + torch.count_nonzero(digital) * self.out_features
        if with_analog:
            self.digital_accumulations = (self.digital_accumulations
                                          + digital.ne(0).any(1).sum() * self.out_features)

    def observe_adc(self, conversions: int, saturated: Count) -> None:
        self.has_adc = True
        self.adc_conversions += conversions
        self.adc_saturated = self.adc_saturated + saturated

    def observe_output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       y: torch.Tensor) -> None:
        """Signal and error energy against the float layer on the same input."""
        x, y = self._observed(x), self._observed(y)
        y_float = F.linear(x.to(weight.dtype), weight, bias).double()
        self.signal_energy = self.signal_energy + y_float.square().sum()
        self.error_energy = self.error_energy + (y.double() - y_float).square().sum()

    def counters(self) -> dict:
        """Every counter as a plain number (the device ones read: a host sync)."""
        values = {}
        for f in fields(self):
            if f.name in _SETTINGS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.item()
            values[f.name] = dict(value) if isinstance(value, dict) else value
        return values

    def add(self, counters: dict) -> None:
        """Add another part's `counters` (snapshot_stats) to these."""
        for name, value in counters.items():
            mine = getattr(self, name)
            if name in ("has_split", "has_adc"):
                setattr(self, name, mine or value)
            elif name == "tiles":
                self.tiles = value
            elif isinstance(value, dict):
                setattr(self, name, {k: mine.get(k, 0) + value.get(k, 0) for k in {**mine, **value}})
            else:
                setattr(self, name, mine + value)

    def read(self) -> LayerStats:
        """A copy with every device counter read into a Python number (the host syncs)."""
        return LayerStats(**self.counters(), sample_limit=self.sample_limit)

    def row(self, name: str, scheme: str) -> dict:
        """The statistics of one layer (reads the device counters once)."""
        return self.read()._row(name, scheme)

    def _row(self, name: str, scheme: str) -> dict:
        def share(count: int, total: int, applies: bool = True) -> float | None:
            return count / total if applies and total else None

        if self.error_energy > 0:
            sqnr_db = 10 * math.log10(self.signal_energy / self.error_energy)
        else:
            sqnr_db = math.inf if self.calls else None
        return {
            "layer": name,
            "scheme": scheme,
            "msb_density": share(self.msb_nonzero, self.act_values, self.has_split),
            "lsb_range_coverage": share(self.in_lsb_range, self.act_values, self.has_split),
            "int8_range_coverage": share(self.in_int8_range, self.act_values),
            "act_clip_rate": share(self.act_clipped, self.act_values),
            "adc_saturation_rate": share(self.adc_saturated, self.adc_conversions,
                                         self.has_adc),
            "sqnr_db": sqnr_db,
            "digital_macs": self.digital_macs,
            "analog_macs": self.analog_macs,
            "dense_macs": self.dense_macs,
            "dac_conversions": self.dac_conversions,
            **{f"adc_conversions_{path}": n for path, n in self.path_conversions.items()},
            **{f"array_reads_{path}": n for path, n in self.array_reads.items()},
            "tiles": self.tiles,
            "digital_accumulations": self.digital_accumulations,
            "calls": self.calls,
        }


def enable_stats(model: nn.Module, enabled: bool = True, sample_limit: int | None = None) -> None:
    """Start (fresh counters) or stop collecting statistics in every quantized layer;
    `sample_limit`: observe only the samples whose id lies below it."""
    if sample_limit is not None and (isinstance(sample_limit, bool) or sample_limit < 1):
        raise ValueError(f"sample_limit must be a positive integer or None, got {sample_limit!r}")
    for layer in quantized_layers(model).values():
        layer.stats = LayerStats(sample_limit=sample_limit) if enabled else None


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of layers that are collecting."""
    for layer in quantized_layers(model).values():
        if layer.stats is not None:
            layer.stats = LayerStats(sample_limit=layer.stats.sample_limit)


def snapshot_stats(model: nn.Module) -> dict[str, dict]:
    """{layer name: counters as plain numbers} of every collecting layer that observed a
    call: a part that `merge_stats` adds up (one host sync per layer)."""
    return {name: layer.stats.counters() for name, layer in quantized_layers(model).items()
            if layer.stats is not None and layer.stats.calls}


def merge_stats(parts: Iterable[dict[str, dict]]) -> dict[str, LayerStats]:
    """The layers' counters summed over `parts` (snapshot_stats), in the order given: float
    energies are summed in that order, so a fixed order gives the same bits anywhere."""
    merged: dict[str, LayerStats] = {}
    for part in parts:
        for name, counters in part.items():
            merged.setdefault(name, LayerStats()).add(counters)
    return merged


def collect_stats(model: nn.Module, merged: dict[str, LayerStats] | None = None) -> list[dict]:
    """One row per collecting layer: msb_density, lsb_range_coverage, int8_range_coverage,
    act_clip_rate, adc_saturation_rate (None where a scheme has no such part), the layer's
    own bit widths and ADC noise (`layer_settings`), sqnr_db
    (output vs the float layer, accumulated energies), digital_macs, analog_macs (analog
    reads counted each), the operation counts of `LayerStats.observe_paths` (dense_macs,
    dac_conversions, adc_conversions_<path>, array_reads_<path>, tiles,
    digital_accumulations), calls, and the arrays' weight_snr_db and weight_drift_factor
    (`weight_statistics`). `merged` (merge_stats): those counters instead of the layers'
    own (a layer without any is left out)."""
    rows = []
    for name, layer in quantized_layers(model).items():
        stats = layer.stats if merged is None else merged.get(name)
        if stats is not None:
            rows.append({**stats.row(name, layer.scheme), **layer_settings(layer),
                         **weight_statistics(layer)})
    return rows


def layer_settings(layer) -> dict:
    """The layer's own hardware (per-layer quant.layers overrides included): bit widths and
    ADC noise; the ADC columns None for a layer without ADCs (W8A8)."""
    c, adc = layer.cfg, bool(layer.adc_paths)
    return {"weight_bits": c.weight.bits, "act_bits": c.act.bits,
            "adc_bits": c.adc.bits if adc else None,
            "adc_noise_sigma_lsb": c.adc.noise_sigma_lsb if adc else None}


def weight_statistics(layer) -> dict:
    """weight_snr_db and weight_drift_factor of the read-back weights against the INT
    codes (device.py), at device.t_inference_s after drift compensation; for a layer
    without analog arrays (W8A8) None."""
    if not layer.adc_paths:
        return {"weight_snr_db": None, "weight_drift_factor": None}
    with torch.no_grad():
        codes, read_back = layer.read_back_codes()
    return {"weight_snr_db": device.weight_snr_db(codes, read_back),
            "weight_drift_factor": device.weight_drift_factor(codes, read_back)}
