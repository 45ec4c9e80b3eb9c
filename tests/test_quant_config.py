"""quant config: presets, scheme defaults, DictConfig input and every bad value."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from jit.quant import QuantConfig, build_quant_config

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "quant"


def test_presets_load_as_yaml_and_as_dictconfig():
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert names == ["bitserial_w8a10", "bitserial_w8a12", "fp", "hybrid_w8a11", "w8a8"]
    for path in PRESETS.glob("*.yaml"):
        plain = build_quant_config(yaml.safe_load(path.read_text()))
        assert build_quant_config(OmegaConf.load(path)) == plain


def test_preset_values_match_the_issue():
    hybrid = build_quant_config(yaml.safe_load((PRESETS / "hybrid_w8a11.yaml").read_text()))
    assert (hybrid.weight.bits, hybrid.act.bits, hybrid.act.percentile) == (8, 11, 99.8)
    assert (hybrid.split.lsb_bits, hybrid.split.radix) == (9, 256)
    assert (hybrid.adc.bits, hybrid.adc.noise_sigma_lsb, hybrid.adc.samples) == (10, 2.0, 1)
    seed12 = build_quant_config(yaml.safe_load((PRESETS / "bitserial_w8a12.yaml").read_text()))
    assert (seed12.act.bits, seed12.split.lsb_bits, seed12.split.lsb_gain_shift) == (12, 5, 2)
    assert (seed12.adc.samples, seed12.adc.bits, seed12.act.percentile) == (2, 10, 99.5)
    seed10 = build_quant_config(yaml.safe_load((PRESETS / "bitserial_w8a10.yaml").read_text()))
    assert (seed10.act.bits, seed10.split.lsb_bits) == (10, 4)


def test_missing_fields_take_the_scheme_defaults():
    bs = build_quant_config({"scheme": "bitserial", "adc": {"bits": 9}})
    assert (bs.act.bits, bs.act.percentile, bs.split.lsb_bits) == (12, 99.5, 5)
    assert (bs.split.lsb_gain_shift, bs.split.radix, bs.adc.samples, bs.adc.bits) == (2, 32, 2, 9)
    assert build_quant_config({"scheme": "bitserial", "split": {"lsb_bits": 4}}).split.radix == 16
    hy = build_quant_config({"scheme": "hybrid"})
    assert (hy.act.bits, hy.split.lsb_bits, hy.split.radix, hy.act.percentile) == (11, 9, 256, 99.8)
    assert (hy.adc.bits, hy.adc.noise_sigma_lsb, hy.adc.samples) == (10, 2.0, 1)
    assert hy.targets == ("blocks.*.mlp.w12", "blocks.*.mlp.w3")
    assert build_quant_config(None) == QuantConfig()
    assert QuantConfig(scheme="bitserial").act.bits == 12
    assert build_quant_config(hy) is hy
    assert build_quant_config({"calibration_file": "x.pt"}).calibration_file == "x.pt"


BAD = [
    ({"scheme": "analog"}, r"quant\.scheme must be one of fp, w8a8, hybrid, bitserial"),
    ({"mode": "sometimes"}, r"quant\.mode must be one of dynamic, static"),
    ({"weight": {"bits": 1}}, r"quant\.weight\.bits must be an integer in \[2, 16\], got 1"),
    ({"act": {"bits": 17}}, r"quant\.act\.bits must be an integer in \[2, 16\], got 17"),
    ({"adc": {"bits": 0}}, r"quant\.adc\.bits must be an integer in \[2, 16\], got 0"),
    ({"adc": {"bits": 10.5}}, r"quant\.adc\.bits must be an integer"),
    ({"split": {"lsb_bits": 11}}, r"quant\.split\.lsb_bits must be < quant\.act\.bits=11"),
    ({"split": {"radix": 200}}, r"quant\.split\.radix must be a power of two, got 200"),
    ({"split": {"radix": 1024}}, (r"quant\.split\.radix must be a power of two in \[2, 2\*\*quant"
                                  r"\.split\.lsb_bits=512\], got 1024")),
    ({"scheme": "bitserial", "split": {"radix": 16}}, r"quant\.split\.radix must be 2\*\*quant"),
    ({"split": {"lsb_gain_shift": 2}}, r"quant\.split\.lsb_gain_shift must be 0 unless"),
    ({"split": {"lsb_gain_shift": -1}}, r"quant\.split\.lsb_gain_shift must be an integer in \[0, 8\]"),
    ({"adc": {"samples": 0}}, r"quant\.adc\.samples must be an integer >= 1, got 0"),
    ({"adc": {"noise_sigma_lsb": -0.5}}, r"quant\.adc\.noise_sigma_lsb must be a number >= 0"),
    ({"adc": {"noise_sigma_lsb": float("nan")}}, r"quant\.adc\.noise_sigma_lsb must be a finite"),
    ({"act": {"percentile": 0}}, r"quant\.act\.percentile must be a percentile in \(0, 100\]"),
    ({"act": {"percentile": 100.5}}, r"quant\.act\.percentile must be a percentile in \(0, 100\]"),
    ({"weight": {"clip_pct": -3}}, r"quant\.weight\.clip_pct must be a percentile in \(0, 100\]"),
    ({"weight": {"granularity": "row"}}, r"quant\.weight\.granularity must be one of tensor, channel"),
    ({"adc": {"tile_rows": 0}}, r"quant\.adc\.tile_rows must be an integer >= 1, got 0"),
    ({"adc": {"bypass": "yes"}}, r"quant\.adc\.bypass must be true or false"),
    ({"targets": []}, r"quant\.targets must be a non-empty list of glob patterns"),
    ({"seed": -1}, r"quant\.seed must be an integer >= 0"),
    ({"adc": {"bitz": 10}}, r"quant\.adc\.bitz is not a known field \(known: bits, bypass"),
    ({"foo": 1}, r"quant\.foo is not a known field"),
    ({"adc": 10}, r"quant\.adc must be a mapping"),
]


@pytest.mark.parametrize("cfg,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_name_the_field_and_range(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_quant_config(cfg)


def test_dataclass_rejects_bad_values_too():
    with pytest.raises(ValueError, match=r"quant\.adc\.samples"):
        build_quant_config({"adc": {"samples": 0}})
    with pytest.raises(ValueError, match=r"quant\.split\.lsb_bits must be < quant\.act\.bits"):
        QuantConfig(scheme="hybrid", act=QuantConfig().act.__class__(bits=9))
