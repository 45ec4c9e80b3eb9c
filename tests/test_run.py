"""The entry point as a user meets it: `python run.py ...` in a subprocess, on tiny configs."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from entry_point import run_entry_point
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from jit.config import register_schemas
from jit.run_folder import FAILED, LOCK, PREVIOUS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A tiny model and short sampling so each run takes seconds.
TINY_EVAL = [
    "model=jit_t4", "model.net.input_size=16", "data.img_size=16", "data.patch_size=4",
    "sampler.steps=2", "sampler.method=euler", "fid.num_images=20", "fid.chunk_size=10",
    "calibration.num_images=8", "calibration.batch_size=8",
]


def run(args, tmp_path, env=None, check=True):
    """`python run.py *args` in tmp_path (tests/entry_point.py: a fork of a process that has
    imported run.py's modules, or a new interpreter where the environment needs one)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    proc = run_entry_point([*args, f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, full_env)
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
         "trainer.max_steps=4", "trainer.log_every_n_steps=1", "callbacks.fid.every_n_steps=2",
         "fid.num_images=8", "fid.chunk_size=4", "+fid.sampler.steps=2", f"hydra.run.dir={out}"], tmp)
    return out


def compose_run(overrides, hydra_cfg=False):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("run", overrides=list(overrides), return_hydra_config=hydra_cfg)


# ------------------------------------------------------------------ composition
@pytest.mark.parametrize("group", ["model", "data", "quant", "calibration", "fid", "trainer", "logger",
                                   "callbacks", "experiment", "hardware", "device"])
def test_every_group_option_composes_and_instantiates(group, tmp_path, monkeypatch):
    from jit.evaluation.fid import FIDConfig
    from jit.models import build_jit
    from jit.quant import build_quant_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    for option in options(group):
        extra = ["data.root=/nonexistent"] if option == "imagenet" or "_in2" in option or "_in5" in option else []
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
        elif group == "hardware":
            from jit.hardware import build_hardware_config

            assert build_hardware_config(cfg.hardware).name == option
        elif group == "device":
            from jit.settings import parse_settings

            assert parse_settings(cfg).quant.device.preset == option
        elif group == "calibration":
            from jit.evaluation.calibration import CalibrationConfig

            CalibrationConfig.from_any(cfg.calibration)
        elif group == "trainer":
            if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
                continue  # composes; needs a GPU to instantiate
            instantiate(cfg.trainer, _convert_="all")
        elif group in ("logger", "callbacks"):
            for node in cfg[group].values():
                instantiate(node)


def test_wandb_groups_a_sweeps_jobs_by_its_folder(tmp_path, monkeypatch):
    import jit.config

    cfg = compose_run(["logger=wandb", f"paths.output_dir={tmp_path}"])
    assert cfg.logger.wandb.group is None  # a single run: no group
    monkeypatch.setattr(jit.config, "sweep_group", lambda cfg=None: "2026-12-03_10-00-00")
    assert cfg.logger.wandb.group == "2026-12-03_10-00-00"
    cfg = compose_run(["logger=wandb", "logger.wandb.group=mine", f"paths.output_dir={tmp_path}"])
    assert cfg.logger.wandb.group == "mine"


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
def test_bad_input_deletes_only_what_the_run_created(tmp_path):
    """A bad override in an existing folder of logs removes Hydra's files, not the user's."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "important.log").write_text("keep me")
    proc = run(["quant.adc.bits=0", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and "quant.adc.bits" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["important.log"]
    assert (out / "important.log").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["quant=nope"], r"Could not find 'quant/nope'"),
    (["hardware=nope"], r"Could not find 'hardware/nope'[\s\S]*digital_int8_40nm\s+nor_flash_40nm"),
    (["hardware.analog.array_mac_fJ=-1"], r"error: hardware.analog.array_mac_fJ: must be >= 0, got -1"),
    (["hardware.digital.add32_pJ=nan"], r"hardware.digital.add32_pJ: must be a finite number"),
    (["sampler.steps=abc"], r"sampler.steps"),
    (["sampler.steps=0"], r"sampler.steps: must be >= 1, got 0"),
    (["eval.layer_stats_images=-1"], r"eval.layer_stats_images: must be >= 0"),
    (["quant.adc.bits=40"], r"quant.adc.bits"),
    (["no_such_key=1"], r"no_such_key"),
    (["data=imagenet"], r"data.root"),
    (["device=nope"], r"Could not find 'device/nope'[\s\S]*ideal\s+nor_flash\s+pcm"),
    (["device=pcm", "device.t_inference_s=-1"], r"error: device.t_inference_s must be a number >= 0"),
    (["device=pcm", "device.stuck_at_zero_fraction=0.7", "device.stuck_at_max_fraction=0.5"],
     r"error: device.stuck_at_max_fraction must be at most 1 - device.stuck_at_zero_fraction"),
    (["device=pcm", "quant=fp"], r"error: device=pcm: quant.scheme=fp has no analog array"),
    (["device.t_inference=1"], r"device.t_inference"),
    (["quant.adc.bitz=3"], r"Could not override 'quant.adc.bitz'[\s\S]*Key 'bitz' not in 'AdcSchema'"),
    (["hardware.analog.leakage_pJ=1"], r"Could not override 'hardware.analog.leakage_pJ'"),
    (["quant.adc.dnl_sigma_lsb=-0.5"], r"error: quant.adc.dnl_sigma_lsb must be a number >= 0"),
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
def test_training_progress_bar_names_the_step_limit():
    from types import SimpleNamespace

    from jit.callbacks.progress import TrainingProgressBar

    bar = TrainingProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=4000)
    assert bar._get_train_description(1) == "Epoch 1 · to step 4000"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1) == "Epoch 1/2"


def test_tiny_train_writes_checkpoints_and_tracks_fid_without_changing_the_training(trained_tiny, tmp_path):
    assert (trained_tiny / "checkpoint-last.pth").exists()
    assert (trained_tiny / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader(open(trained_tiny / "csv" / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows)
    # callbacks.fid.every_n_steps=2 over 4 steps: FID at steps 2 and 4, logged at those steps
    assert sorted(r["step"] for r in rows if r.get("train_fid/fid_digits")) == ["2", "4"]
    for step in (2, 4):
        scored = json.loads((trained_tiny / "fid_during_training" / f"step{step:07d}" / "results.json").read_text())
        assert scored["num_images"] == 8 and scored["weights"] == "ema1" and scored["chunk_size"] == 4
    # The same training without the FID: the same weights, bit for bit (the callback draws
    # from a fork of the random state).
    plain = tmp_path / "plain"
    run(["experiment=digits_train", "model=jit_t4", "model.net.input_size=16", "data.batch_size=16",
         "trainer.max_steps=4", "trainer.log_every_n_steps=1", f"hydra.run.dir={plain}"], tmp_path)
    from jit.checkpoint import safe_load

    ours, theirs = (safe_load(folder / "checkpoint-last.pth") for folder in (trained_tiny, plain))
    for key in ("model", "model_ema1", "model_ema2"):
        assert all(torch.equal(ours[key][name], theirs[key][name]) for name in ours[key]), key


def test_tiny_eval_writes_results_grid_and_coverage(trained_tiny, tmp_path):
    out = tmp_path / "eval"
    proc = run([f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, f"hydra.run.dir={out}"],
               tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert {"fid_digits", "cond_accuracy"} <= set(results["metrics"])
    assert {"fid_digits", "cond_accuracy"} <= set(results["baseline_fp"])
    assert results["quant"]["scheme"] == "hybrid" and results["num_images"] == 20
    # which code on which machine: two results can be traced to their code and CPU
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
    if head.returncode == 0:
        assert results["git_revision"] == head.stdout.strip() and isinstance(results["git_dirty"], bool)
    else:
        assert results["git_revision"] is None and results["git_dirty"] is None
    assert results["cpu_model"] and results["torch_version"] == torch.__version__
    assert results["int8_kernel"] in ("onednn", "int_mm", "float32")
    assert results["cpu_noise_draw"] in ("compiled", "torch")
    assert (out / "sample_grid.png").exists() or results.get("sample_grid")
    assert list(out.glob("*coverage*.csv")), list(out.iterdir())
    # The float baseline and the quantized model log under their own keys.
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    assert {"eval/fid_digits", "eval_fp/fid_digits"} <= set(rows[0])
    assert any(r["eval/fid_digits"] for r in rows) and any(r["eval_fp/fid_digits"] for r in rows)
    # Energy estimates: results.json, the CSV logger and the console, next to fid_digits.
    energy = results["energy"]
    assert energy["energy_per_image_uJ"] > 0 and energy["energy_adc_uJ"] > 0
    assert any(r.get("energy/energy_per_image_uJ") for r in rows)
    assert "uJ/image" in proc.stdout and f"energy per image on {energy['hardware']}" in proc.stdout
    layer_rows = list(csv.DictReader(open(out / "layer_stats.csv")))
    assert float(layer_rows[0]["energy_pJ_per_image"]) > 0 and float(layer_rows[0]["adc_conversions_lsb"]) > 0
    # The console: each log line once, no dependency chatter, no test-loop bar, and the
    # run ends by saying where its results are.
    console = proc.stdout + proc.stderr
    lines = [line.split("]", 2)[-1].strip() for line in console.splitlines() if "[INFO]" in line]
    assert lines and len(lines) == len(set(lines)), console
    assert not any(line.startswith("INFO:") for line in console.splitlines()), console
    for chatter in ("Tip:", "was configured so", "Testing", "LeafSpec"):
        assert chatter not in console, console
    assert proc.stdout.rstrip().splitlines()[-2:] == [f"run directory: {out}",
                                                       f"results: {out / 'results.json'}"]


def test_multirun_sweep_summary(trained_tiny, tmp_path):
    sweep = tmp_path / "sweep"
    run(["-m", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
         "quant.mode=dynamic", "quant.adc.bits=4,8", "quant.adc.noise_sigma_lsb=0,8",
         "eval.layer_stats_images=0", f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 4
    # eval.layer_stats_images=0: no per-layer statistics, no layer_stats.csv
    assert not list(sweep.glob("*/layer_stats.csv"))
    assert all("layer_stats_summary" not in json.loads(r.read_text()) for r in sweep.glob("*/results.json"))
    assert {r["quant.adc.bits"] for r in rows} == {"4", "8"}
    assert all(r["status"] == "ok" and float(r["fid_digits"]) >= 0 for r in rows)
    assert "compare_fp" not in rows[0]  # the same for every job: not a column
    assert (sweep / "summary.md").exists() and list(sweep.glob("summary_*.png"))


def test_sweep_summary_has_energy_columns_and_the_pareto_plot(trained_tiny, tmp_path):
    """quant=fp costs exactly the digital INT8 baseline; so does W8A8 (the same dense INT8 MACs)."""
    sweep = tmp_path / "sweep"
    run(["-m", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
         "quant=fp,w8a8,hybrid_w8a11", "quant.mode=dynamic", "eval.layer_stats_images=2",
         f"hydra.sweep.dir={sweep}"], tmp_path)
    rows = {r["quant"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert set(rows) == {"fp", "w8a8", "hybrid_w8a11"}
    for column in ("energy_per_image_uJ", "energy_adc_uJ", "energy_digital_msb_uJ", "saving_vs_digital_int8",
                   "latency_per_image_ms", "pareto"):
        assert all(r[column] != "" for r in rows.values()), column
    results = {name: json.loads((sweep / r["job"] / "results.json").read_text())["energy"]
               for name, r in rows.items()}
    for name in ("fp", "w8a8"):
        assert results[name]["energy_per_image_uJ"] == pytest.approx(results[name]["digital_int8_energy_per_image_uJ"])
        assert results[name]["energy_adc_uJ"] == 0
    assert results["fp"]["saving_vs_digital_int8"] == 0
    assert results["hybrid_w8a11"]["energy_adc_uJ"] > 0 and results["hybrid_w8a11"]["analog_tiles"] > 0
    assert "True" in {r["pareto"] for r in rows.values()}
    assert (sweep / "summary_fid_vs_energy.png").stat().st_size > 0


def test_interrupted_sweep_summary_lists_every_job_and_exits_non_zero(trained_tiny, tmp_path):
    """Ctrl-C during the second job of three: the summary written as the sweep stops lists
    the first job ok, the second interrupted, the third not started."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}",
           *TINY_EVAL, "compare_fp=false", "quant.mode=dynamic", "eval.layer_stats_images=0",
           "quant.adc.bits=4,8,10", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"]
    # A shell without job control starts background commands with SIGINT ignored, and Python
    # keeps an inherited SIG_IGN: the child gets the default action back, as in a terminal.
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (sweep / "1" / ".sweep_id").exists():  # the second job started: the first one ended
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    expected = [("4", "ok"), ("8", "interrupted"), ("10", "not started")]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["quant.adc.bits"], r["status"]) for r in rows] == expected
    assert float(rows[0]["fid_digits"]) >= 0
    assert (sweep / "1" / FAILED).read_text().startswith("interrupted by SIGINT")
    assert "2 of 3 sweep jobs did not succeed (1 ok, 1 interrupted, 1 not started)" in err
    # rebuilt by hand: the same rows, and the exit code says not all jobs succeeded
    rebuilt = subprocess.run([sys.executable, "-m", "jit.sweep", str(sweep)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert rebuilt.returncode == 1 and "2 of 3 sweep jobs did not succeed" in rebuilt.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["quant.adc.bits"], r["status"]) for r in rows] == expected


def fake_imagenet(root: Path, classes: int = 10, train_per_class: int = 2, val_per_class: int = 2) -> Path:
    """ImageNet's ImageFolder layout in miniature: root/{train,val}/<wnid>/<image>.JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
    return root


def test_corrupt_image_in_a_loader_worker_is_one_line(official_tiny_ckpt_path, tmp_path):
    root = fake_imagenet(tmp_path / "imagenet")
    broken = root / "val" / "n00000003" / "broken.JPEG"
    broken.write_bytes(b"not a jpeg at all" * 50)
    proc = run(["data=imagenet", f"data.root={root}", "data.num_workers=1", "model=jit_t4",
                f"ckpt_path={official_tiny_ckpt_path}", "fid=inception_10k", "fid.extractor=digits-cnn",
                "fid.num_images=4", "fid.isc_splits=1", "compare_fp=false", "quant.mode=dynamic",
                "eval.layer_stats_images=0", "sampler.steps=1", "sampler.method=euler",
                f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(f"error: cannot read image {broken}: "), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


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
    """Also in a reused sweep folder (overwrite=true): the earlier sweep moves to previous/,
    its rows (an "ok" job 1, a job 2 this sweep does not have) must not show, and the
    multirun ends with code 1 after the summary."""
    sweep = tmp_path / "sweep"
    for job, bits in enumerate(["4", "8", "10"]):  # an earlier sweep, all ok
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- quant.adc.bits={bits}\n")
        (sweep / str(job) / "results.json").write_text(json.dumps({"metrics": {"fid_digits": 1.0}}))
    args = ["-m", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "compare_fp=false",
            "quant.mode=dynamic", "quant.adc.bits=6,40", f"hydra.sweep.dir={sweep}"]
    refused = run(args, tmp_path, check=False)
    assert refused.returncode == 2 and "overwrite=true" in refused.stderr.strip().splitlines()[-1]
    assert not (sweep / "multirun.yaml").exists() and not (sweep / PREVIOUS).exists()
    proc = run([*args, "overwrite=true"], tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = {r["quant.adc.bits"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert set(rows) == {"6", "40"}
    assert rows["6"]["status"] == "ok" and float(rows["6"]["fid_digits"]) >= 0
    assert rows["40"]["status"].startswith("failed") and "quant.adc.bits" in rows["40"]["status"]
    assert "quant.adc.bits" in (sweep / "1" / FAILED).read_text()
    assert not (sweep / "1" / "results.json").exists() and not (sweep / "2").exists()
    (earlier,) = (sweep / PREVIOUS).iterdir()
    assert sorted(p.name for p in earlier.iterdir()) == ["0", "1", "2"]
    assert "quant.adc.bits" in proc.stderr and "1 of 2 sweep jobs did not succeed (1 ok, 1 failed)" in proc.stderr


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


def test_layer_statistics_ride_along_the_fid_pass_and_equal_a_statistics_pass(trained_tiny, tmp_path):
    """eval generates the first eval.layer_stats_images images once, observing them inside
    the FID pass (13 images: chunk 0 whole, chunk 1 up to its fourth image); task=calibrate,
    which has no FID pass, generates those chunks itself. Both write the same
    layer_stats.csv, and the energy estimate is computed from it."""
    args = [f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "eval.layer_stats_images=13",
            "quant.adc.noise_sigma_lsb=2.0"]
    evaluated = run([*args, "compare_fp=false", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)
    log = evaluated.stdout + evaluated.stderr
    assert log.count("FID generation (hybrid): 20 images") == 1, log
    assert "layer statistics: the first 13 images, observed in this pass's forwards" in log
    assert not re.search(r"layer statistics: \d+ images in chunks", log), log  # no pass of their own
    run([*args, "task=calibrate", f"hydra.run.dir={tmp_path / 'calibrate'}"], tmp_path)
    ours, theirs = (tmp_path / "eval" / "layer_stats.csv", tmp_path / "calibrate" / "layer_stats.csv")
    assert ours.read_text() == theirs.read_text()
    rows = list(csv.DictReader(open(ours)))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    # Calls observed: 2 chunks x 3 network calls (2 Euler steps, the second one guided);
    # every operation count covers 13 images.
    assert results["layer_stats_images"] == 13 and int(rows[0]["calls"]) == 2 * 3
    assert int(rows[0]["dense_macs"]) % (13 * 3) == 0 and int(rows[0]["adc_conversions_lsb"]) % (13 * 3) == 0
    assert results["energy"]["energy_per_image_uJ"] > 0


def test_calibrate_task_runs_under_the_trainer_precision(trained_tiny, tmp_path):
    """task=calibrate samples in the trainer's precision, as eval does: under bf16-mixed
    the float blocks around the quantized layers run in bf16, so the thresholds move."""
    import torch

    clips = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / precision
        run(["task=calibrate", f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL,
             f"trainer.precision={precision}", f"hydra.run.dir={out}"], tmp_path)
        artefact = torch.load(out / "calibration.pt", weights_only=True)
        clips[precision] = [entry["act_clip"] for entry in artefact["layers"].values()]
    assert clips["32-true"] != clips["bf16-mixed"]


def test_compile_outside_eval_is_one_line_naming_the_key(tmp_path):
    proc = run(["task=train", "model.compile=true", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path,
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.compile" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_export_task_writes_the_official_layout(trained_tiny, tmp_path):
    from jit.checkpoint import load_jit_checkpoint

    target = tmp_path / "exported.pth"
    run(["task=export", f"ckpt_path={trained_tiny / 'checkpoints' / 'last.ckpt'}", f"export.out_path={target}",
         f"hydra.run.dir={tmp_path / 'export'}"], tmp_path)
    _, meta = load_jit_checkpoint(target, "model_ema2")
    assert meta["variant"] == "JiT-T/4" and meta["img_size"] == 16


# ------------------------------------------------------------- run folder, full disk, sweeps
def run_main(tmp_path, monkeypatch, task_fn, *overrides, multirun=False):
    """jit.runner.main in-process on the default config with the eval task replaced by task_fn."""
    from jit import runner, tasks
    from jit.config import Task

    calls = []

    def task(cfg, settings):
        calls.append(cfg)
        return task_fn(cfg)

    monkeypatch.setitem(tasks.TASKS, Task.eval, task)
    if multirun:
        monkeypatch.setattr(runner, "sweep_group", lambda cfg: "sweep")
        monkeypatch.setattr("jit.sweep.mark_sweep_job", lambda job_dir: None)
    cfg = compose_run([f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
                       *overrides])
    return runner.main(cfg), calls


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno

    from jit.atomic import atomic_torch_save

    target = tmp_path / "out" / "calibration.pt"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit) as exit_info:
        run_main(tmp_path, monkeypatch, lambda cfg: atomic_torch_save({}, target))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: no space left on {target}"
    assert not list(target.parent.glob(".*.tmp"))
    # an OSError without a file name names the run folder
    with pytest.raises(SystemExit):
        run_main(tmp_path, monkeypatch, no_space)
    assert capsys.readouterr().err.strip() == f"error: no space left on {tmp_path / 'out'}"


def test_unwritable_cache_or_output_folder_fails_before_any_work(tmp_path, monkeypatch, capsys):
    import errno

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ran = []
    with pytest.raises(SystemExit):  # a path under a regular file can never be created
        run_main(tmp_path, monkeypatch, ran.append, f"paths.cache_dir={blocker / 'cache'}")
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {blocker / 'cache'}") and "\n" not in err

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("jit.atomic._create_temporary", read_only)
    with pytest.raises(SystemExit):
        run_main(tmp_path, monkeypatch, ran.append)
    assert capsys.readouterr().err.strip() == f"error: cannot write {tmp_path / 'out'}: read-only file system"
    assert not ran


def test_earlier_run_is_refused_or_moved_aside_never_deleted(tmp_path, monkeypatch, capsys):
    """A folder holding an earlier run's outputs: refused in one line; with overwrite=true
    they move to previous/<timestamp>/, while this run's inputs and the user's files stay."""
    out = tmp_path / "out"
    (out / "baseline_fp").mkdir(parents=True)
    for name in ("results.json", "layer_stats.csv", "coverage.csv", "baseline_fp/results.json", "notes.txt"):
        (out / name).write_text("earlier run")
    torch.save({}, out / "calibration.pt")  # given to this run as its calibration input
    seen = []
    with pytest.raises(SystemExit) as refused:
        run_main(tmp_path, monkeypatch, seen.append, f"quant.calibration_file={out / 'calibration.pt'}")
    assert refused.value.code == 2 and not seen
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} holds the outputs of an earlier run") and "overwrite=true" in err, err
    assert "\n" not in err
    run_main(tmp_path, monkeypatch, lambda cfg: seen.append(sorted(p.name for p in out.iterdir())),
             f"quant.calibration_file={out / 'calibration.pt'}", "overwrite=true")
    assert seen == [[".lock", "calibration.pt", "notes.txt", PREVIOUS]]
    (earlier,) = (out / PREVIOUS).iterdir()
    assert sorted(p.name for p in earlier.iterdir()) == ["baseline_fp", "coverage.csv", "layer_stats.csv",
                                                          "results.json"]
    assert (earlier / "results.json").read_text() == "earlier run"
    assert not (out / ".lock").exists()


def test_sweep_summary_uses_only_this_sweeps_jobs(tmp_path):
    from jit.sweep import SWEEP_ID_FILE, collect_rows

    sweep = tmp_path / "sweep"
    for job, (sweep_id, files) in enumerate([("new", {"results.json": {"metrics": {"fid": 3.0}}}),
                                             ("new", {"results.json": {"metrics": {"fid": 1.0}},
                                                      FAILED: "ValueError: bad\n"}),
                                             ("old", {"results.json": {"metrics": {"fid": 2.0}}})]):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (sweep / str(job) / SWEEP_ID_FILE).write_text(sweep_id)
        for name, content in files.items():
            (sweep / str(job) / name).write_text(content if name == FAILED else json.dumps(content))
    (sweep / SWEEP_ID_FILE).write_text("new")
    rows, swept = collect_rows(sweep)
    assert [(r["seed"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed: ValueError: bad")]
    assert swept == ["seed"]


# ------------------------------------------------------- run folders through run.py
# The shipped digits model, few images and steps: each run takes seconds.
QUICK_EVAL = ["fid.num_images=10", "fid.chunk_size=10", "sampler.steps=2", "sampler.method=euler",
              "calibration.num_images=8", "calibration.batch_size=8", "compare_fp=false",
              "eval.layer_stats_images=0"]


def run_with_fault(fault: str, args, tmp_path, check=False):
    """`python run.py *args` with `fault` (Python source) run first in the same process: a
    failure the machine would cause (a full disk, a folder made read-only) at a chosen point."""
    proc = run_entry_point([*args, f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path,
                           {**os.environ, "WANDB_MODE": "offline"}, prelude=fault)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_run_leaves_the_earlier_run_in_its_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    run([*QUICK_EVAL, f"hydra.run.dir={out}"], tmp_path)
    earlier = folder_state(out)
    assert ".hydra/config.yaml" in earlier and "results.json" in earlier and "run.log" in earlier
    # without overwrite=true: refused in one line, before Hydra rewrites .hydra/
    refused = run([*QUICK_EVAL, "seed=1", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (f"error: {out} holds the outputs of an earlier run (.hydra, calibration.pt, "
                                      f"coverage.csv, csv, ...); choose another folder (hydra.run.dir=..., "
                                      f"hydra.sweep.dir=...), or pass overwrite=true to move them to "
                                      f"{out / PREVIOUS}/<timestamp>/")
    assert folder_state(out) == earlier
    # overwrite=true but bad input: refused by the checks; the earlier run is back in place
    missing = tmp_path / "nowhere.pt"
    bad = run([*QUICK_EVAL, "overwrite=true", f"quant.calibration_file={missing}", f"hydra.run.dir={out}"],
              tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: quant.calibration_file: no such file: {missing}"
    assert folder_state(out) == earlier and not (out / PREVIOUS).exists()
    # overwrite=true: the earlier run moves to previous/<timestamp>/, whole
    proc = run([*QUICK_EVAL, "overwrite=true", "fid.num_images=6", f"hydra.run.dir={out}"], tmp_path)
    (moved,) = (out / PREVIOUS).iterdir()
    assert folder_state(moved) == earlier
    assert f"the earlier run in {out} is now in {moved}" in proc.stderr
    assert json.loads((out / "results.json").read_text())["num_images"] == 6
    assert not (out / LOCK).exists() and not (out / FAILED).exists()


def test_one_run_per_folder_at_a_time_and_stale_leftovers_are_cleared(tmp_path):
    import time

    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *QUICK_EVAL, f"hydra.run.dir={out}",
                              f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = run([*QUICK_EVAL, "overwrite=true", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"error: {out}: another run (pid {first.pid}, started ")
    assert len(second.stderr.strip().splitlines()) == 1
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert not (out / PREVIOUS).exists() and not (out / LOCK).exists()
    log = (out / "run.log").read_text()
    assert "overwrite" not in log and log.count("quantized 12 layers") == 1  # the log of one run
    # a run killed by SIGKILL leaves its lock (its process is gone) and a write's temporary
    (out / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": os.uname().nodename, "started": "then"}))
    stale = out / ".results.json.0a1b2c3d.tmp"
    stale.write_text("{")
    run([*QUICK_EVAL, "overwrite=true", f"hydra.run.dir={out}"], tmp_path)
    assert not stale.exists() and not (out / LOCK).exists()
    assert not [p for p in (out / PREVIOUS).rglob("*.tmp")]


def test_a_run_failing_after_its_start_leaves_the_failed_marker(tmp_path):
    """A full disk when results.json is written: one line, exit 2, FAILED holding the error,
    and no results.json; the files written before stay (the marker says they are partial)."""
    out = tmp_path / "out"
    fault = ("import errno, jit.atomic as atomic\n"
             "create = atomic._create_temporary\n"
             "def full(path):\n"
             "    if path.name == 'results.json':\n"
             "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
             "    return create(path)\n"
             "atomic._create_temporary = full")
    proc = run_with_fault(fault, [*QUICK_EVAL, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: no space left on {out / 'results.json'}"
    assert "Traceback" not in proc.stderr
    assert (out / FAILED).read_text() == f"no space left on {out / 'results.json'}\n"
    assert not (out / "results.json").exists() and (out / "calibration.pt").exists()
    assert (out / ".hydra" / "config.yaml").exists() and not (out / LOCK).exists()


def test_a_folder_made_read_only_mid_run_ends_in_one_line(tmp_path):
    """Once calibration.pt is written, nothing more can be created or removed in the run
    folder (as after chmod a-w; simulated, since root ignores permissions): one line naming
    the file and that the marker could not be written, no traceback from any clean-up."""
    out = tmp_path / "out"
    fault = ("import errno, os, pathlib, jit.atomic as atomic\n"
             f"out = pathlib.Path({str(out)!r})\n"
             "def guarded(fn):\n"
             "    def call(path, *args, **kwargs):\n"
             "        if (out / 'calibration.pt').exists() and pathlib.Path(path).parent == out:\n"
             "            raise PermissionError(errno.EACCES, 'Permission denied', str(path))\n"
             "        return fn(path, *args, **kwargs)\n"
             "    return call\n"
             "atomic._create_temporary = guarded(atomic._create_temporary)\n"
             "os.unlink = guarded(os.unlink)\n"
             "os.rmdir = guarded(os.rmdir)")
    proc = run_with_fault(fault, [*QUICK_EVAL, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: cannot write {out / 'coverage.csv'}: permission denied; the marker "
                    f"{out / FAILED} could not be written (permission denied)"), last
    assert not (out / "results.json").exists()


def test_export_onto_its_own_checkpoint_is_refused_before_work(trained_tiny, tmp_path):
    import hashlib

    ckpt = trained_tiny / "checkpoints" / "last.ckpt"
    alias = tmp_path / "alias.ckpt"
    alias.symlink_to(ckpt)
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for target in (ckpt, alias):
        proc = run(["task=export", f"ckpt_path={ckpt}", f"export.out_path={target}",
                    f"hydra.run.dir={tmp_path / 'export'}"], tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: export.out_path: {target} is the checkpoint being exported "
                                       "(ckpt_path); writing there would replace its optimizer and resume "
                                       "state: choose another file")
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
    assert not (tmp_path / "export").exists()


def test_a_disk_filling_during_a_sweep_ends_it_in_one_line_and_the_summary_lists_every_job(tmp_path):
    """Once the first job's results are written the disk is full: the sweep stops with one
    line (no traceback, exit code 2), and the summary rebuilt later lists all three jobs."""
    sweep = tmp_path / "sweep"
    fault = ("import builtins, errno, os, pathlib, jit.atomic as atomic\n"
             f"sweep = pathlib.Path({str(sweep)!r})\n"
             "def full(path):\n"
             "    if (sweep / '0' / 'results.json').exists() and sweep in pathlib.Path(path).absolute().parents:\n"
             "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
             "create, mkdir, open_ = atomic._create_temporary, os.mkdir, builtins.open\n"
             "def create_(path):\n"
             "    full(path)\n"
             "    return create(path)\n"
             "def mkdir_(path, *args, **kwargs):\n"
             "    full(path)\n"
             "    return mkdir(path, *args, **kwargs)\n"
             "def opened(file, mode='r', *args, **kwargs):\n"
             "    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in 'wax+'):\n"
             "        full(file)\n"
             "    return open_(file, mode, *args, **kwargs)\n"
             "atomic._create_temporary, os.mkdir, builtins.open = create_, mkdir_, opened")
    proc = run_with_fault(fault, ["-m", *QUICK_EVAL, "quant.mode=dynamic", "quant.adc.bits=4,6,8",
                                  f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: no space left on {sweep / 'summary.csv'}; "
                                                            "the sweep stops here")
    rebuilt = subprocess.run([sys.executable, "-m", "jit.sweep", str(sweep)], check=False, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 1
    with open(sweep / "summary.csv") as f:
        rows = [(r["quant.adc.bits"], r["status"]) for r in csv.DictReader(f)]
    assert rows == [("4", "ok"), ("6", "not started"), ("8", "not started")]


@pytest.mark.parametrize("signum, code", [(15, 143), (2, 130)])
def test_a_stop_signal_ends_an_evaluation_within_a_batch(tmp_path, signum, code):
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "run.py"), *QUICK_EVAL, "fid.num_images=2000", "fid.chunk_size=4",
           f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.monotonic() + 300
    while not (out / "calibration.pt").exists():  # calibrated: generation runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(2)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    stopped_after = time.monotonic() - sent
    name = signal.Signals(signum).name
    assert proc.returncode == code, err[-3000:]
    assert stopped_after < 10, stopped_after  # one batch of 4 images takes well under a second
    assert err.strip().splitlines()[-1] == f"interrupted by {name} (exit code {code})"
    assert (out / FAILED).read_text() == f"interrupted by {name} (exit code {code})\n"
    assert not (out / "results.json").exists() and not (out / LOCK).exists()


def test_an_evaluation_stopped_by_sigterm_continues_in_its_folder_to_the_same_numbers(trained_tiny, tmp_path):
    """SIGTERM once the quantized pass has scored its second chunk (the run signals itself,
    so the point is exact): exit 143, every scored chunk kept; the same command in the same
    folder generates only what is missing and writes the uninterrupted run's numbers."""
    fault = ("import os, signal\n"
             "from jit.evaluation import chunks\n"
             "save = chunks.ChunkStore.save\n"
             "def save_then_stop(self, chunk, record):\n"
             "    save(self, chunk, record)\n"
             "    if 'baseline_fp' not in str(self.folder) and chunk == 1:\n"
             "        os.kill(os.getpid(), signal.SIGTERM)\n"
             "chunks.ChunkStore.save = save_then_stop\n")
    args = [f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "fid.num_images=20",
            "fid.chunk_size=4", "quant.adc.noise_sigma_lsb=2.0"]
    out = tmp_path / "out"
    stopped = run_with_fault(fault, [*args, f"hydra.run.dir={out}"], tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"continue with the same overrides plus hydra.run.dir={out}" in stopped.stderr
    assert (out / FAILED).is_file() and not (out / "results.json").exists()
    assert len(list(out.glob(".fid_chunks/*/chunk_*.pt"))) == 2
    assert len(list(out.glob("baseline_fp/.fid_chunks/*/chunk_*.pt"))) == 5  # the float baseline, whole
    resumed = run([*args, f"hydra.run.dir={out}"], tmp_path)
    log = resumed.stdout + resumed.stderr
    assert "5 of 5 chunks already scored" in log and "2 of 5 chunks already scored" in log
    whole = tmp_path / "whole"
    run([*args, f"hydra.run.dir={whole}"], tmp_path)
    ours, theirs = (json.loads((folder / "results.json").read_text()) for folder in (out, whole))
    assert ours["metrics"] == theirs["metrics"] and ours["baseline_fp"] == theirs["baseline_fp"]  # bitwise
    assert ours["energy"] == theirs["energy"]
    # The statistics of the chunks scored before the stop come from the store.
    assert (out / "layer_stats.csv").read_text() == (whole / "layer_stats.csv").read_text()
    assert not list(out.rglob(".fid_chunks")) and not (out / FAILED).exists()


# ------------------------------------------------------------------ packaging
def test_package_metadata_builds_without_deprecation_warnings(monkeypatch):
    """`pip install -e .` reads pyproject.toml this way; the license is an SPDX expression."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"


# ------------------------------------------------------------ reproducible simulation
def _generated(trained_tiny, tmp_path, name, *overrides):
    """(images as exported, fid_digits, layer_stats.csv) of an eval run with thermal noise on.

    One intra-op thread per process in every layout: CPU float kernels split their sums by
    thread, so the thread count per process is part of the layout (Lightning's DDP would
    give each of 2 processes half the cores of a single one)."""
    out = tmp_path / name
    run([f"ckpt_path={trained_tiny / 'checkpoint-last.pth'}", *TINY_EVAL, "fid.num_images=14",
         "fid.export_npz=true", "compare_fp=false", "quant.adc.noise_sigma_lsb=2.0", *overrides,
         f"hydra.run.dir={out}"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    import numpy as np

    with np.load(out / "samples.npz", allow_pickle=False) as npz:
        images = npz["arr_0"]
    stats = out / "layer_stats.csv"
    return (images, json.loads((out / "results.json").read_text())["metrics"]["fid_digits"],
            stats.read_text() if stats.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_generated_images_do_not_depend_on_the_process_count(trained_tiny, tmp_path, mode):
    # 14 images in chunks of 4: rank 0 takes chunks 0 and 2, rank 1 chunks 1 and 3 (the
    # last one short), so the export interleaves chunks of unequal size.
    one = _generated(trained_tiny, tmp_path, "one", f"quant.mode={mode}", "fid.chunk_size=4",
                     "eval.layer_stats_images=10")
    two = _generated(trained_tiny, tmp_path, "two", f"quant.mode={mode}", "fid.chunk_size=4",
                     "trainer=ddp_cpu", "eval.layer_stats_images=10")
    assert (one[0] == two[0]).all() and one[1] == two[1]  # bitwise
    # The statistics of images 0-9 ride along chunks 0-2, spread over both ranks.
    assert one[2] is not None and one[2] == two[2]


@pytest.mark.slow
def test_float_backbone_images_do_not_depend_on_the_process_count(trained_tiny, tmp_path):
    one = _generated(trained_tiny, tmp_path, "one", "quant=fp", "fid.chunk_size=5")
    two = _generated(trained_tiny, tmp_path, "two", "quant=fp", "fid.chunk_size=5",
                     "trainer=ddp_cpu")
    assert (one[0] == two[0]).all() and one[1] == two[1]  # bitwise


def test_fid_batch_size_is_refused_with_the_key_that_replaced_it(tmp_path):
    # as an older experiment file or a `+` override brings it in
    done = run(["+fid.batch_size=8"], tmp_path, check=False)
    assert done.returncode == 2
    assert "fid.batch_size was replaced by fid.chunk_size" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ interrupt and resume
TINY_TRAIN = ["experiment=digits_train", "model=jit_t4", "model.net.input_size=16", "data.batch_size=16",
              "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=2",
              "callbacks.progress=null"]


def test_sigterm_exits_143_and_ckpt_path_last_resumes_in_the_same_run_directory(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY_TRAIN, "trainer.max_steps=100000",
           f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoints/step*.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert f"ckpt_path=last hydra.run.dir={out}" in err
    stopped = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped >= 2

    # what a write killed mid-way leaves behind, next to files that only look alike
    stale = out / "checkpoints" / ".last.ckpt.0a1b2c3d.tmp"
    stale.touch()
    kept = [out / "checkpoints" / "notes.tmp", out / ".results.json.tmp", out / "keep.0a1b2c3d.tmp"]
    for path in kept:
        path.touch()

    target = stopped + 2 + stopped % 2  # even: the periodic checkpoint writes last.ckpt at the end
    resumed = run([*TINY_TRAIN, f"trainer.max_steps={target}", "ckpt_path=last", f"hydra.run.dir={out}"],
                  tmp_path)
    log = resumed.stdout + resumed.stderr
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'}" in log
    assert "dirpath has changed" not in log
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == target
    assert not stale.exists() and all(path.exists() for path in kept)
    assert not list((out / "checkpoints").glob("last-v*.ckpt"))
    assert (out / "checkpoint-last.pth").exists()

    fresh = run(["experiment=digits_train", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'new'}"], tmp_path,
                check=False)
    assert fresh.returncode == 2
    assert f"ckpt_path=last: no last*.ckpt in {tmp_path / 'new' / 'checkpoints'}" in fresh.stderr


def test_readme_cpu_dry_run_command_composes_and_validates(tmp_path):
    """The documented dry run (docs/running.md): the overrides exist and give a small CPU run
    of the ImageNet path."""
    import re
    import shlex

    from jit.evaluation.fid import FIDConfig

    readme = (ROOT / "docs" / "running.md").read_text()
    section = readme.split("## Dry run on CPU", 1)[1]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(command)
    assert args[:2] == ["python", "run.py"]
    cfg = compose_run([*args[2:], f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "cpu" and cfg.data._target_.endswith("ImageNetDataModule")
    fid = FIDConfig.from_any(cfg.fid)
    assert fid.extractor == "inception-v3-compat" and fid.num_images <= 50 and fid.isc_splits <= fid.num_images
    assert cfg.calibration.num_images <= 16 and cfg.data.calib_num_images == cfg.calibration.num_images
