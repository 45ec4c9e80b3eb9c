"""Static calibration: calibrators, histograms, calibrate(), artefact, seed import, callback."""

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import laplace, norm
from torch import nn

from jit.datamodules import DigitsDataModule
from jit.evaluation.calibration import CalibrationConfig, run_calibration
from jit.models import Denoiser, build_jit
from jit.quant import artefact as art
from jit.quant import quantize_model, quantized_layers, reseed
from jit.quant.calibration import AbsHistogram, CalibrationError, calibrate
from jit.quant.calibrators import (
    default_bins,
    kl_candidates,
    kl_divergences,
    kl_threshold,
    mse_threshold,
    percentile_threshold,
    threshold,
)

FIXTURE = Path(__file__).parent / "fixtures" / "seed_bitserial_w8a12.pt"
HYBRID = {"scheme": "hybrid", "mode": "dynamic", "adc": {"noise_sigma_lsb": 2.0}}


def hist_of(x, num_bins=2048):
    h = AbsHistogram(num_bins)
    h.add(x)
    return h


def exact_hist(cdf, upper, num_bins, n=2e9):
    """Expected counts of |x| for n samples: a histogram without sampling noise."""
    edges = np.linspace(0.0, upper, num_bins + 1)
    counts = np.round(n * 2 * (cdf(edges[1:]) - cdf(edges[:-1])))
    last = np.flatnonzero(counts)[-1]
    return SimpleNamespace(counts=torch.tensor(counts), upper=upper, amax=float(edges[last + 1]),
                           total=float(counts.sum()))


# ------------------------------------------------------------------------ calibrators ----
def test_kl_gaussian_threshold_between_p999_and_max():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    c = kl_threshold(hist_of(x), 8)
    assert float(x.abs().quantile(0.999)) < c < float(x.abs().max())


@pytest.mark.parametrize("cdf", [norm.cdf, laplace.cdf], ids=["gauss", "laplace"])
def test_kl_more_levels_never_give_a_smaller_threshold(cdf):
    h = exact_hist(cdf, 12.0, 4096)
    clips = [kl_threshold(h, bits) for bits in range(4, 12)]
    assert clips == sorted(clips), clips


def _kl_by_definition(counts, levels, i):
    """KL(P||Q) for keeping i bins, written out bin by bin (no prefix sums)."""
    h = [float(c) for c in counts]
    p = h[:i]
    p[-1] += sum(h[i:])
    q = [0.0] * i
    for level in range(levels):
        bins = [b for b in range(i) if b * levels // i == level]
        mass = sum(h[b] for b in bins)  # the quantised slice leaves the outliers out
        nonempty = [b for b in bins if p[b] > 0]
        for b in nonempty:
            q[b] = mass / len(nonempty)
    sp, sq = sum(p), sum(q)
    kl = 0.0
    for pb, qb in zip(p, q):
        if pb > 0:
            if qb == 0:
                return math.inf
            kl += pb / sp * math.log((pb / sp) / (qb / sq))
    return kl


def _resampled_by_definition(counts, clip, bins):
    """`bins` equal bins over [0, clip) plus one bin holding everything above: the
    cumulative counts interpolated linearly inside each stored bin."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64))])
    edges = np.linspace(0.0, clip, bins + 1)
    below = np.interp(edges, np.arange(len(cumulative)), cumulative)
    return list(np.diff(below)) + [cumulative[-1] - below[-1]]


@pytest.mark.parametrize("seed", range(4))
def test_kl_equals_brute_force_on_small_histograms(seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (40,), generator=gen).double()
    counts[torch.rand(40, generator=gen) < 0.3] = 0  # empty bins inside the range
    counts[-1] = 3
    for levels, sub_bins in ((4, 1), (4, 3), (8, 2)):
        candidates = np.arange(levels, 41)
        fast = kl_divergences(counts.numpy(), levels, candidates, sub_bins)
        slow = np.array([
            _kl_by_definition(_resampled_by_definition(counts, i, levels * sub_bins), levels,
                              levels * sub_bins)
            for i in candidates])
        assert np.array_equal(np.isinf(fast), np.isinf(slow))
        finite = np.isfinite(slow)
        np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)
    # On a grid of one stored bin per sub-bin the resampling is the identity.
    i = 32
    plain = kl_divergences(counts.numpy(), 4, [i], sub_bins_per_level=8)[0]
    assert plain == pytest.approx(_kl_by_definition(counts, 4, i), rel=1e-9)


def test_kl_threshold_minimises_the_kl_over_its_candidates():
    x = student_t_abs(3, 200_000, seed=5)
    h = hist_of(x, 1 << 14)
    candidates = kl_candidates(h.counts, 128)
    kl = kl_divergences(h.counts.double().numpy(), 128, candidates)
    best = candidates[np.flatnonzero(kl <= kl[np.isfinite(kl)].min() + 1e-12)[0]]
    assert kl_threshold(h, 8) == pytest.approx(min(best * h.upper / (1 << 14), h.amax))
    assert kl_threshold(h, 8) < h.amax  # heavy tail at 128 levels: clipped


@pytest.mark.parametrize("dof, n, seed", [(2, 1_000_000, 0), (3, 200_000, 1), (4, 200_000, 0)])
def test_kl_clip_converged_at_the_default_bins(dof, n, seed):
    """Doubling the default INT11 grid moves the KL clip by under 5%, also when the tail
    is sparse (200k values: on the stored bins directly the clip moved 18-29% here)."""
    fine = hist_of(student_t_abs(dof, n, seed), 2 * default_bins(11))
    default = AbsHistogram(default_bins(11))
    default.counts = fine.counts.view(default_bins(11), 2).sum(1)  # the same grid, merged
    default.upper, default.amax, default.total = fine.upper, fine.amax, fine.total
    clip, doubled = kl_threshold(default, 11), kl_threshold(fine, 11)
    assert abs(doubled / clip - 1) < 0.05, (clip, doubled)


def test_percentile_minmax_mse():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    h = hist_of(x, 4096)
    width = h.upper / 4096
    assert abs(percentile_threshold(h, 99.0) - float(x.abs().quantile(0.99))) < width
    assert threshold("minmax", h, 8) == float(x.abs().max())
    mse4, mse8 = mse_threshold(h, 4), mse_threshold(h, 8)
    assert float(x.abs().quantile(0.99)) < mse8 < float(x.abs().max())
    assert mse4 < mse8  # fewer levels: rounding costs more, so clip harder


def student_t_abs(dof, n, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(dof, n, generator=gen, dtype=torch.float64).square().sum(0)
    return (z / (chi2 / dof).sqrt()).float()


def test_histogram_counts_exactly_on_a_fixed_grid():
    """Counts equal a direct histogram on the final grid however the data arrive, the
    merges when the max grows included; the size does not depend on the data."""
    x = student_t_abs(2, 100_000, seed=2)
    x[:10] = 0
    h = hist_of(x, 1024)
    assert h.counts.numel() == 1024 and h.total == 100_000
    assert h.upper == 2.0 ** math.ceil(math.log2(h.amax)) and h.amax == float(x.abs().max())
    direct, _ = np.histogram(x.abs().double().numpy(), bins=np.linspace(0, h.upper, 1025))
    assert np.array_equal(h.counts.numpy(), direct)
    by_max = sorted(x.split(7000), key=lambda part: float(part.abs().max()))  # max grows 14x
    grown = AbsHistogram(1024)
    for part in [torch.zeros(5)] + by_max:
        grown.add(part)
    assert grown.upper == h.upper and torch.equal(grown.counts[1:], h.counts[1:])
    assert grown.counts[0] == h.counts[0] + 5


@pytest.mark.parametrize("method", ["kl", "percentile", "mse", "minmax"])
def test_thresholds_identical_for_any_split_and_order(method):
    """|Student-t(2)|, 1M values: one batch, 8 batches, 8 permuted batches and 8 batches
    of a shuffled order give bitwise-identical histograms and clips (the growing
    histogram this replaces gave 0.539 vs 0.253 of max for 8 vs 1 batches)."""
    x = student_t_abs(2, 1_000_000, seed=0)
    gen = torch.Generator().manual_seed(1)
    splits = {"one": [x], "eight": list(x.chunk(8))}
    splits["permuted"] = [splits["eight"][k] for k in torch.randperm(8, generator=gen)]
    splits["shuffled"] = list(x[torch.randperm(x.numel(), generator=gen)].chunk(8))
    hists, clips = {}, {}
    for key, parts in splits.items():
        hists[key] = AbsHistogram(131072)
        for part in parts:
            hists[key].add(part)
        clips[key] = threshold(method, hists[key], 11)
    for key in splits:
        assert torch.equal(hists[key].counts, hists["one"].counts), key
        assert clips[key] == clips["one"], (key, clips)


# ------------------------------------------------------------------------ calibrate ----
def tiny_model(scheme_cfg=HYBRID, seed=0, depth=2, num_classes=4):
    torch.manual_seed(seed)
    net = build_jit("JiT-T/4", input_size=16, num_classes=num_classes, depth=depth,
                    in_context_start=min(2, depth - 1))
    for p in net.parameters():  # the official init zeroes adaLN and the final layer
        nn.init.normal_(p, std=0.05)
    quantize_model(net, scheme_cfg)
    return Denoiser(net, num_classes)


def noised_batches(denoiser, n=8, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1
    labels = torch.randint(0, 4, (n,), generator=gen)
    t = denoiser.sample_t(n, generator=gen)
    z = denoiser.noised(x, t, torch.randn(x.shape, generator=gen))
    return [(z[i:i + batch], t[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


def set_mode(model, mode):
    for layer in quantized_layers(model).values():
        layer.cfg = dataclasses.replace(layer.cfg, mode=mode)


def layer_outputs(model, batches):
    """{layer: (input, output)} of every quantized layer on the batches."""
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda m, i, o, name=name: seen.setdefault(name, []).append((i[0], o)))
        for name, layer in quantized_layers(model).items()]
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for hook in hooks:
        hook.remove()
    return {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in seen.items()}


@pytest.mark.parametrize("method", ["kl", "percentile"])
def test_static_reproduces_dynamic_on_the_calibration_data(method):
    """Per layer, noise off, same inputs: the relative RMS difference between static and
    dynamic outputs measured 0.04-1.2% (kl) and 0.01-0.51% (percentile 99.8, the
    dynamic clip's own percentile), each below the dynamic mode's own error against the
    float layer (0.05-1.4%). Bound: <= 1.5% and <= that quantisation error. 32 images
    (33k-100k values per layer): a 1024-level KL needs more values than 8 images give."""
    den = tiny_model({**HYBRID, "adc": {"noise_sigma_lsb": 0.0}})
    net, batches = den.net, noised_batches(den, n=32, batch=16)
    inputs = layer_outputs(net, batches)
    artefact = calibrate(net, batches, method=method, percentile=99.8)
    layers = quantized_layers(net)
    for name, (x, y_dyn) in inputs.items():
        layer = layers[name]
        with torch.no_grad():
            y_float = nn.functional.linear(x, layer.weight, layer.bias)
            set_mode(layer, "static")
            art.apply({**artefact, "layers": {"": artefact["layers"][name]}}, layer)
            y_static = layer(x)
            set_mode(layer, "dynamic")
        rms = y_dyn.pow(2).mean().sqrt()
        static_err = float((y_static - y_dyn).pow(2).mean().sqrt() / rms)
        quant_err = float((y_dyn - y_float).pow(2).mean().sqrt() / rms)
        assert static_err <= 1.5e-2, (name, static_err)
        assert static_err <= quant_err, (name, static_err, quant_err)


def snapshot(model):
    return [(layer.cfg, layer.static, layer.observer, layer.stats)
            for layer in quantized_layers(model).values()]


def test_calibration_restores_noise_and_state_and_is_reproducible():
    den = tiny_model({**HYBRID, "mode": "static"})
    net, batches = den.net, noised_batches(den)
    for layer in quantized_layers(net).values():
        layer.set_static(1.0, 1e5)
    before = snapshot(net)
    first = calibrate(net, batches, method="kl")
    assert snapshot(net) == before  # noise sigma, mode, thresholds, observers, stats
    assert all(layer.cfg.adc.noise_sigma_lsb == 2.0 for layer in quantized_layers(net).values())
    second = calibrate(net, batches, method="kl")
    assert first == second  # noise never leaks in: the streams would differ otherwise
    art.apply(first, net)
    reseed(net, 7)
    with torch.no_grad():
        y1 = net(*batches[0])
        reseed(net, 7)
        y2 = net(*batches[0])
        y3 = net(*batches[0])
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)  # noise is back on


def test_threshold_searches_side_by_side_give_the_serial_artefact(monkeypatch):
    """The per-layer searches run on the intra-op threads: the artefact is the one of a
    serial search, and a failing search names the first failing layer in layer order."""
    from jit.quant import calibration as calibration_module

    den = tiny_model({**HYBRID, "mode": "static"}, depth=3)
    batches = noised_batches(den, n=8, batch=4)
    monkeypatch.setattr(calibration_module, "_search_workers", lambda jobs: 1)
    serial = calibrate(den.net, batches)
    monkeypatch.setattr(calibration_module, "_search_workers", lambda jobs: min(jobs, 3))
    assert calibrate(den.net, batches) == serial

    def fail_blocks_1_and_2(method, hist, bits, percentile, name):
        if "blocks.1." in name or "blocks.2." in name:
            raise CalibrationError(f"{name}: no")
        return 1.0

    monkeypatch.setattr(calibration_module, "_clip", fail_blocks_1_and_2)
    with pytest.raises(CalibrationError, match=r"^layer blocks\.1\.mlp\.w12 \(act\): no$"):
        calibrate(den.net, batches)


def test_artefact_identical_for_permuted_and_resplit_batches():
    """calibrate() on the tiny JiT with its batches in another order, and on one quantized
    layer with its inputs split differently (heavy-tailed, so the max grows from batch to
    batch): bitwise-identical artefacts, ADC clips included."""
    den = tiny_model({**HYBRID, "mode": "static"})
    batches = noised_batches(den, n=12, batch=4)
    assert calibrate(den.net, batches) == calibrate(den.net, [batches[k] for k in (2, 0, 1)])
    model = linear_model(mode="static")
    x = student_t_abs(2, 48 * 16, seed=3).reshape(48, 16) * torch.randn(48, 16).sign()
    x = x[x.abs().amax(1).argsort()]  # max grows batch after batch
    for method in ("kl", "percentile", "mse"):
        one = calibrate(model, [x], method=method)
        for parts in (list(x.split(16)), list(x.split(7))[::-1], list(x.split(5))[1::2] + list(x.split(5))[::2]):
            assert calibrate(model, parts, method=method) == one, method


def test_round_trip_save_load_apply(tmp_path):
    den = tiny_model({**HYBRID, "mode": "static"})
    net, batches = den.net, noised_batches(den)
    artefact = calibrate(net, batches, method="mse", save_weights=True)
    path = art.save(artefact, tmp_path / "calibration.pt")
    loaded = art.load(path)
    assert loaded["format_version"] == 1 and loaded["num_images"] == 8
    entry = loaded["layers"]["blocks.0.mlp.w12"]
    assert entry["made_for"]["act_bits"] == 11 and entry["weight_int"].dtype == torch.int8
    outputs = []
    for a in (artefact, loaded):
        art.apply(a, net)
        reseed(net, 3)
        with torch.no_grad():
            outputs.append(layer_outputs(net, batches))
    for name, (_, y) in outputs[0].items():
        assert torch.equal(y, outputs[1][name][1]), name


# ----------------------------------------------------------------------- seed import ----
def seed_layer(case):
    k = case["layer_kwargs"]
    root = nn.Module()
    root.blocks = nn.ModuleList([nn.Module()])
    root.blocks[0].mlp = nn.Module()
    root.blocks[0].mlp.w12 = nn.Linear(*case["weight"].shape[::-1])
    with torch.no_grad():
        root.blocks[0].mlp.w12.weight.copy_(case["weight"])
        root.blocks[0].mlp.w12.bias.copy_(case["bias"])
    quantize_model(root, {
        "scheme": "bitserial", "mode": "static", "targets": ["blocks.*.mlp.w12"],
        "weight": {"bits": k["weight_nbit"], "clip_pct": k.get("weight_clip_pct") or None},
        "act": {"bits": k["act_bits"]},
        "split": {"lsb_bits": k["lsb_bits"], "lsb_gain_shift": k["lsb_gain_shift"]},
        "adc": {"bits": k["adc_nbit"], "samples": k["msb_samples"],
                "noise_sigma_lsb": k["noise_sigma_lsb"]}})
    return root


def test_seed_json_import_reproduces_the_seed_layer(tmp_path):
    cases = [c for c in torch.load(FIXTURE, weights_only=True) if c["forward_kwargs"]]
    assert len(cases) == 2  # one single output-domain step, one raw (msb, lsb) pair
    for case in cases:
        f = case["forward_kwargs"]
        scales = {"blocks.0.mlp.w12_act": f["act_scale"],
                  "blocks.0.mlp.w12_acc": list(f["adc_scale"]) if isinstance(
                      f["adc_scale"], (tuple, list)) else f["adc_scale"]}
        path = tmp_path / f"{case['name']}.json"
        path.write_text(json.dumps(scales))
        root = seed_layer(case)
        artefact = art.import_seed_json(path, root)
        assert artefact["source"] == f"seed:{path.name}"
        art.apply(art.load(art.save(artefact, tmp_path / "a.pt")), root)
        with torch.no_grad():
            y = root.blocks[0].mlp.w12(case["x"])
        expected = case["expected"]
        err = (y - expected).abs()
        tol = 1e-4 * expected.abs().max()
        assert (err > tol).float().mean() <= 0.005, case["name"]  # fixture README tolerance
        # the seed's calibrate script writes the same keys as an npz
        np.savez(tmp_path / "scales.npz", **{k: np.asarray(v) for k, v in scales.items()})
        from_npz = art.import_seed_json(tmp_path / "scales.npz", root)
        assert from_npz["layers"] == artefact["layers"]
    with pytest.raises(art.ArtefactError, match=r"describe the bit-serial layer; layer "
                       r"blocks\.0\.mlp\.w12 uses quant\.scheme=hybrid"):
        art.import_seed_json(path, tiny_model(HYBRID).net)


# ------------------------------------------------------------------------ bad input ----
def linear_model(**cfg):
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_model(model, {**HYBRID, "targets": ["0"], **cfg})
    return model


def test_zero_images():
    with pytest.raises(CalibrationError, match="zero images"):
        calibrate(linear_model(), [])
    with pytest.raises(CalibrationError, match=r"calibration\.num_images must be an integer >= 1"):
        CalibrationConfig(num_images=0)


def test_num_bins_validation():
    for bad in (0, 3, 1000, 2.0, True, "4096"):
        with pytest.raises(CalibrationError, match=r"calibration\.num_bins must be a power of two "
                           r">= 2 or null, got"):
            CalibrationConfig(num_bins=bad)
    assert CalibrationConfig().num_bins is None and CalibrationConfig(num_bins=8192).num_bins == 8192
    with pytest.raises(CalibrationError, match=r"calibration\.num_bins must be a power of two"):
        calibrate(linear_model(), [torch.randn(4, 16)], num_bins=100)
    # KL at INT11 needs >= 1024 bins: refused before any forward pass
    calls = []
    with pytest.raises(CalibrationError, match=r"num_bins=512 is below the 1024 levels of layer 0 "
                       r"\(act\)"):
        calibrate(linear_model(), [torch.randn(4, 16)], num_bins=512,
                  forward=lambda batch, generator: calls.append(batch))
    assert calls == []


def test_empty_and_constant_tensors():
    with pytest.raises(CalibrationError, match=r"layer 0: got an empty act tensor"):
        calibrate(linear_model(), [torch.zeros(0, 16)])
    with pytest.raises(CalibrationError, match=r"layer 0 \(act\): all 64 observed values are zero"):
        calibrate(linear_model(), [torch.zeros(4, 16)])


def test_missing_calibration_split(tmp_path):
    class NoCalibration:
        def dataloader(self, name, **kwargs):
            raise ValueError(f"unknown split {name!r}; valid names: train, val")

    den = tiny_model({**HYBRID, "mode": "static"})
    for dm, message in ((None, "needs a datamodule with a 'calibration' split"),
                        (NoCalibration(), "no usable 'calibration' split: unknown split")):
        with pytest.raises(CalibrationError, match=message):
            run_calibration(den, {**HYBRID, "mode": "static"}, {"num_images": 4}, tmp_path,
                            datamodule=dm)
    assert list(tmp_path.iterdir()) == []


def test_artefact_for_another_model():
    den = tiny_model({**HYBRID, "mode": "static"})
    artefact = calibrate(den.net, noised_batches(den), method="minmax")
    cases = [
        (tiny_model({**HYBRID, "act": {"bits": 10}}).net,
         r"blocks\.0\.mlp\.w12 was calibrated for act_bits=11 \(model: 10\)"),
        (tiny_model({"scheme": "bitserial"}).net, r"scheme='hybrid' \(model: 'bitserial'\)"),
        (tiny_model(HYBRID, depth=1).net, r"layers not quantized in this model: blocks\.1\.mlp\.w12"),
        (tiny_model({**HYBRID, "targets": ["blocks.*.mlp.w12"]}).net,
         r"layers not quantized in this model: blocks\.0\.mlp\.w3"),
    ]
    for net, message in cases:
        with pytest.raises(art.ArtefactError, match=message):
            art.apply(artefact, net)
        assert all(layer.static is None for layer in quantized_layers(net).values())


def test_corrupt_truncated_and_foreign_files(tmp_path):
    den = tiny_model({**HYBRID, "mode": "static"})
    good = art.save(calibrate(den.net, noised_batches(den)), tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    torch.save({"thresholds": [1.0]}, tmp_path / "foreign.pt")
    for name, message in (("truncated.pt", "corrupt or truncated"),
                          ("garbage.pt", "corrupt or truncated"),
                          ("foreign.pt", "not a calibration artefact")):
        with pytest.raises(art.ArtefactError, match=message):
            art.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        art.load(tmp_path / "missing.pt")


def test_failed_calibration_leaves_no_artefact(tmp_path, monkeypatch):
    den = tiny_model({**HYBRID, "mode": "static"})
    model = linear_model(mode="static")
    with pytest.raises(CalibrationError):
        calibrate(model, [torch.zeros(4, 16)])
    # a crash while writing: neither a partial file nor the temporary one stays behind
    artefact = calibrate(den.net, noised_batches(den))

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        art.save(artefact, tmp_path / "calibration.pt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ run_calibration ----
@pytest.mark.parametrize("source", ["data", "sampling"])
def test_run_calibration_calibrates_saves_and_applies(tmp_path, source):
    den = tiny_model({**HYBRID, "mode": "static"}, depth=1, num_classes=10)
    dm = DigitsDataModule(img_size=16, batch_size=4, val_fraction=0.2, num_workers=0,
                          pin_memory=False, persistent_workers=False, subset_frac=1.0,
                          random_flip=False, calib_split="train", calib_num_images=8,
                          reference_split="val", seed=0, num_classes=None, patch_size=None)
    quant = {**HYBRID, "mode": "static"}
    calib = {"method": "kl", "num_images": 6, "batch_size": 4, "source": source}
    sampler = {"steps": 2, "method": "heun", "cfg_scale": 2.0, "interval": [0.0, 1.0]}
    outcome = run_calibration(SimpleNamespace(denoiser=den), quant, calib, tmp_path,
                              datamodule=dm, sampler=sampler)
    assert outcome.calibrated and outcome.artefact["num_images"] == 6
    assert outcome.artefact["source"] == source
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.pt", "coverage.csv"]
    rows = (tmp_path / "coverage.csv").read_text().splitlines()
    assert rows[0].startswith("layer,lsb_range_coverage,int8_range_coverage,msb_density")
    assert len(rows) == 3 and len(outcome.coverage) == 2
    assert all(0 <= r["lsb_range_coverage"] <= 1 for r in outcome.coverage)
    assert all(layer.static is not None for layer in quantized_layers(den.net).values())
    # quant.calibration_file applies an existing artefact instead of calibrating
    other = tiny_model({**HYBRID, "mode": "static"}, depth=1, num_classes=10)
    again = run_calibration(other, {**quant, "calibration_file": str(outcome.artefact_path)},
                            calib, tmp_path / "second")
    assert not again.calibrated and not (tmp_path / "second").exists()
    assert [layer.static.act_clip for layer in quantized_layers(other.net).values()] == \
        [e["act_clip"] for e in outcome.artefact["layers"].values()]

