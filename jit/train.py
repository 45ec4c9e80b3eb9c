"""Training plumbing the entry point uses: crash-safe checkpoint files, a checkpoint on
SIGTERM, and export of Lightning checkpoints to the official JiT layout.

Why a CheckpointIO of our own: Lightning 2.6's `TorchCheckpointIO` serialises into memory
and writes through an fsspec transaction, which for local paths writes a file in the
system temp folder and then `shutil.move`s it. When that folder is on another file
system than the checkpoints (the usual case on clusters: local /tmp, shared /scratch),
the move degrades to a copy into the final path, so a crash mid-copy leaves a truncated
`last.ckpt` where the previous good one was. `AtomicCheckpointIO` writes the temporary
file beside the target and renames it over the target (`jit.atomic.atomic_torch_save`).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from jit.atomic import atomic_torch_save
from jit.checkpoint import safe_load, save_official_checkpoint
from jit.module import JiTModule, NonFiniteLossError, official_state_from_lightning

__all__ = [
    "AtomicCheckpointIO",
    "JiTModule",
    "NonFiniteLossError",
    "SaveOnSignal",
    "checkpoint_callbacks",
    "export_official",
]


def _is_local(path) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the target's folder, then rename over the target.

    A crash or kill at any moment leaves either the old file or the new one, never a
    partial file. Remote (fsspec URL) paths fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # The project's one atomic writer (jit.atomic): temp file beside the target, fsync, rename.
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class SaveOnSignal(Callback):
    """On SIGTERM, write `<dir>/last.ckpt` at the next batch end, then stop.

    Lightning registers a SIGTERM handler in every environment that only sets
    `trainer.received_sigterm`; its loops then raise `SIGTERMException` (a SystemExit,
    status 0) at the end of the batch without saving. This callback runs first, in
    `on_train_batch_end`, and saves through `trainer.save_checkpoint` (so through the
    configured CheckpointIO: atomically). Under DDP the decision is reduced over ranks,
    because saving is collective. Resume with `python run.py ... ckpt_path=last
    hydra.run.dir=<run dir>` (README, "Resuming"), or `trainer.fit(ckpt_path=<the file>)`.
    `dirpath` defaults to the ModelCheckpoint's folder, else `<root>/checkpoints`.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath = dirpath
        self.filename = filename
        self.saved_path: str | None = None

    def _target(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None and trainer.checkpoint_callback is not None:
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, self.filename)

    def _maybe_save(self, trainer: L.Trainer) -> None:
        received = bool(trainer.received_sigterm)
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received or self.saved_path is not None:
            return
        path = self._target(trainer)
        rank_zero_info(
            f"SIGTERM received: saving {path} at global step {trainer.global_step} and stopping"
        )
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A SIGTERM that lands after this callback's batch-end check, but before the loop's
        # own check (end of the step, end of the epoch, start of a DDP step), stops the run
        # at a finished step that nothing saved yet; it is saved here. Every rank raises the
        # exception at the same point, so the collective save still matches up.
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.saved_path is None:
            if trainer.state.fn == "fit" and not trainer.sanity_checking:
                self._maybe_save(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        # Lightning also aborts validation on SIGTERM; the module's on_save_checkpoint
        # keeps the raw weights even though EMA weights are swapped in at this point.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_save(trainer)


def checkpoint_callbacks(
    dirpath: str, every_n_train_steps: int | None = None, every_n_epochs: int | None = None
) -> list[Callback]:
    """ModelCheckpoint keeping `last.ckpt` (overwritten atomically with AtomicCheckpointIO) + SaveOnSignal."""
    ckpt = ModelCheckpoint(
        dirpath=dirpath,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=0 if every_n_train_steps or every_n_epochs else 1,
        every_n_train_steps=every_n_train_steps,
        every_n_epochs=every_n_epochs,
    )
    return [ckpt, SaveOnSignal(dirpath=dirpath)]


def export_official(lightning_ckpt_path, out_path) -> Path:
    """Write a JiTModule Lightning checkpoint in the official layout.

    The result holds `model` (raw), `model_ema1`, `model_ema2` (Denoiser state dicts with
    `net.` keys), `epoch` and `args` (argparse.Namespace: model, img_size, class_num,
    P_mean, ...), and loads with `jit.checkpoint.build_denoiser_from_checkpoint`.
    """
    official = official_state_from_lightning(safe_load(lightning_ckpt_path))
    save_official_checkpoint(out_path, **official)
    return Path(out_path)
