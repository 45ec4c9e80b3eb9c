"""Checks run before expensive work starts: JiTModule's arguments before the model is
built, the data against the model before training, and before any image is generated
the checkpoint settings against the config, the calibration inputs, the reference
statistics and the data's class count."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from jit.checkpoint import generation_settings
from jit.config import (
    ConfigError,
    DenoiserSchema,
    EMASchema,
    LRSchedule,
    OptimSchema,
    SamplerSchema,
    Weights,
    choices,
    schema_defaults,
)
from jit.evaluation.fid import check_data_classes
from jit.metrics.features import INCEPTION, create_feature_space
from jit.metrics.reference import ReferenceStatsError, load_reference_stats
from jit.quant import artefact, layer_configs

if TYPE_CHECKING:
    from jit.models import Denoiser
    from jit.settings import RunSettings

# JiTModule's sections fall back on the run schema's defaults: each default is written once.
SAMPLER_DEFAULTS = schema_defaults(SamplerSchema)
MODULE_DEFAULTS = {
    "denoiser": schema_defaults(DenoiserSchema),
    "optim": {**schema_defaults(OptimSchema), "batch_size": None},
    "ema": schema_defaults(EMASchema),
    "sampler": SAMPLER_DEFAULTS,
}


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


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def module_arguments(net, eval_weights: str, hold_only: str | None = None, **sections) -> dict:
    """JiTModule's hyper-parameters as plain containers, each section (denoiser, optim, ema,
    sampler) completed with the schema's defaults; checked before the model is built. The
    run schema checks a config's keys and choices at composition; these errors serve
    callers from Python."""
    net = _plain(net)
    if not isinstance(net, dict) or "name" not in net:
        raise ValueError(f"net must be a mapping with a variant 'name' (and build_jit overrides), got {net!r}")
    out = {"net": net}
    for section, defaults in MODULE_DEFAULTS.items():
        given = _plain(sections.get(section)) or {}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {section} option(s) {unknown}; allowed: {sorted(defaults)}")
        out[section] = {**defaults, **given}
    _check_choice("eval_weights", eval_weights, choices(Weights))
    if hold_only is not None:
        _check_choice("hold_only", hold_only, choices(Weights))
    _check_choice("optim.schedule", out["optim"]["schedule"], choices(LRSchedule))
    return {**out, "eval_weights": eval_weights}


def check_sampler_options(options) -> None:
    """Overrides of the sampler settings at generation time (fid.sampler, callers)."""
    unknown = set(options) - set(SAMPLER_DEFAULTS) - {"generator", "step_callback"}
    if unknown:
        raise ValueError(f"unknown sampler option(s) {sorted(unknown)}; allowed: {sorted(SAMPLER_DEFAULTS)}, "
                         "generator and step_callback")


def check_data_fits_model(datamodule, denoiser: Denoiser) -> None:
    """The data's class count and image size must be the model's; a datamodule of the
    project checks its own part (`check_compatible`), another one is read for
    `num_classes` and `img_size` where it has them."""
    net = denoiser.net
    if hasattr(datamodule, "check_compatible"):
        datamodule.check_compatible(patch_size=net.patch_size, num_classes=denoiser.num_classes)
    else:
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != denoiser.num_classes:
            raise ValueError(f"num_classes={denoiser.num_classes} (the model's) disagrees with the data, "
                             f"which has {classes} classes")
    img_size = getattr(datamodule, "img_size", None)
    if img_size is not None and img_size % net.patch_size != 0:
        raise ValueError(f"img_size={img_size} is not divisible by patch_size={net.patch_size}")
    if img_size is not None and img_size != net.input_size:
        raise ValueError(f"the data has img_size={img_size} but the model was built for "
                         f"input_size={net.input_size}; set both to the same value")


def check_checkpoint_settings(cfg: DictConfig, path: str, ckpt=None) -> None:
    """An official checkpoint's generation settings (resolution, classes, noise_scale, t_eps)
    must be the config's: sampling a 512-px model with noise_scale 1.0 runs fine and gives a
    wrong FID. `model.override_checkpoint_args=true` keeps the config's values. `ckpt`: the
    file's contents if already read."""
    trained = generation_settings(path, ckpt=ckpt)
    differ = {}
    for key, value in trained.items():
        configured = OmegaConf.select(cfg, key)
        same = (math.isclose(float(configured), float(value)) if isinstance(value, (int, float))
                and not isinstance(value, bool) else configured == value)
        if not same:
            differ[key] = (value, configured)
    if not differ:
        return
    theirs = " ".join(f"{k}={v}" for k, (v, _) in differ.items())
    ours = " ".join(f"{k}={c}" for k, (_, c) in differ.items())
    if cfg.model.override_checkpoint_args:
        rank_zero_info(f"model.override_checkpoint_args=true: generating with {ours}, although {path} "
                       f"was trained with {theirs}")
        return
    raise ConfigError(f"ckpt_path: {path} was trained with {theirs}, but the config has {ours}; add the "
                      f"overrides {theirs} (or model.override_checkpoint_args=true to keep the config's values)")


def check_calibration_inputs(run: RunSettings, dm) -> None:
    """Static calibration on data needs enough images in the calibration split: check first."""
    if uses_data_for_calibration(run):
        num_images = run.calibration.num_images
        available = len(dm.split_dataset("calibration"))
        if num_images > available:
            raise ConfigError(f"calibration.num_images={num_images} exceeds the {available} images of the "
                              f"calibration split (raise data.calib_num_images)")


def uses_data_for_calibration(run: RunSettings) -> bool:
    qcfg = run.quant
    if not qcfg.quantizes or qcfg.mode != "static" or qcfg.calibration_file is not None:
        return False
    return run.calibration.source == "data"


# `module` below is a JiTModule, not imported: jit/module.py uses these checks itself.
def check_reference(fid_cfg, module, dm) -> None:
    """The feature extractor loads (weights present and safe) and the reference statistics
    fit it: a stats file is read, a data split is listed and its class count checked."""
    weights = fid_cfg.inception_weights if fid_cfg.extractor == INCEPTION else fid_cfg.extractor_weights
    space = create_feature_space(fid_cfg.extractor, weights, probe_size=module.denoiser.img_size)
    stats_file = fid_cfg.reference.get("stats_file")
    if stats_file:
        load_reference_stats(stats_file, space, reduce_images=False)
        return
    check_data_classes(module.denoiser.num_classes, dm)
    split = fid_cfg.reference.get("split", "reference")
    available = len(dm.split_dataset(split))
    if available < 2:
        raise ReferenceStatsError(f"fid.reference.split={split}: the data holds {available} image(s); "
                                  "reference statistics need at least 2 (or give fid.reference.stats_file)")


def check_before_generation(run: RunSettings, module, dm, check_fid: bool) -> None:
    """Inputs that would otherwise fail only after the float baseline, the calibration, the
    per-layer statistics or the whole generation: calibration data and file, quantization
    targets, and with `check_fid` the feature extractor, reference statistics and the data's
    class count against the model's. Raises with the key or file named."""
    qcfg = run.quant
    if uses_data_for_calibration(run):
        check_data_classes(module.denoiser.num_classes, dm)
    check_calibration_inputs(run, dm)
    try:  # targets and quant.layers patterns against the model's layer names
        configs = layer_configs(module.denoiser.net, qcfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    quantized = {name: cfg for name, cfg in configs.items() if cfg.scheme != "fp"}
    if qcfg.quantizes and not quantized:
        raise ConfigError("quant.layers: every targeted layer is set to scheme fp; nothing is quantized "
                          "(use quant=fp for the float model)")
    if qcfg.calibration_file is not None:
        if not quantized or qcfg.mode != "static":
            raise ConfigError(f"quant.calibration_file: only static mode uses it; with quant.scheme="
                              f"{qcfg.scheme} quant.mode={qcfg.mode} it would be ignored (set "
                              "quant.mode=static or drop quant.calibration_file)")
        if not Path(qcfg.calibration_file).is_file():
            raise ConfigError(f"quant.calibration_file: no such file: {qcfg.calibration_file}")
        net = module.denoiser.net
        layers = {name: net.get_submodule(name) for name in quantized}
        config_of = {id(layer): quantized[name] for name, layer in layers.items()}
        with module.eval_weights_context(module.eval_weights):  # the weights it will be applied to
            artefact.check_fits(artefact.load(qcfg.calibration_file), layers,
                                lambda layer: config_of[id(layer)],
                                allow_foreign_weights=qcfg.allow_foreign_calibration,
                                origin=f"quant.calibration_file={qcfg.calibration_file}")
    if check_fid:
        check_reference(run.fid, module, dm)


