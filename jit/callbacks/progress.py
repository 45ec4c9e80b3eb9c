"""The training progress bar."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


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
