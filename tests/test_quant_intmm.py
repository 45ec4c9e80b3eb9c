"""The INT8-kernel path of the quantized layers (jit/quant/intmm.py): base-128 digits,
exact products, and layer outputs identical to the float32 path in every scheme."""

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from jit.quant import (
    BitSerialLinear,
    HybridLinear,
    W8A8Linear,
    build_device_config,
    build_quant_config,
    intmm,
    plan,
    sample_context,
)

PCM = build_device_config(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" /
                                         "device" / "pcm.yaml"))

needs_kernel = pytest.mark.skipif(plan.any_exact_int8_backend() is None,
                                  reason="no exact INT8 kernel on this build/CPU")


def exact(backend: str) -> str:
    if not intmm.kernel_is_exact(backend):
        pytest.skip(f"INT8 backend {backend} is missing or not exact on this build/CPU")
    return backend


@pytest.fixture
def fresh_choice():
    """plan's cached kernel choice, recomputed inside the test and after it."""
    for cached in (plan.int8_backend, plan.any_exact_int8_backend):
        cached.cache_clear()
    yield
    for cached in (plan.int8_backend, plan.any_exact_int8_backend):
        cached.cache_clear()


@pytest.mark.parametrize("low,high,count", [(-128, 127, 1), (0, 124, 1), (-3, 3, 1),
                                            (-256, 255, 2), (-1024, 1023, 2),
                                            (-2**14, 2**14 - 1, 2), (-2**15, 2**15 - 1, 3),
                                            (-2**20, 2**20, 3)])
def test_digits_reconstruct_every_code_at_the_range_ends(low, high, count):
    assert intmm.digit_count(low, high) == count
    codes = torch.cat([torch.arange(low, min(low + 600, high + 1)),
                       torch.arange(max(high - 600, low), high + 1),
                       torch.randint(low, high + 1, (2000,))]).double()
    codes = codes.float() if max(-low, high) < 2**24 else codes
    digits = intmm.to_digits(codes.reshape(-1, 1), low, high)
    assert len(digits) == count and all(d.dtype == torch.int8 for d in digits)
    assert all(int(d.min()) >= 0 and int(d.max()) <= 127 for d in digits[:-1])
    rebuilt = sum(d.double() * 128**i for i, d in enumerate(digits)).reshape(-1)
    assert torch.equal(rebuilt, codes.double())


def test_exhaustive_int11_codes_reconstruct():
    codes = torch.arange(-1024, 1024).float().reshape(64, 32)
    digits = intmm.to_digits(codes, -1024, 1023)
    assert torch.equal(digits[0].float() + 128 * digits[1].float(), codes)


@pytest.mark.parametrize("backend", intmm.BACKENDS)
@pytest.mark.parametrize("tokens,inner,out_features", [(1, 5, 3), (37, 100, 53),
                                                       (300, 768, 96), (2100, 64, 700)])
@pytest.mark.parametrize("low,high", [(-256, 255), (-3, 3), (-1024, 1023), (0, 124)])
def test_int8_linear_is_exact(backend, tokens, inner, out_features, low, high):
    gen = torch.Generator().manual_seed(tokens + inner + low)
    codes = torch.randint(low, high + 1, (tokens, inner), generator=gen).float()
    w_t = torch.randint(-128, 128, (inner, out_features), generator=gen).float()
    weights = intmm.Int8Weights(w_t, exact(backend))
    digits = intmm.to_digits(codes, low, high)
    out = torch.full((tokens, out_features), float("nan"))
    intmm.int8_linear(digits, weights, slice(None), out)
    assert torch.equal(out, codes @ w_t)
    rows = slice(inner // 3, inner)  # a tile of input rows
    intmm.int8_linear([d[:, rows] for d in digits], weights, rows, out)
    assert torch.equal(out, codes[:, rows] @ w_t[rows])


@needs_kernel
def test_int8_path_is_refused_where_it_could_not_be_exact():
    cpu = torch.device("cpu")
    assert plan.use_int8(-256, 255, 2048, 8, cpu, torch.float32, True)
    assert not plan.use_int8(-256, 255, 2048, 8, cpu, torch.float64, True)  # float64 inputs
    assert not plan.use_int8(-256, 255, 2048, 9, cpu, torch.float32, True)  # INT9 weights
    assert not plan.use_int8(-2**15, 2**15 - 1, 2**10, 8, cpu, torch.float32, True)  # INT32 sums
    assert not plan.use_int8(-256, 255, 2048, 8, torch.device("meta"), torch.float32, True)
    assert not plan.use_int8(-256, 255, 2048, 8, cpu, torch.float32, False)


@pytest.mark.parametrize("flags,exact_backends,chosen", [
    ({"avx2", "avx512_vnni", "amx_int8"}, {"int_mm", "onednn"}, "onednn"),
    ({"avx2", "avx512_vnni"}, {"int_mm", "onednn"}, "int_mm"),
    ({"avx2"}, {"int_mm", "onednn"}, None),  # no INT8 units: float32 is faster
    ({"avx2", "avx512_vnni", "amx_int8"}, {"int_mm"}, "int_mm"),  # oneDNN not exact here
    ({"avx2", "avx512_vnni"}, set(), None),
])
def test_int8_kernel_is_chosen_by_cpu_not_by_timing(monkeypatch, fresh_choice, flags,
                                                      exact_backends, chosen):
    cpu = torch.device("cpu")
    monkeypatch.setattr(plan, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(intmm, "kernel_is_exact", lambda backend: backend in exact_backends)
    assert plan.use_int8(-256, 255, 2048, 8, cpu, torch.float32, None) == chosen
    if exact_backends:
        assert plan.use_int8(-256, 255, 2048, 8, cpu, torch.float32, True) in exact_backends
    else:
        with pytest.raises(RuntimeError, match="int8_matmul=True"):
            plan.use_int8(-256, 255, 2048, 8, cpu, torch.float32, True)


def _layer(cls, cfg, in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    return cls.from_linear(lin, build_quant_config({"scheme": cls.scheme, **cfg}), "blocks.3.mlp.w3")


CASES = [
    (HybridLinear, {}),
    (HybridLinear, {"adc": {"bypass": True}}),
    (HybridLinear, {"adc": {"tile_rows": 48, "noise_sigma_lsb": 4.0, "samples": 3}}),
    (HybridLinear, {"weight": {"granularity": "channel"}, "act": {"bits": 12},
                    "split": {"lsb_bits": 10, "radix": 512}}),
    (HybridLinear, {"act": {"bits": 10}, "split": {"lsb_bits": 8, "radix": 256}}),
    (BitSerialLinear, {}),
    (BitSerialLinear, {"act": {"bits": 10}, "split": {"lsb_bits": 4}, "adc": {"tile_rows": 40}}),
    (W8A8Linear, {}),
]


@pytest.mark.parametrize("backend", intmm.BACKENDS)
@pytest.mark.parametrize("cls,cfg", CASES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_layer_output_is_the_same_on_every_kernel(monkeypatch, backend, cls, cfg, mode):
    monkeypatch.setattr(plan, "any_exact_int8_backend", lambda: exact(backend))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, 150, generator=gen) / torch.rand(3, 70, 150, generator=gen).add_(0.05)
    outputs = []
    for kernel in (False, True):
        layer = _layer(cls, dict(cfg, mode=mode), 150, 200, bias=cls is not W8A8Linear)
        layer.int8_matmul = kernel
        if mode == "static":
            clips = {p: 3e3 for p in layer.adc_paths}
            layer.set_static(act_clip=8.0, adc_clip=clips or None)
        with torch.no_grad():
            outputs.append(torch.cat([layer(x), layer(x[:1])]))  # noise advances per call
        int8 = layer._weight_cache[1].int8  # the kernel really ran
        assert (int8.backend if int8 is not None else None) == (backend if kernel else None)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("backend", intmm.BACKENDS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_programmed_arrays_leave_the_digital_product_on_the_int8_kernel(monkeypatch, backend,
                                                                         mode):
    """Programmed PCM arrays (drift, read noise) compute with read-back weights, so the
    analog product stays on float32; the hybrid's exact digital MSB product still takes
    the INT8 kernel, with the same output as all on float32."""
    monkeypatch.setattr(plan, "any_exact_int8_backend", lambda: exact(backend))
    dev = dataclasses.replace(PCM, t_inference_s=86400.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, 150, generator=gen) / torch.rand(3, 70, 150, generator=gen).add_(0.05)
    calls = []
    original = intmm.int8_linear

    def counted(digits, weights, rows, out):
        calls.append(len(digits))
        original(digits, weights, rows, out)

    outputs = []
    for kernel in (False, True):
        torch.manual_seed(0)
        cfg = build_quant_config({"scheme": "hybrid", "mode": mode,
                                  "adc": {"noise_sigma_lsb": 2.0}}, device=dev)
        layer = HybridLinear.from_linear(nn.Linear(150, 200), cfg, "blocks.3.mlp.w3")
        layer.int8_matmul = kernel
        if mode == "static":
            layer.set_static(act_clip=8.0, adc_clip={"lsb": 3e3})
        monkeypatch.setattr("jit.quant.engine.int8_linear", counted)
        with torch.no_grad(), sample_context(layer, range(3)):
            outputs.append(layer(x))
        int8 = layer._weight_cache[1].int8
        assert (int8.backend if int8 is not None else None) == (backend if kernel else None)
    assert calls and set(calls) == {1}  # the one-digit MSB slice alone, not the 9-bit LSB
    assert torch.equal(outputs[0], outputs[1])


@needs_kernel
def test_packed_weights_follow_weight_updates():
    """Training updates the weight in place: the next forward must use the new codes."""
    x = torch.randn(16, 64)
    results = {}
    for kernel in (False, True):
        layer = _layer(HybridLinear, {"adc": {"bypass": True}}, 64, 32)
        layer.int8_matmul = kernel
        with torch.no_grad():
            before = layer(x)
            layer.weight.mul_(-0.5)
            results[kernel] = (before, layer(x))
    assert not torch.equal(results[True][0], results[True][1])
    assert torch.equal(results[True][1], results[False][1])
