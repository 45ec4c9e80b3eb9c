"""Hardware-aware fine-tuning: gradients through the simulated hardware, a fine-tune that
lowers the quantized loss, config checks, resume after SIGTERM, the experiments end to end."""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from test_run import fake_imagenet, run
from test_training import (
    EXACT,
    _one_thread,  # noqa: F401 - autouse: tiny models run fastest on one thread
    assert_state_equal,
    cfg,
    final_state,
    interrupt_at,
    load_ckpt,
)

from jit.callbacks.hardware_aware import HardwareInTheLoop
from jit.checkpoint import build_denoiser_from_checkpoint, load_jit_checkpoint
from jit.datamodules import DigitsDataModule, to_model_range
from jit.evaluation.calibration import run_calibration
from jit.models import Denoiser
from jit.module import JiTModule
from jit.quant import build_quant_config, quantize_model, quantized_layers, sample_context

HELPER = Path(__file__).with_name("training_run.py")
_spec = importlib.util.spec_from_file_location("training_run", HELPER)
training_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training_run)

SHIPPED = Path(__file__).resolve().parents[1] / "jit" / "assets" / "digits_jit.pth"
HARSH = {"scheme": "hybrid", "adc": {"bits": 6, "noise_sigma_lsb": 8.0}}


def digits_batch(n=16, img_size=16, seed=0):
    dm = DigitsDataModule(img_size=img_size, batch_size=n, seed=seed)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    return to_model_range(images), labels


def shipped_denoiser() -> Denoiser:
    """The trained digits model: a freshly initialised JiT has zero final layers, so no
    gradient would reach the earlier ones."""
    return build_denoiser_from_checkpoint(SHIPPED, "model_ema1")[0]


def loss_grads(denoiser, x, labels, seed=0) -> dict[str, torch.Tensor]:
    denoiser.zero_grad()
    with torch.random.fork_rng(), sample_context(denoiser.net, range(x.shape[0])):
        torch.manual_seed(seed)
        denoiser.loss(x, labels).backward()
    return {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_gradients_flow_through_noisy_quantized_layers_to_weights_and_earlier_layers(mode, tmp_path):
    x, labels = digits_batch()
    float_model = shipped_denoiser()
    reference = loss_grads(float_model, x, labels)
    denoiser = shipped_denoiser()
    qcfg = build_quant_config({**HARSH, "mode": mode, "adc": {"bits": 8, "noise_sigma_lsb": 2.0}})
    layers = quantize_model(denoiser.net, qcfg)
    if mode == "static":
        dm = DigitsDataModule(img_size=16, batch_size=16, calib_num_images=32)
        run_calibration(denoiser, qcfg, {"method": "kl", "num_images": 32, "batch_size": 16,
                                         "source": "data"}, tmp_path, datamodule=dm)
    grads = loss_grads(denoiser, x, labels)
    assert set(grads) == set(reference)
    quantized = {f"net.{name}.weight" for name in layers}
    earlier = [n for n in reference if n.startswith("net.x_embedder") or ".attn." in n]
    assert earlier, sorted(reference)[:5]
    for name in sorted(quantized) + earlier:
        g, r = grads[name], reference[name]
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        # The straight-through gradient follows the float gradient; noise and rounding
        # perturb it without turning it around.
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cosine > 0.5, (name, float(cosine))


# ------------------------------------------------------------------ a short fine-tune
def quantized_loss(module: JiTModule, batches) -> float:
    """The training loss under the quantized forward on fixed batches, times and noise."""
    total = 0.0
    module.denoiser.eval()
    with torch.no_grad():
        for i, (x, labels) in enumerate(batches):
            with torch.random.fork_rng(), sample_context(module.denoiser.net, range(i * 64, i * 64 + len(x))):
                torch.manual_seed(1000 + i)
                total += float(module.denoiser.loss(to_model_range(x), labels))
    module.denoiser.train()
    return total / len(batches)


def test_short_hardware_aware_finetune_lowers_the_quantized_training_loss(tmp_path):
    L.seed_everything(0, verbose=False)
    module = JiTModule(net={"name": "JiT-S/4", "input_size": 16, "num_classes": 10},
                       optim={"blr": 1e-3}, ema={"decay1": 0.9, "decay2": 0.9},
                       init_checkpoint=str(SHIPPED), init_weights="model_ema1")
    dm = DigitsDataModule(img_size=16, batch_size=64, calib_num_images=64)
    dm.setup("fit")
    fixed = [b for b, _ in zip(dm.train_dataloader(), range(4))]
    hardware = HardwareInTheLoop(build_quant_config({**HARSH, "mode": "static"}),
                                 {"method": "kl", "num_images": 64, "batch_size": 32, "source": "data"},
                                 run_dir=tmp_path)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[hardware])

    class Before(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.loss = quantized_loss(pl_module, fixed)

    before = Before()
    trainer.callbacks.append(before)
    trainer.fit(module, dm)
    after = quantized_loss(module, fixed)
    assert len(quantized_layers(module.denoiser.net)) == 12
    assert (tmp_path / "calibration.pt").exists()
    assert after < 0.9 * before.loss, (before.loss, after)


def test_frozen_parameters_do_not_move_and_get_no_gradient(tmp_path):
    # A fresh JiT starts with zero gates and a zero final layer, which must train for any
    # gradient to reach the MLPs; the embedders stay frozen.
    trainable = ["net.blocks.*", "net.final_layer.*"]
    c = cfg(tmp_path, max_steps=3, hardware={"quant": {"scheme": "hybrid", "mode": "dynamic"},
                                             "trainable": trainable})
    module = training_run.make_module(c)
    start = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    trainer = training_run.make_trainer(c)
    trainer.fit(module, training_run.make_datamodule(c))
    moved = {k for k, v in module.denoiser.state_dict().items() if not torch.equal(v, start[k])}
    def trains(name):
        return name.startswith(("net.blocks.", "net.final_layer."))

    assert any(".mlp." in k for k in moved) and all(trains(k) for k in moved), sorted(moved)
    assert all(p.requires_grad == trains(n) for n, p in module.denoiser.named_parameters())


# ------------------------------------------------------------------------- resume
def test_sigterm_and_resume_of_a_hardware_aware_run_equals_an_uninterrupted_one(tmp_path):
    """Static ranges recalibrated every 5 steps and 8 LSB noise: the resumed run must use the
    thresholds of step 5 (stored in the checkpoint), not calibrate from the weights of step 7."""
    hardware = {"quant": {**HARSH, "mode": "static"}, "recalibrate_every_n_steps": 5}
    exact = {**EXACT, "hardware": hardware}
    reference = final_state(cfg(tmp_path / "reference", **exact, result=str(tmp_path / "ref.pt")))
    c = cfg(tmp_path / "interrupted", **exact)
    interrupt_at(c, 7, signal.SIGTERM)
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    saved = load_ckpt(last)
    assert saved["global_step"] == 7
    state = next(v for k, v in saved["callbacks"].items() if "HardwareInTheLoop" in k)
    assert state["calibrated_at_step"] == 5 and state["artefact"]["layers"]
    resumed = final_state({**c, "ckpt_path": str(last), "result": str(tmp_path / "resumed.pt")})
    assert resumed["global_step"] == reference["global_step"] == exact["max_steps"]
    assert_state_equal(resumed["params"], reference["params"])
    for mine, theirs in zip(resumed["ema"]["shadows"], reference["ema"]["shadows"], strict=True):
        assert_state_equal(mine, theirs)


# -------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("overrides, message", [
    (["finetune.hardware_aware=true", "quant=fp"], "finetune.hardware_aware=true needs a quantized scheme"),
    (["finetune.hardware_aware=false", "finetune.noise_sigma_lsb=4"], "finetune.noise_sigma_lsb: only used with finetune.hardware_aware=true"),
    (["finetune.hardware_aware=true", "finetune.noise_sigma_lsb=-1"], "finetune.noise_sigma_lsb: must be >= 0"),
    (["finetune.hardware_aware=true", "finetune.ranges=dynamic", "finetune.recalibrate_every_n_steps=10"],
     "finetune.recalibrate_every_n_steps: only used with static ranges"),
    (["finetune.trainable=[net.nothing.*]", "finetune.compare=[]"], "finetune.trainable: pattern 'net.nothing.*' matches no parameter"),
    (["finetune.compare=[{}]", "ckpt_path=null"], "finetune.compare: needs a start checkpoint"),
    (["finetune.compare=[7]"], "finetune.compare[0]: must be a mapping of quant overrides"),
    (["finetune.compare=[{adc: {bits: 1}}]"], "finetune.compare[0]: quant.adc.bits must be an integer in [2, 16]"),
    (["finetune.ranges=sometimes"], "finetune.ranges"),
    (["task=eval", "finetune.hardware_aware=true"], "finetune.hardware_aware: applies to task=train only"),
])
def test_bad_finetune_settings_are_one_line_errors_naming_the_key(tmp_path, overrides, message):
    proc = run(["experiment=digits_hwa", "trainer.max_steps=1", *overrides,
                f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert any(message in line for line in lines), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


# ------------------------------------------------------------- through the entry point
def test_digits_hwa_experiment_fine_tunes_exports_and_compares(tmp_path):
    out = tmp_path / "run"
    run(["experiment=digits_hwa", "trainer.max_steps=4", "calibration.num_images=16",
         "calibration.batch_size=16", "fid.num_images=20", "fid.chunk_size=10", "sampler.steps=2",
         "eval.layer_stats_images=0", "finetune.compare=[{},{adc: {bits: 4, noise_sigma_lsb: 2.0}}]",
         f"hydra.run.dir={out}"], tmp_path)
    summary = json.loads((out / "finetune_comparison.json").read_text())
    assert summary["metric"] == "fid_digits"
    assert [p["point"] for p in summary["points"]] == ["hybrid static, ADC 6 bit, 8 LSB",
                                                       "hybrid static, ADC 4 bit, 2 LSB"]
    for point in summary["points"]:
        assert point["start"]["fid_digits"] > 0 and point["trained"]["fid_digits"] > 0
        assert point["start"]["fid_digits"] != point["trained"]["fid_digits"]
    assert summary["points"][0]["start_float"]["fid_digits"] > 0
    assert summary["points"][0]["trained_float"]["fid_digits"] > 0
    # The evaluations ran with the same seeds and images as a plain task=eval would.
    start = json.loads((out / "compare" / "start_0" / "results.json").read_text())
    assert start["checkpoint"] == str(SHIPPED) and start["seed"] == 0 and start["num_images"] == 20
    assert start["quant"]["adc.bits"] == 6 and start["quant"]["mode"] == "static"
    # The export is an official-layout checkpoint that loads strictly, with moved weights.
    exported = out / "checkpoint-last.pth"
    denoiser, _ = build_denoiser_from_checkpoint(exported, "model_ema1")
    assert denoiser.img_size == 16 and denoiser.num_classes == 10
    shipped, _ = load_jit_checkpoint(SHIPPED, "model_ema1")
    trained, _ = load_jit_checkpoint(exported, "model")
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)
    assert (out / "calibration.pt").exists()  # the training-time static ranges


def test_jit_b16_hwa_experiment_runs_on_a_tiny_model_and_fake_imagenet(official_tiny_ckpt_path, tmp_path):
    root = fake_imagenet(tmp_path / "imagenet", train_per_class=4)
    out = tmp_path / "run"
    run(["experiment=jit_b16_in256_hwa", f"data.root={root}", f"ckpt_path={official_tiny_ckpt_path}",
         "model=jit_t4", "model.net.input_size=32", "data.img_size=32", "data.batch_size=4",
         "data.num_workers=0", "data.calib_num_images=8", "trainer=cpu", "trainer.max_steps=3",
         "calibration.num_images=8", "calibration.batch_size=8", "finetune.recalibrate_every_n_steps=2",
         "fid.extractor=digits-cnn", "fid.num_images=4", "fid.chunk_size=4", "fid.isc_splits=1",
         "sampler.steps=1", "sampler.method=euler", "eval.layer_stats_images=0",
         f"hydra.run.dir={out}"], tmp_path)
    summary = json.loads((out / "finetune_comparison.json").read_text())
    assert len(summary["points"]) == 1
    assert summary["points"][0]["point"] == "hybrid static, ADC 6 bit, 8 LSB"
    denoiser, _ = build_denoiser_from_checkpoint(out / "checkpoint-last.pth", "model_ema1")
    assert denoiser.img_size == 32


@pytest.mark.parametrize("overrides, messages", [
    (["finetune.compare=[{calibration_file: /nowhere/calibration.pt}]"],
     [("finetune.compare[0] (hybrid static, ADC 6 bit, 8 LSB): quant.calibration_file: no such file: "
       "/nowhere/calibration.pt")]),
    (["finetune.compare=[{},{targets: ['blocks.*.nothing']}]"], ["finetune.compare[1] ", "'blocks.*.nothing'"]),
    (["model.denoiser.noise_scale=2.0"], ["finetune.compare[0] ", f"{SHIPPED} was trained with",
                                          "model.denoiser.noise_scale"]),
])
def test_every_comparison_is_checked_before_training(tmp_path, overrides, messages):
    """A comparison that could only fail after training (a missing calibration file,
    targets matching nothing, a start checkpoint made for other settings) is refused
    before the first step: the run folder is left as it was (here: not created)."""
    out = tmp_path / "out"
    proc = run(["experiment=digits_hwa", "trainer.max_steps=2", *overrides, f"hydra.run.dir={out}"], tmp_path,
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: finetune.compare[") and all(m in line for m in messages), line
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_failure_after_training_keeps_the_run_folder_and_marks_it_failed(tmp_path):
    """Whatever fails once training has started (here: the comparison, replaced by one that
    raises a configuration error) leaves .hydra/, run.log and the trained checkpoints where
    they are, with the error in FAILED."""
    from test_run import run_with_fault

    out = tmp_path / "out"
    fault = ("import jit.tasks\n"  # where the task looks the comparison up
             "from jit.config import ConfigError\n"
             "def compare(*args, **kwargs):\n"
             "    raise ConfigError('finetune.compare: a comparison failing after training')\n"
             "jit.tasks.compare_after_training = compare")
    proc = run_with_fault(fault, ["experiment=digits_hwa", "trainer.max_steps=2", "calibration.num_images=16",
                                  "calibration.batch_size=16", "finetune.compare=[{}]", f"hydra.run.dir={out}"],
                          tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: finetune.compare: a comparison failing after training"
    assert (out / "FAILED").read_text() == "finetune.compare: a comparison failing after training\n"
    for kept in (".hydra/config.yaml", ".hydra/overrides.yaml", "run.log", "checkpoint-last.pth"):
        assert (out / kept).is_file(), kept
