"""Building the pieces a task composes from the run config: the module (from an official
or Lightning checkpoint), loggers, callbacks (fine-tuning's included), the trainer, the
checkpoint to resume (and the check that resuming changes no training setting)."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig

from jit.callbacks.hardware_aware import HardwareInTheLoop, TrainablePatterns
from jit.callbacks.progress import PlainTrainingProgress, TrainingProgressBar
from jit.checkpoint import (
    WEIGHT_KEYS,
    CheckpointError,
    lightning_weights,
    load_into,
    load_jit_checkpoint,
    safe_load,
)
from jit.checks import check_checkpoint_settings
from jit.config import ASSETS, ConfigError, to_plain
from jit.console import stdout_is_terminal
from jit.datamodules import DigitsDataModule
from jit.ema import WEIGHTS
from jit.module import JiTModule
from jit.quant import QuantConfig
from jit.settings import training_quant_config

if TYPE_CHECKING:
    from jit.settings import RunSettings

SHIPPED_DIGITS_MODEL = ASSETS / "digits_jit.pth"


def flat_hparams(cfg: DictConfig, quant: QuantConfig) -> dict:
    """Flat `section.key` hyper-parameters: quantization fields at top level for dashboards,
    those of `quant` (the run's parsed settings), since the config leaves scheme-dependent
    fields null (the scheme's default)."""
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
    plain["quant"] = {k: v for k, v in quant.to_dict().items() if k != "device"}
    for section in ("task", "seed", "ckpt_path", "eval_weights", "model", "quant", "calibration", "sampler", "fid",
                    "eval", "hardware", "device"):
        if section in plain:
            walk(section, plain[section])
    walk("data", {k: v for k, v in plain["data"].items() if k != "_target_"})
    return out


def build_loggers(cfg: DictConfig, quant: QuantConfig) -> list:
    loggers = []
    for node in (cfg.logger or {}).values():
        if node is not None:
            loggers.append(instantiate(node))
    hparams = flat_hparams(cfg, quant)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


def build_callbacks(cfg: DictConfig, training: bool) -> list:
    """The `callbacks` group serves training; eval and calibration show their own
    progress (generation, calibration passes), so their trainer gets none. Where stdout
    is not a terminal the training bar gives way to plain progress lines. Without a
    logger (logger=none) a LearningRateMonitor has nowhere to write, and Lightning refuses
    it at the start of training: it is left out."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if not training:
        return []

    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    if not stdout_is_terminal():  # a rich bar would show nothing until the end
        callbacks = [PlainTrainingProgress() if isinstance(c, TrainingProgressBar) else c for c in callbacks]
    if not any(node is not None for node in (cfg.logger or {}).values()):
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list) -> L.Trainer:
    # Without a progress-bar callback (eval) Lightning would add its default bar, a second
    # line beside the passes' own progress (images, rate, time left).
    progress_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                       enable_progress_bar=progress_bar, _convert_="all")


def checkpoint_kind(path: str | None, ckpt=None) -> str | None:
    """'lightning' for a Lightning .ckpt, 'official' for a checkpoint-last.pth, None for no
    path. `ckpt`: the file's contents if already read."""
    if path is None:
        return None
    if ckpt is None:
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
    return {"net": plain["model"]["net"], "denoiser": plain["model"]["denoiser"], "optim": plain["optim"],
            "ema": plain["ema"], "sampler": plain["sampler"], "eval_weights": plain["eval_weights"]}


def load_for_evaluation(path, kind: str, which: str, module_kwargs: Mapping | None = None,
                        ckpt: Mapping | None = None) -> JiTModule:
    """A JiTModule holding only the `which` weights (raw | ema1 | ema2) of a checkpoint.

    Evaluation needs one set of weights; a module with the raw weights and both EMAs holds
    three copies of the parameters. The file is memory-mapped and only the chosen tensors
    are read. `kind` is "lightning" (a .ckpt of JiTModule; its hyper-parameters build the
    module) or "official" (a checkpoint-last.pth; `module_kwargs` build the module).
    `ckpt`: the file's contents if the caller has read them (`safe_load`, memory-mapped).
    """
    if kind == "official":
        module = JiTModule(**{**(module_kwargs or {}), "hold_only": which})
        key = WEIGHT_KEYS[WEIGHTS.index(which)]  # raw -> model, ema1 -> model_ema1, ...
        state, _ = load_jit_checkpoint(path, key, ckpt)
        load_into(module.denoiser, state, source=f"{path}[{key!r}]")
        module.init_source = str(path)
        return module
    if ckpt is None:
        ckpt = safe_load(path, mmap=True)
    state = lightning_weights(ckpt, None if which == "raw" else WEIGHTS.index(which) - 1, str(path))
    module = JiTModule(**{**ckpt.get("hyper_parameters", {}), "init_checkpoint": None, "hold_only": which})
    load_into(module.denoiser, state, source=f"{path} ({which} weights)")
    module.init_source = ckpt.get("init_checkpoint")
    return module


def load_module(cfg: DictConfig) -> tuple[JiTModule, str]:
    """The module to evaluate/calibrate, with weights from ckpt_path or the shipped digits model."""
    path = cfg.ckpt_path
    if path is None:
        data_class = get_class(cfg.data._target_) if cfg.data.get("_target_") else None
        if cfg.model.net.name != "JiT-S/4" or not (
                isinstance(data_class, type) and issubclass(data_class, DigitsDataModule)):
            raise ConfigError("ckpt_path: required unless evaluating the shipped digits model "
                              "(model=jit_s4_digits data=digits)")
        if not SHIPPED_DIGITS_MODEL.exists():
            raise ConfigError(f"ckpt_path: the shipped digits model {SHIPPED_DIGITS_MODEL} is missing; "
                              "train one with `python run.py experiment=digits_train`")
        path = str(SHIPPED_DIGITS_MODEL)
    # Read once (memory-mapped: tensors load when used) for the kind, the settings check
    # and the weights.
    ckpt = safe_load(path, mmap=True)
    kind = checkpoint_kind(path, ckpt)
    if kind != "lightning":
        check_checkpoint_settings(cfg, path, ckpt)
    # Only the weights being evaluated are loaded, unless FID asks for others than the run.
    needed = {cfg.eval_weights, cfg.fid.get("eval_weights") or cfg.eval_weights}
    if len(needed) == 1:
        module = load_for_evaluation(path, kind, cfg.eval_weights, module_kwargs(cfg), ckpt)
    elif kind == "lightning":
        module = JiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    else:
        module = JiTModule(**module_kwargs(cfg), init_checkpoint=path, init_weights="model")
    plain = to_plain(cfg)
    # Evaluation settings come from this run's config, not from the checkpoint's hparams.
    module.eval_weights = plain["eval_weights"]
    module.sampler = dict(plain["sampler"])
    return module, path


def finalize_loggers(trainer, status: str = "success") -> None:
    for logger in trainer.loggers:
        logger.finalize(status)
    finish_wandb(0 if status == "success" else 1)


def finish_wandb(exit_code: int) -> None:
    """Close the wandb run of this job (offline runs write their files on finish)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


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


def finetune_callbacks(cfg: DictConfig, run: RunSettings) -> list:
    """The hardware in the training loop (finetune.hardware_aware), or freezing alone."""
    settings = run.finetune
    if not settings.hardware_aware:
        return [] if settings.trainable == ("*",) else [TrainablePatterns(settings.trainable)]
    return [HardwareInTheLoop(training_quant_config(run.quant, settings), run.calibration,
                              settings.trainable, settings.recalibrate_every_n_steps,
                              run_dir=cfg.paths.output_dir)]


# ----------------------------------------------------------------------------- resuming
# What a resumed training must share with the run it continues: the sections below, less
# the data keys that change how the data is read but not which data (loader workers,
# where the same files lie).
RESUME_SECTIONS = ("data", "optim", "ema", "model.net", "model.denoiser")
RESUME_FREE_DATA_KEYS = ("num_workers", "pin_memory", "persistent_workers", "root", "verify_images")
RESUME_SETTINGS_KEY = "jit_resume_settings"


def _flat(prefix: str, node, out: dict) -> dict:
    if isinstance(node, dict):
        for key, value in node.items():
            _flat(f"{prefix}.{key}", value, out)
    else:
        out[prefix] = list(node) if isinstance(node, (list, tuple)) else node
    return out


def resume_settings(cfg: DictConfig) -> dict:
    """The training settings a checkpoint records, as flat `section.key` values."""
    plain = to_plain(cfg)
    out: dict = {}
    for section in RESUME_SECTIONS:
        node = plain
        for part in section.split("."):
            node = node[part]
        if section == "data":
            node = {k: v for k, v in node.items() if k not in RESUME_FREE_DATA_KEYS}
        _flat(section, node, out)
    return out


def _settings_from_hparams(hparams: dict) -> dict:
    """What a checkpoint written before run settings were recorded still tells: the
    module's hyper-parameters (model, optimizer, EMA; no data settings)."""
    out: dict = {}
    for section, key in (("model.net", "net"), ("model.denoiser", "denoiser"), ("optim", "optim"),
                         ("ema", "ema")):
        _flat(section, {k: v for k, v in (hparams.get(key) or {}).items() if k != "batch_size"}, out)
    return out


class RecordResumeSettings(L.Callback):
    """Stores the run's training settings in every checkpoint, for the check on resume."""

    def __init__(self, settings: dict):
        self.settings = settings

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RESUME_SETTINGS_KEY] = self.settings


def check_resume_settings(cfg: DictConfig, ckpt_path: str, ckpt=None) -> None:
    """Refuse a resume whose data, optimizer, EMA or model settings differ from the
    checkpoint's, naming every changed key, unless resume.allow_changes lists it."""
    from lightning.pytorch.utilities import rank_zero_warn

    allowed = list(cfg.resume.allow_changes)
    if ckpt is None:
        ckpt = safe_load(ckpt_path, mmap=True)
    ours = resume_settings(cfg)
    stored = ckpt.get(RESUME_SETTINGS_KEY)
    if stored is None:
        stored = _settings_from_hparams(ckpt.get("hyper_parameters") or {})
        rank_zero_warn(f"{ckpt_path} records no data settings (written by an earlier version): only the "
                       "model, optimizer and EMA settings are compared with this run's")
    for pattern in allowed:
        if not any(fnmatch.fnmatchcase(key, pattern) for key in ours):
            raise ConfigError(f"resume.allow_changes: {pattern!r} names none of the settings compared on "
                              f"resume (keys under {', '.join(RESUME_SECTIONS)})")
    changed = [key for key in sorted(set(stored) | set(ours))
               if key in stored and stored[key] != ours.get(key)
               and not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed)]
    if changed:
        listed = ", ".join(f"{key} ({stored[key]!r} -> {ours.get(key)!r})" for key in changed)
        raise ConfigError(f"ckpt_path={ckpt_path}: resuming would change {listed}; a resumed run continues "
                          f"the same training (start a new run, or allow the change with "
                          f"resume.allow_changes=[{','.join(changed)}])")
