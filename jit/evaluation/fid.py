"""FID evaluation, the maths without the loop: what a pass of generated chunks is scored by.

Image i (global index) gets label labels[i] and initial noise drawn from a generator
seeded with seed * 1_000_003 + i, and i is its sample id for the quantized layers'
thermal noise (jit.quant.sample_context). `FIDConfig.sample_plan` turns the settings into
the test dataset of Lightning's loop (jit/evaluation/plan.py): one item per fixed chunk of
the global index (`fid.chunk_size` images per forward, rank r of W taking chunks r, r + W,
...), so every run layout computes the same forwards and the generated images do not
depend on the number of processes. `FIDEvaluation` is driven by the loop's callback
(jit/callbacks/evaluation.py): `prepare` before the first chunk, `start`, `add` per
generated chunk, `finish`, `reduce`, `report`. Images never leave memory unless PNGs or an
npz are asked for; each image's features are kept with its global index, and the
statistics are reduced once, in index order, after all ranks' rows are gathered
(jit.metrics.fid), so the score does not depend on the layout either.

Everything that can fail on bad input (config values, extractor name, Inception weights,
reference statistics and their shape) is checked before the first image is generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from jit import __version__
from jit.atomic import atomic_path
from jit.config import FLOAT32_MAX, FIDSchema, Weights, choices
from jit.console import announce
from jit.evaluation.chunks import ChunkRecord, model_digest, settings_digest
from jit.evaluation.plan import (
    LABEL_STRATEGIES,
    EvaluationConfigError,
    SamplePlan,
    balanced_labels,
    rank_world,
)
from jit.evaluation.report import (
    NpzExport,
    flatten,
    sample_grid,
    sample_grid_slots,
    write_json_atomic,
)
from jit.metrics.features import INCEPTION, FeatureSpace, create_feature_space
from jit.metrics.fid import GaussianStats, InceptionScoreStats, all_reduce_sum, frechet_distance
from jit.metrics.reference import reference_stats, stats_digest
from jit.provenance import provenance
from jit.quant.validate import check_known

WEIGHT_CHOICES = choices(Weights)


# ------------------------------------------------------------------------------ config
@dataclass
class FIDConfig(FIDSchema):
    """The validated `fid` group (fields and defaults: jit.config.FIDSchema)."""

    @classmethod
    def from_any(cls, cfg) -> FIDConfig:
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            cfg = {}
        if isinstance(cfg, DictConfig):  # plain containers, so results.json gets lists, not ListConfig
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if "batch_size" in cfg:
            raise EvaluationConfigError(
                "fid.batch_size was replaced by fid.chunk_size: every forward covers one fixed "
                "chunk of the global image index, so the images do not depend on the run layout")
        check_known(cls, cfg, "fid", EvaluationConfigError)
        out = cls(**cfg)
        out.reference = {**cls().reference, **dict(out.reference or {})}
        out.grid = {**cls().grid, **dict(out.grid or {})}
        out.sampler = dict(out.sampler or {})
        out.validate()
        return out

    def validate(self) -> None:
        def positive_int(name, value, minimum=1):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise EvaluationConfigError(f"fid.{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("num_images", self.num_images, 2)
        positive_int("chunk_size", self.chunk_size)
        positive_int("isc_splits", self.isc_splits)
        positive_int("grid.samples_per_class", self.grid["samples_per_class"], 0)
        positive_int("grid.max_classes", self.grid["max_classes"])
        if self.label_strategy not in LABEL_STRATEGIES:
            raise EvaluationConfigError(
                f"fid.label_strategy={self.label_strategy!r}; allowed: {', '.join(LABEL_STRATEGIES)}")
        if self.extractor == INCEPTION and self.isc_splits > self.num_images:
            raise EvaluationConfigError(
                f"fid.isc_splits={self.isc_splits} exceeds fid.num_images={self.num_images}: the Inception Score "
                f"needs at least one image per split (lower fid.isc_splits or raise fid.num_images)")
        scale = self.sampler.get("cfg_scale")
        if scale is not None and not (isinstance(scale, (int, float)) and 0 <= scale <= FLOAT32_MAX):
            raise EvaluationConfigError(f"fid.sampler.cfg_scale must be in [0, {FLOAT32_MAX:.4g}] (the sampler "
                                        f"computes in float32), got {scale!r}")
        # A setting of another extractor would be ignored: the user believes it is used.
        if self.inception_weights is not None and self.extractor != INCEPTION:
            raise EvaluationConfigError(
                f"fid.inception_weights={self.inception_weights} applies to fid.extractor={INCEPTION} only, "
                f"but the extractor is {self.extractor} (drop it, or give that extractor's weights as "
                "fid.extractor_weights)")
        if self.extractor_weights is not None and self.extractor == INCEPTION:
            raise EvaluationConfigError(
                f"fid.extractor_weights={self.extractor_weights} is not read by fid.extractor={INCEPTION}; "
                "its weights are fid.inception_weights")
        if self.eval_weights is not None and self.eval_weights not in WEIGHT_CHOICES:
            raise EvaluationConfigError(f"fid.eval_weights={self.eval_weights!r}; allowed: {', '.join(WEIGHT_CHOICES)}")

    def labels(self, num_classes: int) -> torch.Tensor:
        """The conditioning label of every global image index: the one sample plan that the
        FID images, the per-layer statistics and the MAC count share."""
        return balanced_labels(self.num_images, num_classes, self.label_strategy)

    def sample_plan(self, denoiser, num_images: int | None = None, sharded: bool = True) -> SamplePlan:
        """The test dataset of a generation pass over the first `num_images` (default: all)
        images of this plan; `sharded=False`: every rank generates all of them."""
        n = self.num_images if num_images is None else min(int(num_images), self.num_images)
        return SamplePlan(self.labels(int(denoiser.num_classes)), n, self.chunk_size, self.seed,
                          (denoiser.in_channels, denoiser.img_size, denoiser.img_size), denoiser.noise_scale,
                          sharded=sharded)


def check_data_classes(model_classes: int, datamodule) -> None:
    """Labels come from the model; reference data of another class count would make FID
    compare generated classes with other classes' images."""
    data_classes = getattr(datamodule, "num_classes", None)
    if data_classes is None or int(data_classes) == int(model_classes):
        return
    root = getattr(datamodule, "root", None)
    where = f"data.root={root}" if root is not None else f"data={getattr(datamodule, 'dataset_name', '?')}"
    raise EvaluationConfigError(
        f"class count: the model generates model.net.num_classes={model_classes} classes but the data "
        f"({where}) has {data_classes}; use data with {model_classes} classes or give fid.reference.stats_file")


class NonFiniteFeaturesError(ValueError):
    """The feature extractor gave NaN or Inf for a generated image: nothing non-finite is scored."""


def check_finite_features(features: torch.Tensor, logits: torch.Tensor | None, indices, extractor: str) -> None:
    """Raise naming the first image whose features (or logits) are not finite."""
    finite = torch.isfinite(features).all(1)
    if logits is not None:
        finite &= torch.isfinite(logits).all(1)
    if not bool(finite.all()):
        first = int(indices[int(torch.nonzero(~finite)[0, 0])])
        raise NonFiniteFeaturesError(f"the feature extractor {extractor} gave NaN or Inf features for "
                                     f"image {first}: it is not scored (check fid.extractor_weights "
                                     "or fid.inception_weights)")


# ------------------------------------------------------------------------- the evaluation
@dataclass
class FIDPlan:
    """What `FIDEvaluation.prepare` checked and set up: all that generation needs."""

    run_dir: Path
    device: torch.device
    rank: int
    world: int
    num_classes: int  # the model's, whatever the data holds
    image_shape: tuple[int, int, int]  # C, H, W
    space: FeatureSpace
    reference: tuple[np.ndarray, np.ndarray]  # mu, sigma
    reference_source: str
    labels: torch.Tensor  # of every global image index
    sampler: dict
    weights: str  # raw | ema1 | ema2

    @property
    def uses_inception_score(self) -> bool:
        return self.space.is_inception and self.space.logits_layer is not None


@dataclass
class Generated:
    """This rank's share of the generation, streamed into statistics."""

    stats: GaussianStats
    inception: InceptionScoreStats | None
    correct: torch.Tensor  # images the extractor classified as their label (non-Inception logits)
    grid_tiles: list[tuple[int, int, int, np.ndarray]]  # (index, row, column, HWC image)
    seconds: float
    export: NpzExport | None = None  # open while chunks arrive
    grid_slots: dict = field(default_factory=dict)  # global index -> (row, column) of the grid


class FIDEvaluation:
    """Score `fid.num_images` generated images: FID (and IS or cond_accuracy), results.json.

    `prepare` (everything that can fail on bad input), `start`, `add` (one generated chunk),
    `finish`, `reduce` (over ranks) and `report` (results.json, logger). The module is a
    JiTModule: `denoiser`, `sampler`, `eval_weights`, `hparams`, `device`. `extra`
    (quantization config, calibration provenance, per-layer statistics summary) is written
    into results.json as given. Metrics and the sample grid are logged under `log_prefix`
    (`eval`; the float baseline of a quantized run uses `eval_fp`).
    """

    def __init__(self, cfg=None, run_dir=None, extra: dict | None = None, device=None,
                 log_prefix: str = "eval"):
        self.cfg = FIDConfig.from_any(cfg)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.extra = dict(extra or {})
        self.device = device
        self.log_prefix = log_prefix
        self.results: dict | None = None

    def label(self) -> str:
        """What this evaluation scores, for progress lines: the quantization scheme."""
        quant = self.extra.get("quant") or {}
        return str(quant.get("scheme", "fp")) if isinstance(quant, Mapping) else "fp"

    # ----------------------------------------------------------------- prepare
    def prepare(self, trainer, module, datamodule=None) -> FIDPlan:
        """Everything that can fail on bad input, before the first image: the feature
        extractor, the reference statistics (and the data's class count), the labels."""
        cfg, denoiser = self.cfg, module.denoiser
        rank, world = rank_world()
        device = torch.device(self.device) if self.device is not None else module.device
        announce(f"FID ({self.label()}): loading the feature extractor {cfg.extractor} and the reference statistics")
        extractor_weights = cfg.inception_weights if cfg.extractor == INCEPTION else cfg.extractor_weights
        space = create_feature_space(cfg.extractor, extractor_weights, device=device,
                                     probe_size=denoiser.img_size)
        num_classes = int(denoiser.num_classes)
        if not cfg.reference.get("stats_file") and datamodule is not None:
            check_data_classes(num_classes, datamodule)
        reference, reference_source = reference_stats(
            space, cfg.reference.get("stats_file"), datamodule, cfg.reference.get("split", "reference"),
            cfg.reference.get("cache_dir"), cfg.chunk_size)
        if self.run_dir is not None:
            run_dir = self.run_dir
        elif trainer is not None:
            run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        else:
            run_dir = Path.cwd()
        run_dir.mkdir(parents=True, exist_ok=True)
        return FIDPlan(run_dir=run_dir, device=device, rank=rank, world=world, num_classes=num_classes,
                       image_shape=(denoiser.in_channels, denoiser.img_size, denoiser.img_size), space=space,
                       reference=reference, reference_source=reference_source, labels=cfg.labels(num_classes),
                       sampler={**module.sampler, **cfg.sampler}, weights=cfg.eval_weights or module.eval_weights)

    # ------------------------------------------------------------------- score
    def start(self, plan: FIDPlan) -> Generated:
        """Empty running statistics (and the npz shard, PNG folder) for this rank's chunks."""
        cfg, space = self.cfg, plan.space
        inception = (InceptionScoreStats(cfg.num_images, space.extractor.fc.out_features, cfg.isc_splits)
                     if plan.uses_inception_score else None)
        if cfg.save_images:
            (plan.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        _, h, w = plan.image_shape
        export = NpzExport(plan.run_dir, cfg.num_images, (h, w, 3), plan.rank, plan.world,
                           cfg.chunk_size) if cfg.export_npz else None
        return Generated(stats=GaussianStats(space.feature_dim), inception=inception,
                         correct=torch.zeros(1, dtype=torch.float64), grid_tiles=[], seconds=0.0,
                         export=export, grid_slots=sample_grid_slots(
                             plan.labels, plan.num_classes, cfg.grid["samples_per_class"], cfg.grid["max_classes"]))

    def add(self, plan: FIDPlan, generated: Generated, index: torch.Tensor, images: torch.Tensor) -> ChunkRecord:
        """One chunk's images (uint8 NCHW, global indices `index`) scored into the running
        statistics and kept as PNGs, npz rows and sample-grid tiles where asked; returns
        what the chunk store keeps of it (jit/evaluation/chunks.py)."""
        space = plan.space
        if images.shape[1] == 1:  # grey models: the extractors take RGB
            images = images.expand(-1, 3, -1, -1)
        features, logits = space(images.to(plan.device))
        check_finite_features(features, logits, index, space.name)
        nhwc = images.permute(0, 2, 3, 1).cpu().numpy()
        tiles = [(i, *generated.grid_slots[i], nhwc[row]) for row, i in enumerate(index.tolist())
                 if i in generated.grid_slots]
        record = ChunkRecord(index, features.cpu(), logits.cpu() if logits is not None else None, tiles,
                             nhwc if self.cfg.export_npz else None)
        self.keep(plan, generated, record)
        if self.cfg.save_images:
            for row, i in enumerate(index.tolist()):
                Image.fromarray(nhwc[row]).save(plan.run_dir / "samples" / f"{i:06d}_class{int(plan.labels[i])}.png")
        return record

    def keep(self, plan: FIDPlan, generated: Generated, record: ChunkRecord) -> None:
        """A scored chunk, fresh or stored by an earlier run, into this rank's statistics."""
        generated.stats.update(record.features, record.index)
        if generated.inception is not None:
            generated.inception.update(record.logits, record.index)
        elif record.logits is not None:
            generated.correct += (record.logits.argmax(1) == plan.labels[record.index]).sum()
        if generated.export is not None:
            generated.export.add(record.images)
        generated.grid_tiles.extend(record.tiles)

    def digest(self, plan: FIDPlan, module, layer_stats=None) -> str:
        """What the scored features depend on, and which images the per-layer statistics
        stored beside them observe (`layer_stats`): the key of this evaluation's stored
        chunks."""
        fid = asdict(self.cfg)
        fid["reference"] = {k: v for k, v in fid["reference"].items() if k != "cache_dir"}
        fid.pop("progress")
        settings = {"fid": fid, "sampler": plan.sampler, "weights": plan.weights, "extractor": plan.space.name,
                    "extractor_weights_sha256": plan.space.weights_sha256, "image_shape": plan.image_shape,
                    "quant": self.extra.get("quant"), "device": self.extra.get("device"),
                    "layer_stats": layer_stats}
        return settings_digest(settings, model_digest(module.denoiser))

    def finish(self, plan: FIDPlan, generated: Generated, seconds: float) -> None:
        """Every chunk is in: the npz written (all ranks' shards, in index order)."""
        generated.seconds = seconds
        if generated.export is not None:
            export, generated.export = generated.export, None
            export.finish(plan.run_dir / "samples.npz")

    @staticmethod
    def abort(generated: Generated | None) -> None:
        """The pass failed or was stopped: no partial npz is left behind."""
        if generated is not None and generated.export is not None:
            generated.export.abort()
            generated.export = None

    # ------------------------------------------------------------------ reduce
    def reduce(self, plan: FIDPlan, generated: Generated) -> tuple[dict, list]:
        """The metrics over every rank's images (statistics reduced in index order) and the
        sample-grid tiles of all ranks."""
        space = plan.space
        generated.stats.all_reduce()
        mu, sigma = generated.stats.mu_sigma()
        fid = frechet_distance(mu, sigma, *plan.reference)
        # "digits-cnn" is reported as fid_digits: the feature space, never "Inception".
        metrics = {"fid" if space.is_inception else f"fid_{space.name.split('-')[0]}": fid}
        if generated.inception is not None:
            metrics["inception_score"], metrics["inception_score_std"] = generated.inception.all_reduce().compute()
        elif space.logits_layer is not None:
            metrics["cond_accuracy"] = float(all_reduce_sum(generated.correct).item()) / self.cfg.num_images
        tiles = generated.grid_tiles
        if plan.world > 1:
            gathered = [None] * plan.world
            dist.all_gather_object(gathered, tiles)
            tiles = [t for part in gathered for t in part]
        return metrics, tiles

    # ------------------------------------------------------------------ report
    def report(self, trainer, module, plan: FIDPlan, generated: Generated, metrics: dict, tiles: list,
               wall_seconds: float) -> dict:
        """results.json with the provenance two results must share to be compared, the
        sample grid and the logged metrics (rank 0 writes)."""
        cfg, denoiser, space = self.cfg, module.denoiser, plan.space
        results = self.results = {
            "metrics": metrics,
            "num_images": cfg.num_images,
            # Provenance: what two results must share to be compared.
            "model": {"variant": module.hparams["net"].get("name"), "img_size": denoiser.img_size,
                      "num_classes": plan.num_classes, "noise_scale": denoiser.noise_scale},
            "feature_extractor": space.name,
            "feature_extractor_weights_sha256": space.weights_sha256,
            "feature_dim": space.feature_dim,
            "reference": plan.reference_source,
            "reference_stats_sha256": stats_digest(*plan.reference),
            "sampler": plan.sampler,
            "weights": plan.weights,
            "label_strategy": cfg.label_strategy,
            "seed": cfg.seed,
            "world_size": plan.world,
            "precision": self._precision(trainer, denoiser, plan.device),
            "package_version": __version__,
            **provenance(),
            "chunk_size": cfg.chunk_size,
            **self.extra,
            # Flat keys ("weights.bits") so sweeps can tabulate runs.
            "quant": flatten(self.extra.get("quant") or {}),
            "wall_time_s": wall_seconds,
            "generation_time_s": generated.seconds,
            "images_per_s": cfg.num_images / generated.seconds,
        }
        if plan.rank == 0:
            grid = sample_grid(tiles, plan.image_shape[1:]) if tiles else None
            if grid is not None:
                results["sample_grid"] = str(plan.run_dir / "sample_grid.png")
                with atomic_path(results["sample_grid"]) as tmp:
                    Image.fromarray(grid).save(tmp, format="PNG")
            write_json_atomic(results, plan.run_dir / "results.json")
            self._log(trainer, metrics, grid)
        return results

    @staticmethod
    def _precision(trainer, denoiser, device) -> dict:
        """The trainer's precision setting and what generation ran in: the weights' dtype
        and the autocast dtype of the trainer's precision context (JiTModule.generate);
        quantized layers compute in float32 inside it."""
        autocast = None
        if trainer is not None:
            with trainer.precision_plugin.forward_context():
                if torch.is_autocast_enabled(device.type):
                    autocast = str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
        return {"trainer": str(trainer.precision) if trainer is not None else None,
                "weights_dtype": str(next(denoiser.parameters()).dtype).removeprefix("torch."),
                "autocast": autocast}

    def _log(self, trainer, metrics: dict, grid) -> None:
        if trainer is None or trainer.logger is None:
            return
        logger, step, prefix = trainer.logger, trainer.global_step, self.log_prefix
        logger.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        if grid is None:
            return  # CSV and other loggers: the PNG in the run dir is all there is
        from lightning.pytorch.loggers import TensorBoardLogger

        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(f"{prefix}/sample_grid", grid, step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # wandb
            logger.log_image(key=f"{prefix}/sample_grid", images=[grid], step=step)
