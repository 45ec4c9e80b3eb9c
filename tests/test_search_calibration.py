"""task=search reuses a calibration's activation clips across ADC settings: with the clips
given, `calibrate` reads its batches once (the ADC pass) and returns bit for bit the
artefact of a full calibration; the search's ADC-pass-only calibration of a trial equals
that trial's full calibration, files included."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from test_calibration import noised_batches, tiny_model
from test_run import compose_run
from test_search import SHORT

from jit.quant import artefact as art
from jit.quant import quantize_model, quantized_layers, restore_float
from jit.quant.calibration import CalibrationError, calibrate

# Another ADC for some layers: bits, thermal noise and converter errors (calibration runs
# without the last two; the ADC clips follow the bits).
OTHER_ADCS = {"blocks.0.*": {"adc": {"bits": 6, "noise_sigma_lsb": 0.0, "dnl_sigma_lsb": 0.3}},
              "blocks.1.mlp.*": {"adc": {"bits": 8}}}


@pytest.mark.parametrize("scheme, method", [("hybrid", "kl"), ("bitserial", "mse")])
def test_given_activation_clips_give_the_artefact_of_a_full_calibration(scheme, method):
    base = {"scheme": scheme, "mode": "static", "adc": {"noise_sigma_lsb": 2.0}}
    den = tiny_model(base)
    batches = noised_batches(den, n=8, batch=4)
    calls = []

    def forward(batch, generator):
        calls.append(len(batch[0]))
        return den.net(*batch)

    options = {"method": method, "num_bins": 2048, "forward": forward}  # >= the levels, and quick
    first = calibrate(den.net, batches, **options)
    restore_float(den.net)
    quantize_model(den.net, {**base, "layers": OTHER_ADCS})
    full_coverage, given_coverage = [], []
    full = calibrate(den.net, batches, coverage=full_coverage, **options)
    clips = {name: entry["act_clip"] for name, entry in first["layers"].items()}
    assert clips == {name: entry["act_clip"] for name, entry in full["layers"].items()}  # ADC-independent
    assert any(first["layers"][name]["adc_clip"] != full["layers"][name]["adc_clip"] for name in clips)
    calls.clear()
    given = calibrate(den.net, batches, coverage=given_coverage, act_clips=clips, **options)
    assert calls == [4, 4]  # the batches once: the ADC pass
    assert given == full and given_coverage == full_coverage


def test_given_activation_clips_name_every_quantized_layer_with_a_finite_clip():
    den = tiny_model({"scheme": "hybrid", "mode": "static"})
    batches = noised_batches(den, n=4, batch=4)
    names = list(quantized_layers(den.net))
    clips = dict.fromkeys(names, 1.0)
    with pytest.raises(CalibrationError, match=rf"^act_clips: must name every quantized layer and no other "
                                               rf"\(missing: \['{names[-1]}'\], not quantized: \['head'\]\)$"):
        calibrate(den.net, batches, act_clips={**{n: 1.0 for n in names[:-1]}, "head": 1.0})
    with pytest.raises(CalibrationError, match=rf"^act_clips\['{names[0]}'\]: must be a finite number >= 0, got nan$"):
        calibrate(den.net, batches, act_clips={**clips, names[0]: float("nan")})


def test_the_searchs_adc_pass_gives_the_trials_full_calibration(tmp_path):
    from jit.builders import load_module
    from jit.evaluation.calibration import ARTEFACT_NAME, COVERAGE_NAME, run_calibration
    from jit.passes import evaluation_trainer
    from jit.quant import target_names
    from jit.search import (
        SearchRun,
        activation_key,
        calibrate_adc_pass,
        calibration_key,
        parse_search,
        trial_quant,
    )
    from jit.settings import parse_settings

    cfg = compose_run([*SHORT, f"paths.output_dir={tmp_path}"])
    settings = parse_settings(cfg)
    module, source = load_module(cfg)
    datamodule = instantiate(cfg.data)
    net = module.denoiser.net
    names = target_names(net, settings.quant.targets)
    search = parse_search({"n_trials": 1, "objectives": ["fid", "energy"], "space": {"blocks.0.*": {"adc": {"bits": [6]}}}},
                          settings.quant)
    run = SearchRun(settings=search, quant=settings.quant, fid=settings.fid, hardware=settings.hardware,
                    calibration=settings.calibration, run_dir=tmp_path, checkpoint=source, layer_stats_images=2,
                    digest="0" * 64, seed=0)
    earlier = trial_quant(settings.quant, {"blocks.0.*": {"adc": {"bits": 6}}})
    trial = trial_quant(settings.quant, {"blocks.0.*": {"adc": {"bits": 8}}, "blocks.1.*": {"adc": {"bits": 10}}})
    assert activation_key(earlier, names, run.calibration) == activation_key(trial, names, run.calibration)
    assert calibration_key(earlier, names, run.calibration) != calibration_key(trial, names, run.calibration)

    def full_calibration(qcfg, folder):
        quantize_model(net, qcfg)
        try:
            return run_calibration(module, qcfg, run.calibration, folder, datamodule=datamodule,
                                   sampler=module.sampler, eval_weights=module.eval_weights).artefact_path
        finally:
            restore_float(net)

    clips_from = full_calibration(earlier, tmp_path / "earlier")
    full = full_calibration(trial, tmp_path / "full")
    adc_pass = calibrate_adc_pass(evaluation_trainer(), module, datamodule, run, trial, tmp_path / "trial", clips_from)
    assert adc_pass == tmp_path / "trial" / ARTEFACT_NAME and not quantized_layers(net)  # float again
    assert art.load(adc_pass) == art.load(full) != art.load(clips_from)
    assert (tmp_path / "trial" / COVERAGE_NAME).read_bytes() == (tmp_path / "full" / COVERAGE_NAME).read_bytes()
