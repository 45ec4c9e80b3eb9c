"""task=sensitivity: a unit's proxy is the output MSE against the float model along the
float sampling trajectories (recomputed here by hand), reruns resume, bad input is one line."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from test_run import compose_run, run

from jit.builders import SHIPPED_DIGITS_MODEL
from jit.checkpoint import build_denoiser_from_checkpoint
from jit.config import ConfigError, validate
from jit.quant import quantize_model, sample_context
from jit.sample_plan import balanced_labels, index_chunks, initial_noise
from jit.sensitivity import COLUMNS, block_of, read_done, spearman, units_of, write_rows
from jit.settings import parse_settings

UNITS = ["blocks.0.mlp.w12", "blocks.1.mlp.w3"]
# The shipped digits model, two layers as the units, dynamic ranges (no calibration),
# 4 trajectories of 2 Euler steps with guidance in chunks of 2: seconds.
SHORT = ["task=sensitivity", "quant.mode=dynamic", f"quant.targets=[{','.join(UNITS)}]",
         "sampler.steps=2", "sampler.method=euler", "sampler.cfg_scale=2.0", "fid.chunk_size=2",
         "sensitivity.proxy_images=4"]


def rows_of(path):
    with open(path, newline="") as f:
        return {row["unit"]: row for row in csv.DictReader(f)}


def hand_proxy(layer: str) -> float:
    """Record every network call of the float model's sampling of the 4 images, then
    run a copy with `layer` quantized on those inputs under the same sample ids."""
    denoiser, _ = build_denoiser_from_checkpoint(SHIPPED_DIGITS_MODEL, "model_ema1")
    denoiser.eval()
    quantized = copy.deepcopy(denoiser.net)
    quantize_model(quantized, {"scheme": "hybrid", "mode": "dynamic", "targets": [layer]})
    quantized.eval()
    labels = balanced_labels(4, 10)
    shape = (denoiser.in_channels, denoiser.img_size, denoiser.img_size)
    squared, count = 0.0, 0
    for indices in index_chunks(4, 2):
        calls = []
        handle = denoiser.net.register_forward_hook(lambda m, args, out, calls=calls: calls.append((args, out)))
        with torch.no_grad():
            denoiser.generate(labels[indices], initial_noise(0, indices, shape, denoiser.noise_scale), steps=2,
                              method="euler", cfg_scale=2.0, interval=(0.1, 1.0))
        handle.remove()
        assert len(calls) == 3  # 2 steps; the one inside the guidance interval adds an unconditional pass
        with torch.no_grad(), sample_context(quantized, indices):
            for args, out in calls:
                squared += float((quantized(*args).double() - out.double()).square().sum())
                count += out.numel()
    return squared / count


def test_proxy_equals_the_hand_computed_mse_and_a_rerun_skips_done_units(tmp_path):
    out = tmp_path / "sens"
    proc = run([*SHORT, f"hydra.run.dir={out}"], tmp_path)
    rows = rows_of(out / "sensitivity.csv")
    assert list(rows) == UNITS and list(next(iter(rows.values()))) == list(COLUMNS)
    for unit in UNITS:
        assert float(rows[unit]["proxy_mse"]) > 0 and float(rows[unit]["energy_saved_uJ_per_image"]) > 0
        assert rows[unit]["fid"] == ""  # sensitivity.fid_images=0: the proxy only
    assert float(rows["blocks.1.mlp.w3"]["proxy_mse"]) == pytest.approx(hand_proxy("blocks.1.mlp.w3"), rel=1e-9)
    summary = json.loads((out / "sensitivity.json").read_text())
    assert summary["spearman_proxy_vs_fid"]["rho"] is None and (out / "sensitivity.png").stat().st_size > 0
    assert "Spearman correlation proxy vs FID: not computed" in proc.stdout
    # Interrupted after the first unit: the rerun measures only the second, and gets the same numbers.
    write_rows(out / "sensitivity.csv", [rows[UNITS[0]]])
    proc = run([*SHORT, f"hydra.run.dir={out}"], tmp_path)
    assert "1 of 2 units already in" in proc.stdout + proc.stderr
    assert f"unit 1/2 {UNITS[0]}" not in proc.stdout + proc.stderr
    again = rows_of(out / "sensitivity.csv")
    assert again == rows
    # Another configuration in the same folder is refused before any work.
    proc = run([*SHORT, "quant.adc.bits=8", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = (f"error: {out / 'sensitivity.csv'} holds units measured with another configuration ({UNITS[0]}, "
                "...): resume with the same overrides, or pass overwrite=true (moves them to previous/) or choose "
                "another hydra.run.dir")
    assert proc.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize("args, message", [
    (["sensitivity.fid_images=1"], "sensitivity.fid_images: must be 0 (proxy only) or >= 2"),
    (["sensitivity.proxy_images=0"], "sensitivity.proxy_images: must be >= 1, got 0"),
    (["task=eval", "sensitivity.unit=block"], "sensitivity.unit: applies to task=sensitivity only"),
    (["quant=fp"], "quant: task=sensitivity puts units on the hardware of quant; quant.scheme=fp"),
    (["trainer=ddp_cpu"], "trainer: task=sensitivity runs in one process (got 2)"),
])
def test_bad_sensitivity_input_is_refused_before_the_model_loads(args, message, tmp_path, monkeypatch):
    from jit import builders, tasks

    monkeypatch.setattr(builders, "load_module", lambda cfg: pytest.fail("the model was loaded"))
    cfg = compose_run([*SHORT, *args, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
        tasks.sensitivity(cfg, parse_settings(cfg))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_unknown_unit_is_refused_by_the_schema(tmp_path):
    with pytest.raises(Exception) as info:  # Hydra's composition error wraps OmegaConf's
        compose_run([*SHORT, "sensitivity.unit=head", f"paths.output_dir={tmp_path}"])
    text = f"{info.value} {info.value.__cause__}"
    assert "sensitivity.unit=head" in text and "expected one of [layer, block]" in text


def test_units_by_layer_or_block_skip_float_layers():
    from jit.quant import build_quant_config

    cfg = build_quant_config({"scheme": "hybrid", "layers": {"blocks.1.mlp.w3": {"scheme": "fp"}}})
    names = ["blocks.0.mlp.w12", "blocks.0.mlp.w3", "blocks.1.mlp.w12", "blocks.1.mlp.w3", "head"]
    configs = {name: cfg.layer_config(name) for name in names}
    assert units_of(configs, "layer") == {n: [n] for n in names if n != "blocks.1.mlp.w3"}
    assert units_of(configs, "block") == {"blocks.0": ["blocks.0.mlp.w12", "blocks.0.mlp.w3"],
                                          "blocks.1": ["blocks.1.mlp.w12"], "head": ["head"]}
    assert block_of("blocks.11.attn.qkv") == "blocks.11"


def test_spearman_and_the_table_guard(tmp_path):
    rows = [{"unit": str(i), "proxy_mse": p, "fid": f} for i, (p, f) in enumerate([(1, 10), (2, 30), (3, 20), (4, 40)])]
    assert spearman(rows)["rho"] == pytest.approx(0.8)
    assert spearman(rows[:2])["rho"] is None
    path = tmp_path / "sensitivity.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a sensitivity table"):
        read_done(path, "x")
