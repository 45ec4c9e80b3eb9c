"""The entry point as a user meets it: `python run.py ...` in a subprocess, on tiny configs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from jit.config import register_schemas

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A tiny model and short sampling so each run takes seconds.
TINY_EVAL = [
    "model=jit_t4", "model.net.input_size=16", "data.img_size=16", "data.patch_size=4",
    "sampler.steps=2", "sampler.method=euler", "fid.num_images=20", "fid.batch_size=10",
    "calibration.num_images=8", "calibration.batch_size=8",
]


def run(args, tmp_path, env=None, check=True):
    cmd = [sys.executable, str(ROOT / "run.py"), *args, f"paths.cache_dir={tmp_path / 'cache'}"]
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny model trained for a few steps through `task=train`; its official-layout export."""
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    run(["experiment=digits_train", "model=jit_t4", "model.net.input_size=16", "data.batch_size=16",
         "trainer.max_steps=4", "trainer.log_every_n_steps=1", f"hydra.run.dir={out}"], tmp)
    return out


def compose_run(overrides, hydra_cfg=False):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("run", overrides=list(overrides), return_hydra_config=hydra_cfg)


# ------------------------------------------------------------------ composition
@pytest.mark.parametrize("group", ["model", "data", "quant", "calibration", "fid", "trainer", "logger",
                                   "callbacks", "experiment"])
def test_every_group_option_composes_and_instantiates(group, tmp_path, monkeypatch):
    from jit.callbacks.evaluation import FIDConfig
    from jit.models import build_jit
    from jit.quant import build_quant_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    for option in options(group):
        extra = ["data.root=/nonexistent"] if option in ("imagenet",) or "_in" in option else []
        cfg = compose_run([f"{group}={option}", "paths.output_dir=" + str(tmp_path), *extra])
        if group == "model":
            with torch.device("meta"):
                build_jit(cfg.model.net.name, **{k: v for k, v in cfg.model.net.items() if k != "name"})
        elif group == "data":
            instantiate(cfg.data)
        elif group == "quant":
            build_quant_config(cfg.quant)
        elif group == "fid":
            FIDConfig.from_any(cfg.fid)
        elif group == "calibration":
            from jit.callbacks.calibration import CalibrationConfig

            CalibrationConfig.from_any(cfg.calibration)
        elif group == "trainer":
            if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
                continue  # composes; needs a GPU to instantiate
            instantiate(cfg.trainer, _convert_="all")
        elif group in ("logger", "callbacks"):
            for node in cfg[group].values():
                instantiate(node)


@pytest.mark.parametrize("launcher", ["basic", "submitit_local", "submitit_slurm", "slurm"])
def test_launchers_compose(launcher, tmp_path):
    cfg = compose_run([f"hydra/launcher={launcher}", f"paths.output_dir={tmp_path}"], hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("Launcher")


# Official evaluation settings (README of LTH14/JiT): cfg per model, 512 px with noise 2.0 for /32.
@pytest.mark.parametrize("preset, name, size, noise_scale, cfg_scale", [
    ("jit_b16_in256_eval", "JiT-B/16", 256, 1.0, 3.0), ("jit_l16_in256_eval", "JiT-L/16", 256, 1.0, 2.4),
    ("jit_h16_in256_eval", "JiT-H/16", 256, 1.0, 2.2), ("jit_b32_in512_eval", "JiT-B/32", 512, 2.0, 3.0),
    ("jit_l32_in512_eval", "JiT-L/32", 512, 2.0, 2.5), ("jit_h32_in512_eval", "JiT-H/32", 512, 2.0, 2.3),
])
def test_official_eval_presets(preset, name, size, noise_scale, cfg_scale, tmp_path):
    cfg = compose_run([f"experiment={preset}", "data.root=/data/imagenet", f"paths.output_dir={tmp_path}"])
    assert cfg.task == "eval" and cfg.eval_weights == "ema1"
    assert cfg.model.net.name == name and cfg.model.net.input_size == size and cfg.data.img_size == size
    assert cfg.model.denoiser.noise_scale == noise_scale
    assert dict(cfg.sampler) == {"method": "heun", "steps": 50, "cfg_scale": cfg_scale, "interval": [0.1, 1.0],
                                 "schedule": "linear"}


@pytest.mark.parametrize("variant", ["b", "l", "h"])
def test_patch32_models_default_to_512px_and_noise_2(variant, tmp_path):
    cfg = compose_run([f"model=jit_{variant}32", f"paths.output_dir={tmp_path}"])
    assert cfg.model.net.input_size == 512 and cfg.model.denoiser.noise_scale == 2.0


def test_cfg_job_prints_the_full_config(tmp_path):
    proc = run(["--cfg", "job"], tmp_path)
    for key in ("task: eval", "quant:", "noise_sigma_lsb: 2.0", "calibration:", "fid:", "sampler:", "trainer:"):
        assert key in proc.stdout


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, message", [
    (["quant=nope"], r"Could not find 'quant/nope'"),
    (["sampler.steps=abc"], r"sampler.steps"),
    (["sampler.steps=0"], r"sampler.steps: must be >= 1, got 0"),
    (["quant.adc.bits=40"], r"quant.adc.bits"),
    (["no_such_key=1"], r"no_such_key"),
    (["data=imagenet"], r"data.root"),
    (["data=imagenet", "data.root=/data/imagenet", "model=jit_b16", "fid=inception_10k"], r"ckpt_path"),
])
def test_bad_input_one_clear_line(args, message, tmp_path):
    out = tmp_path / "out"
    proc = run([*args, f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode != 0
    import re

    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(p.name != ".hydra" for p in out.iterdir())


# ------------------------------------------------------------------ real runs
def test_tiny_train_writes_checkpoints(trained_tiny):
    assert (trained_tiny / "checkpoint-last.pth").exists()
    assert (trained_tiny / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader(open(trained_tiny / "csv" / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows)


def test_tiny_eval_writes_results_grid_and_coverage(trained_tiny, tmp_path):
    out = tmp_path / "eval"
    run([f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, f"hydra.run.dir={out}"], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert {"fid_digits", "cond_accuracy"} <= set(results["metrics"])
    assert {"fid_digits", "cond_accuracy"} <= set(results["baseline_fp"])
    assert results["quant"]["scheme"] == "hybrid" and results["num_images"] == 20
    assert (out / "sample_grid.png").exists() or results.get("sample_grid")
    assert list(out.glob("*coverage*.csv")), list(out.iterdir())


def test_multirun_sweep_summary(trained_tiny, tmp_path):
    sweep = tmp_path / "sweep"
    run(["-m", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
         "quant.mode=dynamic", "quant.adc.bits=4,8", "quant.adc.noise_sigma_lsb=0,8",
         f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 4
    assert {r["quant.adc.bits"] for r in rows} == {"4", "8"}
    assert all(r["status"] == "ok" and float(r["fid_digits"]) >= 0 for r in rows)
    assert (sweep / "summary.md").exists() and list(sweep.glob("summary_*.png"))


def test_wandb_offline_records_quant_hyperparameters(trained_tiny, tmp_path):
    out = tmp_path / "wb"
    run([f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
         "quant.mode=dynamic", "logger=wandb", f"hydra.run.dir={out}"], tmp_path)
    # an offline run keeps config, history and summary in its .wandb record file
    records = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1, list(out.rglob("*"))[:20]
    data = records[0].read_bytes()
    for key in (b"quant.adc.bits", b"quant.scheme", b"quant.adc.noise_sigma_lsb", b"fid_digits", b"cond_accuracy"):
        assert key in data, key
    assert list(out.glob("wandb/offline-run-*/files/media/images/**/*.png"))  # the sample grid


def test_failing_sweep_job_is_reported_and_the_others_complete(trained_tiny, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["-m", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
                "quant.mode=dynamic", "quant.adc.bits=6,40", f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = {r["quant.adc.bits"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert rows["6"]["status"] == "ok" and float(rows["6"]["fid_digits"]) >= 0
    assert rows["40"]["status"].startswith("failed") and "quant.adc.bits" in rows["40"]["status"]
    assert "quant.adc.bits" in proc.stderr


def test_submitit_local_two_job_sweep(trained_tiny, tmp_path):
    sweep = tmp_path / "sweep"
    run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
         f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
         "quant.mode=dynamic", "quant.adc.noise_sigma_lsb=0,8", f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)


def test_eval_runs_under_cpu_ddp(trained_tiny, tmp_path):
    out = tmp_path / "ddp"
    run([f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "trainer=ddp_cpu",
         f"hydra.run.dir={out}"], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["num_images"] == 20
    assert (out / "calibration.pt").exists()


def test_default_run_directory_is_named_after_the_task(trained_tiny, tmp_path):
    run([f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false"], tmp_path)
    runs = list((tmp_path / "outputs" / "eval").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.json").exists()


def test_calibrate_task_writes_only_the_artefact(trained_tiny, tmp_path):
    out = tmp_path / "calib"
    proc = run(["task=calibrate", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL,
                f"hydra.run.dir={out}"], tmp_path)
    assert f"calibration artefact: {out / 'calibration.pt'}" in proc.stdout
    assert (out / "coverage.csv").exists() and not (out / "results.json").exists()


def test_export_task_writes_the_official_layout(trained_tiny, tmp_path):
    from jit.checkpoint import load_jit_checkpoint

    target = tmp_path / "exported.pth"
    run(["task=export", f"ckpt_path={trained_tiny / 'checkpoints' / 'last.ckpt'}", f"export.out_path={target}",
         f"hydra.run.dir={tmp_path / 'export'}"], tmp_path)
    _, meta = load_jit_checkpoint(target, "model_ema2")
    assert meta["variant"] == "JiT-T/4" and meta["img_size"] == 16
