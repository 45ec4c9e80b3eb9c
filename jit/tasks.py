"""What `run.py` dispatches to: train, eval, calibrate, export.

Each task validates everything it can before building a model or touching data, then
composes the pieces (data module, JiTModule, quantization, callbacks, Lightning trainer).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from jit.checkpoint import CheckpointError, safe_load, save_official_checkpoint
from jit.config import ASSETS, ConfigError, Task, to_plain, validate
from jit.module import JiTModule, load_for_evaluation

SHIPPED_DIGITS_MODEL = ASSETS / "digits_jit.pth"


# ----------------------------------------------------------------------------- building
def quant_config(cfg: DictConfig):
    from jit.quant import build_quant_config

    return build_quant_config(cfg.quant)


def flat_hparams(cfg: DictConfig) -> dict:
    """Flat `section.key` hyper-parameters: quantization fields at top level for dashboards."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                if not str(k).startswith("_"):
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            out[prefix] = str(list(node))
        else:
            out[prefix] = node

    plain = to_plain(cfg)
    for section in ("task", "seed", "ckpt_path", "eval_weights", "model", "quant", "calibration", "sampler", "fid",
                    "eval", "hardware"):
        if section in plain:
            walk(section, plain[section])
    walk("data", {k: v for k, v in plain["data"].items() if k != "_target_"})
    return out


def sweep_group(cfg: DictConfig) -> str | None:
    """Jobs of one multirun share a group named after the sweep directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except (ValueError, ImportError):
        pass
    return None


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, node in (cfg.logger or {}).items():
        if node is None:
            continue
        kwargs = {}
        if "Wandb" in str(node.get("_target_", "")) and node.get("group") is None:
            kwargs["group"] = sweep_group(cfg)
        loggers.append(instantiate(node, **kwargs))
    hparams = flat_hparams(cfg)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


def build_callbacks(cfg: DictConfig, training: bool) -> list:
    """The `callbacks` group serves training; eval and calibration show their own
    progress (generation, calibration passes), so their trainer gets none."""
    if not training:
        return []
    return [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list) -> L.Trainer:
    # Without a progress-bar callback (eval) Lightning would add its default bar, which
    # shows only the one-step dummy test loop the evaluation runs in.
    progress_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                       enable_progress_bar=progress_bar, _convert_="all")


def checkpoint_kind(path: str | None) -> str | None:
    """'lightning' for a Lightning .ckpt, 'official' for a checkpoint-last.pth, None for no path."""
    if path is None:
        return None
    ckpt = safe_load(path, mmap=True)  # a peek at the keys: no need to read GBs of tensors
    if "state_dict" in ckpt and "pytorch-lightning_version" in ckpt:
        return "lightning"
    if "model" in ckpt:
        return "official"
    raise CheckpointError(
        f"{path} is neither a Lightning checkpoint nor an official JiT checkpoint; found keys {sorted(map(str, ckpt))[:10]}"
    )


def module_kwargs(cfg: DictConfig) -> dict:
    plain = to_plain(cfg)
    return dict(net=plain["model"]["net"], denoiser=plain["model"]["denoiser"], optim=plain["optim"],
                ema=plain["ema"], sampler=plain["sampler"], eval_weights=plain["eval_weights"])


def load_module(cfg: DictConfig) -> tuple[JiTModule, str]:
    """The module to evaluate/calibrate, with weights from ckpt_path or the shipped digits model."""
    path = cfg.ckpt_path
    if path is None:
        if cfg.model.net.name != "JiT-S/4" or not str(cfg.data.get("_target_", "")).endswith("DigitsDataModule"):
            raise ConfigError("ckpt_path: required unless evaluating the shipped digits model "
                              "(model=jit_s4_digits data=digits)")
        if not SHIPPED_DIGITS_MODEL.exists():
            raise ConfigError(f"ckpt_path: the shipped digits model {SHIPPED_DIGITS_MODEL} is missing; "
                              "train one with `python run.py experiment=digits_train`")
        path = str(SHIPPED_DIGITS_MODEL)
    kind = checkpoint_kind(path)
    if kind != "lightning":
        check_checkpoint_settings(cfg, path)
    # Only the weights being evaluated are loaded, unless FID asks for others than the run.
    needed = {cfg.eval_weights, cfg.fid.get("eval_weights") or cfg.eval_weights}
    if len(needed) == 1:
        module = load_for_evaluation(path, kind, cfg.eval_weights, module_kwargs(cfg))
    elif kind == "lightning":
        module = JiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    else:
        module = JiTModule(**module_kwargs(cfg), init_checkpoint=path, init_weights="model")
    plain = to_plain(cfg)
    # Evaluation settings come from this run's config, not from the checkpoint's hparams.
    module.eval_weights = plain["eval_weights"]
    module.sampler = dict(plain["sampler"])
    return module, path


def check_checkpoint_settings(cfg: DictConfig, path: str) -> None:
    """An official checkpoint's generation settings (resolution, classes, noise_scale, t_eps)
    must be the config's: sampling a 512-px model with noise_scale 1.0 runs fine and gives a
    wrong FID. `model.override_checkpoint_args=true` keeps the config's values."""
    from jit.checkpoint import generation_settings

    trained = generation_settings(path)
    differ = {}
    for key, value in trained.items():
        configured = OmegaConf.select(cfg, key)
        same = (math.isclose(float(configured), float(value)) if isinstance(value, (int, float))
                and not isinstance(value, bool) else configured == value)
        if not same:
            differ[key] = (value, configured)
    if not differ:
        return
    theirs = " ".join(f"{k}={v}" for k, (v, _) in differ.items())
    ours = " ".join(f"{k}={c}" for k, (_, c) in differ.items())
    if cfg.model.override_checkpoint_args:
        rank_zero_info(f"model.override_checkpoint_args=true: generating with {ours}, although {path} "
                       f"was trained with {theirs}")
        return
    raise ConfigError(f"ckpt_path: {path} was trained with {theirs}, but the config has {ours}; add the "
                      f"overrides {theirs} (or model.override_checkpoint_args=true to keep the config's values)")


def check_calibration_inputs(cfg: DictConfig, qcfg, dm) -> None:
    """Static calibration on data needs enough images in the calibration split: check first."""
    if uses_data_for_calibration(cfg, qcfg):
        num_images = cfg.calibration.num_images
        available = len(dm.split_dataset("calibration"))
        if num_images > available:
            raise ConfigError(f"calibration.num_images={num_images} exceeds the {available} images of the "
                              f"calibration split (raise data.calib_num_images)")


def uses_data_for_calibration(cfg: DictConfig, qcfg) -> bool:
    from jit.evaluation.calibration import CalibrationConfig

    if qcfg.scheme == "fp" or qcfg.mode != "static" or qcfg.calibration_file is not None:
        return False
    return CalibrationConfig.from_any(to_plain(cfg.calibration)).source == "data"


def check_reference(fid_cfg, module: JiTModule, dm) -> None:
    """The feature extractor loads (weights present and safe) and the reference statistics
    fit it: a stats file is read, a data split is listed and its class count checked."""
    from jit.evaluation.fid import check_data_classes
    from jit.metrics.features import INCEPTION, create_feature_space
    from jit.metrics.reference import ReferenceStatsError, load_reference_stats

    weights = fid_cfg.inception_weights if fid_cfg.extractor == INCEPTION else fid_cfg.extractor_weights
    space = create_feature_space(fid_cfg.extractor, weights, probe_size=module.denoiser.img_size)
    stats_file = fid_cfg.reference.get("stats_file")
    if stats_file:
        load_reference_stats(stats_file, space, reduce_images=False)
        return
    check_data_classes(module.denoiser.num_classes, dm)
    split = fid_cfg.reference.get("split", "reference")
    available = len(dm.split_dataset(split))
    if available < 2:
        raise ReferenceStatsError(f"fid.reference.split={split}: the data holds {available} image(s); "
                                  "reference statistics need at least 2 (or give fid.reference.stats_file)")


def check_before_generation(cfg: DictConfig, qcfg, module: JiTModule, dm, fid_cfg=None) -> None:
    """Inputs that would otherwise fail only after the float baseline, the calibration, the
    per-layer statistics or the whole generation: calibration data and file, quantization
    targets, the feature extractor, reference statistics, the data's class count against the
    model's. Raises with the key or file named."""
    from jit.evaluation.fid import check_data_classes
    from jit.quant import artefact, target_names

    if uses_data_for_calibration(cfg, qcfg):
        check_data_classes(module.denoiser.num_classes, dm)
    check_calibration_inputs(cfg, qcfg, dm)
    targets = target_names(module.denoiser.net, qcfg.targets)
    if qcfg.calibration_file is not None:
        if qcfg.scheme == "fp" or qcfg.mode != "static":
            raise ConfigError(f"quant.calibration_file: only static mode uses it; with quant.scheme="
                              f"{qcfg.scheme} quant.mode={qcfg.mode} it would be ignored (set "
                              "quant.mode=static or drop quant.calibration_file)")
        if not Path(qcfg.calibration_file).is_file():
            raise ConfigError(f"quant.calibration_file: no such file: {qcfg.calibration_file}")
        artefact.check_fits(artefact.load(qcfg.calibration_file), dict.fromkeys(targets), lambda _: qcfg)
    if fid_cfg is not None:
        check_reference(fid_cfg, module, dm)


# -------------------------------------------------------------------------------- tasks
# What a training stopped by SIGTERM exits with, after saving last.ckpt: 128 + 15, as a shell
# reports a process that SIGTERM ended. Not 0 (finished) nor 1/2 (failed, or bad input).
EXIT_INTERRUPTED = 128 + 15


def checkpoint_dir(cfg: DictConfig) -> Path:
    node = (cfg.callbacks or {}).get("checkpoint")
    dirpath = node.get("dirpath") if node is not None else None
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def latest_checkpoint(folder: Path) -> str:
    """`ckpt_path=last`: the newest last*.ckpt of the run's checkpoint folder (as Lightning picks)."""
    found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise ConfigError(f"ckpt_path=last: no last*.ckpt in {folder}; name the run directory to resume "
                          "with hydra.run.dir=<that directory>")
    return str(found[-1])


def train(cfg: DictConfig) -> dict:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from jit.atomic import remove_stale_temporaries
    from jit.finetune import compare_after_training, settings_from

    settings = settings_from(cfg)
    ckpt_path = latest_checkpoint(checkpoint_dir(cfg)) if cfg.ckpt_path == "last" else cfg.ckpt_path
    kind = checkpoint_kind(ckpt_path)
    dm = instantiate(cfg.data)
    module = JiTModule(**module_kwargs(cfg), init_checkpoint=ckpt_path if kind == "official" else None,
                       init_weights=settings.init_weights)
    callbacks = build_callbacks(cfg, training=True) + finetune_callbacks(cfg, settings)
    trainer = build_trainer(cfg, build_loggers(cfg), callbacks)
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
        result["comparison"] = compare_after_training(cfg, settings, module.init_source, str(out))
    return result


def finetune_callbacks(cfg: DictConfig, settings) -> list:
    """The hardware in the training loop (finetune.hardware_aware), or freezing alone."""
    from jit.callbacks.hardware_aware import HardwareInTheLoop, TrainablePatterns
    from jit.finetune import training_quant_config

    if not settings.hardware_aware:
        return [] if settings.trainable == ("*",) else [TrainablePatterns(settings.trainable)]
    return [HardwareInTheLoop(training_quant_config(cfg.quant, settings), to_plain(cfg.calibration),
                              settings.trainable, settings.recalibrate_every_n_steps,
                              run_dir=cfg.paths.output_dir)]


def export(cfg: DictConfig) -> dict:
    from jit.train import export_official

    if checkpoint_kind(cfg.ckpt_path) != "lightning":
        raise ConfigError(f"ckpt_path: task=export converts a Lightning .ckpt; {cfg.ckpt_path} is not one")
    out = cfg.export.out_path or str(Path(cfg.paths.output_dir) / "checkpoint-last.pth")
    export_official(cfg.ckpt_path, out)
    print(f"official-layout checkpoint written: {out}")
    return {"checkpoint": out}


class RunAtTestStart(L.Callback):
    """Runs `fn(trainer, module)` once `trainer.test` has set up every process and device."""

    def __init__(self, fn):
        self.fn = fn
        self.result = None

    def on_test_start(self, trainer, pl_module) -> None:
        self.result = self.fn(trainer, pl_module)


def run_in_test_loop(trainer: L.Trainer, module: JiTModule, fn):
    """Execute `fn` under `trainer.test`: one process per device (DDP, SLURM, torchrun) or inline."""
    from torch.utils.data import DataLoader

    hook = RunAtTestStart(fn)
    trainer.callbacks.append(hook)
    trainer.test(module, dataloaders=DataLoader([0]), verbose=False)
    return hook.result


def evaluate(cfg: DictConfig) -> dict:
    from jit.evaluation.fid import FIDConfig
    from jit.evaluation.pipeline import EvaluationSettings, evaluate_float_then_quantized
    from jit.hardware import build_hardware_config

    qcfg, fid_cfg = quant_config(cfg), FIDConfig.from_any(cfg.fid)  # validated before any work
    hardware = build_hardware_config(cfg.hardware)
    module, source = load_module(cfg)
    run = EvaluationSettings(
        quant=qcfg, fid=fid_cfg, hardware=hardware, calibration=to_plain(cfg.calibration),
        run_dir=Path(cfg.paths.output_dir), checkpoint=source, compare_fp=bool(cfg.compare_fp),
        layer_stats_images=int(cfg.eval.layer_stats_images),
        compile_backbone=bool(cfg.model.compile))
    dm = instantiate(cfg.data)
    check_before_generation(cfg, run.quant, module, dm, run.fid)
    trainer = build_trainer(cfg, build_loggers(cfg), build_callbacks(cfg, training=False))
    results = run_in_test_loop(trainer, module, lambda trainer, module: evaluate_float_then_quantized(
        trainer, module, dm, run))
    finalize_loggers(trainer)
    if trainer.is_global_zero:
        print(f"run directory: {run.run_dir}\nresults: {run.run_dir / 'results.json'}")
    return results


def calibrate(cfg: DictConfig) -> dict:
    from jit.evaluation.pipeline import prepare_quantized

    qcfg = quant_config(cfg)
    if qcfg.scheme == "fp" or qcfg.mode != "static":
        raise ConfigError(f"quant: task=calibrate needs a quantized scheme in static mode "
                          f"(got quant.scheme={qcfg.scheme}, quant.mode={qcfg.mode})")
    run_dir = Path(cfg.paths.output_dir)
    module, _ = load_module(cfg)
    dm = instantiate(cfg.data)
    check_before_generation(cfg, qcfg, module, dm)
    # Under the trainer, as eval: its precision (bf16 autocast with bf16-mixed) and devices.
    trainer = build_trainer(cfg, [], build_callbacks(cfg, training=False))
    info = run_in_test_loop(trainer, module, lambda trainer, module: prepare_quantized(
        module, qcfg, to_plain(cfg.calibration), dm, run_dir, trainer))
    if trainer.is_global_zero:
        print(f"calibration artefact: {info['calibration']['file']}")
    return info


def finalize_loggers(trainer, status: str = "success") -> None:
    for logger in trainer.loggers:
        logger.finalize(status)
    finish_wandb(0 if status == "success" else 1)


def finish_wandb(exit_code: int) -> None:
    """Close the wandb run of this job (offline runs write their files on finish)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


TASKS = {Task.train: train, Task.eval: evaluate, Task.calibrate: calibrate, Task.export: export}


def dispatch(cfg: DictConfig):
    from jit.finetune import settings_from

    validate(cfg)
    if cfg.model.compile:
        from jit.models.compile import compile_available

        reason = compile_available()
        if reason is not None:
            raise ConfigError(f"model.compile=true: {reason}; run with model.compile=false")
    settings_from(cfg)  # finetune.* against task and quant, for every task
    if cfg.task != Task.train:
        quant_config(cfg)  # fail on quant.* before loading anything
    prepare_run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return TASKS[cfg.task](cfg)


# ---------------------------------------------------------------------- error handling
def _user_error_types() -> tuple[type, ...]:
    """Errors that mean bad input (config, paths, files): one line, no traceback wall."""
    from jit.datamodules import CorruptImageError
    from jit.metrics.features import FeatureExtractorError

    return (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError, NotADirectoryError,
            PermissionError, CorruptImageError, FeatureExtractorError)


# What an eval/calibrate run writes into its folder. A new run in the same folder removes
# these first, so one folder never mixes two runs; training outputs (checkpoints, logger
# folders) stay, since a resumed run continues them.
RUN_OUTPUTS = ("results.json", "failed.json", "layer_stats.csv", "calibration.pt", "coverage.csv",
               "sample_grid.png", "samples.npz", "samples", "baseline_fp")


def _config_paths(node) -> set[Path]:
    """Every string of the config read as a path: files the run reads must not be removed."""
    if isinstance(node, dict):
        return set().union(*(_config_paths(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_config_paths(v) for v in node))
    return {Path(node).expanduser().resolve()} if isinstance(node, str) and node else set()


def prepare_run_dir(cfg: DictConfig) -> None:
    """Before any work: the output folder (and for eval the cache folder) is writable, and
    the run folder holds no outputs of an earlier run, except files this run reads."""
    import shutil

    from jit.atomic import check_writable

    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir)
    if cfg.task == Task.eval:
        check_writable(Path(cfg.paths.cache_dir).expanduser())
    if rank_zero_only.rank != 0:  # DDP/SLURM ranks start the same job: one of them clears
        return
    inputs = _config_paths(to_plain(cfg))
    for path in [run_dir / name for name in RUN_OUTPUTS] + list(run_dir.glob(".samples.rank*.u8")):
        if path.resolve() in inputs or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _files_hydra_wrote(run_dir: Path) -> list[Path]:
    """What Hydra put into the run folder for this job: the saved config (rewritten for every
    job) and the job log, unless that log already held lines of an earlier run."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:
        hc = HydraConfig.get()
    except ValueError:  # called without Hydra (tests, scripts)
        return []
    files = []
    if hc.output_subdir is not None:
        files += [run_dir / hc.output_subdir / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    log = OmegaConf.select(hc, "job_logging.handlers.file.filename", default=None)
    if log and Path(log).is_file() and Path(log).stat().st_size == 0:
        files.append(Path(log))
    return files


def _remove_files_of_failed_run(run_dir: Path, created: list[Path]) -> None:
    """Delete what this run created, then the folders that are left empty; nothing else."""
    for path in created:
        path.unlink(missing_ok=True)
    for folder in sorted({p.parent for p in created} | {run_dir}, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass


def _one_line_error(err: BaseException, run_dir: Path) -> str | None:
    """The message of bad input, a full disk or an unwritable path; None for anything else."""
    from jit.atomic import OutputWriteError, write_error

    # PermissionError may come from reading an input: its own message names the file.
    if isinstance(err, OSError) and not isinstance(err, PermissionError):
        mapped = write_error(err, err.filename or run_dir)
        if isinstance(mapped, OutputWriteError):
            return str(mapped)
    if isinstance(err, _user_error_types()):
        return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return None


def main(cfg: DictConfig):
    """Run one job; bad input, a full disk or an unwritable path end it with one clear line.

    A single run then exits with code 2, after deleting only the files Hydra created for it
    (the run folder too if that leaves it empty). In a multirun a failing job, whatever the
    exception, records `failed.json` in its folder and returns, so the other jobs carry on;
    the sweep summary lists the failure and the multirun exits non-zero (jit.sweep).
    """
    from jit.console import quiet_dependencies

    quiet_dependencies()
    run_dir = Path(cfg.paths.output_dir)
    multirun = sweep_group(cfg) is not None
    created = _files_hydra_wrote(run_dir)
    try:
        if multirun:  # a reused sweep folder: this job's folder must not show an earlier sweep's rows
            from jit.sweep import mark_sweep_job

            prepare_run_dir(cfg)
            mark_sweep_job(run_dir)
        return dispatch(cfg)
    except Exception as err:
        finish_wandb(1)  # a crashed job must not leave its run open for the next job of a sweep
        message = _one_line_error(err, run_dir)
        if message is None and not multirun:
            raise
        import logging
        import traceback

        trace = "".join(traceback.format_exception(err))
        logging.getLogger("jit").debug(trace)
        if multirun:
            from jit.evaluation.fid import write_json_atomic

            if message is None:  # not bad input: keep the traceback for the user
                print(trace, file=sys.stderr)
                message = " ".join(str(err).split())
            try:
                write_json_atomic({"status": "failed", "error": f"{type(err).__name__}: {message}"},
                                  run_dir / "failed.json")
            except OSError as write_err:
                print(f"could not record the failure: {write_err}", file=sys.stderr)
            print(f"job failed: {message}", file=sys.stderr)
            return None
        print(f"error: {message}", file=sys.stderr)
        _remove_files_of_failed_run(run_dir, created)
        sys.exit(2)
    except BaseException:
        finish_wandb(1)
        raise
