"""Bad input is refused before any generation: at startup of `run.py`, or once at load.

Each run uses the shipped digits model with tiny settings; a run that got as far as
generating would leave `baseline_fp/` or `calibration.pt` behind, so their absence shows
the error came first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run import compose_run, run

from jit.checkpoint import CheckpointError
from jit.config import ConfigError, validate

SHIPPED = Path(__file__).resolve().parents[1] / "jit" / "assets" / "digits_jit.pth"
TINY = ["fid.num_images=20", "fid.chunk_size=10", "sampler.steps=2", "sampler.method=euler",
        "calibration.num_images=8", "calibration.batch_size=8"]
DIGITS_FEATURES = 64  # feature dimension of the shipped digits classifier


def run_fails(args, tmp_path, *messages):
    out = tmp_path / "out"
    proc = run([*TINY, *args, f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for message in messages:
        assert message in proc.stderr, proc.stderr[-2000:]
    produced = {p.name for p in out.iterdir()} if out.exists() else set()
    assert not produced & {"baseline_fp", "calibration.pt", "coverage.csv", "results.json"}, produced
    return proc


# ------------------------------------------------------------- item: startup validation
def test_missing_calibration_file_fails_before_the_baseline(tmp_path):
    missing = tmp_path / "nowhere" / "calibration.pt"
    run_fails([f"quant.calibration_file={missing}"], tmp_path, "quant.calibration_file", str(missing))


def test_calibration_file_in_dynamic_mode_is_an_error(tmp_path):
    run_fails(["quant.mode=dynamic", f"quant.calibration_file={tmp_path / 'calibration.pt'}"], tmp_path,
              "quant.calibration_file", "quant.mode=dynamic")


def test_calibration_file_made_for_other_settings_fails_at_startup(tmp_path):
    from jit.builders import load_module
    from jit.quant import artefact, build_quant_config, target_names

    cfg = compose_run(TINY + [f"paths.output_dir={tmp_path}"])
    module, _ = load_module(cfg)
    names = target_names(module.denoiser.net, build_quant_config(cfg.quant).targets)
    made = artefact.made_for(build_quant_config({"scheme": "hybrid", "adc": {"bits": 6}}))
    layers = {n: {"act_clip": 1.0, "adc_clip": {"analog": 1.0}, "made_for": made} for n in names}
    path = tmp_path / "other.pt"
    artefact.save(artefact.new_artefact(scheme="hybrid", method="kl", num_images=8, source="data",
                                        layers=layers), path)
    run_fails([f"quant.calibration_file={path}"], tmp_path, "does not fit the model", "adc_bits")


def test_targets_matching_no_layer_fail_before_the_baseline(tmp_path):
    run_fails(["quant.targets=['blocks.*.mlp.w12','blocks.*.nothing']"], tmp_path, "'blocks.*.nothing'")


@pytest.mark.parametrize("problem", ["shape", "nan", "inf"])
def test_bad_reference_statistics_fail_at_startup(problem, tmp_path):
    dim = 7 if problem == "shape" else DIGITS_FEATURES
    mu, sigma = np.zeros(dim), np.eye(dim)
    if problem != "shape":
        sigma[1, 2] = np.nan if problem == "nan" else np.inf
    path = tmp_path / "stats.npz"
    np.savez(path, mu=mu, sigma=sigma)
    # compare_fp=false: before, static calibration ran (and wrote calibration.pt) first
    run_fails(["compare_fp=false", f"fid.reference.stats_file={path}"], tmp_path, str(path))


# ------------------------------------------------------------- item: non-finite settings
@pytest.mark.parametrize("override, key", [
    ("sampler.cfg_scale=inf", "sampler.cfg_scale"),
    ("model.denoiser.noise_scale=inf", "model.denoiser.noise_scale"),
    ("optim.blr=inf", "optim.blr"),
])
def test_non_finite_settings_one_line_error(override, key, tmp_path):
    proc = run_fails([override], tmp_path, f"{key}: must be a finite number, got inf")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("override, key", [
    ("sampler.interval=[0.1,nan]", "sampler.interval[1]"),
    ("ema.decay1=nan", "ema.decay1"),
    ("model.denoiser.t_eps=-inf", "model.denoiser.t_eps"),
    ("calibration.percentile=nan", "calibration.percentile"),
    ("quant.act.percentile=inf", "quant.act.percentile"),
    ("+fid.sampler.cfg_scale=inf", "fid.sampler.cfg_scale"),
    ("+trainer.gradient_clip_val=inf", "trainer.gradient_clip_val"),
    ("data.subset_frac=nan", "data.subset_frac"),
])
def test_every_config_group_rejects_non_finite_numbers(override, key, tmp_path):
    overrides = [override, f"paths.output_dir={tmp_path}"]
    if override.startswith("data."):
        overrides += ["data=imagenet", "data.root=/data/imagenet", "ckpt_path=x.pth"]
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: must be a finite")):
        validate(compose_run(overrides))


# ------------------------------------------------------------- item: non-finite weights
def corrupt_checkpoint(tmp_path, entry="model_ema1", name="net.blocks.0.mlp.w12.weight", value=float("nan")):
    from jit.checkpoint import safe_load, save_official_checkpoint

    ckpt = safe_load(SHIPPED)
    ckpt[entry] = dict(ckpt[entry])
    ckpt[entry][name] = ckpt[entry][name].clone()
    ckpt[entry][name][0, 0] = value
    path = tmp_path / "bad.pth"
    save_official_checkpoint(path, ckpt["model"], ckpt["model_ema1"], ckpt["model_ema2"],
                             args=ckpt["args"], epoch=ckpt["epoch"])
    return path


@pytest.mark.parametrize("quant", ["fp", "w8a8", "hybrid_w8a11", "bitserial_w8a12"])
def test_nan_weight_fails_once_at_load_under_every_scheme(quant, tmp_path):
    path = corrupt_checkpoint(tmp_path)
    proc = run_fails([f"quant={quant}", f"ckpt_path={path}", "model=jit_s4_digits"], tmp_path,
                     "net.blocks.0.mlp.w12.weight", "model_ema1")
    assert proc.stderr.count("NaN or Inf") == 1


@pytest.mark.parametrize("entry", ["model", "model_ema2"])
def test_inf_weight_in_any_weight_set_is_named(entry, tmp_path):
    from jit.module import JiTModule

    path = corrupt_checkpoint(tmp_path, entry, "net.final_layer.linear.weight", float("inf"))
    with pytest.raises(CheckpointError, match=rf"\['{entry}'\]: parameter net.final_layer.linear.weight "):
        JiTModule(net={"name": "JiT-S/4", "input_size": 16, "num_classes": 10}, init_checkpoint=str(path),
                  init_weights="model")


def test_nan_weight_in_a_lightning_checkpoint_is_named(tmp_path):
    import lightning

    from jit.module import JiTModule

    module = JiTModule(net={"name": "JiT-T/4", "input_size": 16, "num_classes": 3})
    state = module.state_dict()
    state["denoiser.net.blocks.1.mlp.w3.weight"][0, 0] = float("nan")
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": lightning.__version__,
                "hyper_parameters": dict(module.hparams), "ema": module.ema.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"parameter denoiser.net.blocks.1.mlp.w3.weight "):
        JiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------ run time: the first layer is named
def quantized_tiny(scheme):
    from jit.models import Denoiser, build_jit
    from jit.quant import quantize_model

    torch.manual_seed(0)
    net = build_jit("JiT-T/4", input_size=16, num_classes=3)
    quantize_model(net, {"scheme": scheme})
    return Denoiser(net, 3).eval()


@pytest.mark.parametrize("scheme", ["w8a8", "hybrid", "bitserial"])
def test_nan_weight_set_at_run_time_names_its_own_layer(scheme):
    denoiser = quantized_tiny(scheme)
    with torch.no_grad():
        denoiser.net.blocks[0].mlp.w12.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer 'blocks.0.mlp.w12': NaN or Inf in the weights"):
        denoiser.generate(torch.tensor([0, 1]), steps=1, method="euler")


@pytest.mark.parametrize("scheme", ["w8a8", "hybrid", "bitserial"])
def test_nan_arising_upstream_names_the_first_quantized_layer_it_reaches(scheme):
    denoiser = quantized_tiny(scheme)
    with torch.no_grad():  # not quantized: the NaN first meets a quantized layer in block 1's MLP
        denoiser.net.blocks[1].attn.proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer 'blocks.1.mlp.w12': NaN or Inf in the input"):
        denoiser.generate(torch.tensor([0, 1]), steps=1, method="euler")
