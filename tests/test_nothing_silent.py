"""Nothing silent: bad values, files and settings are refused where they appear, in one line
through `python run.py`, and long phases say what they do where stdout is not a terminal
(the subprocesses here write into pipes, as under SLURM or nohup)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run import TINY_EVAL, TINY_TRAIN, compose_run, run

from jit.checkpoint import safe_load, save_official_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model trained for a few steps through `task=train` (as test_run's trained_tiny)."""
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    run([*TINY_TRAIN, "trainer.max_steps=4", f"hydra.run.dir={out}"], tmp)
    return out


def one_line_error(proc) -> str:
    """The run failed with exit code 2 and one `error:` line, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def edited_checkpoint(source, target, edit) -> str:
    """A copy of an official checkpoint with `edit(name, tensor) -> tensor` applied to every
    weight set (model, model_ema1, model_ema2)."""
    ckpt = safe_load(source)
    for key in ("model", "model_ema1", "model_ema2"):
        ckpt[key] = {name: edit(name, value) for name, value in ckpt[key].items()}
    save_official_checkpoint(target, **ckpt)
    return str(target)


# ------------------------------------------------------------------ non-finite values
def test_a_sampling_step_that_gives_nan_or_inf_stops_the_run_naming_step_and_image(tiny_run, tmp_path):
    """Weights that are finite but overflow float32 in the forward: the first sampling
    step is non-finite. The run stops there, before calibration and before anything is
    scored, float model and hybrid alike."""
    overflow = edited_checkpoint(
        tiny_run / "checkpoint-last.pth", tmp_path / "overflow.pth",
        lambda name, value: torch.full_like(value, 1e38) if name == "net.final_layer.linear.weight" else value)
    expected = "error: sampling step 1 of 2 produced NaN or Inf values (first at image 0)"
    for name, extra in (("fp", ["quant=fp"]), ("hybrid", ["quant.mode=static", "compare_fp=false"])):
        out = tmp_path / name
        proc = run([f"ckpt_path={overflow}", *TINY_EVAL, *extra, f"hydra.run.dir={out}"], tmp_path, check=False)
        assert one_line_error(proc).startswith(expected), proc.stderr[-2000:]
        assert not (out / "results.json").exists() and not (out / "calibration.pt").exists()


def test_a_guidance_scale_beyond_float32_is_refused_before_any_work(tmp_path):
    proc = run(["quant=fp", "sampler.cfg_scale=1e300", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path,
               check=False)
    assert one_line_error(proc).startswith("error: sampler.cfg_scale: must be in [0, 3.403e+38]")
    assert "GPU available" not in proc.stdout + proc.stderr  # no trainer was built


def test_non_finite_features_are_never_scored():
    from jit.evaluation.fid import NonFiniteFeaturesError, check_finite_features

    features = torch.zeros(3, 4)
    check_finite_features(features, None, torch.tensor([7, 8, 9]), "digits-cnn")
    features[1, 2] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="NaN or Inf features for image 8"):
        check_finite_features(features, None, torch.tensor([7, 8, 9]), "digits-cnn")
    logits = torch.zeros(3, 2)
    logits[2, 0] = float("inf")
    with pytest.raises(NonFiniteFeaturesError, match="image 9"):
        check_finite_features(torch.zeros(3, 4), logits, torch.tensor([7, 8, 9]), "digits-cnn")


def test_the_sampler_names_the_first_bad_step_and_row():
    from jit.models import Denoiser, build_jit
    from jit.models.denoiser import NonFiniteSampleError

    torch.manual_seed(0)
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=8, num_classes=4), 4).eval()
    calls = []

    def poison_second_call(module, args, output):  # row 2 turns NaN from the second step on
        calls.append(1)
        if len(calls) >= 2:
            output = output.clone()
            output[2] = float("nan")
        return output

    denoiser.net.register_forward_hook(poison_second_call)
    with pytest.raises(NonFiniteSampleError) as info:
        denoiser.generate(torch.arange(4), steps=3, method="euler")
    assert (info.value.step, info.value.rows) == (2, [2])
    assert "image 12" in str(info.value.for_images([10, 11, 12, 13]))


# ------------------------------------------------------------------ reference statistics
@pytest.mark.parametrize("case, message", [
    ("asymmetric", "sigma is not a covariance, it is not symmetric"),
    ("non_finite", "contain NaN or Inf values"),
    ("wrong_shape", "have mu (64,) and sigma (64, 63)"),
])
def test_unusable_reference_statistics_are_refused_naming_the_file(case, message, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 64))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    if case == "asymmetric":
        sigma[0, 1] += 0.5
    elif case == "non_finite":
        sigma[3, 3] = np.inf
    else:
        sigma = sigma[:, :63]
    stats = tmp_path / f"{case}.npz"
    np.savez(stats, mu=mu, sigma=sigma)
    proc = run([f"fid.reference.stats_file={stats}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, check=False)
    line = one_line_error(proc)
    assert str(stats) in line and message in line, line


def test_reference_statistics_within_round_off_of_symmetric_are_accepted(tmp_path):
    from jit.metrics.reference import _check

    sigma = np.cov(np.random.default_rng(0).normal(size=(100, 8)), rowvar=False).astype(np.float32)
    sigma[0, 1] *= 1 + 1e-7  # float32 round-off
    _check(np.zeros(8), sigma, 8, "stats.npz")


# ------------------------------------------------------------------ calibration artefacts
def test_calibration_of_other_weights_is_refused_unless_allowed(tiny_run, tmp_path):
    """An artefact records the digest of the weights it was calibrated on; applied to other
    weights of the same architecture it is refused, unless quant.allow_foreign_calibration."""
    ckpt = tiny_run / "checkpoint-last.pth"
    run(["task=calibrate", f"ckpt_path={ckpt}", *TINY_EVAL, "quant.mode=static",
         f"hydra.run.dir={tmp_path / 'cal'}"], tmp_path)
    artefact = tmp_path / "cal" / "calibration.pt"
    stored = torch.load(artefact, weights_only=True)
    assert all(re.fullmatch(r"[0-9a-f]{64}", entry["weights_sha256"]) for entry in stored["layers"].values())
    other = edited_checkpoint(ckpt, tmp_path / "other.pth",
                              lambda name, value: value * 1.01 if name.endswith("mlp.w3.weight") else value)
    common = [*TINY_EVAL, "quant.mode=static", f"quant.calibration_file={artefact}", "compare_fp=false",
              "eval.layer_stats_images=0", "fid.num_images=10"]
    refused = run([f"ckpt_path={other}", *common, f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path, check=False)
    line = one_line_error(refused)
    assert f"quant.calibration_file={artefact} was calibrated on other weights" in line
    assert "layer blocks.0.mlp.w3 (and 3 more of 8 layers)" in line and "allow_foreign_calibration=true" in line
    assert "GPU available" not in refused.stdout + refused.stderr  # refused before the trainer and generation
    allowed = tmp_path / "allowed"
    run([f"ckpt_path={other}", *common, "quant.allow_foreign_calibration=true", f"hydra.run.dir={allowed}"],
        tmp_path)
    assert json.loads((allowed / "results.json").read_text())["calibration"]["calibrated_here"] is False
    # the weights it was made on take it without the setting
    run([f"ckpt_path={ckpt}", *common, f"hydra.run.dir={tmp_path / 'own'}"], tmp_path)


def test_an_artefact_without_a_weight_digest_is_applied_with_a_warning(caplog):
    from jit.quant import artefact as art
    from jit.quant import build_quant_config, quantize_model
    from jit.quant.calibration import calibrate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    quantize_model(net, build_quant_config({"scheme": "hybrid", "mode": "static", "targets": ["0", "2"],
                                            "adc": {"noise_sigma_lsb": 0.0}}))
    made = calibrate(net, [(torch.randn(32, 16),)])
    legacy = {**made, "layers": {name: {k: v for k, v in entry.items() if k != "weights_sha256"}
                                 for name, entry in made["layers"].items()}}
    with caplog.at_level("WARNING"):
        assert art.apply(legacy, net) == ["0", "2"]
    assert "records no weight digest for 2 layer(s)" in caplog.text
    with torch.no_grad():
        net[2].weight.add_(0.01)
    with pytest.raises(art.ArtefactError, match="layer 2 differs"):
        art.apply(made, net)
    art.apply(made, net, allow_foreign_weights=True)


@pytest.mark.parametrize("kind, message", [
    ("malicious", r"refused as unsafe: the calibration artefact would unpickle the Python object posix\.system"),
    ("corrupt", r"cannot read the calibration artefact \(corrupt or truncated file"),
])
def test_an_unsafe_calibration_file_is_refused_as_unsafe_in_one_line(kind, message, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "calibration.pt"
    torch.save({"kind": Payload()}, path)
    if kind == "corrupt":
        path.write_bytes(path.read_bytes()[:40])
    proc = run(["quant.mode=static", f"quant.calibration_file={path}", f"hydra.run.dir={tmp_path / 'out'}"],
               tmp_path, check=False)
    assert re.search(message, one_line_error(proc)), proc.stderr
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------ settings that do not apply
@pytest.mark.parametrize("overrides, message", [
    (["fid.inception_weights=/nonexistent/pt_inception.pth"],
     ("fid.inception_weights=/nonexistent/pt_inception.pth applies to fid.extractor=inception-v3-compat only, "
      "but the extractor is digits-cnn")),
    (["fid=inception_10k", "fid.extractor_weights=/nonexistent/w.pt"],
     "fid.extractor_weights=/nonexistent/w.pt is not read by fid.extractor=inception-v3-compat"),
    (["calibration=kl", "calibration.percentile=99.9"],
     "calibration.percentile applies to calibration.method=percentile only"),
    (["quant.allow_foreign_calibration=true"],
     "quant.allow_foreign_calibration=true applies to a quant.calibration_file, and none is given"),
    (["resume.allow_changes=[optim.blr]"], "resume.allow_changes: applies to resuming a training"),
])
def test_a_setting_that_does_not_apply_is_refused(overrides, message, tmp_path):
    proc = run([*overrides, f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, check=False)
    assert message in one_line_error(proc)
    assert "GPU available" not in proc.stdout + proc.stderr  # before any model or trainer


# ------------------------------------------------------------------ resuming
def test_resume_refuses_changed_training_settings_unless_allowed(tmp_path):
    out = tmp_path / "run"
    run([*TINY_TRAIN, "trainer.max_steps=2", f"hydra.run.dir={out}"], tmp_path)
    resume = [*TINY_TRAIN, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={out}"]
    changed = ["data.batch_size=8", "optim.blr=1e-3"]
    refused = run([*resume, *changed], tmp_path, check=False)
    assert one_line_error(refused) == (
        f"error: ckpt_path={out / 'checkpoints' / 'last.ckpt'}: resuming would change data.batch_size (16 -> 8), "
        "optim.blr (0.004 -> 0.001); a resumed run continues the same training (start a new run, or allow the "
        "change with resume.allow_changes=[data.batch_size,optim.blr])")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    # more steps and another loader setting are the same training
    run([*resume, "trainer.max_steps=3", "data.num_workers=1"], tmp_path)
    run([*resume, *changed, "resume.allow_changes=[data.batch_size,optim.*]"], tmp_path)
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


# ------------------------------------------------------------------ training without a logger
def test_training_without_a_logger_and_without_a_terminal_prints_plain_progress(tmp_path):
    out = tmp_path / "run"
    proc = run(["experiment=digits_train", "model=jit_t4", "model.net.input_size=16", "data.batch_size=16",
                "logger=none", "trainer.max_steps=3", "progress_interval_s=0.001", f"hydra.run.dir={out}"], tmp_path)
    assert (out / "checkpoint-last.pth").exists() and not (out / "csv").exists()
    console = proc.stdout + proc.stderr
    assert re.search(r"training: [12]/3 steps \(\d+%\), [\d.]+ steps/s, ETA \d+s", console), console
    assert re.search(r"training: 3/3 steps in \d+s", console), console


def test_hardware_aware_recipes_train_what_the_fine_tuning_docs_say(tmp_path):
    """docs/finetuning.md measured the digits recipe training every parameter tensor; the
    recipes and the schema default agree with it, and the documented FFN-only pattern
    selects exactly the FFN layers."""
    from jit.callbacks.hardware_aware import freeze_all_but
    from jit.models import Denoiser, build_jit

    docs = (Path(__file__).resolve().parents[1] / "docs" / "finetuning.md").read_text()
    assert '| `finetune.trainable` | fnmatch patterns of the parameters that train (default `["*"]`' in docs
    for args in (["experiment=digits_hwa"], ["experiment=jit_b16_in256_hwa", "data.root=/data/imagenet"]):
        assert list(compose_run([*args, f"paths.output_dir={tmp_path}"]).finetune.trainable) == ["*"]
    assert compose_run([f"paths.output_dir={tmp_path}"]).finetune.trainable == ["*"]
    net = compose_run(["experiment=digits_hwa", f"paths.output_dir={tmp_path}"]).model.net
    denoiser = Denoiser(build_jit(net.name, input_size=net.input_size, num_classes=net.num_classes),
                        net.num_classes)
    everything = [name for name, _ in denoiser.named_parameters()]
    assert freeze_all_but(denoiser, ["*"]) == everything and len(everything) == 99
    ffn = freeze_all_but(denoiser, ["net.blocks.*.mlp.*"])
    assert ffn and all(".mlp.w12." in name or ".mlp.w3." in name for name in ffn)


# ------------------------------------------------------------------ progress of an evaluation
def test_every_phase_announces_itself_and_reports_progress_without_a_terminal(tiny_run, tmp_path):
    proc = run([f"ckpt_path={tiny_run / 'checkpoint-last.pth'}", *TINY_EVAL, "quant.mode=static",
                "compare_fp=false", "eval.layer_stats_images=4", "progress_interval_s=0.001",
                f"paths.cache_dir={tmp_path / 'fresh_cache'}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    console = proc.stdout
    for phase in (r"reference statistics \(reference split\): computing digits-cnn features of \d+ images",
                  r"calibration: kl ranges of 8 layers from 8 images of the calibration split",
                  r"calibration \(activations\): pass 1 over 8 images",
                  r"calibration: kl search for the activation clips of 8 layers",
                  r"calibration \(ADC inputs\): pass 2 over 8 images",
                  r"calibration: kl search for the ADC clips of 8 layers",
                  r"FID generation \(hybrid\): 20 images in chunks of 10",
                  r"layer statistics: the first 4 images, observed in this pass's forwards"):
        assert re.search(phase, console), (phase, console)
    # count, rate and time left while generating; one closing line
    assert re.search(r"FID generation \(hybrid\): \d+/20 images \(\d+%\), [\d.]+ images/s, ETA \d+s", console)
    assert len(re.findall(r"FID generation \(hybrid\): 20/20 images in \d+s", console)) == 1


def test_plain_progress_lines_come_at_the_configured_interval(monkeypatch):
    from jit import console

    lines = []
    monkeypatch.setattr(console, "announce", lines.append)
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 40.0]).__next__
    monkeypatch.setattr("time.monotonic", clock)
    console.configure_progress(30.0)
    with console.PhaseProgress("FID generation", 100, terminal=False) as progress:
        progress.update(10)  # t=1: too early
        progress.update(20)  # t=2: too early
        progress.update(60)  # t=31: a line
        progress.update(70)  # t=32: too early
    assert lines == ["FID generation: 60/100 images (60%), 1.94 images/s, ETA 21s",
                     "FID generation: 70/100 images in 40s (1.75 images/s)"]


# ------------------------------------------------------------------ hardware reports
def test_the_digital_baseline_reports_no_saving_against_itself(tiny_run, tmp_path):
    args = [f"ckpt_path={tiny_run / 'checkpoint-last.pth'}", *TINY_EVAL, "quant=fp", "fid.num_images=10"]
    digital = run([*args, "hardware=digital_int8_40nm", f"hydra.run.dir={tmp_path / 'digital'}"], tmp_path)
    assert re.search(r"energy per image on digital_int8_40nm: [\d.]+ uJ \(the digital INT8 baseline other "
                     r"hardware is compared with\)", digital.stdout), digital.stdout
    analog = run([*args, f"hydra.run.dir={tmp_path / 'analog'}"], tmp_path)  # fp: the digital INT8 MACs
    assert ", 0.0% vs the digital INT8 baseline" in analog.stdout, analog.stdout
    assert "-0.0%" not in digital.stdout + analog.stdout


def test_help_lists_only_the_hardware_a_user_can_pick(tmp_path):
    proc = run(["--help"], tmp_path)
    groups = proc.stdout.split("== Config ==")[0]
    assert re.search(r"^hardware: digital_int8_40nm, nor_flash_40nm$", groups, re.MULTILINE), groups
    assert "hardware/" not in groups
    cfg = compose_run(["hardware=digital_int8_40nm", "hardware.digital.int8_mac_pJ=0.5",
                       f"paths.output_dir={tmp_path}"])
    assert cfg.hardware.digital.int8_mac_pJ == 0.5 and cfg.hardware.digital.mac_units == 2048
