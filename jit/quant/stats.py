"""Per-layer statistics of docs/design.md "Statistics per layer".

A layer owns a `LayerStats` only while statistics are enabled (`enable_stats`); when
it is None the forward pass does no extra work at all. Counters known from shapes are
Python numbers; counters of values (clipped activations, MSB codes, saturated
conversions, energies) accumulate as 0-d tensors on the layer's device, so collecting
costs no host sync per call; `collect_stats` reads them once and turns them into one row
per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import device
from .layers import quantized_layers

# A counter: a Python number, or a 0-d device tensor while values are being added.
Count = int | torch.Tensor
Energy = float | torch.Tensor


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

    def observe_paths(self, analog: list, digital: torch.Tensor | None, tokens: int,
                      in_features: int, out_features: int, tiles: int) -> None:
        """Count one call's operations. Each analog path converts every output of every
        tile once per read; each input code is driven once per read. An output's partial
        results (tiles x reads per path, plus the digital MSB result of a token that has
        one) are merged by adds; a digital-only layer (W8A8) accumulates inside its MACs."""
        self.dense_macs += tokens * in_features * out_features
        self.tiles = tiles
        partials = 0
        for path in analog:
            vectors = path.codes.shape[0]
            self.array_reads[path.name] = self.array_reads.get(path.name, 0) + vectors * path.reads
            conversions = vectors * out_features * tiles * path.reads
            self.path_conversions[path.name] = self.path_conversions.get(path.name, 0) + conversions
            self.dac_conversions += path.codes.numel() * path.reads
            partials += conversions
        if analog and digital is not None:
            partials = partials + digital.ne(0).any(1).sum() * out_features
        if analog:
            self.digital_accumulations += partials - tokens * out_features

    def observe_activations(self, x: torch.Tensor, clip: torch.Tensor,
                            x_int: torch.Tensor) -> None:
        """Clip rate and coverage of x_int by [-128, 127]."""
        self.act_values += x.numel()
        self.act_clipped = self.act_clipped + (x.abs() > clip).sum()
        self.in_int8_range = self.in_int8_range + ((x_int >= -128) & (x_int <= 127)).sum()

    def observe_msb(self, msb: torch.Tensor) -> None:
        """MSB density; a code lies in the LSB slice's range exactly when its MSB is 0
        (center-out split: [Lmin, Lmax]; bit-serial: [0, 2^lb - 1])."""
        self.has_split = True
        nonzero = torch.count_nonzero(msb)
        self.msb_nonzero = self.msb_nonzero + nonzero
        self.in_lsb_range = self.in_lsb_range + (msb.numel() - nonzero)

    def observe_adc(self, conversions: int, saturated: Count) -> None:
        self.has_adc = True
        self.adc_conversions += conversions
        self.adc_saturated = self.adc_saturated + saturated

    def observe_output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       y: torch.Tensor) -> None:
        """Signal and error energy against the float layer on the same input."""
        y_float = F.linear(x.to(weight.dtype), weight, bias).double()
        self.signal_energy = self.signal_energy + y_float.square().sum()
        self.error_energy = self.error_energy + (y.double() - y_float).square().sum()

    def read(self) -> LayerStats:
        """A copy with every device counter read into a Python number (the host syncs)."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.item()
            values[f.name] = value
        return LayerStats(**values)

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


def enable_stats(model: nn.Module, enabled: bool = True) -> None:
    """Start (fresh counters) or stop collecting statistics in every quantized layer."""
    for layer in quantized_layers(model).values():
        layer.stats = LayerStats() if enabled else None


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of layers that are collecting."""
    for layer in quantized_layers(model).values():
        if layer.stats is not None:
            layer.stats = LayerStats()


def collect_stats(model: nn.Module) -> list[dict]:
    """One row per collecting layer: msb_density, lsb_range_coverage, int8_range_coverage,
    act_clip_rate, adc_saturation_rate (None where a scheme has no such part), the layer's
    own bit widths and ADC noise (`layer_settings`), sqnr_db
    (output vs the float layer, accumulated energies), digital_macs, analog_macs (analog
    reads counted each), the operation counts of `LayerStats.observe_paths` (dense_macs,
    dac_conversions, adc_conversions_<path>, array_reads_<path>, tiles,
    digital_accumulations), calls, and the arrays' weight_snr_db and weight_drift_factor
    (`weight_statistics`)."""
    rows = []
    for name, layer in quantized_layers(model).items():
        if layer.stats is not None:
            rows.append({**layer.stats.row(name, layer.scheme), **layer_settings(layer),
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
