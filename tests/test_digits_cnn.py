"""The digits classifier behind the built-in FID ("fid_digits") and cond_accuracy."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from jit.datamodules import DigitsDataModule
from jit.metrics import (
    DIGITS_EXTRACTOR,
    DIGITS_FEATURES,
    DIGITS_LOGITS,
    cond_accuracy,
    default_weights_path,
    digits_cnn,
    load_digits_classifier,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits_classifier.py"


def whole_split(name: str, img_size: int = 32):
    dm = DigitsDataModule(img_size=img_size)
    loader = dm.dataloader(name, batch_size=len(dm.split_dataset(name)))
    return next(iter(loader))


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def test_shipped_weights_are_small_and_self_describing():
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta = payload["meta"]
    assert meta["input_size"] == 32 and meta["feature_dim"] == 64 and meta["seed"] == 0
    assert meta["heldout_accuracy"] >= 0.97


def test_heldout_accuracy_recomputed(classifier):
    # "val" of the default DigitsDataModule is the split the training script holds out.
    images, labels = whole_split("val")
    assert len(labels) == 359
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(classifier.meta["heldout_accuracy"], abs=1e-6)


@pytest.mark.parametrize("img_size", [32, 16, 64])
def test_cond_accuracy_of_real_validation_images(img_size):
    # Generated samples come at the model's resolution; the classifier resizes itself.
    images, labels = whole_split("val", img_size)
    assert cond_accuracy(images, labels) >= 0.97


def test_cond_accuracy_of_noise_is_near_chance():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(500) % 10
    assert cond_accuracy(noise, labels) <= 0.30


def test_cond_accuracy_is_batch_size_independent(classifier):
    images, labels = whole_split("val")
    full = cond_accuracy(images, labels, classifier=classifier, batch_size=len(labels))
    assert cond_accuracy(images, labels.tolist(), classifier=classifier, batch_size=7) == full


def test_cond_accuracy_bad_input():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        cond_accuracy(images, [0, 1, 2])
    with pytest.raises(TypeError, match="uint8"):
        cond_accuracy(images.float(), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        cond_accuracy(images[:, :1], [0, 1, 2, 3])


def test_registered_with_torch_fidelity_and_idempotent():
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR] is digits_cnn.FeatureExtractorDigitsCNN
    digits_cnn.register()
    # A reload runs the registration again; done in a child process so that this one
    # keeps a single set of class objects for the other tests.
    code = (
        "import importlib, jit.metrics, jit.metrics.digits_cnn as m\n"
        "from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as R\n"
        "importlib.reload(m); import jit.metrics\n"
        "assert R['digits-cnn'] is m.FeatureExtractorDigitsCNN\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registration_refuses_a_foreign_extractor(monkeypatch):
    class Other(digits_cnn.FeatureExtractorBase):
        pass

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, DIGITS_EXTRACTOR, Other)
    with pytest.raises(RuntimeError, match="already registered"):
        digits_cnn.register()


def test_torch_fidelity_extractor_features():
    cls = FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR]
    assert cls.get_default_feature_layer_for_metric("fid") == DIGITS_FEATURES
    assert cls.get_default_feature_layer_for_metric("isc") == DIGITS_LOGITS
    extractor = create_feature_extractor(
        DIGITS_EXTRACTOR, [DIGITS_LOGITS, DIGITS_FEATURES], cuda=False, verbose=False
    )
    images, _ = whole_split("val", img_size=48)  # any size, uint8 in
    logits, features = extractor(images[:10])
    assert logits.shape == (10, 10) and features.shape == (10, 64)
    assert logits.dtype == features.dtype == torch.float32
    named = extractor.convert_features_tuple_to_dict((logits, features))
    assert set(named) == {DIGITS_FEATURES, DIGITS_LOGITS}


def test_torch_fidelity_fid_runs_on_digits_features():
    # The same calculate_metrics path as Inception: identical sets give FID ~0.
    import torch_fidelity

    images, _ = whole_split("val")
    dataset = torch.utils.data.TensorDataset(images)

    class Images(torch.utils.data.Dataset):  # torch-fidelity wants bare tensors
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return dataset[i][0]

    metrics = torch_fidelity.calculate_metrics(
        input1=Images(),
        input2=Images(),
        fid=True,
        feature_extractor=DIGITS_EXTRACTOR,
        cuda=False,
        cache=False,
        verbose=False,
        batch_size=128,
        save_cpu_ram=True,  # no worker processes
    )
    assert abs(metrics["frechet_inception_distance"]) < 1e-3


def test_extractor_takes_a_weights_path_and_dtype(tmp_path):
    weights = tmp_path / "copy.pt"
    weights.write_bytes(default_weights_path().read_bytes())
    extractor = create_feature_extractor(
        DIGITS_EXTRACTOR,
        [DIGITS_FEATURES],
        cuda=False,
        verbose=False,
        feature_extractor_weights_path=str(weights),
        feature_extractor_internal_dtype="float64",
    )
    (features,) = extractor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert features.shape == (2, 64) and features.dtype == torch.float32


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_digits_classifier(missing)
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        create_feature_extractor(
            DIGITS_EXTRACTOR,
            [DIGITS_FEATURES],
            cuda=False,
            verbose=False,
            feature_extractor_weights_path=str(missing),
        )


@pytest.mark.parametrize(
    "payload",
    [b"not a torch file", {"state_dict": {}}, {"state_dict": {}, "meta": {"input_size": 32}}],
)
def test_corrupt_weights_file_is_named(tmp_path, payload):
    path = tmp_path / "bad.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match=f"{path}.*corrupt"):
        load_digits_classifier(path)


def test_training_script_is_reproducible(tmp_path):
    # Two independent runs, side by side: most of the time is interpreter start-up.
    outs = [tmp_path / "a.pt", tmp_path / "b.pt"]
    runs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--epochs", "1", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out in outs
    ]
    for run in runs:
        log, _ = run.communicate(timeout=120)
        assert run.returncode == 0, log
        assert "held-out accuracy" in log
    first, second = (torch.load(out, map_location="cpu", weights_only=True) for out in outs)
    assert first["meta"] == second["meta"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    # The file it writes is what load_digits_classifier expects.
    assert load_digits_classifier(outs[0]).meta["epochs"] == 1
