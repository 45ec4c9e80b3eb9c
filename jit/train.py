"""Training plumbing: the official optimiser recipe (parameter groups, learning-rate
schedule), crash-safe checkpoint files, a checkpoint on SIGTERM, the random states a
checkpoint carries for an exact resume, and export of Lightning checkpoints to the
official JiT layout.

Why a CheckpointIO of our own: Lightning 2.6's `TorchCheckpointIO` serialises into memory
and writes through an fsspec transaction, which for local paths writes a file in the
system temp folder and then `shutil.move`s it. When that folder is on another file
system than the checkpoints (the usual case on clusters: local /tmp, shared /scratch),
the move degrades to a copy into the final path, so a crash mid-copy leaves a truncated
`last.ckpt` where the previous good one was. `AtomicCheckpointIO` writes the temporary
file beside the target and renames it over the target (`jit.atomic.atomic_torch_save`).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from jit.atomic import atomic_torch_save
from jit.checkpoint import official_state_from_lightning, safe_load, save_official_checkpoint


def _is_local(path) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient) became NaN/inf; raised before the optimizer step."""


def check_finite_loss(loss: torch.Tensor, trainer: L.Trainer, where: str) -> None:
    """Stop before the update when the loss is NaN/inf on any rank; `where` (epoch, batch)
    goes into the message with the global step."""
    finite = bool(torch.isfinite(loss.detach()))
    if trainer.world_size > 1:
        # Every rank must stop together, or the others wait forever in the gradient all-reduce.
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if not finite:
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item()} on this rank) at global step {trainer.global_step} "
            f"({where}); no update was applied and no checkpoint written"
        )


def finite_grad_norm(parameters, global_step: int) -> torch.Tensor | None:
    """The total gradient norm (None without gradients); NaN/inf stops before the update.
    Gradients are all-reduced already, so every rank takes the same decision."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm):
        raise NonFiniteLossError(f"non-finite gradient norm at global step {global_step}; "
                                 "no update was applied and no checkpoint written")
    return norm


def per_device_batch(datamodule, configured: int | None) -> int:
    """The batch of one device for lr = blr * global_batch / 256: the datamodule's
    `batch_size` (any LightningDataModule that has one), else optim.batch_size."""
    size = getattr(datamodule, "batch_size", None) if datamodule is not None else None
    size = size or configured
    if not size:
        raise ValueError("cannot tell the per-device batch size for lr = blr * global_batch / 256: "
                         "use a datamodule with `batch_size` or set optim.batch_size")
    return int(size)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Official rule: no weight decay on 1-D parameters (biases, norm weights); frozen ones are skipped."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_schedule(optimizer, schedule: str, warmup_steps: int, min_ratio: float,
                total_steps: float | None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per optimizer step: linear warm-up over `warmup_steps`, then constant, or cosine from
    the peak down to `min_ratio` of it at `total_steps` (needed, finite, for cosine)."""
    if schedule == "cosine" and not math.isfinite(total_steps):
        raise ValueError(
            "the cosine schedule needs a finite run length: set trainer.max_steps or max_epochs"
        )

    def factor(step: int) -> float:
        # (step + 1) / warmup: the first step already moves (the official per-iteration
        # warm-up starts at exactly 0, which wastes that step).
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_sample_ids(global_step: int, batch_idx: int, accumulate: int, world_size: int, rank: int,
                     local_batch: int) -> range:
    """Global sample ids of a rank's rows: micro-batch number x global batch + rank offset +
    row, so quantized layers draw the same noise for a sample whatever the process count
    (jit.quant.sample_context)."""
    micro_batch = global_step * accumulate + batch_idx % accumulate
    start = (micro_batch * world_size + rank) * local_batch
    return range(start, start + local_batch)


def rng_states(device: torch.device) -> dict:
    """The global RNG states (torch CPU, the CUDA device in use, numpy, Python), as tensors
    and plain containers so a checkpoint holding them still loads with weights_only=True."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng_states(states: Mapping, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


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
