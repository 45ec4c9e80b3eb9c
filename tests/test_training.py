"""Training: loss goes down, EMAs, lr schedule, resume after a kill, SIGTERM, DDP, official
export and fine-tuning, non-finite loss, bad data/model combinations.

Runs use JiT-T/4 on 16 px digits; subprocess runs go through tests/training_run.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from jit.atomic import _create_temporary, remove_stale_temporaries
from jit.checkpoint import build_denoiser_from_checkpoint, load_jit_checkpoint
from jit.datamodules import DigitsDataModule
from jit.ema import EMA
from jit.module import JiTModule, NonFiniteLossError
from jit.train import AtomicCheckpointIO, export_official

HELPER = Path(__file__).with_name("training_run.py")
_spec = importlib.util.spec_from_file_location("training_run", HELPER)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: on two shared cores one thread is many times faster than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg(tmp_path, **kw) -> dict:
    return {**run.DEFAULTS, "root": str(tmp_path), **kw}


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(c: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HELPER), json.dumps(c)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training process ended early:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.1)


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def quiet_trainer(tmp_path, **kw) -> L.Trainer:
    """A CPU trainer without logger, progress bar or checkpoints."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kw,
    )


class Recorder(Callback):
    """Losses, learning rates and parameters after every optimizer step."""

    def __init__(self):
        self.losses, self.lrs, self.params = [], [], []

    def on_train_start(self, trainer, pl_module):
        self.params.append([p.detach().clone() for p in pl_module.denoiser.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.params.append([p.detach().clone() for p in pl_module.denoiser.parameters()])


# ----------------------------------------------------------------------------- training
def test_training_reduces_loss_with_closed_form_emas_and_lr_schedule(tmp_path):
    steps, warmup, batch, blr, min_lr = 40, 5, 16, 0.016, 1e-4
    L.seed_everything(0, verbose=False)
    module = JiTModule(
        net={"name": "JiT-T/4", "input_size": 16, "num_classes": 10},
        optim={"blr": blr, "warmup_steps": warmup, "schedule": "cosine", "min_lr": min_lr},
        ema={"decay1": 0.9, "decay2": 0.7},
    )
    rec = Recorder()
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[rec])
    trainer.fit(module, DigitsDataModule(img_size=16, batch_size=batch))
    assert trainer.global_step == steps

    first, last = sum(rec.losses[:8]) / 8, sum(rec.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last, rec.losses)

    # lr = blr * global batch / 256, linear warm-up, then cosine down to min_lr
    peak = blr * batch / 256
    assert module.lr == pytest.approx(peak) and module.global_batch_size == batch
    for step, lr in enumerate(rec.lrs):  # the lr the optimizer step `step` used
        if step < warmup:
            expected = peak * (step + 1) / warmup
        else:
            progress = (step - warmup) / (steps - warmup)
            expected = min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr == pytest.approx(expected, rel=1e-6), step

    # Each EMA after n updates: d^n p_0 + sum_k (1 - d) d^(n-k) p_k, in float64.
    for index, d in enumerate((0.9, 0.7)):
        for j, shadow in enumerate(module.ema.shadows[index]):
            seq = [ps[j].double() for ps in rec.params]
            n = len(seq) - 1
            closed = d**n * seq[0] + sum((1 - d) * d ** (n - k) * seq[k] for k in range(1, n + 1))
            torch.testing.assert_close(shadow.double(), closed, rtol=1e-5, atol=1e-6)

    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert key in metrics, key


def test_accumulation_bf16_and_validation_with_ema_weights(tmp_path):
    """bf16-mixed autocast (CPU here, GPU the same code), one EMA update per optimizer step,
    accumulation counted in the global batch, validation on EMA weights restoring the raw ones."""
    module = run.make_module(cfg(tmp_path))
    updates = []
    real_update = module.ema.update
    module.ema.update = lambda m: (updates.append(1), real_update(m))

    class RawWeightsAfterValidation(Callback):
        def on_validation_start(self, trainer, pl_module):
            self.before = [p.detach().clone() for p in pl_module.denoiser.parameters()]

        def on_validation_end(self, trainer, pl_module):
            self.after = [p.detach().clone() for p in pl_module.denoiser.parameters()]

    check = RawWeightsAfterValidation()
    trainer = quiet_trainer(
        tmp_path,
        precision="bf16-mixed",
        max_steps=3,
        accumulate_grad_batches=2,
        limit_val_batches=1,
        val_check_interval=6,
        callbacks=[check],
    )
    trainer.fit(module, DigitsDataModule(img_size=16, batch_size=8))
    assert trainer.global_step == 3 and len(updates) == 3
    assert module.global_batch_size == 16
    assert module.lr == pytest.approx(0.02 * 16 / 256)
    assert "val/loss_ema1" in trainer.callback_metrics
    assert all(torch.equal(a, b) for a, b in zip(check.before, check.after))
    assert all(p.dtype == torch.float32 for p in module.denoiser.parameters())


def test_ema_closed_form_unit():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, [0.99, 0.5])
    start = [p.detach().clone() for p in net.parameters()]
    values = [torch.full_like(net.weight, float(k)) for k in range(1, 6)]
    for v in values:
        with torch.no_grad():
            net.weight.copy_(v)
        ema.update(net)
    for i, d in enumerate((0.99, 0.5)):
        n = len(values)
        closed = d**n * start[0] + sum(
            (1 - d) * d ** (n - k) * values[k - 1] for k in range(1, n + 1)
        )
        torch.testing.assert_close(ema.shadows[i][0], closed)
        # the bias never moved: its EMA is the start value
        torch.testing.assert_close(ema.shadows[i][1], start[1])
    assert all(s.dtype == torch.float32 for sh in ema.shadows for s in sh)


def test_eval_weights_context_swaps_and_restores(tmp_path):
    module = run.make_module(cfg(tmp_path))
    raw = [p.detach().clone() for p in module.denoiser.parameters()]
    for shadow in module.ema.shadows[1]:
        shadow.add_(1.0)
    with module.eval_weights_context("ema2"):
        for p, r in zip(module.denoiser.parameters(), raw):
            assert torch.equal(p, r + 1.0)
        with module.eval_weights_context("raw"):
            assert all(torch.equal(p, r) for p, r in zip(module.denoiser.parameters(), raw))
        # an export taken while EMA weights are in place still reports the raw weights
        state = module.export_official_state()
        assert all(
            torch.equal(state["model"][f"net.{k}"], r)
            for (k, _), r in zip(module.denoiser.net.named_parameters(), raw)
        )
    assert all(torch.equal(p, r) for p, r in zip(module.denoiser.parameters(), raw))
    with pytest.raises(ValueError, match="raw, ema1, ema2"), module.eval_weights_context("ema3"):
        pass


# ------------------------------------------------------------------------------ resume
def test_killed_run_resumes_with_identical_state(tmp_path):
    c = cfg(tmp_path, max_steps=10_000, every_n=2, progress=str(tmp_path / "progress"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = launch(c)
    try:
        wait_for(last.exists, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load_ckpt(last)
    step = saved["global_step"]
    assert step >= 2 and step % 2 == 0

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.ema = pl_module.ema.state_dict()
            # deep copies: state_dict() hands out the live tensors, which go on training
            self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.sched = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())

    snap = Snapshot()
    c2 = cfg(tmp_path / "resumed", max_steps=step + 2, every_n=2)
    torch.set_num_threads(1)
    module = run.make_module(c2)
    trainer = run.make_trainer(c2, callbacks=[snap])
    trainer.fit(module, run.make_datamodule(c2), ckpt_path=str(last))

    assert snap.step == step
    assert_state_equal(snap.state, saved["state_dict"])
    for mine, theirs in zip(snap.ema["shadows"], saved["ema"]["shadows"]):
        assert_state_equal(mine, theirs)
    saved_opt = saved["optimizer_states"][0]
    assert snap.optim["param_groups"] == saved_opt["param_groups"]
    for i, st in saved_opt["state"].items():
        for key, value in st.items():
            assert torch.equal(snap.optim["state"][i][key], value), (i, key)
    assert snap.sched["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"] == step
    assert trainer.global_step == step + 2


def interrupt_at(c: dict, step: int, sig: int) -> None:
    """Run `c` in a subprocess, stop it with `sig` once it has finished global step `step`."""
    progress = Path(c["root"]) / "progress"
    progress.parent.mkdir(parents=True, exist_ok=True)
    proc = launch({**c, "progress": str(progress), "pause_at": step})
    try:
        wait_for(lambda: progress.exists() and progress.read_text() == str(step), proc)
    finally:
        proc.send_signal(sig)
        proc.communicate(timeout=120)


def final_state(c: dict) -> dict:
    run.main(c)
    return torch.load(c["result"].format(rank=0), weights_only=True)


# 43 training images in batches of 8: 5 steps per epoch, so runs cross epoch boundaries and
# stop mid-epoch; random flips make the data order and the augmentation both matter.
EXACT = {"subset_frac": 0.03, "random_flip": True, "every_n": 2, "max_steps": 13}


@pytest.mark.parametrize(
    "sig, workers",
    [(signal.SIGTERM, 0), (signal.SIGKILL, 2)],  # workers load batches ahead of the training loop
    ids=["sigterm", "sigkill-2-workers"],
)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, sig, workers):
    exact = {**EXACT, "num_workers": workers}
    reference = final_state(cfg(tmp_path / "reference", **exact, result=str(tmp_path / "ref.pt")))

    c = cfg(tmp_path / "interrupted", **exact)
    interrupt_at(c, 7, sig)  # epoch 1, third batch
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    # SIGTERM saves at the step it arrives; SIGKILL leaves the periodic checkpoint of step 6.
    assert load_ckpt(last)["global_step"] == (7 if sig == signal.SIGTERM else 6)
    resumed = final_state({**c, "ckpt_path": str(last), "result": str(tmp_path / "resumed.pt")})

    assert resumed["global_step"] == reference["global_step"] == exact["max_steps"]
    assert_state_equal(resumed["params"], reference["params"])
    for mine, theirs in zip(resumed["ema"]["shadows"], reference["ema"]["shadows"], strict=True):
        assert_state_equal(mine, theirs)


def test_sigterm_after_the_batch_end_check_still_saves_and_resumes_bitwise(tmp_path):
    # The signal lands after SaveOnSignal looked at the batch end; Lightning's loop then stops
    # at the end of the step, and the checkpoint is written from on_exception.
    reference = final_state(cfg(tmp_path / "reference", **EXACT, result=str(tmp_path / "ref.pt")))
    c = cfg(tmp_path / "interrupted", **EXACT, sigterm_self_at=7)
    proc = subprocess.run([sys.executable, str(HELPER), json.dumps(c)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert last.exists(), (proc.stdout + proc.stderr)[-3000:]
    assert "SIGTERM received: saving" in proc.stdout + proc.stderr
    assert load_ckpt(last)["global_step"] == 7
    resumed = final_state({**c, "sigterm_self_at": None, "ckpt_path": str(last),
                           "result": str(tmp_path / "resumed.pt")})
    assert resumed["global_step"] == reference["global_step"] == EXACT["max_steps"]
    assert_state_equal(resumed["params"], reference["params"])
    for mine, theirs in zip(resumed["ema"]["shadows"], reference["ema"]["shadows"], strict=True):
        assert_state_equal(mine, theirs)


def test_sigterm_writes_checkpoint_before_stopping(tmp_path):
    progress = tmp_path / "progress"
    c = cfg(tmp_path, max_steps=10_000, every_n=None, progress=str(progress))
    proc = launch(c)
    wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists(), out[-3000:]
    assert "SIGTERM received" in out
    saved = load_ckpt(last)
    assert saved["global_step"] >= 2
    assert "ema" in saved and "optimizer_states" in saved
    # no periodic checkpoint was due: the only file is the one written on SIGTERM
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


# --------------------------------------------------------------------------------- DDP
def test_ddp_cpu_two_processes_identical_parameters_and_global_batch_lr(tmp_path):
    c = cfg(tmp_path, devices=2, max_steps=3, batch_size=4, result=str(tmp_path / "rank{rank}.pt"))
    proc = subprocess.run(
        [sys.executable, str(HELPER), json.dumps(c)],
        check=False,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["global_batch_size"] == 8
    assert r0["lr"] == pytest.approx(c["blr"] * 4 * 2 / 256)
    assert_state_equal(r0["params"], r1["params"])
    for a, b in zip(r0["ema"]["shadows"], r1["ema"]["shadows"]):
        assert_state_equal(a, b)
    # and training moved the weights away from their (identical) initialisation
    fresh = run.make_module(c).denoiser.state_dict()
    assert any(not torch.equal(fresh[k], r0["params"][k]) for k in fresh)


# ----------------------------------------------------------------- official checkpoints
def test_export_official_layout_loads_strict_and_reproduces_outputs(tmp_path):
    c = cfg(tmp_path, max_steps=2, every_n=1)
    torch.manual_seed(0)
    module = run.make_module(c)
    run.make_trainer(c).fit(module, run.make_datamodule(c))
    out = export_official(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoint-last.pth")

    raw = torch.load(out, weights_only=False)
    assert set(raw) == {"model", "model_ema1", "model_ema2", "epoch", "args"}
    assert (
        raw["args"].model == "JiT-T/4"
        and raw["args"].img_size == 16
        and raw["args"].class_num == 10
    )
    torch.manual_seed(1)
    z, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 4, 9])
    module.eval()
    for which, key in (("raw", "model"), ("ema1", "model_ema1"), ("ema2", "model_ema2")):
        denoiser, meta = build_denoiser_from_checkpoint(out, weights=key)  # strict load
        assert meta["variant"] == "JiT-T/4"
        with torch.no_grad(), module.eval_weights_context(which):
            expected = module.denoiser.net(z, t, y)
        assert torch.equal(denoiser.eval().net(z, t, y), expected), which
    direct = module.export_official_state()
    for key in ("model", "model_ema1", "model_ema2"):
        assert_state_equal(direct[key], raw[key])


def test_finetune_from_official_fixture(tmp_path, official_tiny_ckpt_path):
    official = tmp_path / "checkpoint-last.pth"
    shutil.copy(official_tiny_ckpt_path, official)
    c = cfg(tmp_path, img_size=32, max_steps=2, batch_size=4, every_n=2)
    module = JiTModule(
        net={"name": "JiT-T/4", "input_size": 32, "num_classes": 10},
        optim={"blr": 0.01},
        init_checkpoint=str(official),
    )
    ema1, _ = load_jit_checkpoint(official, "model_ema1")
    ema2, _ = load_jit_checkpoint(official, "model_ema2")
    assert_state_equal(module.denoiser.state_dict(), ema1)  # init_weights defaults to model_ema1
    assert_state_equal(module.ema.as_dict(1), {k: ema2[k] for k in module.ema.names})
    run.make_trainer(c).fit(module, run.make_datamodule(c))
    tuned = module.denoiser.state_dict()
    assert any(not torch.equal(tuned[k], ema1[k]) for k in ema1)
    assert all(torch.isfinite(v).all() for v in tuned.values())

    # The fine-tuned Lightning checkpoint reloads without the official file it started from.
    official.unlink()
    reloaded = JiTModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert_state_equal(reloaded.denoiser.state_dict(), tuned)
    assert reloaded.init_source == str(official)
    for i in (0, 1):
        assert_state_equal(reloaded.ema.as_dict(i), module.ema.as_dict(i))


# ------------------------------------------------------------------------- bad input
def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    c = cfg(tmp_path, max_steps=10, every_n=1)
    module = run.make_module(c)
    real_loss = module.denoiser.loss

    def loss(x, labels):
        value = real_loss(x, labels)
        return value * float("nan") if module.global_step == 3 else value

    module.denoiser.loss = loss
    with pytest.raises(NonFiniteLossError, match="global step 3"):
        run.make_trainer(c).fit(module, run.make_datamodule(c))
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = load_ckpt(last)
    assert saved["global_step"] == 3
    # the weights in the file are those the module still holds: the bad step changed nothing
    assert_state_equal(saved["state_dict"], module.state_dict())
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_class_count_mismatch_is_reported_before_training(tmp_path):
    module = JiTModule(net={"name": "JiT-T/4", "input_size": 16, "num_classes": 7})
    trainer = run.make_trainer(cfg(tmp_path))
    with pytest.raises(ValueError, match=r"num_classes=7 .*10 classes"):
        trainer.fit(module, DigitsDataModule(img_size=16, batch_size=8))
    assert trainer.global_step == 0


def test_patch_size_and_image_size_mismatch_messages(tmp_path):
    module = run.make_module(cfg(tmp_path))  # 16 px, patch 4
    with pytest.raises(ValueError, match="img_size=18 is not divisible by patch_size=4"):
        run.make_trainer(cfg(tmp_path)).fit(module, DigitsDataModule(img_size=18, batch_size=8))
    with pytest.raises(ValueError, match="img_size=32 but the model was built for input_size=16"):
        run.make_trainer(cfg(tmp_path)).fit(module, DigitsDataModule(img_size=32, batch_size=8))


def test_config_errors_name_the_allowed_values():
    net = {"name": "JiT-T/4", "input_size": 16, "num_classes": 10}
    with pytest.raises(ValueError, match="unknown optim option.*'lr'"):
        JiTModule(net=net, optim={"lr": 1e-3})
    with pytest.raises(ValueError, match="constant, cosine"):
        JiTModule(net=net, optim={"schedule": "step"})
    with pytest.raises(ValueError, match="raw, ema1, ema2"):
        JiTModule(net=net, eval_weights="best")


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial") if hasattr(f, "write") else Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    left = [_create_temporary(tmp_path / "last.ckpt"), _create_temporary(tmp_path / "results.json")]
    left[1].write_bytes(b"partial")
    lookalikes = ["last.ckpt", "notes.tmp", ".last.ckpt.tmp", "last.ckpt.0a1b2c3d.tmp",
                  ".last.ckpt.0A1B2C3D.tmp", ".last.ckpt.0a1b2c3.tmp"]
    for name in lookalikes:
        (tmp_path / name).touch()
    (tmp_path / ".dir.0a1b2c3d.tmp").mkdir()
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*lookalikes, ".dir.0a1b2c3d.tmp"])
    assert remove_stale_temporaries(tmp_path / "missing") == []
