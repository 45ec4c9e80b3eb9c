"""The parts of the `task=eval` pipeline that need no loop: its settings, putting the
model on the hardware (quantize, then calibrate or apply an artefact) and what
results.json records about per-layer configs. jit/passes.py runs the pipeline as passes
of Lightning's test loop:

    float baseline (optional) -> quantize -> calibrate or apply an artefact -> per-layer
    statistics -> cost estimate -> FID of the quantized model -> results.json, summary
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from jit.evaluation.calibration import CalibrationConfig, run_calibration
from jit.evaluation.fid import FIDConfig
from jit.evaluation.report import flatten, log_table
from jit.quant import QuantConfig, quantize_model


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything the pipeline needs, parsed once from the run config."""

    quant: QuantConfig
    fid: FIDConfig
    hardware: object  # jit.hardware.HardwareConfig
    calibration: CalibrationConfig
    run_dir: Path
    checkpoint: str  # the weights' file (results.json records it and its sha256)
    compare_fp: bool = True
    layer_stats_images: int = 0
    compile_backbone: bool = False


def per_layer_differences(qcfg: QuantConfig, targets: list[str]) -> dict[str, dict]:
    """{layer: {"adc.bits": 8, ...}}: where each targeted layer's own config (quant.layers)
    differs from the group's, flat keys; {} for a layer on the group's config."""
    group = flatten({k: v for k, v in qcfg.to_dict().items() if k != "layers"})
    out = {}
    for name in targets:
        own = flatten({k: v for k, v in qcfg.layer_config(name).to_dict().items() if k != "layers"})
        out[name] = {key: value for key, value in own.items()
                     if group.get(key) != value and not key.startswith("device.")}
    return out


def prepare_quantized(module, qcfg: QuantConfig, calibration: CalibrationConfig, dm, run_dir: Path,
                      trainer=None) -> dict:
    """Quantize the backbone in place; in static mode calibrate with `calibration` or
    apply quant.calibration_file.

    Returns the provenance recorded in results.json.
    """
    if not qcfg.quantizes:
        return {"calibration": None}
    replaced = quantize_model(module.denoiser.net, qcfg)
    rank_zero_info(f"quantized {len(replaced)} layers ({qcfg.scheme}, {qcfg.mode})")
    if not replaced:  # quant.layers keeps every targeted layer digital: nothing to calibrate
        return {"calibration": None, "quantized_layers": 0}
    outcome = run_calibration(module, qcfg, calibration, run_dir, datamodule=dm,
                              sampler=module.sampler, eval_weights=module.eval_weights)
    if outcome is None:
        return {"calibration": None, "quantized_layers": len(replaced)}
    meta = {k: v for k, v in outcome.artefact.items() if k not in ("layers", "weights")}
    provenance = {"file": str(outcome.artefact_path), "calibrated_here": outcome.calibrated,
                  **{k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    if outcome.coverage and trainer is not None:
        log_table(trainer, "calibration/coverage", outcome.coverage)
    return {"calibration": provenance, "quantized_layers": len(replaced)}
