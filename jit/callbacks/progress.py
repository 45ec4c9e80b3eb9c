"""The training progress: a rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from jit.console import PhaseProgress


class TrainingProgressBar(RichProgressBar):
    """Rich progress bar that names the optimizer step in step-limited training.

    With `max_steps` set and no epoch limit Lightning's bar reads "Epoch 1/-2"; here it
    reads "Epoch 1 · to step 4000" (the description is set once per epoch)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        max_epochs = trainer.max_epochs
        text = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            text += f"/{max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text += f" · to step {trainer.max_steps}"
        return text


class PlainTrainingProgress(ProgressBar):
    """Training progress where stdout is not a terminal (SLURM, nohup, CI), where a rich
    bar would draw nothing until the end: a line every `progress_interval_s` seconds with
    the optimizer step, the rate and the time left (jit.console.PhaseProgress).
    jit/builders.py puts it in place of TrainingProgressBar there."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._progress: PhaseProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._progress = PhaseProgress("training", total, "steps", enabled=self._enabled and trainer.is_global_zero,
                                       terminal=False, initial=trainer.global_step)
        self._progress.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._progress is not None:
            self._progress.update(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None
