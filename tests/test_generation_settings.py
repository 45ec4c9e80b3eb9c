"""Settings that would change FID silently are refused or recorded, and checked before generating.

The checkpoint's generation settings, the reference statistics cache, the class count
the labels come from, the provenance in results.json, and the checks done before any image
is generated (through `run.py` where they are about the CLI).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_run import run
from test_startup_checks import run_fails

from jit.checkpoint import CheckpointError, build_denoiser_from_checkpoint, save_official_checkpoint
from jit.models import Denoiser, build_jit
from jit.module import JiTModule

TINY_T4 = ["model=jit_t4", "model.net.input_size=16", "sampler.steps=2", "sampler.method=euler",
           "fid.num_images=20", "fid.chunk_size=10", "calibration.num_images=8", "calibration.batch_size=8",
           "compare_fp=false", "eval.layer_stats_images=0"]


def official_checkpoint(path: Path, num_classes: int = 10, noise_scale: float = 1.0) -> Path:
    """An official-layout JiT-T/4 (16 px) with random weights and the `args` the official code writes."""
    torch.manual_seed(0)
    denoiser = Denoiser(build_jit("JiT-T/4", input_size=16, num_classes=num_classes), num_classes)
    with torch.no_grad():  # the official init zeroes the output layer: every sample would be the same image
        for p in denoiser.parameters():
            p.normal_(0, 0.02)
    save_official_checkpoint(path, denoiser.state_dict(), args={
        "model": "JiT-T/4", "img_size": 16, "class_num": num_classes, "noise_scale": noise_scale, "t_eps": 0.05})
    return path


# ---------------------------------------------------- 1. generation settings of the checkpoint
def test_noise_scale_other_than_the_checkpoints_is_refused_with_the_overrides_that_fit(tmp_path):
    ckpt = official_checkpoint(tmp_path / "ck.pth", noise_scale=2.0)
    proc = run_fails([*TINY_T4, f"ckpt_path={ckpt}"], tmp_path,
                     "model.denoiser.noise_scale=2.0", "model.denoiser.noise_scale=1.0",
                     "model.override_checkpoint_args=true")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_resolution_other_than_the_checkpoints_names_the_overrides_that_fit(tmp_path):
    ckpt = official_checkpoint(tmp_path / "ck.pth")
    run_fails([*TINY_T4, "model.net.input_size=32", f"ckpt_path={ckpt}"], tmp_path,
              "add the overrides model.net.input_size=16")


def test_shape_mismatch_hint_gives_overrides(official_tiny_ckpt_path):
    with pytest.raises(CheckpointError, match="model.net.name=JiT-T/4 model.net.input_size=32 "
                                              "model.net.num_classes=10"):
        build_denoiser_from_checkpoint(official_tiny_ckpt_path, variant="JiT-S/4")


# ------------------------------------------- 4. provenance (and 1: the override that fits works)
def test_results_record_provenance(tmp_path):
    ckpt = official_checkpoint(tmp_path / "ck.pth", noise_scale=2.0)
    out = tmp_path / "out"
    run([*TINY_T4, "quant=fp", "model.denoiser.noise_scale=2.0", f"ckpt_path={ckpt}",
         f"hydra.run.dir={out}"], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == {"variant": "JiT-T/4", "img_size": 16, "num_classes": 10, "noise_scale": 2.0}
    assert results["checkpoint"] == str(ckpt)
    assert results["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / "fid_stats" / "digits_reference_16px_digits-cnn.npz"
    assert results["reference"].startswith(str(cache))
    with np.load(cache) as stats:
        expected = hashlib.sha256(stats["mu"].tobytes() + stats["sigma"].tobytes()).hexdigest()
        assert results["reference_stats_sha256"] == expected
        assert results["feature_extractor_weights_sha256"] == str(stats["extractor_weights_sha256"])
    assert len(results["feature_extractor_weights_sha256"]) == 64
    assert results["sampler"]["steps"] == 2 and results["sampler"]["method"] == "euler"
    assert results["precision"] == {"trainer": "32-true", "weights_dtype": "float32", "autocast": None}
    assert results["world_size"] == 1 and results["package_version"] == "0.1.0"


# ------------------------------------------------------------------ 2. reference cache
class FakeSpace:
    """What the reference code needs of a FeatureSpace; `weights_sha256` names its weights."""

    name, feature_dim = "fake-ext", 3

    def __init__(self, weights_sha256="a" * 64):
        self.weights_sha256 = weights_sha256
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return images.flatten(1)[:, :3].double(), None


def image_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def cached_stats(root: Path, cache: Path, space: FakeSpace):
    from jit.datamodules import ImageNetDataModule
    from jit.metrics.reference import reference_stats

    dm = ImageNetDataModule(root, img_size=8, batch_size=4, num_workers=0)
    return reference_stats(space, None, dm, "reference", cache)


def test_reference_cache_is_recomputed_for_other_data_or_weights(tmp_path, caplog):
    cache, space = tmp_path / "cache", FakeSpace()
    trial = image_folder(tmp_path / "trial")
    cached_stats(trial, cache, space)
    computed = space.calls
    _, source = cached_stats(trial, cache, space)
    assert space.calls == computed and "computed" not in source  # same data, same weights: reused

    full = Path(shutil.copytree(trial, tmp_path / "full"))  # another root
    caplog.set_level(logging.WARNING, logger="jit.metrics.reference")
    _, source = cached_stats(full, cache, space)
    assert space.calls > computed and "computed from 6 images" in source
    assert "recomputing the cached reference statistics" in caplog.text and "data_root" in caplog.text

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(full / "val" / "a" / "extra.png")  # one more file
    _, source = cached_stats(full, cache, space)
    assert "computed from 7 images" in source and "num_files '6' (now '7')" in caplog.text

    _, source = cached_stats(full, cache, FakeSpace("b" * 64))  # other extractor weights
    assert "computed from 7 images" in source and "extractor_weights_sha256" in caplog.text


def test_reference_cache_without_metadata_is_recomputed(tmp_path):
    from jit.metrics.reference import cache_file

    cache, space = tmp_path / "cache", FakeSpace()
    root = image_folder(tmp_path / "data")
    path = cache_file(cache, "imagenet", "reference", 8, space.name)
    path.parent.mkdir(parents=True)
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))  # written before the cache recorded its sources
    (mu, _), source = cached_stats(root, cache, space)
    assert "computed from 6 images" in source and not np.array_equal(mu, np.zeros(3))


# ------------------------------------------------------------------ 3. class count
class RecordingModule(JiTModule):
    """A small JiTModule that records the labels it generates."""

    def __init__(self, num_classes):
        super().__init__(net={"name": "JiT-T/4", "input_size": 16, "num_classes": num_classes},
                         sampler={"steps": 1, "method": "euler"})
        self.labels = []

    def generate(self, labels, noise=None, **sampler):
        self.labels.append(labels)
        return super().generate(labels, noise=noise, **sampler)


def fid_settings(tmp_path, **extra):
    return {"extractor": "digits-cnn", "num_images": 20, "chunk_size": 10, "progress": False,
            "grid": {"samples_per_class": 0}, **extra}


def test_labels_come_from_the_model_not_the_data(tmp_path):
    from types import SimpleNamespace

    from jit.passes import evaluate_fid

    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
    module = RecordingModule(num_classes=10)
    four_class_data = SimpleNamespace(num_classes=4)  # not read: the statistics come from the file
    evaluate_fid(None, module, fid_settings(tmp_path, reference={"stats_file": str(stats)}), tmp_path / "run",
                 datamodule=four_class_data)
    assert sorted(set(torch.cat(module.labels).tolist())) == list(range(10))


def test_class_count_of_model_and_reference_data_must_agree(tmp_path):
    from jit.datamodules import DigitsDataModule
    from jit.evaluation import EvaluationConfigError
    from jit.passes import evaluate_fid

    module = RecordingModule(num_classes=4)
    settings = fid_settings(tmp_path, reference={"split": "reference", "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(EvaluationConfigError, match=r"model.net.num_classes=4 .* \(data=digits\) has 10"):
        evaluate_fid(None, module, settings, tmp_path / "run", datamodule=DigitsDataModule(img_size=16, batch_size=64))
    assert not module.labels


# ------------------------------------------------------ 5. checked before any image is generated
def test_class_count_mismatch_fails_before_calibration(tmp_path):
    ckpt = official_checkpoint(tmp_path / "ck.pth", num_classes=4)
    proc = run_fails([*TINY_T4, "model.net.num_classes=4", f"ckpt_path={ckpt}"], tmp_path,
                     "model.net.num_classes=4", "has 10")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_isc_splits_above_num_images_names_the_key(tmp_path):
    run_fails(["fid=inception_10k", "fid.num_images=5", "fid.isc_splits=10"], tmp_path,
              "fid.isc_splits=10 exceeds fid.num_images=5")


def test_missing_extractor_weights_fail_before_calibration_from_sampling(tmp_path):
    """Calibration from sampling, then per-layer statistics, generate images before the FID pass."""
    run_fails(["fid=inception_10k", "fid.num_images=20", "compare_fp=false", "calibration.source=sampling",
               "eval.layer_stats_images=10"], tmp_path, "not available offline", "fid.inception_weights")


@pytest.fixture(autouse=True)
def _offline_without_inception(tmp_path, monkeypatch):
    # run.py subprocesses inherit this: no Inception download, none in the cache
    monkeypatch.setenv("JIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
