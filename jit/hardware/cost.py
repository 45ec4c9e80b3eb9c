"""Energy, latency and area per generated image, from exact operation counts.

Counts come from the simulation: dense MACs per layer from one counted image
(`counting.py`), and for the quantized layers the per-layer statistics (`LayerStats`:
analog MACs, DAC conversions, ADC conversions per path, array reads, MSB MACs, merges)
divided by the images they observed. Each count is multiplied by its energy per operation
from the `hardware` config; nothing is fitted. The numbers are estimates whose value lies
in comparing design points with each other and with the digital INT8 baseline of the same
model at the same node (README "Energy, latency and area").

Breakdown of the energy: `adc`, `analog_array`, `dac`, `digital_msb` (the hybrid's MSB
MACs) and `digital_rest` (layers outside quant.targets, W8A8 layers, the adds that merge
partial results, and targeted layers kept in float by quant.layers, which cost what they
cost on the digital INT8 baseline).

Per-layer hardware (quant.layers): each statistics row carries its layer's own `scheme`
and `adc_bits`, and is costed with them.
"""

from __future__ import annotations

import math

from .config import HardwareConfig

PARTS = ("adc", "analog_array", "dac", "digital_msb", "digital_rest")
PJ_PER_UJ = 1e6
NS_PER_MS = 1e6
ANALOG_SCHEMES = ("hybrid", "bitserial")


def _path_columns(row: dict, prefix: str) -> dict[str, int]:
    return {key[len(prefix):]: value for key, value in row.items() if key.startswith(prefix)}


def layer_costs(row: dict, images: int, hw: HardwareConfig, scheme: str, adc_bits: int,
                shape: tuple[int, int]) -> dict:
    """Per-image counts, energy (pJ) and latency (ns) of one quantized layer from its
    statistics row (totals over `images` images)."""
    per = {key: row[key] / images for key in ("analog_macs", "dense_macs", "dac_conversions",
                                              "digital_accumulations", "digital_macs")}
    conversions = {p: n / images for p, n in _path_columns(row, "adc_conversions_").items()}
    reads = {p: n / images for p, n in _path_columns(row, "array_reads_").items()}
    d = hw.digital
    energy = dict.fromkeys(PARTS, 0.0)
    latency_ns = 0.0
    if scheme in ANALOG_SCHEMES and hw.kind == "aimc":
        a = hw.analog
        energy["adc"] = sum(conversions.values()) * a.adc_conversion_fJ(adc_bits) / 1000
        energy["analog_array"] = per["analog_macs"] * a.array_mac_fJ / 1000
        energy["dac"] = per["dac_conversions"] * a.dac_conversion_fJ / 1000
        energy["digital_msb"] = per["digital_macs"] * d.int8_mac_pJ
        energy["digital_rest"] = per["digital_accumulations"] * d.add32_pJ
        # One read of a tile settles, then its ADCs convert the tile's columns in rounds;
        # the tiles of a layer work in parallel, the paths (bit-serial slices) in turn.
        rounds = math.ceil(min(shape[1], a.tile_cols) / a.adcs_per_tile)
        read_ns = a.read_ns + rounds * adc_bits * a.adc_conversion_ns_per_bit
        latency_ns = sum(reads.values()) * read_ns + per["digital_macs"] / d.macs_per_ns
    else:  # W8A8, or any scheme on a digital accelerator: dense INT8 MACs
        energy["digital_rest"] = per["dense_macs"] * d.int8_mac_pJ
        latency_ns = per["dense_macs"] / d.macs_per_ns
    out = {f"{key}_per_image": value for key, value in per.items()}
    out.update({f"adc_conversions_per_image_{p}": n for p, n in conversions.items()})
    out.update({f"energy_{part}_pJ_per_image": value for part, value in energy.items()})
    out["energy_pJ_per_image"] = sum(energy.values())
    out["latency_ns_per_image"] = latency_ns
    return out


def tiles_needed(shape: tuple[int, int], hw: HardwareConfig) -> int:
    """Arrays holding one layer's weights (each weight in one tile, weight-stationary)."""
    return math.ceil(shape[0] / hw.analog.tile_rows) * math.ceil(shape[1] / hw.analog.tile_cols)


def digital_baseline(dense, targets: list[str], hw: HardwareConfig) -> tuple[float, float]:
    """(energy pJ, latency ns) per image of the same model on the digital accelerator of
    the preset: the target layers as INT8 MACs, the rest at `hardware.rest_precision`."""
    d = hw.digital
    target, rest = dense.target_macs(targets), dense.rest_macs(targets)
    energy = target * d.int8_mac_pJ + rest * d.mac_pJ(hw.rest_precision)
    return energy, (target + rest) / d.macs_per_ns


def float_layer_row(name: str, macs: int, hw: HardwareConfig) -> dict:
    """The layer_stats.csv row of a targeted layer kept in float (quant.layers scheme fp):
    its dense MACs at the digital INT8 baseline's cost."""
    d = hw.digital
    return {"layer": name, "scheme": "fp", "dense_macs_per_image": float(macs),
            "energy_digital_rest_pJ_per_image": macs * d.int8_mac_pJ,
            "energy_pJ_per_image": macs * d.int8_mac_pJ, "latency_ns_per_image": macs / d.macs_per_ns}


def _row_adc_bits(row: dict, default: int | None) -> int | None:
    bits = row.get("adc_bits")
    return int(bits) if isinstance(bits, (int, float)) and not isinstance(bits, bool) else default


def estimate(hw: HardwareConfig, scheme: str, adc_bits: int | None, dense, targets: list[str],
             layer_rows: list[dict], images: int) -> tuple[dict, list[dict]]:
    """(results.json `energy` block, layer rows with per-image counts and energy added).

    `layer_rows`: statistics rows of the quantized layers over `images` images (empty for
    quant=fp). A quantized model without rows (no statistics) cannot be estimated.
    A row's own `scheme` and `adc_bits` (per-layer hardware) win over `scheme` and
    `adc_bits`; a target without a row stays float and costs its digital INT8 MACs, and
    gets a row of its own (`float_layer_row`).
    """
    baseline_pJ, baseline_ns = digital_baseline(dense, targets, hw)
    d = hw.digital
    rest_macs = dense.rest_macs(targets)
    rest_pJ = rest_macs * d.mac_pJ(hw.rest_precision)
    rest_ns = rest_macs / d.macs_per_ns
    energy = dict.fromkeys(PARTS, 0.0)
    operations = {"analog_macs": 0.0, "dac_conversions": 0.0, "adc_conversions": 0.0,
                  "digital_msb_macs": 0.0, "digital_accumulations": 0.0,
                  "digital_int8_macs": 0.0, "digital_rest_macs": float(rest_macs)}
    rows_out, latency_ns, tiles, adc_bits_used = [], rest_ns, 0, set()
    if not layer_rows:
        # The target layers run digitally, as in the baseline (quant=fp quantizes nothing).
        energy["digital_rest"] = baseline_pJ
        latency_ns = baseline_ns
        operations["digital_int8_macs"] = float(dense.target_macs(targets))
    else:
        energy["digital_rest"] = rest_pJ
        by_name = {row["layer"]: row for row in layer_rows}
        adc_bits_used = set()
        for name in [*targets, *(n for n in by_name if n not in set(targets))]:
            if name not in by_name:  # kept in float by quant.layers
                row = float_layer_row(name, dense.linear_macs.get(name, 0), hw)
                rows_out.append(row)
                energy["digital_rest"] += row["energy_pJ_per_image"]
                latency_ns += row["latency_ns_per_image"]
                operations["digital_int8_macs"] += row["dense_macs_per_image"]
                continue
            row = by_name[name]
            shape = dense.linear_shapes[row["layer"]]
            row_scheme, row_bits = row.get("scheme") or scheme, _row_adc_bits(row, adc_bits)
            costs = layer_costs(row, images, hw, row_scheme, row_bits, shape)
            rows_out.append({**row, **costs})
            for part in PARTS:
                energy[part] += costs[f"energy_{part}_pJ_per_image"]
            latency_ns += costs["latency_ns_per_image"]
            if row_scheme in ANALOG_SCHEMES and hw.kind == "aimc":
                adc_bits_used.add(row_bits)
                tiles += tiles_needed(shape, hw)
                operations["analog_macs"] += costs["analog_macs_per_image"]
                operations["dac_conversions"] += costs["dac_conversions_per_image"]
                operations["adc_conversions"] += sum(v for k, v in costs.items()
                                                     if k.startswith("adc_conversions_per_image_"))
                operations["digital_msb_macs"] += costs["digital_macs_per_image"]
                operations["digital_accumulations"] += costs["digital_accumulations_per_image"]
            else:
                operations["digital_int8_macs"] += costs["dense_macs_per_image"]
    total_pJ = sum(energy.values())
    summary = {
        "hardware": hw.name,
        "hardware_kind": hw.kind,
        "node_nm": hw.node_nm,
        "images_counted": images if layer_rows else 1,
        "energy_per_image_uJ": total_pJ / PJ_PER_UJ,
        **{f"energy_{part}_uJ": value / PJ_PER_UJ for part, value in energy.items()},
        "digital_int8_energy_per_image_uJ": baseline_pJ / PJ_PER_UJ,
        "saving_vs_digital_int8": 1 - total_pJ / baseline_pJ if baseline_pJ else 0.0,
        "latency_per_image_ms": latency_ns / NS_PER_MS,
        "digital_int8_latency_per_image_ms": baseline_ns / NS_PER_MS,
        "analog_tiles": tiles,
        "analog_area_mm2": tiles * hw.analog.tile_area_mm2 if tiles else 0.0,
        # One ADC resolution: its energy per conversion; per-layer resolutions: see layer_stats.csv.
        "adc_conversion_pJ": (hw.analog.adc_conversion_fJ(next(iter(adc_bits_used))) / 1000
                              if tiles and len(adc_bits_used) == 1 else None),
        "operations_per_image": operations,
    }
    return summary, rows_out


def not_estimated(reason: str) -> dict:
    return {"status": f"not estimated: {reason}"}


def adc_bits_of(qcfg) -> int | None:
    adc = getattr(qcfg, "adc", None)
    return adc.bits if adc is not None else None
