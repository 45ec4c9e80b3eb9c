"""Static calibration before evaluation (quant.mode=static).

`run_calibration` (task=eval and task=calibrate, on every process) does one of:

- `quant.calibration_file=PATH`: load that artefact and apply it (checked against the
  model: layer names, bit widths, scheme);
- otherwise calibrate on `calibration.num_images` inputs, write `calibration.pt` and
  `coverage.csv` into the run directory, and apply the artefact.

Inputs (`calibration.source`):
- `data`: real images of the datamodule's "calibration" split, noised at random t exactly
  as in training (t ~ logit-normal, z = t x + (1 - t) e, label dropout to the null class),
  then one network call per batch;
- `sampling`: activations recorded along the model's own sampling trajectories (the run's
  sampler settings, CFG included), with class-balanced labels; no dataset needed.
All randomness comes from `calibration.seed`, so a calibration is reproducible.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from jit.atomic import atomic_path
from jit.config import CalibrationSchema
from jit.console import PhaseProgress, announce
from jit.datamodules import to_model_range
from jit.models.denoiser import NonFiniteSampleError
from jit.quant import artefact as art
from jit.quant import build_quant_config, quantized_layers, sample_context
from jit.quant.calibration import COVERAGE_COLUMNS, SOURCES, CalibrationError, calibrate
from jit.quant.calibrators import METHODS
from jit.quant.validate import check_known

ARTEFACT_NAME = "calibration.pt"
COVERAGE_NAME = "coverage.csv"


@dataclass
class CalibrationConfig(CalibrationSchema):
    """The validated `calibration` group (fields and defaults: jit.config.CalibrationSchema)."""

    def __post_init__(self) -> None:
        def fail(key, allowed, value):
            raise CalibrationError(f"calibration.{key} must be {allowed}, got {value!r}")

        if self.method not in METHODS:
            fail("method", "one of " + ", ".join(METHODS), self.method)
        if self.source not in SOURCES:
            fail("source", "one of " + ", ".join(SOURCES), self.source)
        nb = self.num_bins
        if nb is not None and (isinstance(nb, bool) or not isinstance(nb, int) or nb < 2
                               or nb & (nb - 1)):
            fail("num_bins", "a power of two >= 2 or null", nb)
        for key, low in (("num_images", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(key, f"an integer >= {low}", value)
        for key in ("save_weights", "on_device"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false", getattr(self, key))
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            fail("percentile", "a number in (0, 100]", p)

    @classmethod
    def from_any(cls, cfg) -> CalibrationConfig:
        if isinstance(cfg, cls):
            return cfg
        if type(cfg).__module__.startswith("omegaconf"):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = dict(cfg or {})
        check_known(cls, cfg, "calibration", CalibrationError)
        method = cfg.get("method", cls.method)
        if cfg.get("percentile", cls.percentile) != cls.percentile and method != "percentile":
            raise CalibrationError(f"calibration.percentile applies to calibration.method=percentile only, "
                                   f"but the method is {method} (drop it, or use calibration=percentile)")
        return cls(**cfg)


@dataclass
class CalibrationOutcome:
    artefact_path: Path
    artefact: dict
    coverage: list[dict]  # empty when an existing artefact was applied
    calibrated: bool


# ------------------------------------------------------------------------ inputs ----
def _calibration_batches(datamodule, cfg: CalibrationConfig) -> list:
    """The first num_images images of the "calibration" split, as (uint8, labels) batches."""
    if datamodule is None or not hasattr(datamodule, "dataloader"):
        raise CalibrationError("calibration.source=data needs a datamodule with a "
                               "'calibration' split (or use calibration.source=sampling)")
    try:
        loader = datamodule.dataloader("calibration", batch_size=cfg.batch_size)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        raise CalibrationError(f"calibration.source=data: the datamodule has no usable "
                               f"'calibration' split: {err}") from err
    batches, seen = [], 0
    for images, labels in loader:
        take = min(images.shape[0], cfg.num_images - seen)
        batches.append((images[:take], labels[:take]))
        seen += take
        if seen == cfg.num_images:
            return batches
    raise CalibrationError(f"calibration.num_images={cfg.num_images} exceeds the {seen} images "
                           "of the 'calibration' split (raise data.calib_num_images)")


def _data_forward(denoiser, device, precision=contextlib.nullcontext):
    """Noise real images at random t exactly like the training loss does; the network runs
    under `precision()` (the trainer's, as generation does)."""
    def forward(batch, generator):
        images, labels = batch
        x = to_model_range(images).to(device)
        labels = labels.to(device)
        n = x.shape[0]
        drop = torch.rand(n, generator=generator) < denoiser.label_drop_prob
        labels = torch.where(drop.to(device), torch.full_like(labels, denoiser.num_classes), labels)
        t = denoiser.sample_t(n, generator=generator).to(device)
        noise = (torch.randn(x.shape, generator=generator) * denoiser.noise_scale).to(device)
        with precision():
            return denoiser.net(denoiser.noised(x, t, noise), t, labels)
    return forward


def _sampling_batches(num_images: int, batch_size: int, num_classes: int) -> list:
    """(image indices, labels) batches; the index is each image's sample id."""
    indices = torch.arange(num_images)
    labels = indices % num_classes  # class-balanced, every prefix too
    return list(zip(indices.split(batch_size), labels.split(batch_size)))


def _sampling_forward(denoiser, device, sampler: Mapping, precision=contextlib.nullcontext):
    settings = {k: sampler[k] for k in ("steps", "method", "cfg_scale", "interval", "schedule")
                if k in sampler}
    if "interval" in settings:
        settings["interval"] = tuple(settings["interval"])

    def forward(batch, generator):
        indices, labels = batch
        shape = (labels.shape[0], denoiser.in_channels, denoiser.img_size, denoiser.img_size)
        noise = denoiser.noise_scale * torch.randn(shape, generator=generator)
        try:
            with sample_context(denoiser.net, indices), precision():
                return denoiser.generate(labels.to(device), noise.to(device), **settings)
        except NonFiniteSampleError as err:
            raise err.for_images(indices) from None
    return forward


# ------------------------------------------------------------------------ output ----
def write_coverage_csv(rows: list[dict], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COVERAGE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COVERAGE_COLUMNS})
    return path


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _denoiser(module):
    return getattr(module, "denoiser", module)


@contextlib.contextmanager
def _eval_weights(module, which: str | None):
    """The weights the evaluation will use (raw/ema1/ema2), when the module has several."""
    context = getattr(module, "eval_weights_context", None)
    which = which or getattr(module, "eval_weights", None)
    if context is None or which is None:
        yield
    else:
        with context(which):
            yield


class _WithProgress:
    """Re-iterable batches that report progress (images done / total, rate, time left) on
    each pass; `calibrate` reads its batches twice (activations, then ADC inputs)."""

    PASSES = ("activations", "ADC inputs")

    def __init__(self, batches: list, images_per_batch, enabled: bool, first_pass: int = 0):
        self.batches = batches
        self.sizes = [images_per_batch(b) for b in batches]
        self.enabled = enabled
        self.passes = first_pass  # 1: the activation clips are given, the ADC pass comes first

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        label = f"calibration ({self.PASSES[min(self.passes, len(self.PASSES) - 1)]})"
        self.passes += 1
        if self.enabled:
            announce(f"{label}: pass {self.passes} over {sum(self.sizes)} images")
        with PhaseProgress(label, sum(self.sizes), "images", enabled=self.enabled) as progress:
            for batch, size in zip(self.batches, self.sizes):
                yield batch
                progress.advance(size)


def _batch_size(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 1


def run_calibration(module, quant, calibration, run_dir, datamodule=None, sampler=None,
                    eval_weights: str | None = None, act_clips: Mapping[str, float] | None = None
                    ) -> CalibrationOutcome | None:
    """Calibrate (or apply `quant.calibration_file`) for static mode; None if dynamic.

    module: a JiTModule, or a Denoiser (anything with `.net` or a `.denoiser.net`).
    The artefact's layer names are relative to the backbone (`denoiser.net`), like the
    seed's files (`blocks.{i}.mlp.w12`).
    act_clips: the activation clips of a calibration that differs from this one in ADC
    settings at most (jit/quant/calibration.py): only the ADC pass runs.
    """
    qcfg = build_quant_config(quant)
    if qcfg.mode != "static":
        return None
    denoiser = _denoiser(module)
    net = denoiser.net
    if not quantized_layers(net):
        raise CalibrationError("quant.mode=static but the model has no quantized layers "
                               "(quant.scheme=fp, or quantize_model was not called)")
    if qcfg.calibration_file is not None:
        path = Path(qcfg.calibration_file)
        announce(f"calibration: applying {path}")
        artefact = art.load(path)
        with _eval_weights(module, eval_weights):  # the weights it must have been calibrated on
            art.apply(artefact, net, allow_foreign_weights=qcfg.allow_foreign_calibration, origin=str(path))
        return CalibrationOutcome(path, artefact, [], calibrated=False)

    cfg = CalibrationConfig.from_any(calibration)
    device = next(net.parameters()).device
    precision = getattr(module, "precision_context", contextlib.nullcontext)
    if cfg.source == "data":
        batches = _calibration_batches(datamodule, cfg)
        forward = _data_forward(denoiser, device, precision)
    else:
        batches = _sampling_batches(cfg.num_images, cfg.batch_size, denoiser.num_classes)
        forward = _sampling_forward(denoiser, device,
                                    sampler if sampler is not None else getattr(module, "sampler", {}) or {},
                                    precision)
    announce(f"calibration: {cfg.method} ranges of {len(quantized_layers(net))} layers from {cfg.num_images} "
             f"{'images of the calibration split' if cfg.source == 'data' else 'sampling trajectories'}"
             + (" (activation clips given: the ADC pass only)" if act_clips is not None else ""))
    batches = _WithProgress(list(batches), _batch_size, enabled=_global_rank() == 0,
                            first_pass=0 if act_clips is None else 1)
    coverage: list[dict] = []
    with _eval_weights(module, eval_weights):
        artefact = calibrate(net, batches, method=cfg.method, num_bins=cfg.num_bins,
                             percentile=cfg.percentile, seed=cfg.seed, forward=forward,
                             source=cfg.source, save_weights=cfg.save_weights,
                             coverage=coverage, announce=announce, on_device=cfg.on_device,
                             act_clips=act_clips)
    # Written only once calibration has fully succeeded (and atomically). Every rank
    # calibrated on the same inputs with the same seed, so one copy on disk is enough.
    path = Path(run_dir) / ARTEFACT_NAME
    if _global_rank() == 0:
        art.save(artefact, path)
        write_coverage_csv(coverage, path.with_name(COVERAGE_NAME))
    with _eval_weights(module, eval_weights):
        art.apply(artefact, net)
    return CalibrationOutcome(path, artefact, coverage, calibrated=True)
