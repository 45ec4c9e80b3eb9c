"""Evaluation passes through Lightning's test loop, and the float-then-quantized evaluation
(`task=eval`) made of them.

A pass is one `trainer.test` over a sample plan (jit/evaluation/plan.py): Lightning sets
up the processes and devices, shards the plan's chunks over the ranks and calls
`JiTModule.test_step` per chunk; the pass's callbacks (jit/callbacks/evaluation.py) set
what it generates with and consume the images. On every process the same sequence of
passes runs, so the tasks' code between passes (quantizing, the energy estimate) sees the
same model on every rank:

    float baseline (FIDCallback)  ->  quantized FID pass (CalibrationCallback,
    LayerStatsCallback, FIDCallback)  ->  energy estimate, results.json

The per-layer statistics of the first `eval.layer_stats_images` images ride along the
quantized FID pass: they are observed inside the forwards that generate those images for
FID (the chunks holding them run with statistics on, for their first images only), so
no image is generated twice. A compiled backbone (`model.compile=true`) observes nothing:
there the statistics get an eager pass of their own before the FID pass, as
`task=calibrate` does. Both FID passes store their scored chunks (and the
statistics of their forwards) in the run folder until the evaluation has succeeded: the
same command rerun in the same folder after an interruption continues from the first
missing chunk (jit/evaluation/chunks.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import lightning as L
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info

from jit.callbacks.evaluation import (
    CalibrationCallback,
    FIDCallback,
    GenerationPass,
    LayerStatsCallback,
)
from jit.checkpoint import sha256_file
from jit.config import ConfigError
from jit.evaluation.chunks import STORE_DIR
from jit.evaluation.fid import FIDConfig, FIDEvaluation
from jit.evaluation.pipeline import EvaluationSettings, per_layer_differences
from jit.evaluation.plan import SamplePlan
from jit.evaluation.report import log_table, print_summary, summarize_layer_stats, write_layer_stats
from jit.hardware import estimate_run, log_energy
from jit.interrupt import stop_on_signals


def evaluation_trainer(**overrides) -> L.Trainer:
    """A one-process trainer for passes run from a notebook or a test: no logger, no
    progress bar, no checkpoints (the tasks build theirs from the `trainer` config)."""
    settings = {"accelerator": "auto", "devices": 1, "logger": False, "enable_progress_bar": False,
                "enable_checkpointing": False, "enable_model_summary": False, **overrides}
    return L.Trainer(**settings)


def attach(trainer: L.Trainer, module) -> None:
    """For a one-process task that also works on the model between passes (the
    sensitivity proxy, calibrating one unit): the module on the trainer's device, under
    its precision, before the first pass would put it there."""
    module.trainer = trainer
    module.to(trainer.strategy.root_device)


def check_pass_launcher(trainer: L.Trainer) -> None:
    """Passes that follow each other need processes that live across them: a strategy that
    spawns new processes per `trainer.test` would lose what one pass did to the model."""
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError("trainer.strategy: evaluation runs several test passes in the same processes; "
                          "a spawning strategy (ddp_spawn, ddp_fork, ddp_notebook) starts new ones for each: "
                          "use DDPStrategy (trainer=ddp, trainer=ddp_cpu) or one device")


def generation_pass(trainer: L.Trainer, module, plan: SamplePlan, before: list, after: list, *,
                    sampler: dict, weights: str, label: str, compile_backbone: bool = False,
                    progress: bool = True) -> None:
    """One `trainer.test` over `plan`, `test_step` generating each chunk with `sampler` and
    `weights`. Hooks run in list order: `before` (a CalibrationCallback: it quantizes the
    layers the weight swap then fills), the generation settings (the weights swapped in),
    then `after` (what consumes the images, and digests the weights they come from). A stop
    signal ends the pass at once (jit/interrupt.py); Lightning then stops the other ranks."""
    generation = GenerationPass(plan.num_images, sampler, weights, label, compile_backbone, progress)
    kept = list(trainer.callbacks)
    trainer.callbacks = [*kept, *before, generation, *after]

    def stop_other_processes(signum):
        if trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)

    try:
        with stop_on_signals(stop_other_processes):
            trainer.test(module, dataloaders=plan.loader(), verbose=False)
    finally:
        trainer.callbacks = kept


def evaluate_fid(trainer: L.Trainer | None, module, fid, run_dir=None, extra: dict | None = None,
                 datamodule=None, log_prefix: str = "eval", compile_backbone: bool = False,
                 callbacks: list | None = None, more: Callable[[], dict] | None = None,
                 keep_chunks: bool = False, layer_stats: LayerStatsCallback | None = None) -> dict:
    """FID (and IS or cond_accuracy) of `fid.num_images` images of the module as it is:
    one pass; returns results.json's contents. `trainer` None: `evaluation_trainer()`.
    `callbacks` run before the generation (a CalibrationCallback); `layer_stats` observes
    the per-layer statistics of the pass's first images; `more()` adds to results.json
    what they found. Chunks an interrupted call stored in `run_dir` are reused;
    `keep_chunks`: the store stays after success (the caller removes it)."""
    trainer = trainer if trainer is not None else evaluation_trainer()
    fid = FIDConfig.from_any(fid)
    evaluation = FIDEvaluation(fid, run_dir=run_dir, extra=extra, log_prefix=log_prefix)
    scorer = FIDCallback(evaluation, datamodule, more, keep_chunks, layer_stats)
    after = [scorer] if layer_stats is None else [layer_stats, scorer]
    generation_pass(trainer, module, fid.sample_plan(module.denoiser), list(callbacks or []), after,
                    sampler=fid.sampler, weights=fid.eval_weights or module.eval_weights,
                    label=f"FID generation ({evaluation.label()})", compile_backbone=compile_backbone,
                    progress=fid.progress)
    return scorer.results


def statistics_pass(trainer: L.Trainer, module, fid: FIDConfig, num_images: int,
                    callbacks: list | None = None) -> list[dict]:
    """Per-layer statistics of the first `num_images` FID images without an FID pass, as
    an FID pass observes them: the whole chunks holding them are generated (same labels,
    initial noise, sample ids and forwards; every rank generates them all), with the
    module's weights and the FID sampler; `callbacks` run before it (a
    CalibrationCallback)."""
    stats = LayerStatsCallback(num_images)
    chunks = -(-num_images // fid.chunk_size)
    plan = fid.sample_plan(module.denoiser, min(chunks * fid.chunk_size, fid.num_images), sharded=False)
    generation_pass(trainer, module, plan, list(callbacks or []), [stats], sampler=fid.sampler,
                    weights=module.eval_weights, label="layer statistics", progress=fid.progress)
    return stats.rows


def evaluate_float_then_quantized(trainer: L.Trainer, module, datamodule, run: EvaluationSettings) -> dict:
    """The float baseline (with run.compare_fp), then the model on the hardware of
    run.quant; returns the quantized run's results (results.json). On every process."""
    check_pass_launcher(trainer)
    qcfg, fid = run.quant, run.fid
    common = {"checkpoint": run.checkpoint, "task": "eval", "compiled": run.compile_backbone}
    if trainer.is_global_zero:  # results.json is written by rank 0
        common["checkpoint_sha256"] = sha256_file(run.checkpoint)
    baseline = None
    if run.compare_fp and qcfg.quantizes:
        rank_zero_info("evaluating the float model (baseline)")
        baseline = evaluate_fid(trainer, module, fid, run.run_dir / "baseline_fp", {**common, "quant": {"scheme": "fp"}},
                                datamodule, "eval_fp", run.compile_backbone, keep_chunks=True)["metrics"]
    hardware = CalibrationCallback(qcfg, run.calibration, fid, run.run_dir, datamodule)
    stats_images = min(run.layer_stats_images, fid.num_images) if qcfg.quantizes else 0
    stats = LayerStatsCallback(stats_images) if stats_images else None
    before = [hardware]
    separate_stats: list[dict] | None = None
    if stats is not None and run.compile_backbone:
        # Compiled layers run reference.py, which observes nothing and draws its noise from
        # another generator than the eager layers: riding along would give the observed
        # chunks other noise than the rest. The statistics get an eager pass of their own.
        separate_stats, stats, before = statistics_pass(trainer, module, fid, stats_images, before), None, []
    energy: dict = {}

    def quantized_extra() -> dict:  # called at the end of the quantized pass, on every rank
        layer_stats = stats.rows if stats is not None else separate_stats or []
        energy.update(energy_estimate(trainer, run, hardware, layer_stats, stats_images))
        extra = {"device": qcfg.device.to_dict(), **hardware.provenance, "baseline_fp": baseline,
                 "energy": energy}
        if qcfg.layers:
            extra["quant_per_layer"] = per_layer_differences(qcfg, hardware.targets)
        if layer_stats:
            extra["layer_stats_summary"] = summarize_layer_stats(layer_stats)
            extra["layer_stats_images"] = stats_images
        return extra

    results = evaluate_fid(trainer, module, fid, run.run_dir, {**common, "quant": qcfg.to_dict()}, datamodule,
                           compile_backbone=run.compile_backbone, callbacks=before, more=quantized_extra,
                           keep_chunks=True, layer_stats=stats)
    if trainer.is_global_zero:
        # Both evaluations are done: an interrupted rerun has nothing left to continue.
        for folder in (run.run_dir, run.run_dir / "baseline_fp"):
            shutil.rmtree(folder / STORE_DIR, ignore_errors=True)
        log_energy(trainer, energy)
        print_summary(results, baseline)
    return results


def energy_estimate(trainer: L.Trainer, run: EvaluationSettings, hardware: CalibrationCallback,
                    layer_stats: list[dict], stats_images: int) -> dict:
    """The energy block of results.json; with statistics, layer_stats.csv and its table."""
    energy, rows = estimate_run(run.hardware, run.quant, hardware.dense_macs, hardware.targets, layer_stats,
                                stats_images)
    if layer_stats and trainer.is_global_zero:
        write_layer_stats(rows, run.run_dir / "layer_stats.csv")
        log_table(trainer, "quant/layer_stats", rows)
    return energy


def calibrate(trainer: L.Trainer, module, datamodule, run: EvaluationSettings) -> dict:
    """task=calibrate: quantize and calibrate at the start of the statistics pass, whose
    layer_stats.csv then shows how the new ranges hold on the first FID images."""
    check_pass_launcher(trainer)
    hardware = CalibrationCallback(run.quant, run.calibration, run.fid, run.run_dir, datamodule)
    stats_images = min(run.layer_stats_images, run.fid.num_images)
    layer_stats = statistics_pass(trainer, module, run.fid, stats_images, [hardware])
    energy_estimate(trainer, run, hardware, layer_stats, stats_images)
    return hardware.provenance
