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

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from jit.builders import checkpoint_kind
from jit.checks import check_before_generation, check_checkpoint_settings
from jit.config import ConfigError, to_plain
from jit.evaluation.fid import write_json_atomic
from jit.quant import build_quant_config
from jit.quant.schema import QuantSchema
from jit.settings import FinetuneSettings, RunSettings, merged, parse_settings

__all__ = ["check_comparison", "compare_after_training", "comparison_table", "point_label"]


# ----------------------------------------------------------------- after training --
def point_label(qcfg) -> str:
    """A design point in a few words: scheme, mode, ADC bits and noise."""
    if qcfg.scheme == "fp":
        return "float"
    adc = "ADC bypass" if qcfg.adc.bypass else f"ADC {qcfg.adc.bits} bit"
    return f"{qcfg.scheme} {qcfg.mode}, {adc}, {qcfg.adc.noise_sigma_lsb:g} LSB"


def _comparison_run(cfg: DictConfig, qcfg, tag: str, index: int, checkpoint: str) -> DictConfig:
    """The eval run of one comparison: `checkpoint` at design point `qcfg`, in
    `<run>/compare/<tag>_<index>/`, with this run's fid, sampler, calibration and seeds."""
    sub = OmegaConf.merge(cfg, {
        "task": "eval", "ckpt_path": checkpoint, "compare_fp": index == 0,
        "paths": {"output_dir": str(Path(cfg.paths.output_dir) / "compare" / f"{tag}_{index}")},
        "finetune": {"hardware_aware": False, "noise_sigma_lsb": None, "ranges": None,
                     "recalibrate_every_n_steps": 0, "compare": []},
    })
    point = qcfg.to_dict()
    point.pop("device")  # the run's `device` group, which `sub` keeps, built it (`_points`)
    sub.quant = OmegaConf.merge(OmegaConf.structured(QuantSchema), point)  # the whole group replaced
    sub.logger = OmegaConf.create({})  # merging {} would keep the run's loggers
    return sub


def _points(cfg: DictConfig, settings: FinetuneSettings) -> list:

    return [build_quant_config(merged(to_plain(cfg.quant), override), device=cfg.get("device"))
            for override in settings.compare]


def check_comparison(cfg: DictConfig, settings: FinetuneSettings, module, datamodule, start: str | None) -> None:
    """Before training: every evaluation `compare_after_training` will run can run. The
    start checkpoint's settings fit the config, and at each design point the calibration
    inputs and file, the quantization targets, the feature extractor and the reference
    statistics are checked as `task=eval` checks them (jit.checks), on the model being
    trained (the trained checkpoint has its architecture)."""
    if not settings.compare:
        return
    if start is None:
        raise ConfigError(f"finetune.compare: {cfg.ckpt_path} names no start checkpoint to compare with "
                          "(it was not fine-tuned from an official checkpoint)")
    if checkpoint_kind(start) != "official":
        raise ConfigError(f"finetune.compare: the start checkpoint {start} is not an official-layout checkpoint")
    for i, qcfg in enumerate(_points(cfg, settings)):
        sub = _comparison_run(cfg, qcfg, "start", i, start)
        try:
            if i == 0:
                check_checkpoint_settings(sub, start)
            check_before_generation(parse_settings(sub), module, datamodule, check_fid=i == 0)
        except ValueError as err:
            raise ConfigError(f"finetune.compare[{i}] ({point_label(qcfg)}): {err}") from err


def compare_after_training(cfg: DictConfig, settings: FinetuneSettings, start: str, trained: str,
                           evaluate: Callable[[DictConfig, RunSettings], dict]) -> dict:
    """Evaluate `start` and `trained` (official checkpoints) at every `finetune.compare` point.

    Each evaluation is `evaluate`, the normal `task=eval` task (jit.tasks.evaluate, handed
    in by the task that trained; static mode calibrates from the weights it evaluates),
    with this run's fid, sampler, calibration and seeds, in
    `<run>/compare/{start,trained}_<i>/`; the first point also evaluates both in float.
    `check_comparison` has checked them all before training. Writes
    `<run>/finetune_comparison.json` and returns it.
    """
    run_dir = Path(cfg.paths.output_dir)
    rows = []
    for i, qcfg in enumerate(_points(cfg, settings)):
        row = {"point": point_label(qcfg), "quant": qcfg.to_dict()}
        for tag, path in (("start", start), ("trained", trained)):
            sub = _comparison_run(cfg, qcfg, tag, i, path)
            results = evaluate(sub, parse_settings(sub))
            row[tag] = results["metrics"]
            if i == 0:
                row[f"{tag}_float"] = results.get("baseline_fp")
        rows.append(row)
    metric = _headline_metric(rows)
    summary = {"start_checkpoint": start, "trained_checkpoint": trained, "metric": metric, "points": rows}
    from lightning.pytorch.utilities import rank_zero_only


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
