"""FID passes: deterministic sharded generation, bad input before generation, results.json."""

import json
import os
import signal
import socket
from unittest.mock import MagicMock

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from jit.datamodules import DigitsDataModule
from jit.evaluation import (
    EvaluationConfigError,
    balanced_labels,
    index_chunks,
    initial_noise,
    shard_indices,
)
from jit.evaluation.fid import write_json_atomic
from jit.interrupt import RunInterrupted
from jit.metrics.digits_cnn import DigitsCNN
from jit.metrics.features import FeatureExtractorError
from jit.metrics.reference import ReferenceStatsError
from jit.module import JiTModule
from jit.passes import evaluate_fid

SAMPLER = {"steps": 2, "method": "heun", "cfg_scale": 1.5, "interval": (0.1, 1.0), "schedule": "linear"}


class TinyModule(JiTModule):
    """A small JiTModule that counts its generate calls (and can be interrupted after
    `fail_after` of them) and records the weights it is asked for. `hold_only`: the
    evaluation-only form that `task=eval` loads (one set of weights, no EMA copies)."""

    def __init__(self, seed=0, fail_after=None, num_classes=4, hold_only=None):
        torch.manual_seed(seed)
        super().__init__(net={"name": "JiT-T/4", "input_size": 16, "num_classes": num_classes},
                         sampler=SAMPLER, hold_only=hold_only)
        self.calls, self.weights_used, self.fail_after = 0, [], fail_after

    def eval_weights_context(self, which):
        self.weights_used.append(which)
        return super().eval_weights_context(which)

    def generate(self, labels, noise=None, **overrides):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RunInterrupted(signal.SIGINT)  # what a stop signal raises (jit/interrupt.py)
        return super().generate(labels, noise=noise, **overrides)


def trainer_with(logger, root):
    return L.Trainer(logger=logger, default_root_dir=root, accelerator="cpu", devices=1,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def write_digits_weights(path):
    torch.manual_seed(0)
    model = DigitsCNN()
    torch.save({"meta": model.config(), "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture
def setup(tmp_path):
    weights = write_digits_weights(tmp_path / "digits_cnn.pt")
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 64))
    np.savez(ref, mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    return tmp_path, weights, ref


def cfg(weights, ref, **kw):
    base = {"extractor": "digits-cnn", "extractor_weights": str(weights), "num_images": 10, "chunk_size": 4,
            "reference": {"stats_file": str(ref)}, "export_npz": True, "progress": False,
            "grid": {"samples_per_class": 3}}
    return {**base, **kw}


# ------------------------------------------------------------------ labels, shards, noise
def test_balanced_labels():
    for strategy in ("repeat", "spread"):
        labels = balanced_labels(50_000, 1000, strategy)
        assert torch.equal(labels, torch.arange(50_000) % 1000)
    repeat = balanced_labels(23, 10, "repeat")
    assert torch.equal(repeat, torch.arange(23) % 10)
    spread = balanced_labels(23, 10, "spread")
    counts = torch.bincount(spread, minlength=10)
    assert counts.tolist() == [3, 2, 2, 3, 2, 2, 3, 2, 2, 2]  # leftovers spaced over the classes
    assert torch.equal(spread, balanced_labels(23, 10, "spread"))
    assert torch.bincount(spread[:10], minlength=10).tolist() == [1] * 10  # prefixes balanced


def test_chunks_cover_indices_once_and_ranks_take_whole_chunks():
    for world in (1, 2, 3):
        for chunk in (1, 3, 4, 20):
            parts = torch.cat([shard_indices(11, r, world, chunk) for r in range(world)])
            assert sorted(parts.tolist()) == list(range(11))
            for rank in range(world):
                for piece in index_chunks(11, chunk, rank, world):
                    first = int(piece[0])
                    # a chunk is [kC, min((k+1)C, N)), whoever runs it
                    assert first % chunk == 0 and (first // chunk) % world == rank
                    assert piece.tolist() == list(range(first, min(first + chunk, 11)))


def test_noise_depends_only_on_seed_and_index():
    batch = initial_noise(3, [0, 5, 9], (3, 4, 4), 2.0)
    alone = initial_noise(3, [5], (3, 4, 4), 2.0)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], initial_noise(4, [0], (3, 4, 4), 2.0)[0])


# ------------------------------------------------------------------ determinism across world sizes
def _ddp_worker(rank, world, port, weights, ref, run_dir):
    """One process of a 2-process Lightning DDP run, started as torchrun would (the
    environment names the rank): Lightning's sampler shards the plan's chunks."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    try:
        evaluate_fid(trainer, TinyModule(), cfg(weights, ref, chunk_size=4), run_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_images_and_score_for_any_world_size(setup):
    tmp, weights, ref = setup
    # 10 images in chunks of 4 (rank 0: [0, 4) and [8, 10); rank 1: [4, 8) and a repeat of
    # [0, 4) that Lightning's sampler adds to even out the ranks, and that is not scored)
    one = evaluate_fid(None, TinyModule(), cfg(weights, ref, chunk_size=4), tmp / "one")
    # The 2-process run continues a 1-process run interrupted after its first chunk.
    with pytest.raises(RunInterrupted):
        evaluate_fid(None, TinyModule(fail_after=1), cfg(weights, ref, chunk_size=4), tmp / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), weights, ref, tmp / "ddp"), nprocs=2, join=True)
    arrays = {name: np.load(tmp / name / "samples.npz")["arr_0"] for name in ("one", "ddp")}
    assert arrays["one"].shape == (10, 16, 16, 3) and arrays["one"].dtype == np.uint8
    assert np.array_equal(arrays["one"], arrays["ddp"])
    ddp = json.loads((tmp / "ddp" / "results.json").read_text())
    assert ddp["world_size"] == 2 and ddp["chunk_size"] == 4
    for key in ("fid_digits", "cond_accuracy"):
        assert ddp["metrics"][key] == one["metrics"][key]  # bitwise
    assert not list((tmp / "ddp").glob(".samples*"))  # shard files removed
    # Image i is the one generated alone from (seed, i) with label i % 4.
    module = TinyModule()
    alone = module.generate(torch.tensor([7 % 4]), noise=initial_noise(0, [7], (3, 16, 16), 1.0))
    from jit.datamodules import from_model_range
    assert np.array_equal(from_model_range(alone)[0].permute(1, 2, 0).numpy(), arrays["one"][7])


# ------------------------------------------------------------------ results, grid, logging
def test_results_json_grid_and_logger(setup):
    tmp, weights, ref = setup
    logger = CSVLogger(tmp / "logs", name="eval")
    trainer = trainer_with(logger, tmp)
    module = TinyModule()
    extra = {"calibration": {"source": "digits/calibration", "num_images": 64}, "layer_stats": {"n_layers": 3},
             "quant": {"mode": "hybrid", "weights": {"bits": 8}, "activations": {"bits": 11}}}
    out = evaluate_fid(trainer, module, cfg(weights, ref, eval_weights="ema2", sampler={"steps": 1},
                                            save_images=True), tmp / "run", extra)
    logger.save()
    saved = json.loads((tmp / "run" / "results.json").read_text())
    assert set(saved["metrics"]) == {"fid_digits", "cond_accuracy"} and "fid" not in saved["metrics"]
    assert saved["num_images"] == 10 and saved["weights"] == "ema2" and module.weights_used == ["ema2"]
    assert saved["sampler"]["steps"] == 1 and saved["sampler"]["cfg_scale"] == 1.5
    assert saved["quant"] == {"mode": "hybrid", "weights.bits": 8, "activations.bits": 11}
    assert saved["calibration"]["num_images"] == 64 and saved["layer_stats"] == {"n_layers": 3}
    assert saved["images_per_s"] > 0 and saved["wall_time_s"] > 0 and out["metrics"] == saved["metrics"]
    assert 0.0 <= saved["metrics"]["cond_accuracy"] <= 1.0
    from PIL import Image
    grid = np.asarray(Image.open(tmp / "run" / "sample_grid.png"))
    assert grid.shape == (4 * 18 + 2, 3 * 18 + 2, 3)  # 4 classes x 3 samples of 16 px, 2 px padding
    assert len(list((tmp / "run" / "samples").glob("*.png"))) == 10
    metrics_csv = (tmp / "logs" / "eval" / "version_0" / "metrics.csv").read_text()
    assert "eval/fid_digits" in metrics_csv and "eval/cond_accuracy" in metrics_csv


def test_digits_end_to_end_with_cached_reference_and_tensorboard(tmp_path):
    """Shipped digits-cnn, reference statistics computed from the digits split and cached."""
    dm = DigitsDataModule(img_size=16, batch_size=64)
    logger = MagicMock(spec=TensorBoardLogger)
    trainer = trainer_with(logger, tmp_path)
    settings = {"extractor": "digits-cnn", "num_images": 20, "chunk_size": 10, "progress": False,
                "reference": {"split": "reference", "cache_dir": str(tmp_path / "cache")}}
    extra = {"quant": {"scheme": "hybrid", "adc": {"bits": 11, "noise_sigma_lsb": 2.0}}}
    out = evaluate_fid(trainer, TinyModule(num_classes=10), settings, tmp_path / "run", extra, dm)
    assert (tmp_path / "cache" / "digits_reference_16px_digits-cnn.npz").is_file()
    assert np.isfinite(out["metrics"]["fid_digits"]) and "computed from" in out["reference"]
    assert out["quant"] == {"scheme": "hybrid", "adc.bits": 11, "adc.noise_sigma_lsb": 2.0}
    logger.log_metrics.assert_called_once()
    tag, grid = logger.experiment.add_image.call_args[0][:2]
    assert tag == "eval/sample_grid" and grid.shape == (10 * 18 + 2, 2 * 18 + 2, 3)  # 20 images: 2 per class


def test_inception_metrics_names(setup, monkeypatch):
    """Inception runs report fid and inception_score (feature space mocked small for speed)."""
    from jit.metrics import features as feats

    tmp = setup[0]

    class FakeInception(torch.nn.Module):
        fc = torch.nn.Linear(8, 6)  # IS reads the class count from fc

    class FakeSpace(feats.FeatureSpace):
        def __call__(self, images):
            flat = images.flatten(1).float()
            return flat[:, :8], flat[:, :6]

    space = FakeSpace("inception-v3-compat", FakeInception(), "2048", "logits_unbiased", 8, "cpu")
    monkeypatch.setattr("jit.evaluation.fid.create_feature_space", lambda *a, **k: space)
    ref = tmp / "ref8.npz"
    np.savez(ref, mu=np.zeros(8), sigma=np.eye(8))
    out = evaluate_fid(None, TinyModule(), {"extractor": "inception-v3-compat", "num_images": 10, "chunk_size": 5,
                                            "isc_splits": 2, "reference": {"stats_file": str(ref)}, "progress": False},
                       tmp / "inc")
    assert set(out["metrics"]) == {"fid", "inception_score", "inception_score_std"}


# ------------------------------------------------------------------ bad input, before generation
@pytest.mark.parametrize("case, error, message", [
    ("missing_ref", ReferenceStatsError, "reference statistics file not found"),
    ("no_mu_sigma", ReferenceStatsError, "lacks 'mu' and 'sigma'"),
    ("wrong_shape", ReferenceStatsError, "gives 64-d features"),
    ("one_image", EvaluationConfigError, "num_images must be an integer >= 2"),
    ("unregistered", FeatureExtractorError, "not registered.*digits-cnn.*inception-v3-compat"),
    ("inception_offline", FeatureExtractorError, "not available offline"),
    ("bad_strategy", EvaluationConfigError, "label_strategy"),
])
def test_bad_input_fails_before_generation(setup, monkeypatch, case, error, message):
    tmp, weights, ref = setup
    settings = cfg(weights, ref)
    if case == "missing_ref":
        settings["reference"] = {"stats_file": str(tmp / "nope.npz")}
    elif case == "no_mu_sigma":
        np.savez(tmp / "bad.npz", m=np.zeros(64))
        settings["reference"] = {"stats_file": str(tmp / "bad.npz")}
    elif case == "wrong_shape":
        np.savez(tmp / "bad.npz", mu=np.zeros(2048), sigma=np.eye(2048))
        settings["reference"] = {"stats_file": str(tmp / "bad.npz")}
    elif case == "one_image":
        settings["num_images"] = 1
    elif case == "unregistered":
        settings["extractor"] = "inception-v4"
    elif case == "inception_offline":
        monkeypatch.setenv("TORCH_HOME", str(tmp / "empty_torch_home"))
        monkeypatch.setenv("JIT_OFFLINE", "1")
        settings["extractor"] = "inception-v3-compat"
        settings["extractor_weights"] = None  # the digits classifier's: refused with Inception
    elif case == "bad_strategy":
        settings["label_strategy"] = "random"
    module = TinyModule()
    with pytest.raises(error, match=message):
        evaluate_fid(None, module, settings, tmp / "run")
    assert module.calls == 0
    assert not (tmp / "run" / "results.json").exists()


# ------------------------------------------------------------------ atomic results
def test_results_json_atomic_on_failed_write(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic({"metrics": {"fid": 1.0}}, path)

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_json_atomic({"a": list(range(1000)), "z": Unserialisable()}, path)
    assert json.loads(path.read_text()) == {"metrics": {"fid": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_interrupted_evaluation_leaves_no_results_and_continues_to_the_same_score(setup):
    tmp, weights, ref = setup
    settings = cfg(weights, ref, num_images=14)  # chunks of 4: [0, 4) [4, 8) [8, 12) [12, 14)
    module = TinyModule(fail_after=2)
    with pytest.raises(RunInterrupted):
        evaluate_fid(None, module, settings, tmp / "run")
    assert module.calls == 3
    # No results, no npz shard; the two scored chunks are kept.
    assert sorted(p.name for p in (tmp / "run").iterdir()) == [".fid_chunks"]
    [store] = (tmp / "run" / ".fid_chunks").iterdir()
    assert sorted(p.name for p in store.iterdir()) == ["chunk_0000000.pt", "chunk_0000001.pt"]
    again = TinyModule()  # the same weights (seed 0): the same evaluation
    resumed = evaluate_fid(None, again, settings, tmp / "run")
    assert again.calls == 2  # only the chunks not scored yet
    whole = evaluate_fid(None, TinyModule(), settings, tmp / "whole")
    assert resumed["metrics"] == whole["metrics"]  # bitwise
    for name in ("samples.npz", "sample_grid.png"):
        assert (tmp / "run" / name).read_bytes() == (tmp / "whole" / name).read_bytes()
    assert not (tmp / "run" / ".fid_chunks").exists()  # removed once results.json is written
    # Other weights are another evaluation: nothing stored is reused. Also when only the
    # evaluated EMA differs (the store's digest is taken with those weights swapped in).
    with pytest.raises(RunInterrupted):
        evaluate_fid(None, TinyModule(fail_after=1), settings, tmp / "other")
    changed = TinyModule(seed=1)
    evaluate_fid(None, changed, settings, tmp / "other")
    assert changed.calls == 4
    with pytest.raises(RunInterrupted):
        evaluate_fid(None, TinyModule(fail_after=1), settings, tmp / "ema")
    other_ema = TinyModule()  # the same raw weights; ema1, the weights evaluated, moved
    other_ema.ema.load_dict(0, {name: value + 0.01 for name, value in other_ema.ema.as_dict(0).items()})
    evaluate_fid(None, other_ema, settings, tmp / "ema")
    assert other_ema.calls == 4


def test_runs_with_jit_module(setup):
    """The real LightningModule: its sampler settings and eval_weights are what is recorded."""
    from jit.module import JiTModule

    tmp, weights, ref = setup
    module = JiTModule(net={"name": "JiT-T/4", "input_size": 16, "num_classes": 4},
                       sampler={"steps": 1, "method": "euler"}, eval_weights="ema2")
    out = evaluate_fid(None, module, cfg(weights, ref, export_npz=False), tmp / "run")
    assert out["weights"] == "ema2" and out["sampler"]["steps"] == 1 and out["num_images"] == 10


@pytest.mark.parametrize("name", ["inception_50k", "inception_10k", "digits"])
def test_config_files_validate(name):
    from pathlib import Path

    from omegaconf import OmegaConf

    from jit.evaluation import FIDConfig

    root = Path(__file__).parents[1] / "configs"
    node = OmegaConf.merge({"paths": {"cache_dir": "/cache"}}, {"fid": OmegaConf.load(root / "fid" / f"{name}.yaml")})
    parsed = FIDConfig.from_any(node.fid)
    assert parsed.reference["cache_dir"] == "/cache/fid_stats" and type(parsed.sampler) is dict
    assert parsed.extractor == ("digits-cnn" if name == "digits" else "inception-v3-compat")
    with pytest.raises(EvaluationConfigError, match=r"fid.num_image is not a known field \(known: chunk_size,"):
        FIDConfig.from_any({**OmegaConf.to_container(node.fid), "num_image": 5})


@pytest.mark.skipif(__import__("jit.models.compile", fromlist=["x"]).compile_available() is not None,
                    reason="torch.compile unavailable here")
def test_compiled_generation_of_a_calibrated_model_is_one_graph(setup):
    """The path of model.compile=true: thresholds applied from an artefact (as after a
    calibration), generation under inference mode; no graph break, one graph per batch
    shape, the images close to the eager ones."""
    from torch._dynamo.utils import counters

    from jit.quant import build_quant_config, quantize_model, quantized_layers
    from jit.quant.artefact import apply, made_for, new_artefact

    tmp, weights, ref = setup
    module = TinyModule(hold_only="ema1")  # quantized in place, as task=eval does with its one set of weights
    qcfg = build_quant_config({"scheme": "hybrid", "mode": "static"})
    quantize_model(module.denoiser.net, qcfg)
    layers = {name: {"act_clip": 16.625 + i, "adc_clip": {"lsb": 9000.0 + i},
                     "made_for": made_for(qcfg)}
              for i, name in enumerate(quantized_layers(module.denoiser.net))}
    apply(new_artefact(scheme="hybrid", method="kl", num_images=8, source="data",
                       layers=layers), module.denoiser.net)
    settings = cfg(weights, ref, num_images=8, chunk_size=4, export_npz=False)
    counters.clear()
    compiled = evaluate_fid(None, module, settings, tmp / "compiled", compile_backbone=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    eager = evaluate_fid(None, module, settings, tmp / "eager")
    assert abs(compiled["metrics"]["fid_digits"] - eager["metrics"]["fid_digits"]) < 5
