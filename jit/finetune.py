"""Fine-tuning and hardware-aware training: the `finetune` section of the run config.

`task=train` starts from `ckpt_path` (an official checkpoint: its `finetune.init_weights`
for the trained weights, its EMAs for the EMAs) and trains the parameters that match
`finetune.trainable`. With `finetune.hardware_aware=true` the training forward runs the
simulated hardware of `quant` (`jit.callbacks.hardware_aware.HardwareInTheLoop`); the
backward is the quantized layers' straight-through estimator (jit/quant/layers.py), so
the weights learn to live with the ADC's rounding and thermal noise. The training
hardware may differ from the evaluation's in two knobs:

    finetune.noise_sigma_lsb   thermal noise while training (null: quant.adc.noise_sigma_lsb)
    finetune.ranges            static | dynamic ranges while training (null: quant.mode);
                               static calibrates with `calibration.*` from the weights at the
                               start and every `finetune.recalibrate_every_n_steps`

Evaluation never reuses training thresholds: an evaluation of the trained checkpoint in
static mode calibrates from the trained weights (the recalibration before evaluation).
`finetune.compare` evaluates the start checkpoint and the trained one after training,
with the same seeds and images, at `quant` merged with each listed override
(`compare_after_training`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from jit.config import ConfigError, to_plain

__all__ = ["FinetuneSettings", "compare_after_training", "freeze_all_but", "training_quant_config"]


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The validated `finetune` section (defaults and allowed values: jit.config.FinetuneSchema)."""

    init_weights: str
    trainable: tuple[str, ...]
    hardware_aware: bool
    noise_sigma_lsb: float | None
    ranges: str | None
    recalibrate_every_n_steps: int
    compare: tuple[dict, ...]


def settings_from(cfg: DictConfig, quant) -> FinetuneSettings:
    """Parse `cfg.finetune` once, with the checks that depend on the task and on `quant`
    (the run's parsed QuantConfig)."""
    plain = to_plain(cfg)
    ft = plain["finetune"]
    qcfg = None
    hardware_only = {"noise_sigma_lsb": None, "ranges": None, "recalibrate_every_n_steps": 0}
    if ft["hardware_aware"]:
        if str(plain["task"]) != "train":
            raise ConfigError(f"finetune.hardware_aware: applies to task=train only (got task={plain['task']})")
        qcfg = quant
        if qcfg.scheme == "fp":
            raise ConfigError("finetune.hardware_aware=true needs a quantized scheme: choose quant=hybrid_w8a11, "
                              "bitserial_w8a12, w8a8, ... (got quant.scheme=fp)")
    else:
        for key, default in hardware_only.items():
            if ft[key] != default:
                raise ConfigError(f"finetune.{key}: only used with finetune.hardware_aware=true")
    ranges = ft["ranges"] or (qcfg.mode if qcfg is not None else None)
    if ft["recalibrate_every_n_steps"] and ranges != "static":
        raise ConfigError("finetune.recalibrate_every_n_steps: only used with static ranges while training "
                          f"(finetune.ranges=static, or quant.mode=static); the ranges are {ranges}")
    if ft["compare"]:
        from jit.quant import build_quant_config

        for i, point in enumerate(ft["compare"]):  # checked now, not after hours of training
            try:
                build_quant_config(_merge(plain["quant"], point))
            except ValueError as err:
                raise ConfigError(f"finetune.compare[{i}]: {err}") from err
        if str(plain["task"]) != "train":
            raise ConfigError(f"finetune.compare: applies to task=train only (got task={plain['task']})")
        if plain["ckpt_path"] is None:
            raise ConfigError("finetune.compare: needs a start checkpoint to compare with (ckpt_path=...)")
    return FinetuneSettings(
        init_weights=ft["init_weights"],
        trainable=tuple(ft["trainable"]),
        hardware_aware=bool(ft["hardware_aware"]),
        noise_sigma_lsb=ft["noise_sigma_lsb"],
        ranges=ranges,
        recalibrate_every_n_steps=int(ft["recalibrate_every_n_steps"]),
        compare=tuple(dict(p) for p in ft["compare"]),
    )


def training_quant_config(quant, settings: FinetuneSettings):
    """The hardware the training forward runs: `quant` with the training noise and ranges."""
    from jit.quant import build_quant_config
    from jit.quant import device as device_model

    plain = build_quant_config(quant).to_dict()
    if settings.ranges is not None:
        plain["mode"] = settings.ranges
    if settings.noise_sigma_lsb is not None:
        plain["adc"]["noise_sigma_lsb"] = settings.noise_sigma_lsb
    if plain["mode"] == "dynamic":
        plain["calibration_file"] = None  # dynamic ranges follow the weights as they train
    # The devices inject their programming noise alone, a fresh draw per step (the
    # HardwareInTheLoop callback keys it on the step): the weights learn to tolerate it.
    plain["device"] = device_model.training_draw(build_quant_config(quant).device)
    return build_quant_config(plain)


def freeze_all_but(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter whose name matches none of `patterns`; return the trained names.

    A pattern that matches nothing is an error naming `finetune.trainable` and some names.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"finetune.trainable: pattern {pattern!r} matches no parameter; "
                              f"names look like {names[:3] + names[-2:]}")
    trained = []
    for name, param in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(keep)
        if keep:
            trained.append(name)
    return trained


# ----------------------------------------------------------------- after training --
def _merge(base: Mapping, override: Mapping) -> dict:
    """`base` with `override` merged in depth, as plain containers."""
    return OmegaConf.to_container(OmegaConf.merge(base, override))


def point_label(qcfg) -> str:
    """A design point in a few words: scheme, mode, ADC bits and noise."""
    if qcfg.scheme == "fp":
        return "float"
    adc = "ADC bypass" if qcfg.adc.bypass else f"ADC {qcfg.adc.bits} bit"
    return f"{qcfg.scheme} {qcfg.mode}, {adc}, {qcfg.adc.noise_sigma_lsb:g} LSB"


def compare_after_training(cfg: DictConfig, settings: FinetuneSettings, start: str, trained: str) -> dict:
    """Evaluate `start` and `trained` (official checkpoints) at every `finetune.compare` point.

    Each evaluation is the normal `task=eval` pipeline (static mode calibrates from the
    weights it evaluates) with this run's fid, sampler, calibration and seeds, in
    `<run>/compare/{start,trained}_<i>/`; the first point also evaluates both in float.
    Writes `<run>/finetune_comparison.json` and returns it.
    """
    from jit.quant import build_quant_config
    from jit.settings import parse_settings
    from jit.tasks import evaluate

    run_dir = Path(cfg.paths.output_dir)
    rows = []
    for i, override in enumerate(settings.compare):
        qcfg = build_quant_config(_merge(to_plain(cfg.quant), override),  # errors name quant.* keys
                                  device=cfg.get("device"))
        row = {"point": point_label(qcfg), "quant": qcfg.to_dict()}
        for tag, path in (("start", start), ("trained", trained)):
            sub = OmegaConf.merge(cfg, {
                "task": "eval", "ckpt_path": path, "compare_fp": i == 0,
                "paths": {"output_dir": str(run_dir / "compare" / f"{tag}_{i}")},
                "finetune": {"hardware_aware": False, "noise_sigma_lsb": None, "ranges": None,
                             "recalibrate_every_n_steps": 0, "compare": []},
            })
            sub.quant = OmegaConf.create(qcfg.to_dict())
            sub.logger = OmegaConf.create({})  # merging {} would keep the run's loggers
            results = evaluate(sub, parse_settings(sub))
            row[tag] = results["metrics"]
            if i == 0:
                row[f"{tag}_float"] = results.get("baseline_fp")
        rows.append(row)
    metric = _headline_metric(rows)
    summary = {"start_checkpoint": start, "trained_checkpoint": trained, "metric": metric, "points": rows}
    from lightning.pytorch.utilities import rank_zero_only

    from jit.evaluation.fid import write_json_atomic

    if rank_zero_only.rank == 0:
        write_json_atomic(summary, run_dir / "finetune_comparison.json")
        print(comparison_table(summary))
    return summary


def _headline_metric(rows: list[dict]) -> str:
    keys = rows[0]["start"].keys() if rows else ()
    for name in ("fid_digits", "fid", "fid_inception"):
        if name in keys:
            return name
    return next(iter(keys), "fid")


def comparison_table(summary: Mapping[str, Any]) -> str:
    """Markdown: each design point's metric before and after fine-tuning, and the float rows."""
    metric = summary["metric"]
    lines = [f"| design point | {metric} start | {metric} fine-tuned | start / fine-tuned |",
             "|---|---:|---:|---:|"]

    def line(label, before, after):
        b, a = before.get(metric) if before else None, after.get(metric) if after else None
        ratio = f"{b / a:.2f}x" if isinstance(b, (int, float)) and isinstance(a, (int, float)) and a > 0 else "-"
        fmt = (lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-")
        lines.append(f"| {label} | {fmt(b)} | {fmt(a)} | {ratio} |")

    for row in summary["points"]:
        line(row["point"], row["start"], row["trained"])
    if summary["points"] and summary["points"][0].get("start_float") is not None:
        first = summary["points"][0]
        line("float", first["start_float"], first["trained_float"])
    return "\n".join(lines)
