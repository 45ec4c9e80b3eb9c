"""quantize_model on any nn.Module, strict state-dict compatibility, statistics, observer."""

import pytest
import torch
from torch import nn

from jit.quant import (
    BitSerialLinear,
    HybridLinear,
    W8A8Linear,
    collect_stats,
    enable_stats,
    noise_disabled,
    quantize_model,
    quantized_layers,
    reseed,
    reset_stats,
)


class Mlp(nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(a) * b)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = Mlp()

    def forward(self, x):
        return x + self.mlp(x + self.attn(x))


class Net(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("scheme,cls", [("hybrid", HybridLinear), ("bitserial", BitSerialLinear),
                                        ("w8a8", W8A8Linear)])
def test_quantize_model_replaces_targets_and_keeps_the_state_dict(scheme, cls):
    net = Net()
    before = net.state_dict()
    names = quantize_model(net, {"scheme": scheme})
    assert names == ["blocks.0.mlp.w12", "blocks.0.mlp.w3", "blocks.1.mlp.w12", "blocks.1.mlp.w3"]
    assert all(isinstance(net.get_submodule(n), cls) for n in names)
    assert type(net.blocks[0].attn) is nn.Linear and type(net.head) is nn.Linear
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = Net()
    quantize_model(fresh, {"scheme": scheme})
    fresh.load_state_dict(before, strict=True)
    Net().load_state_dict(after, strict=True)
    with torch.no_grad():
        y = net(torch.randn(2, 5, 32))
    assert torch.isfinite(y).all()
    assert list(quantized_layers(net)) == names
    assert quantized_layers(net)["blocks.1.mlp.w3"].layer_name == "blocks.1.mlp.w3"


def test_weights_reload_invalidates_the_weight_cache():
    net = Net()
    quantize_model(net, {"scheme": "w8a8"})
    x = torch.randn(3, 32)
    layer = net.blocks[0].mlp.w12
    with torch.no_grad():
        y0 = layer(x)
        state = {k: v * 2 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        y1 = layer(x)
    assert not torch.allclose(y0, y1)


def test_fp_replaces_nothing_but_checks_targets():
    net = Net()
    assert quantize_model(net, {"scheme": "fp"}) == []
    assert not quantized_layers(net)
    with pytest.raises(ValueError, match=r"pattern 'nope\.\*' matches no nn\.Linear module "
                                         r"\(available: blocks\.0\.attn, blocks\.0\.mlp\.w12"):
        quantize_model(net, {"scheme": "fp", "targets": ["nope.*"]})


def test_pattern_matching_nothing_lists_available_names():
    with pytest.raises(ValueError, match=r"quant\.targets pattern 'blocks\.\*\.ffn' matches no "
                                         r"nn\.Linear module \(available: blocks\.0\.attn"):
        quantize_model(Net(), {"targets": ["blocks.*.mlp.w12", "blocks.*.ffn"]})


def test_custom_targets_and_dictconfig():
    from omegaconf import OmegaConf

    net = Net()
    cfg = OmegaConf.create({"scheme": "hybrid", "targets": ["head", "blocks.1.attn"]})
    assert quantize_model(net, cfg) == ["blocks.1.attn", "head"]


def test_statistics_table():
    net = Net()
    quantize_model(net, {"scheme": "hybrid", "adc": {"noise_sigma_lsb": 1.0}})
    x = torch.randn(4, 16, 32) * 3
    with torch.no_grad():
        net(x)
    assert collect_stats(net) == []  # off by default
    assert all(layer.stats is None for layer in quantized_layers(net).values())
    enable_stats(net)
    with torch.no_grad():
        net(x)
        net(x)
    rows = collect_stats(net)
    assert [r["layer"] for r in rows] == list(quantized_layers(net))
    for row in rows:
        assert row["calls"] == 2 and row["scheme"] == "hybrid"
        assert 0 <= row["msb_density"] <= 1
        assert row["msb_density"] + row["lsb_range_coverage"] == pytest.approx(1.0)
        assert 0 < row["int8_range_coverage"] <= 1
        assert 0 < row["act_clip_rate"] < 0.01  # 99.8th percentile clip
        assert 0 <= row["adc_saturation_rate"] < 0.01
        assert 5 < row["sqnr_db"] < 80
        layer = quantized_layers(net)[row["layer"]]
        assert row["analog_macs"] == 2 * 64 * layer.in_features * layer.out_features
        assert row["digital_macs"] == pytest.approx(
            row["msb_density"] * 2 * 64 * layer.in_features * layer.out_features)
    reset_stats(net)
    assert all(r["calls"] == 0 for r in collect_stats(net))
    enable_stats(net, False)
    assert collect_stats(net) == []


def test_statistics_of_bitserial_and_w8a8():
    for scheme in ("bitserial", "w8a8"):
        net = Net()
        quantize_model(net, {"scheme": scheme})
        enable_stats(net)
        with torch.no_grad():
            net(torch.randn(2, 8, 32))
        row = collect_stats(net)[0]
        if scheme == "w8a8":
            assert row["msb_density"] is None and row["adc_saturation_rate"] is None
            assert row["analog_macs"] == 0 and row["digital_macs"] == 16 * 32 * 128
        else:
            assert row["analog_macs"] == 3 * 16 * 32 * 128  # MSB read twice + LSB once
            assert row["digital_macs"] == 0 and row["adc_saturation_rate"] is not None


def test_observer_sees_activations_and_each_tile():
    net = Net()
    quantize_model(net, {"scheme": "bitserial", "adc": {"tile_rows": 20}})
    seen = []
    for layer in quantized_layers(net).values():
        layer.observer = lambda name, kind, t: seen.append((name, kind, tuple(t.shape)))
    with torch.no_grad():
        net(torch.randn(2, 3, 32))
    w12 = [s for s in seen if s[0] == "blocks.0.mlp.w12"]
    assert w12 == [("blocks.0.mlp.w12", "act", (2, 3, 32))] + [
        ("blocks.0.mlp.w12", kind, (6, 128)) for kind in ("adc.msb",) * 2 + ("adc.lsb",) * 2]


def test_model_wide_reseed_and_noise_switch():
    net = Net()
    quantize_model(net, {"scheme": "hybrid", "adc": {"noise_sigma_lsb": 4.0}})
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        reseed(net, 3)
        a = net(x)
        reseed(net, 3)
        b = net(x)
        with noise_disabled(net):
            c = net(x)
            d = net(x)
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c)
    assert all(layer.cfg.adc.noise_sigma_lsb == 4.0 for layer in quantized_layers(net).values())
    assert all(layer.cfg.seed == 3 for layer in quantized_layers(net).values())


def test_deepcopy_of_a_quantized_model():
    import copy

    net = Net()
    quantize_model(net, {"scheme": "hybrid"})
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        net(x)
        twin = copy.deepcopy(net)
        reseed(net, 0)
        assert torch.equal(twin(x), net(x))
