"""Checks run before any image is generated: checkpoint settings against the config, the
calibration inputs, the reference statistics and the data's class count."""

from __future__ import annotations

import math
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from jit.config import ConfigError
from jit.module import JiTModule
from jit.settings import RunSettings


def check_checkpoint_settings(cfg: DictConfig, path: str, ckpt=None) -> None:
    """An official checkpoint's generation settings (resolution, classes, noise_scale, t_eps)
    must be the config's: sampling a 512-px model with noise_scale 1.0 runs fine and gives a
    wrong FID. `model.override_checkpoint_args=true` keeps the config's values. `ckpt`: the
    file's contents if already read."""
    from jit.checkpoint import generation_settings

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


def check_reference(fid_cfg, module: JiTModule, dm) -> None:
    """The feature extractor loads (weights present and safe) and the reference statistics
    fit it: a stats file is read, a data split is listed and its class count checked."""
    from jit.evaluation.fid import check_data_classes
    from jit.metrics.features import INCEPTION, create_feature_space
    from jit.metrics.reference import ReferenceStatsError, load_reference_stats

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


def check_before_generation(run: RunSettings, module: JiTModule, dm, check_fid: bool) -> None:
    """Inputs that would otherwise fail only after the float baseline, the calibration, the
    per-layer statistics or the whole generation: calibration data and file, quantization
    targets, and with `check_fid` the feature extractor, reference statistics and the data's
    class count against the model's. Raises with the key or file named."""
    from jit.evaluation.fid import check_data_classes
    from jit.quant import artefact, layer_configs

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


