"""The run configuration parsed once into typed settings.

`jit.tasks.dispatch` parses every section a task computes with, right after the schema
check (jit/config.py) and before any model or data work; the tasks, and everything they
call, take these objects and never parse those sections again. Each type validates its
own section and names the key it rejects:

    quant        jit.quant.QuantConfig                     jit/quant/config.py
    device       jit.quant.DeviceConfig, as quant.device   jit/quant/config.py
    calibration  jit.evaluation.calibration.CalibrationConfig
    fid          jit.evaluation.fid.FIDConfig
    hardware     jit.hardware.HardwareConfig               jit/hardware/config.py
    finetune     FinetuneSettings (below)                  checked against task and quant

The sections Lightning and Hydra build objects from (data, trainer, logger, callbacks)
are instantiated by jit/builders.py instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from jit.config import ConfigError, to_plain
from jit.evaluation.calibration import CalibrationConfig
from jit.evaluation.fid import FIDConfig
from jit.hardware import HardwareConfig, build_hardware_config
from jit.quant import QuantConfig, build_quant_config
from jit.quant import device as device_model


@dataclass(frozen=True)
class RunSettings:
    quant: QuantConfig
    calibration: CalibrationConfig
    fid: FIDConfig
    hardware: HardwareConfig
    finetune: FinetuneSettings


def parse_settings(cfg: DictConfig) -> RunSettings:
    """Every section a task computes with, validated, in one pass."""
    quant = build_quant_config(cfg.quant, device=cfg.get("device"))
    if quant.allow_foreign_calibration and quant.calibration_file is None:
        raise ConfigError("quant.allow_foreign_calibration=true applies to a quant.calibration_file, and "
                          "none is given (drop the setting, or name the artefact to apply)")
    return RunSettings(
        quant=quant,
        calibration=CalibrationConfig.from_any(cfg.calibration),
        fid=FIDConfig.from_any(cfg.fid),
        hardware=build_hardware_config(cfg.hardware),
        finetune=settings_from(cfg, quant),
    )


def merged(base: Mapping, override: Mapping) -> dict:
    """`base` with `override` merged in depth, as plain containers."""
    return OmegaConf.to_container(OmegaConf.merge(base, override))


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The validated `finetune` section (defaults and allowed values: jit.config.FinetuneSchema)."""

    init_weights: str
    trainable: tuple[str, ...]
    hardware_aware: bool
    noise_sigma_lsb: float | None
    ranges: str | None
    recalibrate_every_n_steps: int
    compare: tuple[dict, ...]


def settings_from(cfg: DictConfig, quant) -> FinetuneSettings:
    """Parse `cfg.finetune` once, with the checks that depend on the task and on `quant`
    (the run's parsed QuantConfig)."""
    plain = to_plain(cfg)
    ft = plain["finetune"]
    qcfg = None
    hardware_only = {"noise_sigma_lsb": None, "ranges": None, "recalibrate_every_n_steps": 0}
    if ft["hardware_aware"]:
        if str(plain["task"]) != "train":
            raise ConfigError(f"finetune.hardware_aware: applies to task=train only (got task={plain['task']})")
        qcfg = quant
        if not qcfg.quantizes:
            raise ConfigError("finetune.hardware_aware=true needs a quantized scheme: choose quant=hybrid_w8a11, "
                              "bitserial_w8a12, w8a8, ... (got quant.scheme=fp)")
    else:
        for key, default in hardware_only.items():
            if ft[key] != default:
                raise ConfigError(f"finetune.{key}: only used with finetune.hardware_aware=true")
    ranges = ft["ranges"] or (qcfg.mode if qcfg is not None else None)
    if ft["recalibrate_every_n_steps"] and ranges != "static":
        raise ConfigError("finetune.recalibrate_every_n_steps: only used with static ranges while training "
                          f"(finetune.ranges=static, or quant.mode=static); the ranges are {ranges}")
    if ft["compare"]:
        for i, point in enumerate(ft["compare"]):  # checked now, not after hours of training
            try:
                build_quant_config(merged(plain["quant"], point))
            except ValueError as err:
                raise ConfigError(f"finetune.compare[{i}]: {err}") from err
        if str(plain["task"]) != "train":
            raise ConfigError(f"finetune.compare: applies to task=train only (got task={plain['task']})")
        if plain["ckpt_path"] is None:
            raise ConfigError("finetune.compare: needs a start checkpoint to compare with (ckpt_path=...)")
    return FinetuneSettings(
        init_weights=ft["init_weights"],
        trainable=tuple(ft["trainable"]),
        hardware_aware=bool(ft["hardware_aware"]),
        noise_sigma_lsb=ft["noise_sigma_lsb"],
        ranges=ranges,
        recalibrate_every_n_steps=int(ft["recalibrate_every_n_steps"]),
        compare=tuple(dict(p) for p in ft["compare"]),
    )


def training_quant_config(quant, settings: FinetuneSettings):
    """The hardware the training forward runs: `quant` with the training noise and ranges."""
    plain = build_quant_config(quant).to_dict()
    if settings.ranges is not None:
        plain["mode"] = settings.ranges
    if settings.noise_sigma_lsb is not None:
        plain["adc"]["noise_sigma_lsb"] = settings.noise_sigma_lsb
    if plain["mode"] == "dynamic":
        plain["calibration_file"] = None  # dynamic ranges follow the weights as they train
    # The devices inject their programming noise alone, a fresh draw per step (the
    # HardwareInTheLoop callback keys it on the step): the weights learn to tolerate it.
    plain["device"] = device_model.training_draw(build_quant_config(quant).device)
    return build_quant_config(plain)
