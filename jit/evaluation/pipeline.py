"""Evaluate the float model, then the quantized one: the `task=eval` pipeline end to end.

    float baseline (optional) -> quantize -> calibrate or apply an artefact -> per-layer
    statistics -> cost estimate -> FID of the quantized model -> results.json, summary

`evaluate_float_then_quantized` runs on every process (jit/tasks.py calls it inside
Lightning's test loop, which sets up the devices and DDP); rank 0 writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from jit.checkpoint import sha256_file
from jit.console import PhaseProgress, announce
from jit.evaluation.calibration import CalibrationConfig, run_calibration
from jit.evaluation.fid import FIDConfig, FIDEvaluation
from jit.evaluation.plan import initial_noise
from jit.evaluation.report import log_table, print_summary, summarize_layer_stats, write_layer_stats
from jit.models.denoiser import NonFiniteSampleError
from jit.quant import (
    QuantConfig,
    collect_stats,
    enable_stats,
    quantize_model,
    reset_stats,
    sample_context,
)
from jit.sample_plan import index_chunks


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


def evaluate_float_then_quantized(trainer, module, datamodule, run: EvaluationSettings) -> dict:
    """The float baseline (with run.compare_fp), then the quantized model; returns the
    quantized run's results (results.json)."""
    from jit.hardware import count_targets_and_macs, estimate_run, log_energy

    qcfg, fid_cfg, num_classes = run.quant, run.fid, module.denoiser.num_classes
    common = {"checkpoint": run.checkpoint, "task": "eval", "compiled": run.compile_backbone}
    if trainer.is_global_zero:  # results.json is written by rank 0
        common["checkpoint_sha256"] = sha256_file(run.checkpoint)
    baseline = None
    if run.compare_fp and qcfg.quantizes:
        rank_zero_info("evaluating the float model (baseline)")
        fp = FIDEvaluation(fid_cfg, run_dir=run.run_dir / "baseline_fp", log_prefix="eval_fp",
                           extra={**common, "quant": {"scheme": "fp"}},
                           compile_backbone=run.compile_backbone)
        baseline = fp.run(trainer, module, datamodule)["metrics"]
    dense_macs, targets = count_targets_and_macs(module, qcfg, fid_cfg, num_classes)  # float model
    provenance = prepare_quantized(module, qcfg, run.calibration, datamodule, run.run_dir, trainer)
    stats_images = min(run.layer_stats_images, fid_cfg.num_images)
    layer_stats = quant_statistics(module, qcfg, fid_cfg, num_classes, stats_images)
    energy, layer_rows = estimate_run(run.hardware, qcfg, dense_macs, targets, layer_stats,
                                      stats_images)
    extra = {**common, "quant": qcfg.to_dict(), "device": qcfg.device.to_dict(), **provenance,
             "baseline_fp": baseline, "energy": energy}
    if qcfg.layers:
        extra["quant_per_layer"] = per_layer_differences(qcfg, targets)
    if layer_stats:
        extra["layer_stats_summary"] = summarize_layer_stats(layer_stats)
        extra["layer_stats_images"] = stats_images
        if trainer.is_global_zero:
            write_layer_stats(layer_rows, run.run_dir / "layer_stats.csv")
            log_table(trainer, "quant/layer_stats", layer_rows)
    results = FIDEvaluation(fid_cfg, run_dir=run.run_dir, extra=extra,
                            compile_backbone=run.compile_backbone).run(trainer, module, datamodule)
    if trainer.is_global_zero:
        log_energy(trainer, energy)
        print_summary(results, baseline)
    return results


def per_layer_differences(qcfg: QuantConfig, targets: list[str]) -> dict[str, dict]:
    """{layer: {"adc.bits": 8, ...}}: where each targeted layer's own config (quant.layers)
    differs from the group's, flat keys; {} for a layer on the group's config."""
    from jit.evaluation.fid import flatten

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


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def quant_statistics(module, qcfg: QuantConfig, fid_cfg: FIDConfig, num_classes: int,
                     num_images: int) -> list[dict]:
    """Per-layer statistics over a short sampling run with the evaluation's sampler and weights.

    Statistics cost several extra passes per call, so they are gathered on the first
    `num_images` images of the FID set (same labels, initial noise and noise sample ids),
    in the same fixed chunks of the global index (the last one cut at `num_images`);
    `eval.layer_stats_images=0` skips them.
    """
    n = min(num_images, fid_cfg.num_images)
    if not qcfg.quantizes or n == 0:
        return []
    denoiser = module.denoiser
    shape = (denoiser.in_channels, denoiser.img_size, denoiser.img_size)
    labels = fid_cfg.labels(num_classes)
    enable_stats(denoiser.net, True)
    reset_stats(denoiser.net)
    announce(f"layer statistics: sampling the first {n} FID images with per-layer statistics on")
    try:
        with module.eval_weights_context(module.eval_weights), \
                PhaseProgress("layer statistics", n, "images", enabled=_is_rank_zero()) as progress:
            for indices in index_chunks(n, fid_cfg.chunk_size):
                noise = initial_noise(fid_cfg.seed, indices, shape, denoiser.noise_scale)
                try:
                    with sample_context(denoiser.net, indices):
                        module.generate(labels[indices], noise=noise, **fid_cfg.sampler)
                except NonFiniteSampleError as err:
                    raise err.for_images(indices) from None
                progress.advance(len(indices))
        return collect_stats(denoiser.net)
    finally:
        enable_stats(denoiser.net, False)
