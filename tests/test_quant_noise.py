"""Stateless thermal noise (jit/quant/noise.py) and quant.dynamic_scope at the layer level:
a sample's output does not depend on the batch around it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from jit.quant import (
    SAMPLE_ID_BOUND,
    BitSerialLinear,
    HybridLinear,
    build_quant_config,
    percentile_abs,
    reseed,
    sample_context,
)


def make(cls, mode="dynamic", name="blocks.0.mlp.w12", **cfg):
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 40), build_quant_config(
        {"scheme": cls.scheme, "mode": mode, "adc": {"noise_sigma_lsb": 3.0}, **cfg}), name)
    if mode == "static":
        x = torch.randn(8, 20, 64)
        clips = dict.fromkeys(layer.adc_paths, 4000.0)
        layer.set_static(float(percentile_abs(x, 99.8)), clips)
    return layer


def batch(samples=8, tokens=20):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(samples, tokens, 64, generator=gen) * torch.rand(
        samples, 1, 1, generator=gen).mul(4).add(0.5)  # samples of different ranges


@pytest.mark.parametrize("cls", [HybridLinear, BitSerialLinear])
@pytest.mark.parametrize("mode,scope", [("static", "sample"), ("dynamic", "sample"),
                                        ("dynamic", "token")])
def test_a_sample_alone_equals_the_same_sample_in_a_batch(cls, mode, scope):
    layer = make(cls, mode, dynamic_scope=scope)
    x = batch()
    with torch.no_grad(), sample_context(layer, range(100, 108)):
        together = [layer(x) for _ in range(2)]  # two calls: call indices 0 and 1
    for row in (0, 3, 7):
        with torch.no_grad(), sample_context(layer, [100 + row]):
            alone = [layer(x[row:row + 1]) for _ in range(2)]
        for call in range(2):
            assert torch.equal(alone[call][0], together[call][row])
    assert not torch.equal(together[0], together[1])  # noise differs across calls


def test_batch_scope_depends_on_the_batch_and_sample_scope_does_not():
    x = batch()
    outs = {}
    for scope in ("batch", "sample"):
        layer = make(HybridLinear, adc={"noise_sigma_lsb": 0.0}, dynamic_scope=scope)
        with torch.no_grad():
            outs[scope] = (layer(x)[2], layer(x[2:3])[0])
    assert torch.equal(*outs["sample"]) and not torch.equal(*outs["batch"])


def test_noise_differs_across_samples_and_depends_only_on_the_keys():
    layer = make(HybridLinear, "static")
    x = batch(4).mean(0, keepdim=True).expand(4, -1, -1).contiguous()  # one input, 4 ids
    with torch.no_grad():
        with sample_context(layer, [5, 6, 7, 8]):
            y = layer(x)
        assert not torch.equal(y[0], y[1])
        with sample_context(layer, [8, 7, 6, 5]):  # order and position do not matter
            assert torch.equal(layer(x).flip(0), y)
        reseed(layer, 1)
        with sample_context(layer, [5, 6, 7, 8]):
            assert not torch.equal(layer(x), y)


def test_a_long_sample_is_drawn_alike_in_any_batch():
    """Several row blocks per sample (tokens x out > CHUNK_ELEMENTS) and per batch."""
    torch.manual_seed(0)
    layer = HybridLinear.from_linear(nn.Linear(16, 512), build_quant_config(
        {"scheme": "hybrid", "mode": "static"}), "w")
    layer.set_static(3.0, 800.0)
    x = torch.randn(3, 700, 16)
    with torch.no_grad():
        with sample_context(layer, [0, 1, 2]):
            together = layer(x)
        with sample_context(layer, [1]):
            assert torch.equal(layer(x[1:2])[0], together[1])


def test_call_index_counts_forwards_of_the_context_module():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = make(HybridLinear, "static")

        def forward(self, x):
            return self.w(x), self.w(x)  # two uses of one layer in one call: distinct noise

    net, x = Twice(), batch(2)
    with torch.no_grad(), sample_context(net, [0, 1]):
        first, second = net(x)
        third, _ = net(x)
    assert not torch.equal(first, second) and not torch.equal(first, third)
    with torch.no_grad(), sample_context(net, [0, 1]):
        assert torch.equal(net(x)[0], first)  # a new context starts at call 0


def test_default_outside_a_context_is_row_index_and_noisy_call_count():
    layer, x = make(HybridLinear, "static"), batch(2)
    with torch.no_grad():
        a, b = layer(x), layer(x)
        reseed(layer, 0)
        assert torch.equal(layer(x), a) and not torch.equal(a, b)
        with sample_context(layer, [0, 1]):
            assert not torch.equal(layer(x), a)  # context keys differ from the default


@pytest.mark.parametrize("ids,message", [
    ([0, 1, 2], (r"layer 'blocks\.3\.mlp\.w3': called with a batch of 2 samples inside a "
                 r"sample_context of 3")),
    ([-1, 0], r"layer 'blocks\.3\.mlp\.w3': sample ids must lie in \[0, "),
    ([0, SAMPLE_ID_BOUND], r"layer 'blocks\.3\.mlp\.w3': sample ids must lie in \[0, "),
])
def test_bad_sample_ids_name_the_layer(ids, message):
    layer = make(HybridLinear, "static", name="blocks.3.mlp.w3")
    with pytest.raises(ValueError, match=message), sample_context(layer, ids):
        layer(batch(2))


def test_unknown_dynamic_scope_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^quant\.dynamic_scope must be one of token, sample, "
                                         r"batch, got 'image'$"):
        build_quant_config({"dynamic_scope": "image"})


class _CountingExecutor:
    """A plan.noise_helper executor that counts the draws handed to it."""

    def __init__(self, executor):
        self.executor, self.submitted = executor, 0

    def submit(self, *args):
        self.submitted += 1
        return self.executor.submit(*args)


def test_noise_drawn_beside_the_helper_thread_equals_the_serial_draw(monkeypatch):
    """Samples are shared between the calling and the helper thread per round; rounds
    here cut samples in two, so a sample's rest is drawn in the next round, by the
    generator that drew its start."""
    from jit.quant import engine, plan

    monkeypatch.setattr(plan, "NOISE_ROUND_ELEMENTS", 4 * plan.CHUNK_ELEMENTS)
    torch.manual_seed(0)
    layer = HybridLinear.from_linear(nn.Linear(16, 512), build_quant_config(
        {"scheme": "hybrid", "mode": "static", "adc": {"noise_sigma_lsb": 3.0}}), "w")
    layer.set_static(3.0, 800.0)
    x = torch.randn(5, 700, 16)  # 700 x 512: 2.7 row blocks per sample
    counting = []

    def helper(device):
        found = plan.noise_helper(device)
        if found is None:
            return None
        counting.append(_CountingExecutor(found[0]))
        return counting[-1], found[1]

    monkeypatch.setattr(engine, "noise_helper", helper)
    outputs = []
    with torch.no_grad():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with sample_context(layer, [3, 1, 4, 15, 9]):
                outputs.append(layer(x))
    assert len(counting) == 1 and counting[0].submitted >= 3  # rounds drawn by two threads
    assert torch.equal(*outputs)
    with torch.no_grad(), sample_context(layer, [4]):
        assert torch.equal(layer(x[2:3])[0], outputs[1][2])
    # Lightning's evaluation runs in inference mode, which the helper thread enters too.
    with torch.inference_mode(), sample_context(layer, [3, 1, 4, 15, 9]):
        assert torch.equal(layer(x), outputs[0])
    assert counting[-1].submitted >= 3


def test_vectorised_keys_equal_the_scalar_mix():
    """noise_keys (whole-tensor ops per call) gives noise_key's integers, also for negative
    bases and 64-bit parts, whichever argument carries the per-sample sequence."""
    import random

    from jit.quant.noise import noise_key, noise_keys

    rng = random.Random(0)
    for _ in range(100):
        base = rng.getrandbits(64) - (rng.getrandbits(1) << 63)
        ids = [rng.getrandbits(48) for _ in range(rng.randint(0, 7))]
        path, tile = rng.getrandbits(64), rng.getrandbits(10)
        assert noise_keys(base, ids) == [noise_key(base, i) for i in ids]
        assert noise_keys(ids, path, tile) == [noise_key(i, path, tile) for i in ids]
        assert noise_keys([base, -1, *ids], tile) == [noise_key(k, tile) for k in [base, -1, *ids]]
    assert noise_keys(7, range(3)) == [noise_key(7, i) for i in range(3)]


def _compiled_draw_possible() -> bool:
    """What native_noise needs: a C++ compiler, AVX2 and FMA, torch's AVX2-or-later kernels."""
    import shutil

    from jit.quant.plan import cpu_flags

    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    return (compiler is not None and {"avx2", "fma"} <= cpu_flags()
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def test_the_compiled_draw_is_used_where_possible_and_draws_torchs_values():
    """native_noise draws what Tensor.normal_ draws with a re-seeded generator: random
    keys (both halves of 64 bits), sizes on and off multiples of 16, streams continued
    over segments of one call."""
    import random

    from jit.quant import native_noise

    if not _compiled_draw_possible():
        pytest.skip("no C++ compiler, AVX2/FMA or AVX2 kernels of torch on this machine")
    assert native_noise.available()
    rng = random.Random(1)
    stream, generator = native_noise.Stream(), torch.Generator()
    for _ in range(40):
        sizes = [rng.randint(16, 3000) for _ in range(rng.randint(1, 4))]
        key, std = rng.getrandbits(63), rng.uniform(0.1, 5.0)
        generator.manual_seed(key)
        expected = torch.cat([torch.empty(n).normal_(0.0, std, generator=generator)
                              for n in sizes])
        out = torch.empty(sum(sizes))
        stream.draw(out, sizes, [key] + [None] * (len(sizes) - 1), std)
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="contiguous float32"):
        stream.draw(torch.empty(10, dtype=torch.float64), [16], [1], 1.0)
    with pytest.raises(ValueError, match="at least 16 values"):
        stream.draw(torch.empty(40), [20, 15], [1, None], 1.0)


@pytest.mark.parametrize("device_config", [None, "pcm"])
@pytest.mark.parametrize("threads", [1, 2])
def test_layers_give_the_same_outputs_with_the_compiled_and_torchs_draw(
        monkeypatch, device_config, threads):
    """Long samples (several segments, continued across rounds of the helper thread),
    thermal noise alone or with the devices' per-element read noise."""
    from omegaconf import OmegaConf

    from jit.quant import build_device_config, native_noise, plan

    if not _compiled_draw_possible():
        pytest.skip("no C++ compiler, AVX2/FMA or AVX2 kernels of torch on this machine")
    monkeypatch.setattr(plan, "NOISE_ROUND_ELEMENTS", 4 * plan.CHUNK_ELEMENTS)
    device = None
    if device_config:
        configs = Path(__file__).resolve().parents[1] / "configs" / "device"
        device = build_device_config(OmegaConf.load(configs / f"{device_config}.yaml"))
    torch.manual_seed(0)
    layer = HybridLinear.from_linear(nn.Linear(16, 512), build_quant_config(
        {"scheme": "hybrid", "mode": "static", "adc": {"noise_sigma_lsb": 3.0}},
        device=device), "w")
    layer.set_static(3.0, 800.0)
    x = torch.randn(5, 700, 16)  # 700 x 512: 2.7 row blocks per sample
    draws = []
    original_draw = native_noise.Stream.draw

    def counted_draw(self, *args):
        draws.append(args[2])  # the keys
        return original_draw(self, *args)

    monkeypatch.setattr(native_noise.Stream, "draw", counted_draw)
    outputs, calls = [], []
    torch.set_num_threads(threads)
    try:
        for compiled in (True, False):
            if not compiled:
                monkeypatch.setattr(native_noise, "available", lambda: False)
            with torch.no_grad(), sample_context(layer, [3, 1, 4, 15, 9]):
                outputs.append(layer(x))
            calls.append(len(draws))
    finally:
        torch.set_num_threads(2)
    assert torch.equal(*outputs)
    assert calls[0] >= 2 and calls[1] == calls[0]  # the kernel drew the first run only
    assert any(None in keys for keys in draws)  # some segments continued a stream
