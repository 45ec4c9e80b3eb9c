"""task=search: trials evaluate distinct per-layer assignments, the study resumes from its
SQLite file after the process is killed mid-trial, without counting a trial twice and with
the trials and front of a run straight through, another study is refused, the front's
presets compose, and bad input is one line before the model loads."""

from __future__ import annotations

import csv
import json
import os
import signal

import optuna
import pytest
from optuna.trial import TrialState
from test_run import compose_run, run, run_with_fault

from jit.config import ConfigError, validate
from jit.evaluation.fid import flatten
from jit.run_folder import LOCK
from jit.search import activation_key, assignment, calibration_key, parse_search, study_name
from jit.settings import parse_settings

SPACE = "{blocks.0.*: {adc: {bits: [6, 8]}, scheme: [hybrid, fp]}, blocks.1.*: {adc: {bits: [6, 10]}}}"
# The shipped digits model, two targeted layers, static KL ranges from 4 images, 4 FID
# images of 2 Euler steps: a trial takes a few seconds.
SHORT = ["task=search", "quant.mode=static", "quant.targets=[blocks.0.mlp.w12,blocks.1.mlp.w3]",
         "sampler.steps=2", "sampler.method=euler", "fid.num_images=4", "fid.chunk_size=4",
         "eval.layer_stats_images=2", "calibration.num_images=4", "calibration.batch_size=4",
         f"search.space={SPACE}"]


# SIGKILL in the middle of trial 1: in its FID pass, its calibration and statistics done.
KILL_IN_TRIAL_1 = """
import os, signal
import jit.search
from jit.evaluation.fid import FIDEvaluation

evaluating = []
evaluate_trial, add = jit.search.evaluate_trial, FIDEvaluation.add

def evaluate_and_note(trainer, module, datamodule, run, qcfg, run_dir, fid=None):
    evaluating.append(run_dir.name)
    return evaluate_trial(trainer, module, datamodule, run, qcfg, run_dir, fid)

def add_or_die(self, *args):
    if evaluating[-1:] == ["0001"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return add(self, *args)

jit.search.evaluate_trial, FIDEvaluation.add = evaluate_and_note, add_or_die
"""


def study_of(out):
    storage = f"sqlite:///{out / 'search.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def front_of(out) -> list[tuple]:
    """pareto.csv without what names the run (trial numbers, preset paths)."""
    with open(out / "pareto.csv", newline="") as f:
        return [(row["fid"], row["energy_per_image_uJ"], row["assignment"]) for row in csv.DictReader(f)]


def test_search_killed_mid_trial_resumes_to_the_run_straight_through_refuses_another_study_writes_presets(tmp_path):
    out = tmp_path / "search"
    proc = run([*SHORT, "search.n_trials=2", f"hydra.run.dir={out}"], tmp_path)
    study = study_of(out)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2
    layers = [t.user_attrs["layers"] for t in done]
    assert layers[0] != layers[1]
    for trial in done:  # each trial is an ordinary evaluation of its own quant.layers
        results = json.loads((out / "trials" / f"{trial.number:04d}" / "results.json").read_text())
        searched = {k: v for k, v in results["quant"].items() if k.startswith("layers.")}
        assert searched == flatten({"layers": trial.user_attrs["layers"]})
        assert results["metrics"]["fid_digits"] == pytest.approx(trial.user_attrs["fid"])
        assert results["energy"]["energy_per_image_uJ"] == pytest.approx(trial.user_attrs["energy_per_image_uJ"])
        assert list(trial.values) == [trial.user_attrs["fid"], trial.user_attrs["energy_per_image_uJ"]]
    text = proc.stdout + proc.stderr
    reused = text.count("(calibration reused)")
    assert len([p for p in (out / "calibration_cache").glob("*.pt") if not p.name.startswith("act_")]) == 2 - reused
    with open(out / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["trial"]) for r in rows} == {t.number for t in study.best_trials}
    assert (out / "pareto.png").stat().st_size > 0

    # A rerun with more trials continues the study.
    proc = run([*SHORT, "search.n_trials=3", "search.front_fid_images=6", f"hydra.run.dir={out}"], tmp_path)
    text = proc.stdout + proc.stderr
    assert "2 trial(s) already complete" in text and "left running" not in text
    trials = study_of(out).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and trials[:2] == done
    assert text.count("(3/3)") == 1 and "(1/3)" not in text and "(2/3)" not in text

    # The same search killed (SIGKILL) in the middle of trial 1, then run again in its folder.
    killed = tmp_path / "killed"
    proc = run_with_fault(KILL_IN_TRIAL_1, [*SHORT, "search.n_trials=3", f"hydra.run.dir={killed}"], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [t.state for t in study_of(killed).get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    # Killed at its first scored chunk: the statistics ride along the FID pass, so neither
    # they nor the results are written.
    assert (killed / "trials" / "0001").is_dir()
    assert not any((killed / "trials" / "0001" / name).exists() for name in ("results.json", "layer_stats.csv"))
    dead = json.loads((killed / LOCK).read_text())["pid"]  # the killed run's lock stays behind
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    proc = run([*SHORT, "search.n_trials=3", f"hydra.run.dir={killed}"], tmp_path)  # the stale lock is taken over
    text = proc.stdout + proc.stderr
    assert "1 trial(s) already complete" in text
    assert "trial 1 was left running by an interrupted run: marked failed" in text
    assert text.count("(2/3)") == 1 and text.count("(3/3)") == 1 and "(1/3)" not in text
    resumed = study_of(killed).get_trials()
    assert [t.state for t in resumed] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                                          TrialState.COMPLETE]
    assert resumed[2].params == resumed[1].params  # the killed trial's assignment, evaluated once more
    assert (killed / "trials" / "0002" / "results.json").is_file() and not (killed / LOCK).exists()
    # ... to the trials and the front of the run straight through, bit for bit
    complete = [t for t in resumed if t.state == TrialState.COMPLETE]
    assert [(t.params, t.values, t.user_attrs["layers"]) for t in complete] == [
        (t.params, t.values, t.user_attrs["layers"]) for t in trials]
    assert front_of(killed) == front_of(out)

    # The front's presets run as they are: `--config-dir <run dir>/presets quant=pareto_<k>`.
    with open(out / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    for row in rows:  # the front evaluated again over 6 images
        results = json.loads((out / "front" / f"trial_{int(row['trial']):04d}_6images" / "results.json").read_text())
        assert results["num_images"] == 6 and float(row["fid_front"]) == pytest.approx(results["metrics"]["fid_digits"])
    cfg = compose_run([f"hydra.searchpath=[file://{out / 'presets'}]", f"quant=pareto_{first['pareto_k']}",
                       "task=eval", f"paths.output_dir={tmp_path / 'eval'}"])
    validate(cfg)
    quant = parse_settings(cfg).quant
    assert quant.to_dict()["layers"] == json.loads(first["assignment"]) and quant.targets == (
        "blocks.0.mlp.w12", "blocks.1.mlp.w3")

    # Another search space in the same folder: refused before any work, in one line.
    other = [*SHORT[:-1], "search.space={blocks.0.*: {adc: {bits: [6, 10]}}}"]
    proc = run([*other, "search.n_trials=3", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"error: {out / 'search.db'} holds the study {study.study_name}, "
                                                 "made for another search space")
    assert len(study_of(out).get_trials()) == len(trials)


@pytest.mark.parametrize("args, message", [
    (["search.space=null"], "search.space: empty"),
    (["search.space={blocks.0.*: {adc: {bitz: [6]}}}"], "search.space['blocks.0.*'].adc.bitz=6: "),
    (["search.space={blocks.0.*: {adc: {bits: [6, 99]}}}"], "search.space['blocks.0.*'].adc.bits=99: "),
    (["search.space={blocks.0.*: {mode: [static]}}"],
     "search.space['blocks.0.*'].mode='static': quant.layers['blocks.0.*'].mode is not a per-layer setting"),
    (["search.space={blocks.0.*: {adc: {bits: []}}}"], "search.space['blocks.0.*'].adc.bits: an empty list"),
    (["search.n_trials=0"], "search.n_trials: must be >= 1, got 0"),
    (["search.front_fid_images=1"], "search.front_fid_images: must be 0 (no re-evaluation) or >= 2"),
    (["search.objectives=[fid,latency]"], "search.objectives: must be distinct names among fid, energy"),
    (["task=eval"], "search.space: applies to task=search only"),
    (["quant=fp"], "quant: task=search assigns layers to the hardware of quant"),
    (["eval.layer_stats_images=0"], "eval.layer_stats_images: the energy objective needs"),
])
def test_bad_search_input_is_refused_before_the_model_loads(args, message, tmp_path, monkeypatch):
    from jit import builders, tasks

    monkeypatch.setattr(builders, "load_module", lambda cfg: pytest.fail("the model was loaded"))
    monkeypatch.setattr(tasks, "load_module", lambda cfg: pytest.fail("the model was loaded"))
    base = SHORT[:-1] if any(arg.startswith("search.space=") for arg in args) else SHORT
    cfg = compose_run([*base, *args, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
        tasks.search(cfg, parse_settings(cfg))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_a_pattern_matching_no_layer_is_refused_before_generation(tmp_path):
    cfg = compose_run([*SHORT[:-1], "search.space={blocks.7.*: {adc: {bits: [6]}}}", f"paths.output_dir={tmp_path}"])
    from jit import tasks

    with pytest.raises(ConfigError, match=r"search.space\[.blocks.7.\*.\]: matches no layer of quant.targets"):
        tasks.search(cfg, parse_settings(cfg))
    assert not (tmp_path / "trials").exists()


def test_calibration_is_shared_across_noise_and_activation_clips_across_adc_bits():
    from jit.evaluation.calibration import CalibrationConfig
    from jit.quant import build_quant_config

    quant = build_quant_config({"scheme": "hybrid", "mode": "static", "targets": ["blocks.*"]})
    section = {"n_trials": 1, "objectives": ["fid", "energy"],
               "space": {"blocks.0.*": {"adc": {"bits": [6, 8], "noise_sigma_lsb": [0.0, 8.0]}}}}
    settings = parse_search(section, quant)
    assert [c.name for c in settings.choices] == ["blocks.0.*|adc.bits", "blocks.0.*|adc.noise_sigma_lsb"]
    names, calibration = ["blocks.0.w", "blocks.1.w"], CalibrationConfig()

    def keys(bits, noise, first=None):
        layers = assignment(settings, {"blocks.0.*|adc.bits": bits, "blocks.0.*|adc.noise_sigma_lsb": noise})
        assert layers == {"blocks.0.*": {"adc": {"bits": bits, "noise_sigma_lsb": noise}}}
        if first is not None:  # another setting of the first layer
            layers["blocks.0.*"].update(first)
        qcfg = build_quant_config({**quant.to_dict(), "layers": layers})
        return calibration_key(qcfg, names, calibration), activation_key(qcfg, names, calibration)

    assert keys(6, 0.0) == keys(6, 8.0)
    assert keys(6, 0.0)[0] != keys(8, 0.0)[0] and keys(6, 0.0)[1] == keys(8, 0.0)[1]
    # the first layer's activations or scheme change what every later layer sees
    for first in ({"act": {"bits": 12}}, {"scheme": "fp"}, {"split": {"lsb_bits": 8}}):
        assert keys(6, 0.0, first)[1] != keys(6, 0.0)[1], first
    assert study_name("ab" * 32) == "search-abababababababab"


def test_a_repeated_assignment_takes_the_numbers_of_its_twin(tmp_path):
    out = tmp_path / "one"
    only = [*SHORT[:-1], "quant.mode=dynamic", "search.space={blocks.0.*: {adc: {bits: [6]}}}"]
    proc = run([*only, "search.n_trials=2", f"hydra.run.dir={out}"], tmp_path)
    assert "trial 1 (2/2) repeats trial 0's assignment: its results reused" in proc.stdout + proc.stderr
    trials = study_of(out).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and trials[1].values == trials[0].values and trials[1].user_attrs["same_as"] == 0
    assert not (out / "trials" / "0001").exists()
    with open(out / "pareto.csv", newline="") as f:
        assert [row["trial"] for row in csv.DictReader(f)] == ["0"]


def test_the_b16_imagenet_search_composes_validates_and_covers_every_ffn_layer_once(tmp_path):
    import fnmatch

    import torch

    from jit.config import to_plain
    from jit.models import build_jit
    from jit.quant import target_names
    from jit.search import check_patterns

    cfg = compose_run(["experiment=jit_b16_in256_search", "data.root=/data/imagenet",
                       "ckpt_path=/ckpt/jit-b-16/checkpoint-last.pth", f"paths.output_dir={tmp_path}"])
    validate(cfg)
    settings = parse_settings(cfg)
    search = parse_search(to_plain(cfg)["search"], settings.quant)
    assert cfg.task == "search" and cfg.eval_weights == "ema1" and cfg.trainer.accelerator == "gpu"
    assert (cfg.sampler.method, cfg.sampler.steps, cfg.sampler.cfg_scale) == ("heun", 50, 3.0)  # as jit_b16_in256_eval
    assert settings.quant.mode == "static" and settings.fid.num_images == 10_000 and search.front_fid_images == 50_000
    with torch.device("meta"):
        net = build_jit(cfg.model.net.name, **{k: v for k, v in cfg.model.net.items() if k != "name"})
    names = target_names(net, settings.quant.targets)
    check_patterns(search, names)
    units = list(dict.fromkeys(choice.pattern for choice in search.choices))
    assert len(names) == 24 and len(units) == 6
    assert all(sum(fnmatch.fnmatchcase(name, unit) for unit in units) == 1 for name in names)


def test_a_trial_that_keeps_every_layer_digital_costs_the_digital_baseline(tmp_path):
    """The sampler may draw `fp` for every unit: nothing to calibrate, the statistics
    find no analog layer, and the trial's energy is the digital INT8 baseline's."""
    out = tmp_path / "all_fp"
    args = [a for a in SHORT if not a.startswith("search.space=")]
    run([*args, "search.space={blocks.0.*: {scheme: [fp]}, blocks.1.*: {scheme: [fp]}}", "search.n_trials=1",
         f"hydra.run.dir={out}"], tmp_path)
    results = json.loads((out / "trials" / "0000" / "results.json").read_text())
    assert results["calibration"] is None and results["quantized_layers"] == 0
    energy = results["energy"]
    assert energy["energy_per_image_uJ"] == energy["digital_int8_energy_per_image_uJ"] > 0
    assert not (out / "trials" / "0000" / "calibration.pt").exists()
