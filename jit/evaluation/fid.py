"""FID evaluation: deterministic sharded generation streamed into a feature extractor.

Image i (global index) gets label labels[i] and initial noise drawn from a generator
seeded with seed * 1_000_003 + i, and i is its sample id for the quantized layers'
thermal noise (jit.quant.sample_context). Generation and feature extraction run in fixed
chunks of the global index (`fid.chunk_size` images per forward, rank r of W taking
chunks r, r + W, ...: jit/sample_plan.py), so every run layout computes the same forwards and
the generated images do not depend on the number of processes. Images never leave memory
unless PNGs or an npz are asked for; each image's features are kept with its global
index, and the statistics are reduced once, in index order, after all ranks' rows are
gathered (jit.metrics.fid), so the score does not depend on the layout either.

Everything that can fail on bad input (config values, extractor name, Inception weights,
reference statistics and their shape) is checked before the first image is generated.
"""

from __future__ import annotations

import contextlib
import math
import time
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from jit.atomic import atomic_path, atomic_write_json
from jit.config import FLOAT32_MAX
from jit.console import PhaseProgress, announce
from jit.datamodules import from_model_range
from jit.evaluation.plan import (
    LABEL_STRATEGIES,
    EvaluationConfigError,
    balanced_labels,
    barrier,
    index_chunks,
    initial_noise,
    rank_world,
)
from jit.metrics.features import INCEPTION, create_feature_space
from jit.metrics.fid import GaussianStats, InceptionScoreStats, all_reduce_sum, frechet_distance
from jit.metrics.reference import reference_stats, stats_digest
from jit.models.compile import compiled_forward
from jit.models.denoiser import NonFiniteSampleError
from jit.provenance import provenance
from jit.quant import sample_context
from jit.sample_plan import DEFAULT_CHUNK_SIZE

WEIGHT_CHOICES = ("raw", "ema1", "ema2")


# ------------------------------------------------------------------------------ config
@dataclass
class FIDConfig:
    """The `fid` config group (configs/fid/*.yaml)."""

    extractor: str = INCEPTION
    num_images: int = 50_000
    # Images per forward, a constant of the experiment: results depend on it (in the last
    # bits of float kernels) and on nothing else about the run layout.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    label_strategy: str = "repeat"
    seed: int = 0
    reference: dict = field(default_factory=lambda: {"stats_file": None, "split": "reference", "cache_dir": None})
    inception_weights: str | None = None
    extractor_weights: str | None = None  # weights for a non-Inception extractor (e.g. digits-cnn)
    eval_weights: str | None = None  # raw | ema1 | ema2; None: the module's choice, else ema1
    save_images: bool = False
    export_npz: bool = False
    sampler: dict = field(default_factory=dict)  # overrides of the module's sampler settings
    grid: dict = field(default_factory=lambda: {"samples_per_class": 8, "max_classes": 16})
    isc_splits: int = 10
    progress: bool = True

    @classmethod
    def from_any(cls, cfg) -> FIDConfig:
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            cfg = {}
        if isinstance(cfg, DictConfig):  # plain containers, so results.json gets lists, not ListConfig
            cfg = OmegaConf.to_container(cfg, resolve=True)
        known = {f.name for f in fields(cls)}
        if "batch_size" in cfg:
            raise EvaluationConfigError(
                "fid.batch_size was replaced by fid.chunk_size: every forward covers one fixed "
                "chunk of the global image index, so the images do not depend on the run layout")
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise EvaluationConfigError(f"unknown fid settings {unknown}; known: {sorted(known)}")
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


def package_version() -> str:
    from jit import __version__

    return __version__


# ------------------------------------------------------------------------ file output
def write_json_atomic(obj, path) -> None:
    """JSON written atomically: an interrupted write leaves the previous file (or none)."""
    atomic_write_json(path, obj, indent=2, sort_keys=True, default=str)


class NpzExport:
    """ADM-style sample export (`arr_0`, NHWC uint8) at constant memory.

    Each rank appends its chunks of images to a raw shard file in the run dir; rank 0 then
    streams the chunks, back in global index order (chunk k is the k // W-th chunk of rank
    k % W), into one zip entry of a temporary npz and renames it into place. Needs a file
    system all ranks share.
    """

    def __init__(self, run_dir: Path, num_images: int, image_shape_hwc, rank: int, world: int,
                 chunk_size: int):
        self.run_dir, self.num_images, self.shape = run_dir, num_images, tuple(image_shape_hwc)
        self.rank, self.world, self.chunk_size = rank, world, chunk_size
        self.item_bytes = int(np.prod(self.shape))
        # Open for the whole generation loop; closed by finish() or abort().
        self.file = open(self._shard(rank), "wb")  # noqa: SIM115

    def _shard(self, rank: int) -> Path:
        return self.run_dir / f".samples.rank{rank}.u8"

    def add(self, images_nhwc: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(images_nhwc, dtype=np.uint8).tobytes())

    def finish(self, path: Path) -> None:
        self.file.close()
        barrier()
        if self.rank == 0:
            n, w, c = self.num_images, self.world, self.chunk_size
            with contextlib.ExitStack() as stack:
                shards = [stack.enter_context(open(self._shard(r), "rb")) for r in range(w)]
                with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                        zf.open("arr_0.npy", "w", force_zip64=True) as out:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                              "fortran_order": False, "shape": (n, *self.shape)}
                    np.lib.format.write_array_header_1_0(out, header)
                    for k in range(math.ceil(n / c)):
                        count = min(c, n - k * c)
                        shard = shards[k % w]  # its chunks are read in order: no seek needed
                        out.write(shard.read(count * self.item_bytes))
        barrier()
        self._shard(self.rank).unlink(missing_ok=True)

    def abort(self) -> None:
        """Interrupted: drop this rank's partial shard."""
        self.file.close()
        self._shard(self.rank).unlink(missing_ok=True)


def flatten(d, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; dataclasses are turned into dicts first."""
    if is_dataclass(d) and not isinstance(d, type):
        d = asdict(d)
    out = {}
    for key, value in dict(d).items():
        name = f"{prefix}{key}"
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------- the evaluation
class FIDEvaluation:
    """Generate `fid.num_images` images and report FID (and IS or cond_accuracy).

    Call `run(trainer, module, datamodule)` (the `task=eval` pipeline runs it on every
    process; `trainer` may be None). The module must provide `generate(labels, noise=None, **sampler)`
    (or a `denoiser` with that method), a `sampler` dict and `eval_weights_context(which)`.
    `extra` (quantization config, calibration provenance, per-layer statistics summary)
    is written into results.json as given. Metrics and the sample grid are logged under
    `log_prefix` (`eval`; the float baseline of a quantized run uses `eval_fp`).
    """

    def __init__(self, cfg=None, run_dir=None, extra: dict | None = None, device=None,
                 log_prefix: str = "eval", compile_backbone: bool = False):
        self.cfg = FIDConfig.from_any(cfg)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.extra = dict(extra or {})
        self.device = device
        self.log_prefix = log_prefix
        self.compile_backbone = compile_backbone
        self.results: dict | None = None

    # ---------------------------------------------------------------- helpers
    def _run_dir(self, trainer) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        for attr in ("log_dir", "default_root_dir"):
            value = getattr(trainer, attr, None) if trainer is not None else None
            if value:
                return Path(value)
        return Path.cwd()

    @staticmethod
    def _device(module) -> torch.device:
        device = getattr(module, "device", None)
        if isinstance(device, torch.device):
            return device
        denoiser = getattr(module, "denoiser", module)
        return next(denoiser.parameters()).device

    def _weights(self, module) -> str:
        return self.cfg.eval_weights or getattr(module, "eval_weights", None) or "ema1"

    def _label(self) -> str:
        """What this evaluation scores, for progress lines: the quantization scheme."""
        quant = self.extra.get("quant") or {}
        return str(quant.get("scheme", "fp")) if isinstance(quant, Mapping) else "fp"

    def _sampler(self, module) -> dict:
        return {**dict(getattr(module, "sampler", None) or {}), **self.cfg.sampler}

    @staticmethod
    def _generate_fn(module):
        if hasattr(module, "generate"):
            return module.generate
        return module.denoiser.generate

    def _quant_config(self, module) -> dict:
        quant = getattr(module, "quant_config", None)
        if quant is None:
            hparams = getattr(module, "hparams", None) or {}
            quant = hparams.get("quant") if isinstance(hparams, Mapping) else None
        if quant is None:
            return {}
        if isinstance(quant, DictConfig):
            quant = OmegaConf.to_container(quant, resolve=True)
        return flatten(quant)

    def _grid_slots(self, labels: torch.Tensor, num_classes: int) -> dict[int, tuple[int, int]]:
        """Global index -> (row, column) of the sample grid: rows are classes, in class order."""
        spc, max_rows = self.cfg.grid["samples_per_class"], self.cfg.grid["max_classes"]
        if spc == 0:
            return {}
        classes = np.unique(np.linspace(0, num_classes - 1, min(num_classes, max_rows)).round().astype(int))
        slots = {}
        for row, c in enumerate(classes):
            for col, index in enumerate(torch.nonzero(labels == int(c)).flatten()[:spc].tolist()):
                slots[index] = (row, col)
        return slots

    # --------------------------------------------------------------------- run
    def run(self, trainer, module, datamodule=None) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        rank, world = rank_world()
        run_dir = self._run_dir(trainer)
        device = torch.device(self.device) if self.device is not None else self._device(module)
        denoiser = getattr(module, "denoiser", module)
        num_classes = int(denoiser.num_classes)  # what the model was trained on, whatever the data holds
        image_shape = (denoiser.in_channels, denoiser.img_size, denoiser.img_size)

        # ---- everything that can fail on bad input, before the first image
        announce(f"FID ({self._label()}): loading the feature extractor {cfg.extractor} and the reference statistics")
        extractor_weights = cfg.inception_weights if cfg.extractor == INCEPTION else cfg.extractor_weights
        space = create_feature_space(cfg.extractor, extractor_weights, device=device,
                                     probe_size=denoiser.img_size)
        if not cfg.reference.get("stats_file") and datamodule is not None:
            check_data_classes(num_classes, datamodule)
        (ref_mu, ref_sigma), ref_source = reference_stats(
            space, cfg.reference.get("stats_file"), datamodule, cfg.reference.get("split", "reference"),
            cfg.reference.get("cache_dir"), cfg.chunk_size)
        use_is = space.is_inception and space.logits_layer is not None
        if use_is:
            is_stats = InceptionScoreStats(cfg.num_images, space.extractor.fc.out_features, cfg.isc_splits)
        labels = balanced_labels(cfg.num_images, num_classes, cfg.label_strategy)
        sampler = self._sampler(module)
        weights = self._weights(module)
        generate = self._generate_fn(module)
        net = getattr(denoiser, "net", None)  # the backbone whose calls are counted
        run_dir.mkdir(parents=True, exist_ok=True)

        # ---- generation, streamed
        stats = GaussianStats(space.feature_dim)
        correct = torch.zeros(1, dtype=torch.float64)
        grid_slots = self._grid_slots(labels, num_classes)
        grid_tiles: list[tuple[int, int, int, np.ndarray]] = []
        chunks = index_chunks(cfg.num_images, cfg.chunk_size, rank, world)
        png_dir = run_dir / "samples"
        if cfg.save_images:
            png_dir.mkdir(parents=True, exist_ok=True)
        export = NpzExport(run_dir, cfg.num_images, (image_shape[1], image_shape[2], 3), rank, world,
                           cfg.chunk_size) if cfg.export_npz else None
        weights_ctx = module.eval_weights_context(weights) if hasattr(module, "eval_weights_context") \
            else contextlib.nullcontext()
        label = f"FID generation ({self._label()})"
        announce(f"{label}: {cfg.num_images} images in chunks of {cfg.chunk_size} on {world} process(es), "
                 f"{sampler.get('method')} sampler with {sampler.get('steps')} steps")
        progress = PhaseProgress(label, cfg.num_images, "images", enabled=rank == 0 and cfg.progress)
        gen_start = time.perf_counter()
        try:
            if self.compile_backbone:
                # Graphs of earlier evaluations in this process (the float baseline, earlier
                # jobs of a sweep) guard on modules that are gone; they would count against
                # Dynamo's limit of 8 graphs per code object, past which it runs eagerly.
                torch._dynamo.reset()
            compiled = compiled_forward(net, self.compile_backbone and net is not None)
            with weights_ctx, progress, torch.no_grad(), compiled:
                done_here = 0  # images of this rank so far
                for idx in chunks:
                    noise = initial_noise(cfg.seed, idx, image_shape, denoiser.noise_scale).to(device)
                    y = labels[idx].to(device)
                    in_flight, done_before = len(idx) * world, min(cfg.num_images, done_here * world)

                    def advance(steps_done, steps, n=in_flight, base=done_before):
                        progress.update(min(cfg.num_images, base + n * steps_done / steps))

                    # The global index is the sample id of the thermal noise too.
                    try:
                        with sample_context(net, idx) if net is not None else contextlib.nullcontext():
                            x = generate(y, noise=noise, step_callback=advance, **sampler)
                    except NonFiniteSampleError as err:
                        raise err.for_images(idx) from None
                    images = from_model_range(x)
                    if images.shape[1] == 1:  # grey models: the extractors take RGB
                        images = images.expand(-1, 3, -1, -1)
                    features, logits = space(images)
                    check_finite_features(features, logits, idx, space.name)
                    stats.update(features, idx)
                    if use_is:
                        is_stats.update(logits, idx)
                    elif logits is not None:
                        correct += (logits.argmax(1) == labels[idx]).sum()
                    nhwc = images.permute(0, 2, 3, 1).cpu().numpy()
                    if export is not None:
                        export.add(nhwc)
                    for row, index in enumerate(idx.tolist()):
                        if index in grid_slots:
                            grid_tiles.append((index, *grid_slots[index], nhwc[row]))
                        if cfg.save_images:
                            Image.fromarray(nhwc[row]).save(png_dir / f"{index:06d}_class{int(labels[index])}.png")
                    done_here += len(idx)
                    progress.update(min(cfg.num_images, done_here * world))
            gen_time = time.perf_counter() - gen_start
            if export is not None:
                export.finish(run_dir / "samples.npz")
                export = None
        finally:
            if export is not None:  # interrupted
                export.abort()

        # ---- reduce over ranks and report (rank 0 writes)
        stats.all_reduce()
        mu, sigma = stats.mu_sigma()
        fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
        metrics = {"fid" if space.is_inception else f"fid_{self._space_tag(space.name)}": fid}
        if use_is:
            metrics["inception_score"], metrics["inception_score_std"] = is_stats.all_reduce().compute()
        elif space.logits_layer is not None:
            metrics["cond_accuracy"] = float(all_reduce_sum(correct).item()) / cfg.num_images
        tiles = self._gather_tiles(grid_tiles)
        wall = time.perf_counter() - start
        hparams = getattr(module, "hparams", None) or {}
        results = {
            "metrics": metrics,
            "num_images": cfg.num_images,
            # Provenance: what two results must share to be compared.
            "model": {"variant": (hparams.get("net") or {}).get("name"), "img_size": denoiser.img_size,
                      "num_classes": num_classes, "noise_scale": denoiser.noise_scale},
            "feature_extractor": space.name,
            "feature_extractor_weights_sha256": space.weights_sha256,
            "feature_dim": space.feature_dim,
            "reference": ref_source,
            "reference_stats_sha256": stats_digest(ref_mu, ref_sigma),
            "sampler": sampler,
            "weights": weights,
            "label_strategy": cfg.label_strategy,
            "seed": cfg.seed,
            "world_size": world,
            "precision": self._precision(trainer, denoiser, device),
            "package_version": package_version(),
            **provenance(),
            "chunk_size": cfg.chunk_size,
            **self.extra,
            # Flat keys ("weights.bits") so sweeps can tabulate runs; the caller's config wins.
            "quant": flatten(self.extra["quant"]) if self.extra.get("quant") is not None
            else self._quant_config(module),
            "wall_time_s": wall,
            "generation_time_s": gen_time,
            "images_per_s": cfg.num_images / gen_time,
        }
        if rank == 0:
            grid = self._grid_image(tiles, image_shape[1:]) if tiles else None
            if grid is not None:
                results["sample_grid"] = str(run_dir / "sample_grid.png")
                with atomic_path(results["sample_grid"]) as tmp:
                    Image.fromarray(grid).save(tmp, format="PNG")
            write_json_atomic(results, run_dir / "results.json")
            self._log(trainer, metrics, grid)
        self.results = results
        return results

    @staticmethod
    def _precision(trainer, denoiser, device) -> dict:
        """The trainer's precision setting and what generation ran in: the weights' dtype
        and the autocast dtype of the trainer's precision context (JiTModule.generate);
        quantized layers compute in float32 inside it."""
        plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
        autocast = None
        if plugin is not None:
            with plugin.forward_context():
                if torch.is_autocast_enabled(device.type):
                    autocast = str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
        return {"trainer": str(getattr(trainer, "precision", None)) if trainer is not None else None,
                "weights_dtype": str(next(denoiser.parameters()).dtype).removeprefix("torch."),
                "autocast": autocast}

    @staticmethod
    def _space_tag(name: str) -> str:
        # "digits-cnn" is reported as fid_digits: the feature space, never "Inception".
        return name.split("-")[0]

    @staticmethod
    def _gather_tiles(tiles):
        _, world = rank_world()
        if world == 1:
            return tiles
        gathered = [None] * world
        dist.all_gather_object(gathered, tiles)
        return [t for part in gathered for t in part]

    @staticmethod
    def _grid_image(tiles, hw, pad: int = 2) -> np.ndarray:
        """HWC uint8 grid: one row per grid class, samples_per_class columns, black padding."""
        rows = 1 + max(t[1] for t in tiles)
        cols = 1 + max(t[2] for t in tiles)  # fewer than samples_per_class when num_images is small
        h, w = hw
        grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
        for _, row, col, image in tiles:
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            grid[y : y + h, x : x + w] = image
        return grid

    def _log(self, trainer, metrics: dict, grid) -> None:
        logger = getattr(trainer, "logger", None) if trainer is not None else None
        if logger is None:
            return
        step = int(getattr(trainer, "global_step", 0))
        prefix = self.log_prefix
        logger.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        if grid is None:
            return  # CSV and other loggers: the PNG in the run dir is all there is
        from lightning.pytorch.loggers import TensorBoardLogger

        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(f"{prefix}/sample_grid", grid, step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # wandb
            logger.log_image(key=f"{prefix}/sample_grid", images=[grid], step=step)
