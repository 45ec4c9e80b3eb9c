"""A small digits training run for tests/test_training.py, also usable as a subprocess.

    python tests/training_run.py '{"root": "/tmp/run", "max_steps": 4, ...}'

Options (JSON): root, max_steps, every_n (checkpoint period in steps, null = none),
ckpt_path (resume), devices (>1 = DDP over gloo on CPU), batch_size, img_size, blr,
seed, subset_frac, random_flip and num_workers (data), progress (file rewritten with the global step
after every batch), pause_at (after that step, wait up to a minute for SIGTERM or SIGKILL,
so a parent interrupts at a known step), sigterm_self_at (the run sends itself SIGTERM
after that step, from the last batch-end callback: after the checkpoint callbacks looked
for a signal), result (torch file per rank with the final
parameters, EMAs and lr; "{rank}" is substituted), hardware (null, or hardware-aware
training: {"quant": quant config, "recalibrate_every_n_steps": N, "trainable": [...]},
static ranges calibrated on 16 images from data).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jit.datamodules import DigitsDataModule
from jit.module import JiTModule
from jit.train import AtomicCheckpointIO, checkpoint_callbacks

DEFAULTS = {
    "root": None,
    "max_steps": 4,
    "every_n": None,
    "ckpt_path": None,
    "devices": 1,
    "batch_size": 8,
    "img_size": 16,
    "blr": 0.02,
    "seed": 0,
    "subset_frac": 1.0,
    "random_flip": False,
    "num_workers": 0,
    "progress": None,
    "pause_at": None,
    "sigterm_self_at": None,
    "result": None,
    "hardware": None,
}


class Progress(Callback):
    """Writes the global step after each batch, so a parent process can time its signals."""

    def __init__(self, path, pause_at=None):
        self.path = Path(path)
        self.pause_at = pause_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        os.replace(tmp, self.path)
        if trainer.global_step == self.pause_at:
            deadline = time.monotonic() + 60
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.02)


class SigtermSelf(Callback):
    """Sends SIGTERM to its own process at the end of one step, after every other callback."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10  # delivery to the Python handler is asynchronous
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.01)


def make_module(cfg: dict) -> JiTModule:
    return JiTModule(
        net={"name": "JiT-T/4", "input_size": cfg["img_size"], "num_classes": 10},
        optim={"blr": cfg["blr"]},
        ema={"decay1": 0.9, "decay2": 0.5},
        sampler={"steps": 2},
    )


def make_datamodule(cfg: dict) -> DigitsDataModule:
    return DigitsDataModule(
        img_size=cfg["img_size"],
        batch_size=cfg["batch_size"],
        subset_frac=cfg["subset_frac"],
        random_flip=cfg["random_flip"],
        num_workers=cfg["num_workers"],
    )


def hardware_callbacks(cfg: dict) -> list:
    if not cfg["hardware"]:
        return []
    from jit.callbacks.hardware_aware import HardwareInTheLoop
    from jit.quant import build_quant_config

    hw = cfg["hardware"]
    return [HardwareInTheLoop(build_quant_config(hw["quant"]),
                              {"method": "kl", "num_images": 16, "batch_size": 8, "source": "data"},
                              hw.get("trainable", ["*"]), hw.get("recalibrate_every_n_steps", 0),
                              run_dir=cfg["root"])]


def make_trainer(cfg: dict, callbacks=()) -> L.Trainer:
    callbacks = list(callbacks) + hardware_callbacks(cfg)
    if cfg["progress"]:
        # First, so that SIGTERM received during a pause is acted on at the same batch end.
        callbacks.insert(0, Progress(cfg["progress"], cfg["pause_at"]))
    callbacks += checkpoint_callbacks(
        os.path.join(cfg["root"], "checkpoints"), every_n_train_steps=cfg["every_n"] or 10**9
    )
    if cfg["sigterm_self_at"] is not None:
        callbacks.append(SigtermSelf(cfg["sigterm_self_at"]))
    strategy = "auto"
    if cfg["devices"] > 1:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    return L.Trainer(
        accelerator="cpu",
        devices=cfg["devices"],
        strategy=strategy,
        max_steps=cfg["max_steps"],
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=cfg["root"],
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
    )


def main(cfg: dict) -> None:
    torch.set_num_threads(1)
    L.seed_everything(cfg["seed"], verbose=False)
    module, dm = make_module(cfg), make_datamodule(cfg)
    trainer = make_trainer(cfg)
    trainer.fit(module, dm, ckpt_path=cfg["ckpt_path"])
    if cfg["result"]:
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "lr": module.lr,
                "global_batch_size": module.global_batch_size,
                "params": {k: v.detach().clone() for k, v in module.denoiser.state_dict().items()},
                "ema": module.ema.state_dict(),
            },
            cfg["result"].format(rank=trainer.global_rank),
        )


if __name__ == "__main__":
    main({**DEFAULTS, **json.loads(sys.argv[1])})
