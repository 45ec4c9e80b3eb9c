"""The tasks `run.py` dispatches to: train, eval, calibrate, export, sensitivity, search.

`dispatch` checks the schema and parses every section once (jit/settings.py) before a
task builds a model or touches data; a task then composes the pieces (jit/builders.py)
and hands the work to Lightning (training) or to jit/evaluation (generation,
calibration) inside Lightning's test loop.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from jit import run_folder
from jit.atomic import check_writable, remove_stale_temporaries
from jit.builders import (
    RecordResumeSettings,
    build_callbacks,
    build_loggers,
    build_trainer,
    check_resume_settings,
    checkpoint_dir,
    checkpoint_kind,
    finalize_loggers,
    finetune_callbacks,
    latest_checkpoint,
    load_module,
    module_kwargs,
    resume_settings,
)
from jit.checkpoint import safe_load, save_official_checkpoint, sha256_file
from jit.checks import check_before_generation
from jit.config import ConfigError, Task, to_plain, validate
from jit.console import configure_progress
from jit.evaluation.pipeline import EvaluationSettings
from jit.finetune import check_comparison, compare_after_training
from jit.interrupt import RunInterrupted
from jit.models.compile import compile_available
from jit.module import JiTModule
from jit.passes import attach, check_pass_launcher, evaluate_float_then_quantized
from jit.passes import calibrate as calibrate_in_pass
from jit.quant import target_names
from jit.search import (
    DB_NAME,
    SearchRun,
    check_database,
    check_patterns,
    parse_search,
    run_search,
)
from jit.search_report import print_summary as print_search_summary
from jit.sensitivity import (
    CSV_NAME,
    SensitivityRun,
    SensitivitySettings,
    config_digest,
    read_done,
    run_sensitivity,
)
from jit.sensitivity import print_summary as print_sensitivity_summary
from jit.settings import RunSettings, parse_settings
from jit.train import export_official

# What a training stopped by SIGTERM exits with, after saving last.ckpt: 128 + 15, as a shell
# reports a process that SIGTERM ended. Not 0 (finished) nor 1/2 (failed, or bad input).
EXIT_INTERRUPTED = 128 + 15


def train(cfg: DictConfig, run: RunSettings) -> dict:
    from lightning.pytorch.utilities.exceptions import SIGTERMException


    settings = run.finetune
    ckpt_path = latest_checkpoint(checkpoint_dir(cfg)) if cfg.ckpt_path == "last" else cfg.ckpt_path
    kind = checkpoint_kind(ckpt_path)
    if kind == "lightning":
        check_resume_settings(cfg, ckpt_path)
    elif cfg.resume.allow_changes:
        raise ConfigError("resume.allow_changes: applies to resuming from a Lightning .ckpt "
                          f"(ckpt_path={ckpt_path} is {'an official checkpoint' if kind else 'not set'})")
    dm = instantiate(cfg.data)
    module = JiTModule(**module_kwargs(cfg), init_checkpoint=ckpt_path if kind == "official" else None,
                       init_weights=settings.init_weights)
    if settings.compare:  # every evaluation after training is checked before it
        start = ckpt_path if kind == "official" else safe_load(ckpt_path, mmap=True).get("init_checkpoint")
        check_comparison(cfg, settings, module, dm, start)
    callbacks = (build_callbacks(cfg, training=True) + finetune_callbacks(cfg, run)
                 + [RecordResumeSettings(resume_settings(cfg))])
    trainer = build_trainer(cfg, build_loggers(cfg, run.quant), callbacks)
    run_folder.start()
    if trainer.is_global_zero:  # before anything of this run writes there
        for folder in (Path(cfg.paths.output_dir), checkpoint_dir(cfg)):
            for stale in remove_stale_temporaries(folder):
                rank_zero_info(f"removed {stale.name}, left in {folder} by an interrupted write")
    if ckpt_path is not None:
        rank_zero_info(f"resuming from {ckpt_path}" if kind == "lightning" else f"fine-tuning from {ckpt_path}")
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path if kind == "lightning" else None)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"training stopped by SIGTERM at step {trainer.global_step} (exit code {EXIT_INTERRUPTED}); "
                  f"resume with the same overrides plus: ckpt_path=last hydra.run.dir={cfg.paths.output_dir}",
                  file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finalize_loggers(trainer)
    out = Path(cfg.paths.output_dir) / "checkpoint-last.pth"
    if trainer.is_global_zero:
        save_official_checkpoint(out, **module.export_official_state())
        rank_zero_info(f"official-layout checkpoint: {out}")
    result = {"checkpoint": str(out), "global_step": int(trainer.global_step)}
    if settings.compare:
        trainer.strategy.barrier()  # every rank evaluates; rank 0 has just written the file
        result["comparison"] = compare_after_training(cfg, settings, module.init_source, str(out), evaluate)
    return result


def export(cfg: DictConfig, run: RunSettings) -> dict:

    if checkpoint_kind(cfg.ckpt_path) != "lightning":
        raise ConfigError(f"ckpt_path: task=export converts a Lightning .ckpt; {cfg.ckpt_path} is not one")
    out = cfg.export.out_path or str(Path(cfg.paths.output_dir) / "checkpoint-last.pth")
    target, source = Path(out).expanduser(), Path(cfg.ckpt_path).expanduser()
    if target.resolve() == source.resolve() or (target.exists() and os.path.samefile(target, source)):
        raise ConfigError(f"export.out_path: {out} is the checkpoint being exported (ckpt_path); writing there "
                          "would replace its optimizer and resume state: choose another file")
    run_folder.start()
    export_official(cfg.ckpt_path, out)
    print(f"official-layout checkpoint written: {out}")
    return {"checkpoint": out}


def evaluation_settings(cfg: DictConfig, settings: RunSettings, checkpoint: str) -> EvaluationSettings:
    return EvaluationSettings(
        quant=settings.quant, fid=settings.fid, hardware=settings.hardware,
        calibration=settings.calibration, run_dir=Path(cfg.paths.output_dir), checkpoint=checkpoint,
        compare_fp=bool(cfg.compare_fp), layer_stats_images=int(cfg.eval.layer_stats_images),
        compile_backbone=bool(cfg.model.compile))


def evaluate(cfg: DictConfig, settings: RunSettings) -> dict:
    module, source = load_module(cfg)
    run = evaluation_settings(cfg, settings, source)
    dm = instantiate(cfg.data)
    check_before_generation(settings, module, dm, check_fid=True)
    trainer = build_trainer(cfg, build_loggers(cfg, settings.quant), build_callbacks(cfg, training=False))
    check_pass_launcher(trainer)
    run_folder.start()
    try:
        results = evaluate_float_then_quantized(trainer, module, dm, run)
    except RunInterrupted as stop:
        if trainer.is_global_zero:
            print(f"evaluation {stop} (exit code {stop.exit_code}); the scored chunks are kept in the run folder: "
                  f"continue with the same overrides plus hydra.run.dir={run.run_dir}", file=sys.stderr)
        raise
    finalize_loggers(trainer)
    if trainer.is_global_zero:
        print(f"run directory: {run.run_dir}\nresults: {run.run_dir / 'results.json'}")
    return results


def calibrate(cfg: DictConfig, settings: RunSettings) -> dict:
    qcfg = settings.quant
    if not qcfg.quantizes or qcfg.mode != "static":
        raise ConfigError(f"quant: task=calibrate needs a quantized scheme in static mode "
                          f"(got quant.scheme={qcfg.scheme}, quant.mode={qcfg.mode})")
    if int(cfg.eval.layer_stats_images) < 1:
        raise ConfigError("eval.layer_stats_images: task=calibrate calibrates at the start of the statistics pass "
                          "(layer_stats.csv over the first N FID images) and needs N >= 1, got "
                          f"{cfg.eval.layer_stats_images}")
    module, source = load_module(cfg)
    run = evaluation_settings(cfg, settings, source)
    dm = instantiate(cfg.data)
    check_before_generation(settings, module, dm, check_fid=False)
    # Under the trainer, as eval: its precision (bf16 autocast with bf16-mixed) and devices.
    trainer = build_trainer(cfg, [], build_callbacks(cfg, training=False))
    check_pass_launcher(trainer)
    run_folder.start()
    info = calibrate_in_pass(trainer, module, dm, run)
    if trainer.is_global_zero:
        print(f"calibration artefact: {info['calibration']['file']}\n"
              f"layer statistics: {run.run_dir / 'layer_stats.csv'}")
    return info


def numbers_depend_on(cfg: DictConfig, settings: RunSettings, section: str) -> dict:
    """What the measured numbers of a sensitivity or search run depend on (their digest
    guards resumed results): the model and its weights, sampler, hardware, quant,
    calibration, the FID settings (not where files go) and the task's own `section`."""
    plain = to_plain(cfg)
    checkpoint = cfg.ckpt_path
    parts = {key: plain.get(key) for key in ("model", "sampler", "eval_weights", section, "hardware", "seed")}
    parts.update(quant=settings.quant.to_dict(), calibration=dataclasses.asdict(settings.calibration),
                 checkpoint_sha256=sha256_file(checkpoint) if checkpoint else "shipped digits model")
    fid = dataclasses.asdict(settings.fid)  # what the images and their score depend on, not where files go
    fid["reference"] = {k: v for k, v in fid["reference"].items() if k != "cache_dir"}
    parts["fid"] = {k: v for k, v in fid.items() if k not in ("progress", "save_images", "export_npz")}
    return parts


def one_process_trainer(cfg: DictConfig):
    """The trainer of a task that keeps its state in one process (sensitivity, search),
    refused before the model loads when the run would span several."""
    trainer = build_trainer(cfg, [], build_callbacks(cfg, training=False))
    if trainer.world_size > 1:
        raise ConfigError(f"trainer: task={cfg.task} runs in one process (got {trainer.world_size}); use "
                          "trainer=cpu or trainer.devices=1")
    return trainer


def sensitivity(cfg: DictConfig, settings: RunSettings) -> dict:

    qcfg = settings.quant
    if not qcfg.quantizes:
        raise ConfigError("quant: task=sensitivity puts units on the hardware of quant; quant.scheme=fp has "
                          "none (choose quant=hybrid_w8a11, bitserial_w8a12, w8a8, ...)")
    plain = to_plain(cfg)
    sens = SensitivitySettings(**plain["sensitivity"])
    run_dir = Path(cfg.paths.output_dir)
    # Everything a unit's numbers depend on; a CSV of another configuration is refused.
    digest = config_digest(numbers_depend_on(cfg, settings, "sensitivity"))
    done = read_done(run_dir / CSV_NAME, digest)
    trainer = one_process_trainer(cfg)
    module, _ = load_module(cfg)
    dm = instantiate(cfg.data)
    check_before_generation(settings, module, dm, check_fid=sens.fid_images > 0)
    run_folder.start()
    run = SensitivityRun(settings=sens, quant=qcfg, fid=settings.fid, hardware=settings.hardware,
                         calibration=settings.calibration, run_dir=run_dir, digest=digest, done=done)
    attach(trainer, module)
    with torch.no_grad():
        summary = run_sensitivity(trainer, module, dm, run)
    print_sensitivity_summary(summary, run_dir / CSV_NAME)
    print(f"run directory: {run_dir}\nsensitivity: {run_dir / CSV_NAME}")
    return summary


def search(cfg: DictConfig, settings: RunSettings) -> dict:

    search_settings = parse_search(to_plain(cfg)["search"], settings.quant)
    if int(cfg.eval.layer_stats_images) < 1 and "energy" in search_settings.objectives:
        raise ConfigError("eval.layer_stats_images: the energy objective needs the per-layer statistics "
                          "(>= 1 image), got 0")
    run_dir = Path(cfg.paths.output_dir)
    # Left out: a rerun with more trials, or a re-evaluation of the front, continues the same study.
    parts = numbers_depend_on(cfg, settings, "search")
    parts["search"] = {k: v for k, v in parts["search"].items() if k not in ("n_trials", "front_fid_images")}
    parts["layer_stats_images"] = int(cfg.eval.layer_stats_images)
    digest = config_digest(parts)
    check_database(run_dir / DB_NAME, digest)
    trainer = one_process_trainer(cfg)
    module, source = load_module(cfg)
    dm = instantiate(cfg.data)
    check_before_generation(settings, module, dm, check_fid=True)
    check_patterns(search_settings, target_names(module.denoiser.net, settings.quant.targets))
    run_folder.start()
    run = SearchRun(settings=search_settings, quant=settings.quant, fid=settings.fid, hardware=settings.hardware,
                    calibration=settings.calibration, run_dir=run_dir, checkpoint=source,
                    layer_stats_images=int(cfg.eval.layer_stats_images), digest=digest, seed=int(cfg.seed))
    summary = run_search(trainer, module, dm, run)
    print_search_summary(summary)
    print(f"run directory: {run_dir}\nPareto front: {run_dir / 'pareto.csv'}")
    return summary


def check_output_folders(cfg: DictConfig) -> None:
    """Before any work: the output folder (and for eval the cache folder) is writable."""
    check_writable(Path(cfg.paths.output_dir))
    if cfg.task in (Task.eval, Task.sensitivity, Task.search):
        check_writable(Path(cfg.paths.cache_dir).expanduser())


TASKS = {Task.train: train, Task.eval: evaluate, Task.calibrate: calibrate, Task.export: export,
         Task.sensitivity: sensitivity, Task.search: search}


def dispatch(cfg: DictConfig):
    validate(cfg)
    configure_progress(cfg.progress_interval_s)
    if cfg.model.compile:
        reason = compile_available()
        if reason is not None:
            raise ConfigError(f"model.compile=true: {reason}; run with model.compile=false")
    settings = parse_settings(cfg)  # fails on a bad section before anything is loaded
    check_output_folders(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return TASKS[cfg.task](cfg, settings)


