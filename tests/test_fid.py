"""Fréchet distance, streaming statistics, Inception Score, extractors and reference statistics."""

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
)
from torch_fidelity.metric_isc import isc_features_to_metric
from torchvision.models import VGG16_Weights

from jit.metrics.features import FeatureExtractorError, create_feature_space, inception_cache_path
from jit.metrics.fid import GaussianStats, InceptionScoreStats, frechet_distance
from jit.metrics.reference import (
    ReferenceStatsError,
    atomic_savez,
    cache_file,
    load_reference_stats,
    reference_stats,
)


def sqrtm_frechet(mu1, s1, mu2, s2):
    """The textbook formula via scipy's sqrtm, as pytorch-fid and torch-fidelity compute it."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ------------------------------------------------------------------ Fréchet distance
def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_sqrtm_formula_full_covariance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 1
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(sqrtm_frechet(*args), rel=1e-8)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 20))
    y = rng.normal(size=(80, 20)) * 2 + 0.5
    mx, sx, my, sy = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    assert abs(frechet_distance(mx, sx, mx, sx)) < 1e-8
    assert frechet_distance(mx, sx, my, sy) == pytest.approx(frechet_distance(my, sy, mx, sx), rel=1e-10)
    # Singular covariances (fewer samples than dims) need no eps and stay finite.
    z = rng.normal(size=(5, 20))
    assert np.isfinite(frechet_distance(z.mean(0), np.cov(z, rowvar=False), mx, sx))


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\), expected \(4, 4\)"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="mu2 has shape"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------ streaming statistics
def test_gaussian_stats_match_numpy_and_merge():
    x = torch.randn(101, 7, dtype=torch.float64) * 3 + 1
    whole = GaussianStats(7)
    for chunk in x.split(13):
        whole.update(chunk)
    mu, sigma = whole.mu_sigma()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    a, b = GaussianStats(7), GaussianStats(7)
    a.update(x[:50])
    b.update(x[50:])
    np.testing.assert_allclose(a.merge(b).mu_sigma()[1], sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStats(3).mu_sigma()
    with pytest.raises(ValueError, match=r"expected \[N, 7\]"):
        whole.update(torch.zeros(2, 6))


def test_inception_score_matches_torch_fidelity():
    logits = torch.randn(103, 12) * 3
    ours = InceptionScoreStats(103, 12, splits=10)
    perm = torch.randperm(103)  # any arrival order: splits follow the global index
    for chunk in perm.split(17):
        ours.update(logits[chunk], chunk)
    mean, std = ours.compute()
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-6, abs=1e-12)


# ------------------------------------------------------------------ extractors
@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised inception-v3-compat state dict in the file format torch-fidelity loads."""
    from benchmarks.feature_extraction import random_inception_weights as make

    return make(tmp_path_factory.mktemp("inception") / "random_inception.pth")


def test_inception_end_to_end_on_random_weights(random_inception_weights, tmp_path):
    """uint8 32x32 images through the TF-compatible resize, 2048-d features, FID and IS."""
    space = create_feature_space("inception-v3-compat", random_inception_weights)
    assert space.feature_dim == 2048 and space.logits_layer == "logits_unbiased"
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    features, logits = space(images)
    assert features.shape == (6, 2048) and logits.shape == (6, 1008)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    # Reference statistics from an images-only npz (arr_0, NHWC uint8).
    ref_file = tmp_path / "ref_images.npz"
    np.savez(ref_file, arr_0=torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8).numpy())
    ref_mu, ref_sigma = load_reference_stats(ref_file, space)
    assert ref_mu.shape == (2048,) and ref_sigma.shape == (2048, 2048)
    stats = GaussianStats(2048)
    stats.update(features)
    fid = frechet_distance(*stats.mu_sigma(), ref_mu, ref_sigma)
    assert np.isfinite(fid) and fid >= 0
    isc = InceptionScoreStats(6, 1008, splits=2)
    isc.update(logits, torch.arange(6))
    assert all(np.isfinite(isc.compute()))


class _CreatesFileWhenUnpickled:
    """A pickle payload: full unpickling calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["inception-v3-compat", "vgg16"])
@pytest.mark.parametrize("where", ["user_file", "hub_cache"])
def test_crafted_weights_file_is_refused_without_running_it(tmp_path, monkeypatch, name, where):
    """fid.inception_weights (and the torch-hub cache file handed over when it is unset) is
    read with weights_only=True before torch-fidelity, which would unpickle it fully."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("JIT_OFFLINE", "1")
    marker = tmp_path / "payload_ran"
    url = URL_INCEPTION_V3 if name == "inception-v3-compat" else VGG16_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    weights = tmp_path / "weights.pth" if where == "user_file" else cached
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": _CreatesFileWhenUnpickled(marker)}, weights)
    with pytest.raises(FeatureExtractorError) as info:
        create_feature_space(name, weights if where == "user_file" else None)
    message = str(info.value)
    assert not marker.exists()
    assert str(weights) in message and "\n" not in message
    assert "object io.open" in message


def test_crafted_digits_classifier_weights_are_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    weights = tmp_path / "digits.pt"
    torch.save({"meta": {}, "state_dict": _CreatesFileWhenUnpickled(marker)}, weights)
    with pytest.raises(FeatureExtractorError) as info:
        create_feature_space("digits-cnn", weights)
    assert not marker.exists()
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


def test_weights_file_that_is_not_a_state_dict_names_the_file(tmp_path):
    weights = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], weights)
    with pytest.raises(FeatureExtractorError, match=f"{weights}.* not a state dict"):
        create_feature_space("inception-v3-compat", weights)


def test_unregistered_extractor_lists_registered():
    with pytest.raises(FeatureExtractorError, match=r"'nope' is not registered.*inception-v3-compat"):
        create_feature_space("nope")


def test_missing_inception_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("JIT_OFFLINE", "1")
    assert not inception_cache_path().exists()
    with pytest.raises(FeatureExtractorError, match=r"not available offline.*fid\.inception_weights"):
        create_feature_space("inception-v3-compat")
    with pytest.raises(FeatureExtractorError, match="weights file not found"):
        create_feature_space("inception-v3-compat", tmp_path / "missing.pth")


# ------------------------------------------------------------------ reference statistics
class _Space:  # what the reference code needs from a FeatureSpace
    def __init__(self, dim, name="fake"):
        self.feature_dim, self.name = dim, name
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return images.flatten(1)[:, : self.feature_dim].double(), None


def test_reference_file_layouts_and_errors(tmp_path):
    space = _Space(4)
    official = tmp_path / "jit_in256_stats.npz"
    np.savez(official, mu=np.ones(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    mu, sigma = load_reference_stats(official, space)
    assert mu.dtype == np.float64 and np.array_equal(sigma, np.eye(4))
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"  # ADM: images plus mu/sigma and spatial stats
    np.savez(adm, arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=np.zeros(4), sigma=np.eye(4) * 2,
             mu_s=np.zeros(7), sigma_s=np.eye(7))
    assert load_reference_stats(adm, space)[1][0, 0] == 2 and space.calls == 0
    with pytest.raises(ReferenceStatsError, match="not found"):
        load_reference_stats(tmp_path / "missing.npz", space)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(4))
    with pytest.raises(ReferenceStatsError, match="lacks 'mu' and 'sigma'.*mean"):
        load_reference_stats(tmp_path / "bad.npz", space)
    with pytest.raises(ReferenceStatsError, match=r"mu \(4,\).*gives 8-d features"):
        load_reference_stats(official, _Space(8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReferenceStatsError, match="not a readable npz"):
        load_reference_stats(tmp_path / "junk.npz", space)


@pytest.mark.parametrize("layout", ["mu_sigma", "arr_0"])
def test_reference_file_with_pickled_array_names_the_file(tmp_path, layout):
    path = tmp_path / "pickled.npz"
    objects = np.array([{"a": 1}, None], dtype=object)
    arrays = {"mu": objects, "sigma": np.eye(4)} if layout == "mu_sigma" else {"arr_0": objects}
    np.savez(path, **arrays)
    with pytest.raises(ReferenceStatsError, match=f"{path}: array '(mu|arr_0)' holds pickled Python objects"):
        load_reference_stats(path, _Space(4))


class _DataModule:
    dataset_name, img_size, batch_size, num_workers = "toy", 8, 4, 0

    def __init__(self):
        self.images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
        self.reads = 0

    def split_dataset(self, name):
        assert name == "reference"
        self.reads += 1
        return list(zip(self.images, torch.zeros(10, dtype=torch.long)))


def test_reference_computed_once_and_cached(tmp_path):
    dm, space = _DataModule(), _Space(4, name="fake-ext")
    (mu, _), source = reference_stats(space, None, dm, "reference", tmp_path)
    path = cache_file(tmp_path, "toy", "reference", 8, "fake-ext")
    assert path.name == "toy_reference_8px_fake-ext.npz" and path.is_file() and "computed from 10" in source
    feats = dm.images.flatten(1)[:, :4].double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0))
    calls = space.calls
    (mu2, _), source2 = reference_stats(space, None, dm, "reference", tmp_path)
    # read from the cache: no image went through the extractor again (the split is only listed)
    assert space.calls == calls and source2 == str(path) and np.array_equal(mu, mu2)
    assert not list(tmp_path.glob(".*tmp"))


def test_atomic_savez_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "stats.npz"
    atomic_savez(path, mu=np.zeros(2))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError):
        atomic_savez(path, mu=np.ones(2))
    assert np.array_equal(np.load(path)["mu"], np.zeros(2)) and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------ run-layout independence
def test_statistics_do_not_depend_on_batching_or_arrival_order():
    torch.manual_seed(0)
    features = torch.randn(203, 9) * 5 + 2
    logits = torch.randn(203, 12) * 3

    def scores(chunks):
        gauss, isc = GaussianStats(9), InceptionScoreStats(203, 12, splits=4)
        for chunk in chunks:
            gauss.update(features[chunk], chunk)
            isc.update(logits[chunk], chunk)
        return gauss.mu_sigma(), isc.compute()

    (mu, sigma), is_score = scores(torch.arange(203).split(203))
    for chunks in (torch.arange(203).split(1), torch.randperm(203).split(7), torch.randperm(203).split(32)):
        (mu2, sigma2), is2 = scores(chunks)
        assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)  # bitwise
        assert is2 == is_score


def test_feature_space_runs_one_pass_per_chunk_and_repeats_it_bitwise():
    space = create_feature_space("digits-cnn", None, device="cpu", probe_size=16)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    calls = []
    handle = space.extractor.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        features, logits = space(images)
        again, again_logits = space(images.clone())
    finally:
        handle.remove()
    assert calls == [20, 20]  # one forward over the whole chunk, no per-image loop
    assert features.shape == (20, space.feature_dim) and logits.shape[0] == 20
    assert torch.equal(features, again) and torch.equal(logits, again_logits)
    empty, empty_logits = space(images[:0])
    assert empty.shape == (0, space.feature_dim) and empty_logits.shape[0] == 0


def test_reference_statistics_are_made_of_fixed_chunks_of_the_split(tmp_path):
    """Statistics of a split do not depend on the loader's batch size or the process's
    share: features are extracted per chunk [kC, (k+1)C) of the split's index."""
    from jit.sample_plan import rechunk

    space = create_feature_space("digits-cnn", None, device="cpu", probe_size=16)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (23, 3, 16, 16), dtype=torch.uint8)
    expected = GaussianStats(space.feature_dim)
    for start in range(0, 23, 5):
        expected.update(space(images[start:start + 5])[0], torch.arange(start, min(start + 5, 23)))
    for loader_batch in (1, 4, 23):
        batches = [(part, torch.zeros(len(part))) for part in images.split(loader_batch)]
        got = GaussianStats(space.feature_dim)
        starts = []
        for start, chunk in rechunk(batches, 5):
            starts.append(start)
            got.update(space(chunk)[0], torch.arange(start, start + len(chunk)))
        assert starts == [0, 5, 10, 15, 20]
        for a, b in zip(got.mu_sigma(), expected.mu_sigma(), strict=True):
            assert np.array_equal(a, b)  # bitwise
