"""Structured schema of the run configuration and startup validation.

The schema is registered in Hydra's ConfigStore as `run_schema` and sits first in
`configs/run.yaml`'s defaults, so an unknown key or a value of the wrong type fails
at composition, before any model or data work. Range checks that types cannot express
live in `validate`, also called before anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from jit.hardware.config import HardwareSchema
from jit.models.denoiser import SAMPLING_METHODS, TIME_SCHEDULES
from jit.quant.schema import DeviceSchema, QuantSchema
from jit.sample_plan import DEFAULT_CHUNK_SIZE


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


class _Choice(str, Enum):
    """Enum whose interpolation (`${task}` in a path) is its value, not `Task.eval`."""

    def __str__(self) -> str:
        return self.value


class Task(_Choice):
    train = "train"
    eval = "eval"
    calibrate = "calibrate"
    export = "export"
    sensitivity = "sensitivity"
    search = "search"


class Weights(_Choice):
    raw = "raw"
    ema1 = "ema1"
    ema2 = "ema2"


# What the sampler implements is the Denoiser's to say; the schema takes its list.
Method = _Choice("Method", [(name, name) for name in SAMPLING_METHODS])
Schedule = _Choice("Schedule", [(name, name) for name in TIME_SCHEDULES])


class LRSchedule(_Choice):
    constant = "constant"
    cosine = "cosine"


class InitWeights(_Choice):
    model = "model"
    model_ema1 = "model_ema1"
    model_ema2 = "model_ema2"


class Ranges(_Choice):
    static = "static"
    dynamic = "dynamic"


@dataclass
class NetSchema:
    name: str = MISSING
    input_size: int = 256
    num_classes: int = 1000
    attn_drop: float = 0.0
    proj_drop: float = 0.0


@dataclass
class DenoiserSchema:
    P_mean: float = -0.8
    P_std: float = 0.8
    t_eps: float = 0.05
    noise_scale: float = 1.0
    label_drop_prob: float = 0.1


@dataclass
class ModelSchema:
    net: NetSchema = field(default_factory=NetSchema)
    denoiser: DenoiserSchema = field(default_factory=DenoiserSchema)
    # An official checkpoint's args (img_size, class_num, noise_scale, t_eps) must agree with
    # the config; true: generate with the config's values anyway.
    override_checkpoint_args: bool = False
    # task=eval: generate the FID images with a torch.compile'd backbone, quantized layers
    # included (jit/models/compile.py); the first batch compiles. Needs a C++ compiler on CPU.
    compile: bool = False


@dataclass
class SamplerSchema:
    method: Method = Method.heun
    steps: int = 50
    cfg_scale: float = 1.0
    interval: list[float] = field(default_factory=lambda: [0.1, 1.0])
    schedule: Schedule = Schedule.linear


@dataclass
class OptimSchema:
    blr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    schedule: LRSchedule = LRSchedule.constant
    min_lr: float = 0.0


@dataclass
class EMASchema:
    decay1: float = 0.9999
    decay2: float = 0.9996


@dataclass
class ExportSchema:
    out_path: str | None = None


@dataclass
class PathsSchema:
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class EvalSchema:
    layer_stats_images: int = 50  # per-layer statistics of the first N FID images; 0 = off


@dataclass
class FinetuneSchema:
    """task=train from a checkpoint, and hardware-aware training (jit/finetune.py)."""

    # Which weights of an official ckpt_path the trained weights start from; the EMAs start
    # from its model_ema1/model_ema2 either way.
    init_weights: InitWeights = InitWeights.model
    # fnmatch patterns over the Denoiser's parameter names (net.blocks.0.mlp.w12.weight);
    # the parameters no pattern matches are frozen. ["*"]: everything trains (training from
    # scratch, plain fine-tuning); the hardware-aware recipes (experiment=*_hwa) train the
    # FFN weights the hardware runs, ["net.blocks.*.mlp.*"].
    trainable: list[str] = field(default_factory=lambda: ["*"])
    # true: the training forward runs the simulated hardware of `quant` (STE backward).
    hardware_aware: bool = False
    # Thermal noise while training, in ADC LSB; null: quant.adc.noise_sigma_lsb.
    noise_sigma_lsb: float | None = None
    # Activation/ADC ranges while training; null: quant.mode. static calibrates (calibration.*)
    # from the weights at the start and again every recalibrate_every_n_steps.
    ranges: Ranges | None = None
    recalibrate_every_n_steps: int = 0  # 0: calibrate once, at the start
    # After training: evaluate the start checkpoint and the trained weights with the same
    # seeds at `quant` merged with each of these overrides (e.g. {adc: {bits: 4}}); the first
    # point is also evaluated in float. Empty: no comparison.
    compare: list[Any] = field(default_factory=list)


@dataclass
class CalibrationSchema:
    """The `calibration` group (configs/calibration/): every preset states only what it
    changes. Allowed values are checked by jit/evaluation/calibration.py (CalibrationConfig)."""

    method: str = "kl"  # kl | mse | percentile | minmax
    num_images: int = 256  # images (data) or generated samples (sampling) calibrated on
    batch_size: int = 32
    # data: the calibration split noised at random t as in training; sampling: the model's
    # own CFG sampling trajectories (no dataset needed).
    source: str = "data"
    # Histogram bins over [0, 2^ceil(log2 max|x|)], a power of two; null: 128 per level of
    # each quantizer (131072 for INT11); doubling it moves the clip < 5%.
    num_bins: int | None = None
    percentile: float = 99.99  # method=percentile: the percentile of |x| clipped at
    seed: int = 0
    save_weights: bool = False  # also store the INT weights and their steps in the artefact
    # false: calibrate the design (ideal devices and converters, the seed's procedure);
    # true: through the programmed arrays at device.t_inference_s and their converters
    # (hardware-in-the-loop calibration of one chip).
    on_device: bool = False


@dataclass
class FIDSchema:
    """The `fid` group (configs/fid/): every preset states only what it changes. Allowed
    values are checked by jit/evaluation/fid.py (FIDConfig)."""

    extractor: str = "inception-v3-compat"  # or digits-cnn (reported as fid_digits)
    num_images: int = 50_000
    # Images per forward, a constant of the experiment: ranks take whole chunks of the
    # global index, and results depend on it (in the last bits of float kernels) and on
    # nothing else about the run layout.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    label_strategy: str = "repeat"  # repeat | spread (only matters when num_images % classes != 0)
    seed: int = 0  # image i starts from noise seeded by (seed, i)
    # stats_file: an npz with mu/sigma; else computed once from the datamodule `split` and
    # cached in cache_dir (null: not cached).
    reference: dict[str, Any] = field(default_factory=lambda: {"stats_file": None, "split": "reference",
                                                                 "cache_dir": None})
    inception_weights: str | None = None  # local weights file for offline machines; null: torch hub cache
    extractor_weights: str | None = None  # weights of a non-Inception extractor; null: the shipped ones
    eval_weights: str | None = None  # raw | ema1 | ema2; null: the run's eval_weights
    save_images: bool = False  # also write every sample as PNG under <run>/samples
    export_npz: bool = False  # also write <run>/samples.npz (arr_0, NHWC uint8) for external evaluators
    sampler: dict[str, Any] = field(default_factory=dict)  # overrides of the run's sampler, e.g. {steps: 25}
    # Rows of sample_grid.png: classes spread evenly over the label range.
    grid: dict[str, Any] = field(default_factory=lambda: {"samples_per_class": 8, "max_classes": 16})
    isc_splits: int = 10
    progress: bool = True


class SensitivityUnit(_Choice):
    layer = "layer"
    block = "block"


@dataclass
class SensitivitySchema:
    """task=sensitivity (jit/sensitivity.py, docs/exploration.md): one unit at a time on the
    hardware of `quant`, the rest float."""

    unit: SensitivityUnit = SensitivityUnit.layer  # layer: each targeted layer; block: per block
    # Images whose float sampling trajectories the proxy (output MSE vs float) follows.
    proxy_images: int = 32
    fid_images: int = 0  # FID of each unit over this many images; 0: the proxy only


@dataclass
class SearchSchema:
    """task=search (jit/search.py, docs/exploration.md): a Pareto search over per-layer
    hardware with Optuna's NSGA-II sampler, each trial an evaluation of `quant` with the
    trial's picks appended to quant.layers."""

    n_trials: int = 20  # complete trials; a rerun with a larger number continues the study
    # {unit pattern: {quant field: [choices]}}, e.g. {"blocks.0.*": {adc: {bits: [6, 8, 10]}}}
    space: Any = None
    objectives: list[str] = field(default_factory=lambda: ["fid", "energy"])  # all minimised
    # After the trials: each Pareto point evaluated again with FID over this many images
    # (the trials' reduced fid.num_images ranks them); 0: not re-evaluated.
    front_fid_images: int = 0


@dataclass
class ResumeSchema:
    """task=train with a Lightning ckpt_path: the run continues that training, so its data,
    optimizer, EMA and model settings must be the checkpoint's (jit/builders.py,
    check_resume_settings). Keys (or fnmatch patterns, e.g. "optim.*") listed here may differ."""

    allow_changes: list[str] = field(default_factory=list)


@dataclass
class RunSchema:
    task: Task = Task.eval
    seed: int = 0
    # A Lightning .ckpt (resume, eval) or an official checkpoint-last.pth (eval, fine-tune);
    # None: the shipped digits model.
    ckpt_path: str | None = None
    eval_weights: Weights = Weights.ema1
    compare_fp: bool = True  # eval: also evaluate the float model with the same seeds
    # Where stdout is not a terminal (SLURM, nohup, CI): seconds between the plain progress
    # lines of generation, calibration, reference statistics and training.
    progress_interval_s: float = 30.0
    # A run folder holding an earlier run's outputs is refused; true: move them to
    # previous/<timestamp>/ in that folder and run there (docs/runs.md).
    overwrite: bool = False
    model: ModelSchema = field(default_factory=ModelSchema)
    sampler: SamplerSchema = field(default_factory=SamplerSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    ema: EMASchema = field(default_factory=EMASchema)
    export: ExportSchema = field(default_factory=ExportSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)
    resume: ResumeSchema = field(default_factory=ResumeSchema)
    sensitivity: SensitivitySchema = field(default_factory=SensitivitySchema)
    search: SearchSchema = field(default_factory=SearchSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)
    calibration: CalibrationSchema = field(default_factory=CalibrationSchema)
    fid: FIDSchema = field(default_factory=FIDSchema)
    quant: QuantSchema = field(default_factory=QuantSchema)  # jit/quant/schema.py
    device: DeviceSchema = field(default_factory=DeviceSchema)  # jit/quant/schema.py
    hardware: HardwareSchema = field(default_factory=HardwareSchema)  # jit/hardware/config.py
    # Instantiation targets: the keys are the keyword arguments of the `_target_` class (a
    # datamodule of jit/datamodules/, lightning.Trainer), differ per option and default in the
    # class; a closed schema would refuse each class's own keys. The class checks them.
    data: dict[str, Any] = MISSING
    trainer: dict[str, Any] = MISSING
    # name -> one instantiation node (its class's keyword arguments), or null to leave it out
    logger: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any] | None] = field(default_factory=dict)


ASSETS = Path(__file__).parent / "assets"
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def schema_defaults(schema: type) -> dict[str, Any]:
    """The defaults of a schema section as plain values (enum members as their strings,
    lists copied): what code outside Hydra (JiTModule's keyword arguments) falls back to,
    so each default is written once, here."""
    def plain(value):
        if isinstance(value, Enum):
            return value.value
        return list(value) if isinstance(value, list) else value

    values = {}
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values[f.name] = plain(value)
    return values


def choices(enum: type[Enum]) -> tuple[str, ...]:
    """The allowed strings of a schema choice, in declaration order."""
    return tuple(member.value for member in enum)


def register_schemas() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunSchema)
    # `${jit_asset:digits_jit.pth}`: a file shipped in jit/assets, wherever the package lives.
    if not OmegaConf.has_resolver("jit_asset"):
        OmegaConf.register_new_resolver("jit_asset", lambda name: str(ASSETS / name))
    # `${jit_sweep_group:}`: the multirun's folder name (configs/logger/wandb.yaml groups a
    # sweep's jobs by it), None in a single run.
    if not OmegaConf.has_resolver("jit_sweep_group"):
        OmegaConf.register_new_resolver("jit_sweep_group", lambda: sweep_group())


def sweep_group(cfg: DictConfig | None = None) -> str | None:
    """The name of the running multirun's sweep folder, None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except (ValueError, ImportError):
        pass
    return None


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_finite(node: Any, key: str = "") -> None:
    """Every number anywhere in a (nested) config must be finite: no inf or nan settings.

    One walk over the whole tree, so groups validated elsewhere (quant, calibration, fid,
    trainer) are covered too; the error names the full key.
    """
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        node = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    if isinstance(node, dict):
        for name, value in node.items():
            check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            check_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}: must be a finite number, got {node}")


def validate(cfg: DictConfig) -> None:
    """Range checks across the run config; raises ConfigError naming the key."""
    check_finite(cfg)
    s, o, net, den = cfg.sampler, cfg.optim, cfg.model.net, cfg.model.denoiser
    _check(s.steps >= 1, "sampler.steps", f"must be >= 1, got {s.steps}")
    _check(0 <= s.cfg_scale <= FLOAT32_MAX, "sampler.cfg_scale",
           f"must be in [0, {FLOAT32_MAX:.4g}] (the sampler computes in float32, where a larger scale "
           f"is Inf at the first guided step), got {s.cfg_scale}")
    _check(len(s.interval) == 2 and 0 <= s.interval[0] <= s.interval[1] <= 1, "sampler.interval",
           f"must be [low, high] with 0 <= low <= high <= 1, got {list(s.interval)}")
    _check(o.blr > 0, "optim.blr", f"must be > 0, got {o.blr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {list(o.betas)}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(cfg.progress_interval_s > 0, "progress_interval_s",
           f"must be > 0 seconds, got {cfg.progress_interval_s}")
    _check(cfg.eval.layer_stats_images >= 0, "eval.layer_stats_images",
           f"must be >= 0 (0 = no per-layer statistics), got {cfg.eval.layer_stats_images}")
    for key in ("decay1", "decay2"):
        value = cfg.ema[key]
        _check(0 <= value < 1, f"ema.{key}", f"must be in [0, 1), got {value}")
    _check(net.input_size > 0, "model.net.input_size", f"must be > 0, got {net.input_size}")
    _check(net.num_classes >= 1, "model.net.num_classes", f"must be >= 1, got {net.num_classes}")
    _check(0 <= den.label_drop_prob < 1, "model.denoiser.label_drop_prob",
           f"must be in [0, 1), got {den.label_drop_prob}")
    _check(den.noise_scale > 0, "model.denoiser.noise_scale", f"must be > 0, got {den.noise_scale}")
    _check(den.t_eps > 0, "model.denoiser.t_eps", f"must be > 0, got {den.t_eps}")
    _check(not cfg.model.compile or cfg.task == Task.eval, "model.compile",
           f"compiles the backbone for FID generation (task=eval); task={cfg.task} runs eagerly")
    ft = cfg.finetune
    _check(len(ft.trainable) >= 1, "finetune.trainable",
           "must list at least one parameter name pattern (['*'] trains everything)")
    if ft.noise_sigma_lsb is not None:
        _check(ft.noise_sigma_lsb >= 0, "finetune.noise_sigma_lsb",
               f"must be >= 0 (ADC LSB) or null (= quant.adc.noise_sigma_lsb), got {ft.noise_sigma_lsb}")
    _check(ft.recalibrate_every_n_steps >= 0, "finetune.recalibrate_every_n_steps",
           f"must be >= 0 (0 = calibrate once, at the start), got {ft.recalibrate_every_n_steps}")
    for i, point in enumerate(ft.compare):
        _check(isinstance(point, DictConfig), f"finetune.compare[{i}]",
               f"must be a mapping of quant overrides such as {{adc: {{bits: 6}}}}, got {point!r}")
    _check(not cfg.resume.allow_changes or cfg.task == Task.train, "resume.allow_changes",
           f"applies to resuming a training (task=train with a Lightning ckpt_path), not to task={cfg.task}")
    sens, sens_defaults = cfg.sensitivity, schema_defaults(SensitivitySchema)
    _check(sens.proxy_images >= 1, "sensitivity.proxy_images", f"must be >= 1, got {sens.proxy_images}")
    _check(sens.fid_images == 0 or sens.fid_images >= 2, "sensitivity.fid_images",
           f"must be 0 (proxy only) or >= 2 (FID needs two images), got {sens.fid_images}")
    if cfg.task != Task.sensitivity:
        changed = [key for key, value in sens_defaults.items() if str(sens[key]) != str(value)]
        _check(not changed, f"sensitivity.{changed[0] if changed else ''}",
               f"applies to task=sensitivity only (got task={cfg.task})")
    _check(cfg.search.n_trials >= 1, "search.n_trials", f"must be >= 1, got {cfg.search.n_trials}")
    front = cfg.search.front_fid_images
    _check(front == 0 or front >= 2, "search.front_fid_images",
           f"must be 0 (no re-evaluation) or >= 2 (FID needs two images), got {front}")
    if cfg.task != Task.search:
        search_defaults = schema_defaults(SearchSchema)
        changed = [key for key, value in search_defaults.items()
                   if OmegaConf.to_container(cfg.search, resolve=True)[key] != value]
        _check(not changed, f"search.{changed[0] if changed else ''}",
               f"applies to task=search only (got task={cfg.task})")
    if cfg.task == Task.export:
        _check(cfg.ckpt_path is not None, "ckpt_path", "task=export needs ckpt_path=<Lightning .ckpt>")
    data_target = str(cfg.data.get("_target_", ""))
    if data_target.endswith("ImageNetDataModule"):
        _check(cfg.data.get("root") is not None, "data.root",
               "data=imagenet needs data.root=/path/to/imagenet (with train/ and val/ folders)")
        if cfg.task in (Task.eval, Task.calibrate):
            _check(cfg.ckpt_path is not None, "ckpt_path",
                   f"task={cfg.task.value} on ImageNet needs ckpt_path=/path/to/checkpoint-last.pth")


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
