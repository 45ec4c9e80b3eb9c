"""The LightningModule that trains the JiT Denoiser with the official recipe.

Recipe (official JiT `main_jit.py` / `engine_jit.py`): the Denoiser's v-loss; AdamW with
betas (0.9, 0.95) and no weight decay on 1-D parameters (biases, norm weights);
`lr = blr * global_batch / 256`; linear warm-up then constant or cosine; two EMAs of the
parameters updated after every optimizer step; evaluation with raw, ema1 or ema2 weights.
The recipe's parts live beside it: the optimiser groups, schedule and resume states in
jit/train.py, the EMAs and the weight swap in jit/ema.py, the official checkpoint layout
in jit/checkpoint.py, the data checks in jit/checks.py.

Loaders hand out uint8 images; they are mapped to [-1, 1] here, on the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from jit.checkpoint import (
    CheckpointError,
    check_lightning_checkpoint,
    load_into,
    load_jit_checkpoint,
    official_ema_weights,
    official_state,
)
from jit.checks import check_data_fits_model, check_sampler_options, module_arguments
from jit.datamodules import from_model_range, to_model_range
from jit.ema import EMA, WeightSwap
from jit.models import Denoiser, build_jit
from jit.models.denoiser import NonFiniteSampleError
from jit.quant import sample_context
from jit.train import (
    NonFiniteLossError,
    check_finite_loss,
    finite_grad_norm,
    lr_schedule,
    param_groups,
    per_device_batch,
    restore_rng_states,
    rng_states,
    train_sample_ids,
)

__all__ = ["JiTModule", "NonFiniteLossError"]


class JiTModule(L.LightningModule):
    """Denoiser + optimiser + two EMAs.

    net:       build_jit arguments, `name` plus overrides, e.g.
               {"name": "JiT-S/4", "input_size": 32, "num_classes": 10, "attn_drop": 0.0, "proj_drop": 0.0}
    denoiser:  {P_mean, P_std, t_eps, noise_scale, label_drop_prob}
    optim:     {blr, weight_decay, betas, warmup_steps, schedule: constant|cosine, min_lr, batch_size}.
               lr = blr * global_batch / 256 with global_batch = per-device batch
               * trainer.world_size (devices * nodes) * accumulate_grad_batches. The per-device
               batch is read at `configure_optimizers` time from `trainer.datamodule.batch_size`;
               without a datamodule, give `optim.batch_size`. It is checked against the train
               loader when training starts. The result is `self.lr` and is logged.
    ema:       {decay1, decay2}
    sampler:   Denoiser.generate defaults {steps, method, cfg_scale, interval, schedule}
    eval_weights:    raw | ema1 | ema2, used by validation (and by callbacks that ask for it).
    init_checkpoint: an official checkpoint to fine-tune from. The trained weights start from
               its `init_weights` entry (default model_ema1, the weights one evaluates; use
               "model" to continue the official run exactly); ema1/ema2 start from its
               model_ema1/model_ema2 (or from the initial weights when absent).
    hold_only: raw | ema1 | ema2 for an evaluation-only module (see jit/builders.py, `load_for_evaluation`):
               the denoiser holds those weights and no EMA copies exist, so the module keeps
               one copy of the parameters; other weights cannot be selected, and it cannot train.
    """

    def __init__(self, net: dict, denoiser: dict | None = None, optim: dict | None = None,
                 ema: dict | None = None, sampler: dict | None = None, eval_weights: str = "ema1",
                 init_checkpoint: str | None = None, init_weights: str = "model_ema1",
                 hold_only: str | None = None):
        super().__init__()
        args = module_arguments(net, eval_weights, hold_only, denoiser=denoiser, optim=optim, ema=ema,
                                sampler=sampler)
        net = args["net"]
        backbone = build_jit(net["name"], **{k: v for k, v in net.items() if k != "name"})
        # Record what was actually built, so exports and checks do not depend on defaults.
        args["net"] = {**net, "input_size": backbone.input_size, "num_classes": backbone.num_classes}
        # init_checkpoint: the trained weights are in our checkpoints; recording the path here
        # would make `load_from_checkpoint` re-read (and require) the official file. It is kept
        # as provenance in `self.init_source` and in the checkpoint's "init_checkpoint".
        self.save_hyperparameters({**args, "init_checkpoint": None, "init_weights": init_weights})
        self.denoiser = Denoiser(backbone, backbone.num_classes, **args["denoiser"])
        self.sampler, self.optim_cfg = args["sampler"], args["optim"]
        self.eval_weights, self.hold_only = eval_weights, hold_only
        # Each EMA is a float32 copy of every parameter; an evaluation-only module has none.
        decays = [] if hold_only else [args["ema"]["decay1"], args["ema"]["decay2"]]
        self.ema = EMA(self.denoiser, decays)
        self.weight_swap = WeightSwap(self.ema, hold_only)
        self.init_source = str(init_checkpoint) if init_checkpoint else None
        if init_checkpoint:
            self._init_from_official(init_checkpoint, init_weights)

        self.lr: float | None = None
        self.global_batch_size: int | None = None
        self._val_stack: contextlib.ExitStack | None = None
        self._last_batch_end: float | None = None
        self._rng_states_to_restore: dict | None = None
        self.test_sampler: dict = {}  # sampler overrides of the running test pass

    # ------------------------------------------------------------------ weights
    def _init_from_official(self, path, init_weights: str) -> None:
        state, _ = load_jit_checkpoint(path, init_weights)
        load_into(self.denoiser, state, source=f"{path}[{init_weights!r}]")
        self.ema.reset(self.denoiser)
        for index, weights in official_ema_weights(path).items():
            self.ema.load_dict(index, weights)
        rank_zero_info(f"initialised from {path}: weights {init_weights}, EMAs from model_ema1/model_ema2")

    def eval_weights_context(self, which: str):
        """Temporarily put raw, ema1 or ema2 weights into `self.denoiser`; restored on exit.

        Nesting is allowed; checkpoints written inside the context still hold the raw weights.
        """
        return self.weight_swap.use(self.denoiser, which)

    def export_official_state(self) -> dict:
        """{"model", "model_ema1", "model_ema2", "epoch", "args"} as the official code writes it."""
        if self.hold_only is not None:
            raise CheckpointError(f"this module holds only the {self.hold_only} weights (loaded for evaluation); "
                                  "export needs the full checkpoint")
        epoch = int(self.current_epoch) if self._trainer is not None else 0
        return official_state(self.weight_swap.training_state_dict(self.denoiser),
                              [self.ema.as_dict(i) for i in (0, 1)], self.hparams, epoch)

    # ---------------------------------------------------------------- sampling
    def generate(self, labels: torch.Tensor, noise: torch.Tensor | None = None,
                 **sampler_overrides) -> torch.Tensor:
        """Images in [-1, 1] from the current weights (wrap in `eval_weights_context` to pick EMAs)."""
        check_sampler_options(sampler_overrides)
        settings = {**self.sampler, **sampler_overrides}
        settings["interval"] = tuple(settings["interval"])
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with self.precision_context():
                return self.denoiser.generate(labels.to(self.device), noise, **settings)
        finally:
            self.denoiser.train(was_training)

    def precision_context(self):
        """The trainer's precision for work outside Lightning's steps (sampling, calibration
        forwards): bf16-mixed samples under bf16 autocast as the official evaluation does;
        without a trainer, or at 32-true, nothing changes."""
        if self._trainer is None:
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.datamodule is not None:
            check_data_fits_model(self.trainer.datamodule, self.denoiser)

    # ---------------------------------------------------------------- training
    def _per_device_batch(self) -> int:
        return per_device_batch(self.trainer.datamodule, self.optim_cfg["batch_size"])

    def configure_optimizers(self):
        cfg = self.optim_cfg
        world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        self.global_batch_size = self._per_device_batch() * world * accumulate
        self.lr = cfg["blr"] * self.global_batch_size / 256
        rank_zero_info(f"lr = blr {cfg['blr']:g} * global batch {self.global_batch_size} / 256 = {self.lr:.4g}")
        groups = param_groups(self.denoiser, cfg["weight_decay"])
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(cfg["betas"]))
        total = self.trainer.estimated_stepping_batches if cfg["schedule"] == "cosine" else None
        min_ratio = cfg["min_lr"] / self.lr if self.lr > 0 else 0.0
        scheduler = lr_schedule(optimizer, cfg["schedule"], int(cfg["warmup_steps"]), min_ratio, total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_fit_start(self) -> None:
        if self.hold_only is not None:
            raise RuntimeError(f"this module holds only the {self.hold_only} weights (loaded for evaluation) "
                               "and cannot be trained")
        self.ema.to(self.device)

    def on_train_start(self) -> None:
        actual = getattr(self.trainer.train_dataloader, "batch_size", None)
        if actual is not None and self.global_batch_size is not None and actual != self._per_device_batch():
            raise ValueError(f"the train loader's batch_size={actual} differs from the "
                             f"{self._per_device_batch()} used to scale the learning rate")
        self._last_batch_end = None
        if self._rng_states_to_restore is not None:
            # Here, after Lightning's set-up, so that the first step after a resume draws its
            # times, noise and label drops as the uninterrupted run did.
            restore_rng_states(self._rng_states_to_restore, self.device)
            self._rng_states_to_restore = None

    @staticmethod
    def _images(x: torch.Tensor) -> torch.Tensor:
        # uint8 from the loaders; float input is taken to be in the model range already.
        return to_model_range(x) if x.dtype == torch.uint8 else x

    def training_step(self, batch, batch_idx):
        x, labels = batch
        accumulate = self.trainer.accumulate_grad_batches
        ids = train_sample_ids(self.global_step, batch_idx, accumulate, self.trainer.world_size,
                               self.global_rank, x.shape[0])
        with sample_context(self.denoiser.net, ids):
            loss = self.denoiser.loss(self._images(x), labels)
        check_finite_loss(loss, self.trainer, f"epoch {self.current_epoch}, batch {batch_idx}")
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=x.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Before clipping (Lightning clips after this hook): the norm the data produced.
        norm = finite_grad_norm(self.denoiser.parameters(), self.global_step)
        if norm is not None:
            self.log("train/grad_norm", norm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.ema.update(self.denoiser)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            images = batch[0].shape[0] * self.trainer.world_size
            self.log("train/images_per_s", images / max(now - self._last_batch_end, 1e-9))
        self._last_batch_end = now

    # --------------------------------------------------------------------- test
    def test_step(self, batch, batch_idx):
        """The images of one chunk of the sample plan (jit/evaluation/plan.py), in [0, 255],
        keyed by global index; the pass's callbacks (jit/callbacks/evaluation.py) set the
        sampler and weights and score or record the images. None for a chunk the sampler
        repeated only to even out the ranks, or one an interrupted run already scored."""
        if self.trainer.test_dataloaders.dataset.skips(batch["index"], self.global_rank, self.trainer.world_size):
            return None
        return self.generate_chunk(batch, **self.test_sampler)

    def generate_chunk(self, batch: Mapping, **sampler_overrides) -> dict:
        """{"index", "images"}: the images of one item of a sample plan, uint8 in [0, 255],
        from its labels and initial noise, with the current weights."""
        index = batch["index"].cpu()
        try:  # the global index is the sample id of the thermal noise too
            with sample_context(self.denoiser.net, index):
                x = self.generate(batch["label"], noise=batch["noise"].to(self.device), **sampler_overrides)
        except NonFiniteSampleError as err:
            raise err.for_images(index) from None
        return {"index": index, "images": from_model_range(x)}

    # --------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_stack = contextlib.ExitStack()
        self._val_stack.enter_context(self.eval_weights_context(self.eval_weights))

    def validation_step(self, batch, batch_idx):
        x, labels = batch
        # The same times and noise for a batch at every validation: the curve shows the
        # weights changing, not the sampling noise.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            loss = self.denoiser.loss(self._images(x), labels)
        self.log(f"val/loss_{self.eval_weights}", loss, sync_dist=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_stack is not None:
            self._val_stack.close()
            self._val_stack = None

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.weight_swap.swapped:
            raw = self.weight_swap.training_state_dict(self.denoiser)
            checkpoint["state_dict"].update({f"denoiser.{k}": v for k, v in raw.items()})
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["init_checkpoint"] = self.init_source
        # Every rank is seeded alike, so rank 0's states (the ones saved) fit every rank.
        checkpoint["rng_states"] = rng_states(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_lightning_checkpoint(checkpoint)
        self.ema.load_state_dict(checkpoint["ema"])
        self.init_source = checkpoint.get("init_checkpoint", self.init_source)
        self._rng_states_to_restore = checkpoint.get("rng_states")
