"""The LightningModule that trains the JiT Denoiser with the official recipe.

Recipe (official JiT `main_jit.py` / `engine_jit.py`): the Denoiser's v-loss; AdamW with
betas (0.9, 0.95) and no weight decay on 1-D parameters (biases, norm weights);
`lr = blr * global_batch / 256`; linear warm-up then constant or cosine; two EMAs of the
parameters updated after every optimizer step; evaluation with raw, ema1 or ema2 weights.

Loaders hand out uint8 images; they are mapped to [-1, 1] here, on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import time
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from jit.checkpoint import (
    CheckpointError,
    check_finite_weights,
    load_into,
    load_jit_checkpoint,
    safe_load,
)
from jit.config import (
    DenoiserSchema,
    EMASchema,
    LRSchedule,
    OptimSchema,
    SamplerSchema,
    Weights,
    choices,
    schema_defaults,
)
from jit.datamodules import to_model_range
from jit.ema import EMA
from jit.models import Denoiser, build_jit
from jit.quant import sample_context

# Defaults and allowed values have one home, the run schema (jit/config.py).
DENOISER_DEFAULTS = schema_defaults(DenoiserSchema)
OPTIM_DEFAULTS = {**schema_defaults(OptimSchema), "batch_size": None}
EMA_DEFAULTS = schema_defaults(EMASchema)
SAMPLER_DEFAULTS = schema_defaults(SamplerSchema)
EVAL_WEIGHTS = choices(Weights)  # raw, ema1, ema2: the EMA index is the position - 1
LR_SCHEDULES = choices(LRSchedule)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient) became NaN/inf; raised before the optimizer step."""


def _plain(obj):
    """Mappings -> dict, sequences -> list, recursively (OmegaConf containers included).

    Hyper-parameters are stored in checkpoints; plain containers keep them loadable with
    `torch.load(weights_only=True)`.
    """
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj


def _with_defaults(section: str, given, defaults: dict) -> dict:
    given = _plain(given) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {section} option(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **given}


def official_args(hparams: Mapping, epoch: int = 0) -> argparse.Namespace:
    """The `args` Namespace of an official checkpoint, filled from this module's hyper-parameters.

    Names follow the official `main_jit.py` so its tools (and `jit.checkpoint`) read them.
    """
    net, den, opt = hparams["net"], hparams["denoiser"], hparams["optim"]
    ema, smp = hparams["ema"], hparams["sampler"]
    return argparse.Namespace(
        model=net["name"],
        img_size=net["input_size"],
        class_num=net["num_classes"],
        attn_dropout=net.get("attn_drop", 0.0),
        proj_dropout=net.get("proj_drop", 0.0),
        label_drop_prob=den["label_drop_prob"],
        P_mean=den["P_mean"],
        P_std=den["P_std"],
        noise_scale=den["noise_scale"],
        t_eps=den["t_eps"],
        ema_decay1=ema["decay1"],
        ema_decay2=ema["decay2"],
        sampling_method=smp["method"],
        num_sampling_steps=smp["steps"],
        cfg=smp["cfg_scale"],
        interval_min=smp["interval"][0],
        interval_max=smp["interval"][1],
        blr=opt["blr"],
        min_lr=opt["min_lr"],
        weight_decay=opt["weight_decay"],
        lr_schedule=opt["schedule"],
        warmup_steps=opt["warmup_steps"],
        epoch=epoch,
    )


def official_state_from_lightning(ckpt: Mapping) -> dict:
    """Official layout {model, model_ema1, model_ema2, epoch, args} from a Lightning checkpoint dict."""
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(
            "not a JiTModule Lightning checkpoint: 'state_dict' or 'hyper_parameters' missing"
        )
    if "ema" not in ckpt:
        raise CheckpointError(
            "the Lightning checkpoint holds no 'ema' state (was it written by JiTModule?)"
        )
    raw = {
        k.removeprefix("denoiser."): v.detach().cpu().clone()
        for k, v in ckpt["state_dict"].items()
        if k.startswith("denoiser.")
    }
    emas = [
        {**raw, **{k: v.detach().cpu().clone() for k, v in sh.items()}}
        for sh in ckpt["ema"]["shadows"]
    ]
    epoch = int(ckpt.get("epoch", 0))
    return {
        "model": raw,
        "model_ema1": emas[0],
        "model_ema2": emas[1],
        "epoch": epoch,
        "args": official_args(ckpt["hyper_parameters"], epoch),
    }


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
    hold_only: raw | ema1 | ema2 for an evaluation-only module (see `load_for_evaluation`):
               the denoiser holds those weights and no EMA copies exist, so the module keeps
               one copy of the parameters; other weights cannot be selected, and it cannot train.
    """

    def __init__(
        self,
        net: dict,
        denoiser: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        sampler: dict | None = None,
        eval_weights: str = "ema1",
        init_checkpoint: str | None = None,
        init_weights: str = "model_ema1",
        hold_only: str | None = None,
    ):
        super().__init__()
        net = _plain(net)
        if not isinstance(net, dict) or "name" not in net:
            raise ValueError(
                f"net must be a mapping with a variant 'name' (and build_jit overrides), got {net!r}"
            )
        denoiser = _with_defaults("denoiser", denoiser, DENOISER_DEFAULTS)
        optim = _with_defaults("optim", optim, OPTIM_DEFAULTS)
        ema = _with_defaults("ema", ema, EMA_DEFAULTS)
        sampler = _with_defaults("sampler", sampler, SAMPLER_DEFAULTS)
        if eval_weights not in EVAL_WEIGHTS:
            raise ValueError(
                f"eval_weights must be one of {', '.join(EVAL_WEIGHTS)}, got {eval_weights!r}"
            )
        if hold_only is not None and hold_only not in EVAL_WEIGHTS:
            raise ValueError(f"hold_only must be one of {', '.join(EVAL_WEIGHTS)}, got {hold_only!r}")
        if optim["schedule"] not in LR_SCHEDULES:
            raise ValueError(
                f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}, got {optim['schedule']!r}"
            )

        backbone = build_jit(net["name"], **{k: v for k, v in net.items() if k != "name"})
        # Record what was actually built, so exports and checks do not depend on defaults.
        net = {**net, "input_size": backbone.input_size, "num_classes": backbone.num_classes}
        self.save_hyperparameters(
            {
                "net": net,
                "denoiser": denoiser,
                "optim": optim,
                "ema": ema,
                "sampler": sampler,
                "eval_weights": eval_weights,
                # The trained weights are in our checkpoints; recording the path here would make
                # `load_from_checkpoint` re-read (and require) the official file. It is kept as
                # provenance in `self.init_source` and in the checkpoint's "init_checkpoint".
                "init_checkpoint": None,
                "init_weights": init_weights,
            }
        )
        self.denoiser = Denoiser(backbone, backbone.num_classes, **denoiser)
        self.sampler = sampler
        self.optim_cfg = optim
        self.eval_weights = eval_weights
        self.hold_only = hold_only
        # Each EMA is a float32 copy of every parameter; an evaluation-only module has none.
        self.ema = EMA(self.denoiser, [] if hold_only else [ema["decay1"], ema["decay2"]])
        self.init_source = str(init_checkpoint) if init_checkpoint else None
        if init_checkpoint:
            self._init_from_official(init_checkpoint, init_weights)

        self.lr: float | None = None
        self.global_batch_size: int | None = None
        # A stack of the weights displaced by eval_weights_context; [0] is the training state.
        self._raw_backup: list[list[torch.Tensor]] = []
        self._val_stack: contextlib.ExitStack | None = None
        self._last_batch_end: float | None = None
        self._rng_states_to_restore: dict | None = None

    # ------------------------------------------------------------------ weights
    def _init_from_official(self, path, init_weights: str) -> None:
        state, _ = load_jit_checkpoint(path, init_weights)
        load_into(self.denoiser, state, source=f"{path}[{init_weights!r}]")
        self.ema.reset(self.denoiser)
        ckpt = safe_load(path, mmap=True)  # only the EMA tensors are read from it
        for i, key in enumerate(("model_ema1", "model_ema2")):
            if key in ckpt:
                check_finite_weights(ckpt[key], f"{path}[{key!r}]")
                self.ema.load_dict(i, {k: v for k, v in ckpt[key].items()})
        rank_zero_info(
            f"initialised from {path}: weights {init_weights}, EMAs from model_ema1/model_ema2"
        )

    @contextlib.contextmanager
    def eval_weights_context(self, which: str):
        """Temporarily put raw, ema1 or ema2 weights into `self.denoiser`; restored on exit.

        Nesting is allowed; checkpoints written inside the context still hold the raw weights.
        """
        if which not in EVAL_WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(EVAL_WEIGHTS)}, got {which!r}")
        if self.hold_only is not None:
            if which != self.hold_only:
                raise ValueError(f"only the {self.hold_only} weights were loaded for evaluation, not {which} "
                                 f"(eval_weights and fid.eval_weights must agree)")
            yield self.denoiser  # already in place: no backup copy needed
            return
        if which == "raw" and not self._raw_backup:
            yield self.denoiser
            return
        params = list(self.denoiser.parameters())
        backup = [p.detach().clone() for p in params]
        self._raw_backup.append(backup)
        try:
            with torch.no_grad():
                if which == "raw":
                    for p, b in zip(params, self._raw_backup[0]):
                        p.copy_(b)
                else:
                    self.ema.copy_to(self.denoiser, EVAL_WEIGHTS.index(which) - 1)
            yield self.denoiser
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
            self._raw_backup.pop()

    def _raw_state_dict(self) -> dict[str, torch.Tensor]:
        """The Denoiser's training weights, even while an eval context has swapped them out."""
        sd = self.denoiser.state_dict()
        if self._raw_backup:
            names = [n for n, _ in self.denoiser.named_parameters()]
            sd.update(zip(names, self._raw_backup[0]))
        return sd

    def export_official_state(self) -> dict:
        """{"model", "model_ema1", "model_ema2", "epoch", "args"} as the official code writes it."""
        if self.hold_only is not None:
            raise CheckpointError(f"this module holds only the {self.hold_only} weights (loaded for evaluation); "
                                  "export needs the full checkpoint")
        raw = {k: v.detach().cpu().clone() for k, v in self._raw_state_dict().items()}
        emas = [
            {**raw, **{k: v.detach().cpu().clone() for k, v in self.ema.as_dict(i).items()}}
            for i in (0, 1)
        ]
        epoch = int(self.current_epoch) if self._trainer is not None else 0
        return {
            "model": raw,
            "model_ema1": emas[0],
            "model_ema2": emas[1],
            "epoch": epoch,
            "args": official_args(self.hparams, epoch),
        }

    # ---------------------------------------------------------------- sampling
    def generate(
        self, labels: torch.Tensor, noise: torch.Tensor | None = None, **sampler_overrides
    ) -> torch.Tensor:
        """Images in [-1, 1] from the current weights (wrap in `eval_weights_context` to pick EMAs)."""
        unknown = set(sampler_overrides) - set(SAMPLER_DEFAULTS) - {"generator", "step_callback"}
        if unknown:
            raise ValueError(
                f"unknown sampler option(s) {sorted(unknown)}; allowed: {sorted(SAMPLER_DEFAULTS)}, "
                "generator and step_callback"
            )
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
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        net = self.denoiser.net
        if hasattr(dm, "check_compatible"):
            dm.check_compatible(patch_size=net.patch_size, num_classes=self.denoiser.num_classes)
        else:
            classes = getattr(dm, "num_classes", None)
            if classes is not None and classes != self.denoiser.num_classes:
                raise ValueError(
                    f"num_classes={self.denoiser.num_classes} (the model's) disagrees with the data, "
                    f"which has {classes} classes"
                )
        img_size = getattr(dm, "img_size", None)
        if img_size is not None and img_size % net.patch_size != 0:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={net.patch_size}")
        if img_size is not None and img_size != net.input_size:
            raise ValueError(
                f"the data has img_size={img_size} but the model was built for "
                f"input_size={net.input_size}; set both to the same value"
            )

    # ---------------------------------------------------------------- training
    def _per_device_batch(self) -> int:
        dm = self.trainer.datamodule
        size = getattr(dm, "batch_size", None) if dm is not None else None
        size = size or self.optim_cfg["batch_size"]
        if not size:
            raise ValueError(
                "cannot tell the per-device batch size for lr = blr * global_batch / 256: "
                "use a datamodule with `batch_size` or set optim.batch_size"
            )
        return int(size)

    def param_groups(self) -> list[dict]:
        """Official rule: no weight decay on 1-D parameters (biases, norm weights); frozen ones are skipped."""
        decay, no_decay = [], []
        for _, p in self.denoiser.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": self.optim_cfg["weight_decay"]},
        ]

    def configure_optimizers(self):
        cfg = self.optim_cfg
        self.global_batch_size = (
            self._per_device_batch()
            * self.trainer.world_size
            * self.trainer.accumulate_grad_batches
        )
        self.lr = cfg["blr"] * self.global_batch_size / 256
        rank_zero_info(
            f"lr = blr {cfg['blr']:g} * global batch {self.global_batch_size} / 256 = {self.lr:.4g}"
        )
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, betas=tuple(cfg["betas"]))
        warmup, schedule = int(cfg["warmup_steps"]), cfg["schedule"]
        min_ratio = cfg["min_lr"] / self.lr if self.lr > 0 else 0.0
        total = self.trainer.estimated_stepping_batches if schedule == "cosine" else None
        if schedule == "cosine" and not math.isfinite(total):
            raise ValueError(
                "the cosine schedule needs a finite run length: set trainer.max_steps or max_epochs"
            )

        def factor(step: int) -> float:
            # (step + 1) / warmup: the first step already moves (the official per-iteration
            # warm-up starts at exactly 0, which wastes that step).
            if step < warmup:
                return (step + 1) / warmup
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def on_fit_start(self) -> None:
        if self.hold_only is not None:
            raise RuntimeError(f"this module holds only the {self.hold_only} weights (loaded for evaluation) "
                               "and cannot be trained")
        self.ema.to(self.device)

    def on_train_start(self) -> None:
        loader = self.trainer.train_dataloader
        actual = getattr(loader, "batch_size", None)
        if (
            actual is not None
            and self.global_batch_size is not None
            and actual != self._per_device_batch()
        ):
            raise ValueError(
                f"the train loader's batch_size={actual} differs from the {self._per_device_batch()} "
                "used to scale the learning rate"
            )
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
        with sample_context(self.denoiser.net, self._train_sample_ids(x.shape[0], batch_idx)):
            loss = self.denoiser.loss(self._images(x), labels)
        finite = bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:
            # Every rank must stop together, or the others wait forever in the gradient all-reduce.
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()} on this rank) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); no update was applied and no checkpoint written"
            )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=x.shape[0])
        return loss

    def _train_sample_ids(self, local_batch: int, batch_idx: int) -> range:
        """Global sample ids of this rank's rows: micro-batch number x global batch + rank
        offset + row, so quantized layers draw the same noise for a sample whatever the
        process count (jit.quant.sample_context)."""
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        micro_batch = self.global_step * accumulate + batch_idx % accumulate
        world = max(1, int(self.trainer.world_size))
        start = (micro_batch * world + self.global_rank) * local_batch
        return range(start, start + local_batch)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.denoiser.parameters() if p.grad is not None]
        if not grads:
            return
        # Before clipping (Lightning clips after this hook): the norm the data produced.
        norm = torch.nn.utils.get_total_norm(grads)
        # Gradients are all-reduced already, so every rank takes the same decision.
        if not torch.isfinite(norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm at global step {self.global_step}; "
                "no update was applied and no checkpoint written"
            )
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
        """Nothing per batch: evaluation (calibration, FID) runs in callbacks at test start,
        inside the processes `trainer.test` launches, so it shards across devices and nodes."""
        return None

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
        if self._raw_backup:
            checkpoint["state_dict"].update(
                {f"denoiser.{k}": v for k, v in self._raw_state_dict().items()}
            )
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["init_checkpoint"] = self.init_source
        # Every rank is seeded alike, so rank 0's states (the ones saved) fit every rank.
        checkpoint["rng_states"] = rng_states(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" not in checkpoint:
            raise CheckpointError(
                "the checkpoint holds no 'ema' state; it was not written by JiTModule "
                "(to start from an official checkpoint use init_checkpoint)"
            )
        check_finite_weights(checkpoint["state_dict"], "checkpoint state_dict")
        for i, shadow in enumerate(checkpoint["ema"]["shadows"]):
            check_finite_weights(shadow, f"checkpoint EMA {i + 1}")
        self.ema.load_state_dict(checkpoint["ema"])
        self.init_source = checkpoint.get("init_checkpoint", self.init_source)
        self._rng_states_to_restore = checkpoint.get("rng_states")


CHECKPOINT_KEY_OF = {"raw": "model", "ema1": "model_ema1", "ema2": "model_ema2"}


def load_for_evaluation(path, kind: str, which: str, module_kwargs: Mapping | None = None,
                        ckpt: Mapping | None = None) -> JiTModule:
    """A JiTModule holding only the `which` weights (raw | ema1 | ema2) of a checkpoint.

    Evaluation needs one set of weights; a module with the raw weights and both EMAs holds
    three copies of the parameters. The file is memory-mapped and only the chosen tensors
    are read. `kind` is "lightning" (a .ckpt of JiTModule; its hyper-parameters build the
    module) or "official" (a checkpoint-last.pth; `module_kwargs` build the module).
    `ckpt`: the file's contents if the caller has read them (`safe_load`, memory-mapped).
    """
    if which not in EVAL_WEIGHTS:
        raise ValueError(f"eval_weights must be one of {', '.join(EVAL_WEIGHTS)}, got {which!r}")
    if kind == "official":
        module = JiTModule(**{**(module_kwargs or {}), "hold_only": which})
        key = CHECKPOINT_KEY_OF[which]
        state, _ = load_jit_checkpoint(path, key, ckpt)
        load_into(module.denoiser, state, source=f"{path}[{key!r}]")
        module.init_source = str(path)
        return module
    if ckpt is None:
        ckpt = safe_load(path, mmap=True)
    if "ema" not in ckpt:
        raise CheckpointError(
            f"{path} holds no 'ema' state; it was not written by JiTModule "
            "(to start from an official checkpoint use init_checkpoint)"
        )
    hparams = {**ckpt.get("hyper_parameters", {}), "init_checkpoint": None, "hold_only": which}
    module = JiTModule(**hparams)
    prefix = "denoiser."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if which != "raw":  # EMAs average the parameters; buffers come from the state dict
        state.update(ckpt["ema"]["shadows"][EVAL_WEIGHTS.index(which) - 1])
    check_finite_weights(state, f"{path} ({which} weights)")
    load_into(module.denoiser, state, source=f"{path} ({which} weights)")
    module.init_source = ckpt.get("init_checkpoint")
    return module
