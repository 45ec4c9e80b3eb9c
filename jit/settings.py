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
    finetune     jit.finetune.FinetuneSettings             checked against task and quant

The sections Lightning and Hydra build objects from (data, trainer, logger, callbacks)
are instantiated by jit/builders.py instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:  # the modules below import torch and Lightning: loaded when parsing
    from jit.evaluation.calibration import CalibrationConfig
    from jit.evaluation.fid import FIDConfig
    from jit.finetune import FinetuneSettings
    from jit.hardware import HardwareConfig
    from jit.quant import QuantConfig


@dataclass(frozen=True)
class RunSettings:
    quant: QuantConfig
    calibration: CalibrationConfig
    fid: FIDConfig
    hardware: HardwareConfig
    finetune: FinetuneSettings


def parse_settings(cfg: DictConfig) -> RunSettings:
    """Every section a task computes with, validated, in one pass."""
    from jit.evaluation.calibration import CalibrationConfig
    from jit.evaluation.fid import FIDConfig
    from jit.finetune import settings_from
    from jit.hardware import build_hardware_config
    from jit.quant import build_quant_config

    quant = build_quant_config(cfg.quant, device=cfg.get("device"))
    return RunSettings(
        quant=quant,
        calibration=CalibrationConfig.from_any(cfg.calibration),
        fid=FIDConfig.from_any(cfg.fid),
        hardware=build_hardware_config(cfg.hardware),
        finetune=settings_from(cfg, quant),
    )
