"""Per-layer statistics limited to the first samples (jit/quant/stats.py): what an
evaluation observes of its first `eval.layer_stats_images` images inside the forwards that
generate them for FID, and the per-chunk parts it stores and adds up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant_execution import layer_for
from test_quant_layers import heavy_tailed

from jit.evaluation.chunks import ChunkRecord, ChunkStore
from jit.quant import enable_stats, merge_stats, sample_context, snapshot_stats
from jit.quant.plan import CHUNK_ELEMENTS
from jit.quant.stats import LayerStats

SCHEMES = [
    ("hybrid", {}),
    ("hybrid", {"adc": {"tile_rows": 128}, "weight": {"granularity": "channel"}}),
    ("hybrid", {"device": {"preset": "pcm"}}),
    ("bitserial", {}),
    ("w8a8", {}),
]


def _layer(scheme, cfg, mode):
    cfg = {**cfg, "mode": mode, "adc": {"noise_sigma_lsb": 2.0, **cfg.get("adc", {})}}
    layer = layer_for(scheme, **cfg)
    if mode == "static":
        layer.set_static(3.0, {path: 2e3 for path in layer.adc_paths} or None)  # some saturate
    return layer


def _row(layer, x, sample_ids, limit=None):
    """The statistics row of one call on x, observing the samples below `limit`."""
    enable_stats(layer, True, limit)
    with torch.no_grad(), sample_context(layer, sample_ids):
        y = layer(x)
    row = layer.stats.row("layer", layer.scheme)
    enable_stats(layer, False)
    return row, y


@pytest.mark.parametrize("scheme,cfg", SCHEMES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_limited_statistics_equal_those_of_the_leading_samples_alone(scheme, cfg, mode):
    """Observing samples 0-2 of a batch of 7 counts exactly what a batch of samples 0-2
    alone counts (every counter, saturation and SQNR included), across several row
    blocks, and the limited call computes the very output of an unobserved one."""
    x = heavy_tailed(7, 150, 300, seed=3)  # 1050 rows of 300: several row blocks
    assert x.shape[1] * x.shape[2] * 3 > CHUNK_ELEMENTS
    layer = _layer(scheme, cfg, mode)
    limited, y = _row(layer, x, range(7), limit=3)
    alone, _ = _row(layer, x[:3], range(3))
    assert limited == alone
    if mode == "static" and layer.adc_paths:
        assert limited["adc_saturation_rate"] > 0
    assert limited["calls"] == 1 and limited["dense_macs"] == 3 * 150 * 300 * 200
    with torch.no_grad(), sample_context(layer, range(7)):
        assert torch.equal(layer(x), y)


def test_a_call_without_observed_samples_is_not_counted():
    layer = _layer("hybrid", {}, "dynamic")
    x = heavy_tailed(4, 10, 300, seed=1)
    enable_stats(layer, True, sample_limit=5)
    with torch.no_grad(), sample_context(layer, [5, 6, 7, 8]):
        layer(x)
    assert layer.stats.calls == 0 and layer.stats.act_values == 0 and snapshot_stats(layer) == {}


def test_limited_statistics_need_sample_ids_that_lead_the_batch():
    layer = _layer("hybrid", {}, "dynamic")
    x = heavy_tailed(3, 10, 300, seed=1)
    enable_stats(layer, True, sample_limit=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="sample_context"):
        layer(x)
    with torch.no_grad(), sample_context(layer, [5, 0, 1]), pytest.raises(ValueError, match="lead the batch"):
        layer(x)
    with pytest.raises(ValueError, match="sample_limit"):
        enable_stats(layer, True, sample_limit=0)


def test_parts_added_up_equal_counting_all_calls_at_once():
    """Counters read per chunk (snapshot_stats) and merged in chunk order give the counts
    of one running total; the energies agree to rounding."""
    layer = _layer("hybrid", {"adc": {"tile_rows": 128}}, "dynamic")
    chunks = [heavy_tailed(3, 20, 300, seed=s) for s in range(3)]
    enable_stats(layer, True)
    parts = []
    with torch.no_grad():
        for k, x in enumerate(chunks):
            with sample_context(layer, range(3 * k, 3 * k + 3)):
                layer(x)
            parts.append(snapshot_stats(layer))
            enable_stats(layer, True)  # fresh counters per chunk
    (merged,) = merge_stats(parts).values()
    enable_stats(layer, True)
    with torch.no_grad():
        for k, x in enumerate(chunks):
            with sample_context(layer, range(3 * k, 3 * k + 3)):
                layer(x)
    whole = layer.stats.read()
    exact = {name: value for name, value in whole.counters().items() if "energy" not in name}
    assert {name: value for name, value in merged.counters().items() if "energy" not in name} == exact
    assert merged.calls == 3 and merged.array_reads == whole.array_reads
    assert merged.signal_energy == pytest.approx(whole.signal_energy, rel=1e-12)
    assert merged.error_energy == pytest.approx(whole.error_energy, rel=1e-12)


def test_a_stored_chunk_keeps_its_statistics(tmp_path):
    """The chunk store writes the counters beside the features and reads them back with
    weights_only loading."""
    layer = _layer("bitserial", {}, "dynamic")
    enable_stats(layer, True, sample_limit=2)
    with torch.no_grad(), sample_context(layer, [0, 1, 2]):
        layer(heavy_tailed(3, 10, 300, seed=2))
    part = snapshot_stats(layer)
    record = ChunkRecord(torch.arange(3), torch.zeros(3, 4), None, [(0, 0, 0, np.zeros((2, 2, 3), np.uint8))],
                         None, part)
    store = ChunkStore(tmp_path, "d" * 64)
    store.save(0, record)
    loaded = store.load(0)
    (counters,) = part.values()  # one layer
    assert loaded.layer_stats == part and isinstance(counters["act_clipped"], int)
    (merged,) = merge_stats([loaded.layer_stats]).values()
    assert merged.row("x", "bitserial") == LayerStats(**counters).row("x", "bitserial")


@pytest.mark.parametrize("compiled", [False, True])
def test_statistics_ride_along_unless_the_backbone_is_compiled(monkeypatch, tmp_path, compiled):
    """Eager: one quantized FID pass, calibrating at its start and observing the first
    images. Compiled (traced layers observe nothing and draw other noise): an eager
    statistics pass calibrates first, and the FID pass only scores."""
    from jit import passes
    from jit.callbacks.evaluation import CalibrationCallback, LayerStatsCallback
    from jit.evaluation import FIDConfig
    from jit.evaluation.pipeline import EvaluationSettings
    from jit.quant import build_quant_config
    from jit.settings import CalibrationConfig

    calls = []
    monkeypatch.setattr(passes, "statistics_pass",
                        lambda trainer, module, fid, n, callbacks: calls.append(("stats", n, callbacks)) or [])
    monkeypatch.setattr(passes, "evaluate_fid", lambda *args, **kwargs: calls.append(("fid", kwargs)) or {
        "metrics": {"fid_digits": 1.0}})
    monkeypatch.setattr(passes, "print_summary", lambda *args: None)
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"0")
    run = EvaluationSettings(quant=build_quant_config({"scheme": "hybrid"}), fid=FIDConfig.from_any({"num_images": 20}),
                             hardware=None, calibration=CalibrationConfig(), run_dir=tmp_path,
                             checkpoint=str(checkpoint), compare_fp=False, layer_stats_images=7,
                             compile_backbone=compiled)
    passes.evaluate_float_then_quantized(passes.evaluation_trainer(), None, None, run)
    if compiled:
        (_, n, before), (_, fid) = calls
        assert n == 7 and [type(c) for c in before] == [CalibrationCallback]
        assert fid["layer_stats"] is None and fid["callbacks"] == []
    else:
        ((_, fid),) = calls
        assert isinstance(fid["layer_stats"], LayerStatsCallback) and fid["layer_stats"].num_images == 7
        assert [type(c) for c in fid["callbacks"]] == [CalibrationCallback]
