"""The run schema types every group: presets state only what differs from the schema's
defaults and still compose to the settings they stood for when they spelled out every
value; an unknown key fails naming it."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
import yaml
from test_run import CONFIGS, compose_run

from jit.config import RunSchema
from jit.hardware import HardwareConfigError, build_hardware_config
from jit.quant import DeviceConfig, build_device_config, build_quant_config
from jit.quant.config import SCHEME_DEFAULTS, SCHEME_DEPENDENT
from jit.quant.schema import SECTION_SCHEMAS, DeviceSchema, QuantSchema

# Every quant preset as it was written out in full before the schema typed the group
# (configs/quant/*.yaml at 4d13047): the composed presets must give these settings.
_ADC = {"bits": 10, "bypass": False, "noise_sigma_lsb": 2.0, "tile_rows": None, "dnl_sigma_lsb": 0.0,
        "inl_max_lsb": 0.0, "offset_sigma_lsb": 0.0, "gain_sigma": 0.0}
_COMMON = {"mode": "dynamic", "dynamic_scope": "sample", "targets": ["blocks.*.mlp.w12", "blocks.*.mlp.w3"],
           "seed": 0, "calibration_file": None, "allow_foreign_calibration": False, "layers": None}
_WEIGHT = {"bits": 8, "clip_pct": None, "granularity": "tensor"}
SPELLED_OUT_QUANT = {
    "hybrid_w8a11": {**_COMMON, "scheme": "hybrid", "weight": _WEIGHT, "act": {"bits": 11, "percentile": 99.8},
                     "split": {"lsb_bits": 9, "radix": 256, "lsb_gain_shift": 0}, "adc": {**_ADC, "samples": 1}},
    "bitserial_w8a12": {**_COMMON, "scheme": "bitserial", "weight": _WEIGHT, "act": {"bits": 12, "percentile": 99.5},
                        "split": {"lsb_bits": 5, "radix": 32, "lsb_gain_shift": 2}, "adc": {**_ADC, "samples": 2}},
    "bitserial_w8a10": {**_COMMON, "scheme": "bitserial", "weight": _WEIGHT, "act": {"bits": 10, "percentile": 99.5},
                        "split": {"lsb_bits": 4, "radix": 16, "lsb_gain_shift": 2}, "adc": {**_ADC, "samples": 2}},
    "w8a8": {**_COMMON, "scheme": "w8a8", "weight": _WEIGHT, "act": {"bits": 8, "percentile": 99.5}},
    "fp": {**_COMMON, "scheme": "fp"},
}


@pytest.mark.parametrize("preset", sorted(SPELLED_OUT_QUANT))
def test_quant_presets_compose_to_the_settings_they_spelled_out(preset, tmp_path):
    cfg = compose_run(["~experiment", f"quant={preset}", f"paths.output_dir={tmp_path}"])
    composed = build_quant_config(cfg.quant, device=cfg.device)
    assert composed == build_quant_config(SPELLED_OUT_QUANT[preset], device=cfg.device)
    assert composed.to_dict() == build_quant_config(SPELLED_OUT_QUANT[preset]).to_dict()


def test_quant_overrides_on_the_command_line_reach_the_config(tmp_path):
    cfg = compose_run(["quant=bitserial_w8a12", "quant.adc.bits=6", "quant.act.bits=10",
                       "quant.layers={blocks.0.*: {adc: {bits: 8}}, blocks.*.mlp.w3: {scheme: fp}}",
                       f"paths.output_dir={tmp_path}"])
    qcfg = build_quant_config(cfg.quant)
    assert (qcfg.adc.bits, qcfg.act.bits, qcfg.act.percentile, qcfg.split.lsb_bits) == (6, 10, 99.5, 5)
    assert qcfg.layer_config("blocks.0.mlp.w12").adc.bits == 8
    assert qcfg.layer_config("blocks.3.mlp.w3").scheme == "fp"


def test_null_in_the_schema_means_the_schemes_default():
    """The fields the scheme decides are exactly the schema's nulls, and null resolves to it."""
    mentioned = {section: set(keys) for values in SCHEME_DEFAULTS.values() for section, keys in values.items()}
    for section, keys in mentioned.items():
        assert keys <= SCHEME_DEPENDENT[section]
    assert SCHEME_DEPENDENT["split"] == {"lsb_bits", "radix", "lsb_gain_shift"}  # radix: 2**lsb_bits in bitserial
    nulls = {"act": {"bits": None, "percentile": None}, "adc": {"samples": None},
             "split": {"lsb_bits": None, "radix": None, "lsb_gain_shift": None}}
    for scheme in ("hybrid", "bitserial", "w8a8"):
        assert build_quant_config({"scheme": scheme, **nulls}) == build_quant_config({"scheme": scheme})


@pytest.mark.parametrize("override, key", [
    ("quant.adc.bitz=3", "quant.adc.bitz"),
    ("quant.sheme=hybrid", "quant.sheme"),
])
def test_an_unknown_key_fails_at_composition_naming_it(override, key, tmp_path):
    with pytest.raises(Exception) as info:  # Hydra's composition error wraps OmegaConf's
        compose_run([override, f"paths.output_dir={tmp_path}"])
    assert f"Could not override '{key}'" in str(info.value)
    cause = str(info.value.__cause__)
    assert f"Key '{key.rsplit('.', 1)[1]}' not in" in cause and f"full_key: {key}" in cause


@pytest.mark.parametrize("override, message", [
    ("+quant.adc.bitz=3", "quant.adc.bitz is not a known field (known: bits, bypass,"),
])
def test_an_appended_unknown_key_fails_in_one_line_naming_it(override, message, tmp_path):
    cfg = compose_run([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError) as info:
        build_quant_config(cfg.quant, device=cfg.device)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# The device presets as they were written out in full (configs/device/*.yaml at 4d13047).
_KNOBS = {"t_inference_s": 0.0, "drift_compensation": "none", "programming_noise_scale": 1.0,
          "read_noise_scale": 1.0, "drift_scale": 1.0, "stuck_at_zero_fraction": 0.0,
          "stuck_at_max_fraction": 0.0, "seed": 0}
SPELLED_OUT_DEVICE = {
    "ideal": {**_KNOBS, "preset": "ideal", "g_max_uS": 25.0, "programming_noise_uS": [0.0, 0.0, 0.0],
              "drift_t0_s": 20.0, "drift_nu_mean": [0.0, 0.0, 0.0, 0.0], "drift_nu_std": [0.0, 0.0, 0.0, 0.0],
              "read_noise_q": [0.0, 0.0, 0.0], "read_time_s": 2.5e-7},
    "pcm": {**_KNOBS, "preset": "pcm", "g_max_uS": 25.0, "programming_noise_uS": [0.26348, 1.9650, -1.1731],
            "drift_t0_s": 20.0, "drift_nu_mean": [-0.0155, 0.0244, 0.049, 0.1],
            "drift_nu_std": [-0.0125, -0.0059, 0.008, 0.045], "read_noise_q": [0.0088, 0.65, 0.2],
            "read_time_s": 2.5e-7},
    "nor_flash": {**_KNOBS, "preset": "nor_flash", "g_max_uS": 1.0, "programming_noise_uS": [0.005, 0.02, 0.0],
                  "drift_t0_s": 20.0, "drift_nu_mean": [0.0, 0.004, 0.004, 0.004],
                  "drift_nu_std": [0.0, 0.002, 0.002, 0.002], "read_noise_q": [0.00073, 0.0, 0.00073],
                  "read_time_s": 2.5e-7},
}


@pytest.mark.parametrize("preset", sorted(SPELLED_OUT_DEVICE))
def test_device_presets_compose_to_the_devices_they_spelled_out(preset, tmp_path):
    cfg = compose_run(["~experiment", f"device={preset}", f"paths.output_dir={tmp_path}"])
    assert build_device_config(cfg.device) == DeviceConfig(**SPELLED_OUT_DEVICE[preset])
    assert build_quant_config(cfg.quant, device=cfg.device).device.to_dict() == SPELLED_OUT_DEVICE[preset]


@pytest.mark.parametrize("preset", ["digital_int8_40nm", "nor_flash_40nm"])
def test_hardware_presets_compose_to_what_their_files_say(preset, tmp_path):
    """Typed by the schema, a preset gives what its YAML files give read as plain mappings."""
    cfg = compose_run([f"hardware={preset}", f"paths.output_dir={tmp_path}"])
    plain = yaml.safe_load((CONFIGS / "hardware" / f"{preset}.yaml").read_text())
    plain.pop("defaults")
    plain["digital"] = yaml.safe_load((CONFIGS / "hardware_digital_int8_40nm.yaml").read_text())
    assert build_hardware_config(cfg.hardware) == build_hardware_config(plain)
    assert build_hardware_config(cfg.hardware).to_dict() == build_hardware_config(plain).to_dict()


def test_hardware_from_a_mapping_names_a_missing_section_or_a_fractional_count(tmp_path):
    """The Python API (a mapping, no schema) keeps the checks the schema's types make at
    composition."""
    plain = build_hardware_config(compose_run([f"paths.output_dir={tmp_path}"]).hardware).to_dict()
    with pytest.raises(HardwareConfigError, match=r"^hardware\.digital: missing"):
        build_hardware_config({k: v for k, v in plain.items() if k != "digital"})
    plain["analog"]["tile_rows"] = 2.5
    with pytest.raises(HardwareConfigError, match=r"^hardware\.analog\.tile_rows: must be an integer >= 1"):
        build_hardware_config(plain)


@pytest.mark.parametrize("override, key", [
    ("hardware.analog.leakage_pJ=1", "hardware.analog.leakage_pJ"),
    ("hardware.nodes_nm=40", "hardware.nodes_nm"),
    ("device.t_inference=1", "device.t_inference"),
])
def test_an_unknown_hardware_or_device_key_fails_at_composition_naming_it(override, key, tmp_path):
    test_an_unknown_key_fails_at_composition_naming_it(override, key, tmp_path)


def test_a_wrong_type_fails_at_composition_naming_the_key(tmp_path):
    for override, key in (("hardware.analog.tile_rows=2.5", "hardware.analog.tile_rows"),
                          ("quant.adc.bits=six", "quant.adc.bits"), ("device.seed=x", "device.seed")):
        with pytest.raises(Exception) as info:
            compose_run([override, f"paths.output_dir={tmp_path}"])
        assert f"full_key: {key}" in str(info.value.__cause__)


def test_every_group_of_the_run_schema_is_typed():
    """No group is `Any`: the settings groups are schema dataclasses, the instantiation
    targets (keys per `_target_` class) mappings; inside `quant` only the free-form
    `layers` (keys are patterns) is `Any`, as jit/quant/schema.py says why."""
    hints = typing.get_type_hints(RunSchema)
    assert [name for name, hint in hints.items() if hint is Any] == []
    for name in ("data", "trainer", "logger", "callbacks"):
        assert typing.get_origin(hints[name]) is dict, name
    for name in ("model", "sampler", "quant", "device", "hardware", "calibration", "fid", "finetune"):
        assert dataclasses.is_dataclass(hints[name]), name
    for section in (QuantSchema, *SECTION_SCHEMAS.values(), DeviceSchema):
        untyped = [name for name, hint in typing.get_type_hints(section).items() if hint is Any]
        assert untyped == (["layers"] if section is QuantSchema else []), section


@pytest.mark.parametrize("preset, expected", [
    ("hybrid_w8a11", {"quant.act.bits": 11, "quant.act.percentile": 99.8, "quant.split.radix": 256,
                      "quant.adc.samples": 1}),
    ("bitserial_w8a10", {"quant.act.bits": 10, "quant.act.percentile": 99.5, "quant.split.radix": 16,
                         "quant.adc.samples": 2}),
])
def test_logged_hyperparameters_are_the_resolved_settings(preset, expected, tmp_path):
    """Dashboards filter on quant.act.bits and friends: the loggers get the scheme's values,
    not the schema's nulls."""
    from jit.builders import flat_hparams
    from jit.settings import parse_settings

    cfg = compose_run([f"quant={preset}", f"paths.output_dir={tmp_path}"])
    hparams = flat_hparams(cfg, parse_settings(cfg).quant)
    assert {key: hparams[key] for key in expected} == expected
    assert hparams["device.preset"] == "ideal" and "quant.device.preset" not in hparams
