"""Hardware in the training loop: the Lightning side of `finetune.hardware_aware=true`.

`setup` quantizes the backbone in place (the quantized layers share the float layers'
Parameters, so the optimizer, the EMAs and every checkpoint see the same tensors under the
same names) and freezes the parameters `finetune.trainable` leaves out, before Lightning
builds the optimizer. Thermal noise is keyed on the global sample ids the module's
`training_step` passes to `jit.quant.sample_context`, so a step draws the same noise at
any process count and after a resume.

With static ranges the thresholds come from `calibration.*` on the current raw weights:
at the start, and every `recalibrate_every_n_steps` steps. They are part of the
callback's state in every Lightning checkpoint, so a resumed run uses the thresholds the
interrupted one had instead of calibrating again from weights it has moved on from.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from jit.config import ConfigError
from jit.evaluation.calibration import run_calibration
from jit.quant import artefact as art
from jit.quant import quantize_model, quantized_layers


def freeze_all_but(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter whose name matches none of `patterns`; return the trained names.

    A pattern that matches nothing is an error naming `finetune.trainable` and some names.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"finetune.trainable: pattern {pattern!r} matches no parameter; "
                              f"names look like {names[:3] + names[-2:]}")
    trained = []
    for name, param in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(keep)
        if keep:
            trained.append(name)
    return trained


class TrainablePatterns(L.Callback):
    """Freeze the Denoiser parameters no `finetune.trainable` pattern matches, before the
    optimizer is built (its parameter groups skip frozen tensors)."""

    def __init__(self, trainable=("*",)):
        self.trainable = tuple(trainable)
        self.trained: list[str] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.trained is None:
            self.trained = freeze_all_but(pl_module.denoiser, self.trainable)
            total = sum(1 for _ in pl_module.denoiser.parameters())
            rank_zero_info(f"{len(self.trained)} of {total} parameter tensors train")


class HardwareInTheLoop(TrainablePatterns):
    """Train `pl_module.denoiser` through the simulated hardware of `quant`.

    quant:       the training QuantConfig (jit.settings.training_quant_config).
    calibration: the `calibration` section, used in static mode.
    trainable:   fnmatch patterns of the Denoiser parameters that train.
    recalibrate_every_n_steps: static mode: recalibrate at global steps N, 2N, ...; 0: never.
    run_dir:     where calibration.pt and coverage.csv of the latest calibration go.
    """

    def __init__(self, quant, calibration, trainable=("*",), recalibrate_every_n_steps: int = 0,
                 run_dir: str | Path = "."):
        super().__init__(trainable)
        self.quant = quant
        self.calibration = calibration
        self.recalibrate_every_n_steps = int(recalibrate_every_n_steps)
        self.run_dir = Path(run_dir)
        self.quantized: list[str] = []
        self.artefact: dict | None = None
        self.calibrated_at_step: int | None = None

    @property
    def static(self) -> bool:
        return self.quant.mode == "static"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.quantized:
            return
        self.quantized = quantize_model(pl_module.denoiser.net, self.quant)
        c = self.quant
        device = (f", {c.device.preset} programming noise x{c.device.programming_noise_scale:g}"
                  if c.device.programming_noise else "")
        rank_zero_info(f"hardware-aware training: {len(self.quantized)} layers {c.scheme} {c.mode}, "
                       f"ADC {'bypass' if c.adc.bypass else c.adc.bits}, noise {c.adc.noise_sigma_lsb:g} LSB"
                       f"{device}")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.static:
            return
        if self.artefact is not None:  # restored from the checkpoint being resumed
            # Calibrated at an earlier step of this training: the weights have moved since,
            # as they do between recalibrations, so its digest cannot match.
            art.apply(self.artefact, pl_module.denoiser.net, allow_foreign_weights=True)
        else:
            self._calibrate(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        n, step = self.recalibrate_every_n_steps, trainer.global_step
        if self.quant.device.programming_noise:  # a fresh programming of the arrays per step
            for layer in quantized_layers(pl_module.denoiser.net).values():
                layer.programming_draw = step
        if self.static and n and step and step % n == 0 and self.calibrated_at_step != step:
            self._calibrate(trainer, pl_module)

    def _calibrate(self, trainer, pl_module) -> None:

        denoiser = pl_module.denoiser
        was_training = denoiser.training
        denoiser.eval()  # no dropout in the activations the thresholds are taken from
        try:
            outcome = run_calibration(pl_module, self.quant, self.calibration, self.run_dir,
                                      datamodule=trainer.datamodule, sampler=pl_module.sampler,
                                      eval_weights="raw")
        finally:
            denoiser.train(was_training)
        self.artefact = outcome.artefact
        self.calibrated_at_step = trainer.global_step
        rank_zero_info(f"hardware-aware training: calibrated static ranges at step {trainer.global_step}")

    def state_dict(self) -> dict:
        return {"artefact": self.artefact, "calibrated_at_step": self.calibrated_at_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.artefact = state_dict.get("artefact")
        self.calibrated_at_step = state_dict.get("calibrated_at_step")
