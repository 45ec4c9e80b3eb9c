"""Hardware cost model: energy, latency and area of a design point next to its FID.

`build_hardware_config` validates the `hardware` group; `count_targets_and_macs` counts
one image's dense MACs before the model is quantized; `estimate_run` turns those counts
and the quantized layers' statistics into the `energy` block of results.json and the
per-layer columns of layer_stats.csv.
"""

from __future__ import annotations

from jit.quant import target_names

from .config import HardwareConfig, HardwareConfigError, build_hardware_config
from .cost import PARTS, adc_bits_of, estimate, not_estimated
from .counting import DenseCounts, count_dense_macs, dense_macs_per_image

__all__ = ["PARTS", "DenseCounts", "HardwareConfig", "HardwareConfigError", "build_hardware_config",
           "count_dense_macs", "count_targets_and_macs", "dense_macs_per_image", "estimate",
           "estimate_run", "log_energy", "metrics_of", "not_estimated"]


def count_targets_and_macs(module, qcfg, fid_cfg, num_classes: int) -> tuple[DenseCounts, list[str]]:
    """(dense MACs of one image, names of the quant.targets layers), on the float model."""
    targets = target_names(module.denoiser.net, qcfg.targets)
    return dense_macs_per_image(module, fid_cfg, num_classes), targets


def estimate_run(hw: HardwareConfig, qcfg, dense: DenseCounts, targets: list[str],
                 layer_rows: list[dict], images: int) -> tuple[dict, list[dict]]:
    """The results.json `energy` block and the layer rows with their cost columns."""
    # No rows despite statistics: quant.layers kept every layer digital (the baseline).
    if qcfg.quantizes and hw.kind == "aimc" and not layer_rows and not images:
        return not_estimated("eval.layer_stats_images=0; the analog operation counts come from "
                             "the per-layer statistics"), layer_rows
    summary, rows = estimate(hw, qcfg.scheme, adc_bits_of(qcfg), dense, targets, layer_rows, images)
    return summary, rows or layer_rows


def log_energy(trainer, energy: dict) -> None:
    """The energy numbers to every logger (CSV, TensorBoard, wandb) under `energy/`."""
    numbers = {f"energy/{key}": value for key, value in metrics_of(energy).items()}
    numbers.update({f"energy/ops/{key}": value
                    for key, value in (energy.get("operations_per_image") or {}).items()})
    if not numbers:
        return
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=int(trainer.global_step))


def metrics_of(energy: dict) -> dict:
    """The numbers of an `energy` block, flat, for loggers and the sweep summary."""
    return {key: value for key, value in energy.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
