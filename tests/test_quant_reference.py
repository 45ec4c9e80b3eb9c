"""The executable specification (jit/quant/reference.py) and the compiled path.

- The fast layers equal the whole-tensor reference bitwise with the noise off, over the
  schemes, modes, dynamic scopes, tiles, weight granularities and dtypes.
- The reference's counter-based noise: a pure function of (layer, sample, call), standard
  normal, with the analog error variance of docs/design.md.
- torch.compile (Inductor on the CPU; skipped without a C++ compiler): a compiled layer and
  a compiled backbone trace in one graph (fullgraph=True) and equal the eager reference up
  to float rounding, which is far below one ADC code.
"""

import itertools
import math

import pytest
import torch
from scipy import stats as scipy_stats
from test_quant_execution import layer_for
from test_quant_layers import heavy_tailed

from jit.models import build_jit
from jit.models.compile import compile_available, compiled_forward
from jit.quant import adc_bypassed, quantize_model, quantized_layers, reference, sample_context
from jit.quant.layers import QuantLinear
from jit.quant.noise import mix_keys, noise_key
from jit.quant.quantizers import percentile_abs

GRID = [
    (scheme, mode, scope, tiles, granularity)
    for scheme, mode, scope, tiles, granularity in itertools.product(
        ["hybrid", "bitserial", "w8a8"], ["dynamic", "static"], ["sample", "token", "batch"],
        [None, 16], ["tensor", "channel"])
    if not (mode == "static" and scope != "sample")
]


def _layer(scheme, mode="dynamic", scope="sample", tiles=None, granularity="tensor",
           noise=0.0, x=None, bias=True, **extra):
    layer = layer_for(scheme, 64, 96, mode=mode, dynamic_scope=scope,
                      adc={"noise_sigma_lsb": noise, "tile_rows": tiles, **extra.pop("adc", {})},
                      weight={"granularity": granularity}, **extra)
    if not bias:
        layer.bias = None
    if mode == "static":
        layer.set_static(float(x.abs().max()) * 0.5,
                         {path: 3e3 for path in layer.adc_paths} or None)
    return layer


@pytest.fixture
def reference_forward(monkeypatch):
    """Quantized layers run reference.py eagerly (as they do when traced)."""
    monkeypatch.setattr(QuantLinear, "forward", QuantLinear._reference_forward)
    return monkeypatch


def _both(layer, x):
    with torch.no_grad():
        return layer(x), layer._reference_forward(x)


@pytest.mark.parametrize("scheme,mode,scope,tiles,granularity", GRID)
def test_fast_layer_equals_the_reference_bitwise_without_noise(scheme, mode, scope, tiles,
                                                                granularity):
    x = heavy_tailed(5, 7, 64, seed=1).clamp(-60, 60)
    fast, ref = _both(_layer(scheme, mode, scope, tiles, granularity, x=x), x)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("scheme", ["hybrid", "bitserial", "w8a8"])
@pytest.mark.parametrize("case", ["float64", "no bias", "2-D input", "bypass", "clip_pct",
                                  "imported weights", "percentile 100", "large"])
def test_fast_layer_equals_the_reference_in_every_variant(scheme, case):
    x = heavy_tailed(3, 9, 64, seed=2)
    options = {"x": x}
    if case == "float64":
        x = options["x"] = x.double()
    elif case == "no bias":
        options["bias"] = False
    elif case == "2-D input":
        x = options["x"] = x[0]
    elif case == "bypass":
        options["adc"] = {"bypass": True}
    elif case == "clip_pct":
        options["weight"] = {"clip_pct": 99.0}
    elif case == "percentile 100":
        options["act"] = {"percentile": 100.0}
    elif case == "large":  # several CPU row blocks, the INT8 digit kernel, sparse MSB columns
        x = options["x"] = heavy_tailed(4, 700, 64, seed=3)
    mode = "static" if case == "imported weights" else "dynamic"
    if "weight" in options:
        layer = layer_for(scheme, 64, 96, mode=mode, weight=options.pop("weight"),
                          adc={"noise_sigma_lsb": 0.0})
    else:
        layer = _layer(scheme, mode, **options)
    if case == "imported weights":
        codes = torch.randint(-128, 128, (96, 64))
        layer.set_static(3.0, {p: 2e3 for p in layer.adc_paths} or None, weight_int=codes,
                         weight_scale=torch.rand(96) * 0.01 + 1e-3)
    fast, ref = _both(layer, x)
    assert fast.dtype == ref.dtype == x.dtype
    assert torch.equal(fast, ref)


def test_reference_formulas_read_as_design():
    codes = torch.arange(-1024, 1024, dtype=torch.float32)
    lsb, msb = reference.center_out_split(codes, 9, 256)
    assert torch.equal(256 * msb + lsb, codes)
    assert lsb.min() >= -256 and lsb.max() <= 255
    assert torch.equal(msb == 0, (codes >= -256) & (codes <= 255))  # maximal MSB sparsity
    assert set(msb.unique().tolist()) <= set(range(-3, 4))
    lsb, msb = reference.bitserial_split(codes, 5, 2)
    assert torch.equal(2**5 * msb + lsb / 4, codes)
    assert lsb.min() >= 0 and lsb.max() <= 31 * 4
    a = torch.tensor([-5000.0, -1.4, 0.6, 3000.0])
    assert reference.adc(a, 2.0, 4, None).tolist() == [-8.0, -1.0, 0.0, 7.0]


# ----- counter-based noise ----------------------------------------------------------------

def test_int64_key_mixing_equals_the_host_splitmix():
    gen = torch.Generator().manual_seed(0)
    keys = [int(k) for k in torch.randint(0, 2**62, (64,), generator=gen)] + [0, 2**63 - 1]
    for part in (0, 1, 7, 2**40 + 3, 2**63 - 25):
        mixed = mix_keys(torch.tensor(keys, dtype=torch.int64), part)
        # noise_key drops the top bit (a 63-bit seed); the int64 mix keeps all 64
        assert [int(v) & (2**63 - 1) for v in mixed] == [noise_key(k, part) for k in keys]


def test_thermal_noise_is_independent_standard_normal():
    keys = mix_keys(torch.arange(64, dtype=torch.int64), 12345)
    noise = reference.thermal_noise(keys, 50, 96, torch.float64)
    assert noise.shape == (64 * 50, 96)
    flat = noise.flatten()
    n = flat.numel()
    assert abs(float(flat.mean())) < 5 / math.sqrt(n)
    assert abs(float(flat.var()) - 1) < 5 * math.sqrt(2 / n)
    assert scipy_stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # neighbours within a row, across rows, and across samples are uncorrelated
    for a, b in ((noise[:, :-1], noise[:, 1:]), (noise[:-1], noise[1:]),
                 (noise[:50], noise[50:100])):
        corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_reference_noise_depends_only_on_sample_and_call(reference_forward):
    x = heavy_tailed(6, 7, 64, seed=4)
    layer = _layer("hybrid", "static", noise=2.0, x=x)

    def run(rows, ids, calls=1):
        with torch.no_grad(), sample_context(layer, ids):
            return [layer(x[rows]) for _ in range(calls)]

    whole = run(slice(None), [10, 11, 12, 13, 14, 15], calls=2)
    alone = run(slice(3, 4), [13])[0]
    moved = run([5, 3], [15, 13])[0]
    assert torch.equal(alone[0], whole[0][3]) and torch.equal(moved[1], whole[0][3])
    assert not torch.equal(whole[0], whole[1])  # the second call draws new noise
    with torch.no_grad(), adc_bypassed(layer):
        exact = layer._reference_forward(x)
    assert not torch.equal(whole[0], exact)


def test_reference_noise_has_the_design_variance(reference_forward):
    sigma, samples, adc_clip = 3.0, 2, 1e9  # a clip far above every sum: no saturation
    layer = layer_for("hybrid", 256, 512, mode="static",
                      adc={"noise_sigma_lsb": sigma, "samples": samples})
    x = heavy_tailed(8, 128, 256, seed=5)
    act_clip = float(percentile_abs(x, 99.8))
    layer.set_static(act_clip, adc_clip)
    w_step = float(layer._weight_codes(x.device, x.dtype).step)
    with torch.no_grad(), sample_context(layer, range(8)):
        with adc_bypassed(layer):
            exact = layer(x).double()
        error = (layer(x).double() - exact) / (act_clip / 1023 * w_step)
    adc_step = adc_clip / 511
    expected = (sigma**2 / samples) * adc_step**2 + adc_step**2 / 12
    assert abs(float(error.var()) / expected - 1) < 6 * math.sqrt(2 / error.numel()) + 0.01


def test_noisy_reference_outside_a_context_counts_its_calls():
    x = heavy_tailed(2, 5, 64, seed=6)
    layer = _layer("hybrid", "static", noise=2.0, x=x)
    with torch.no_grad():
        first, second = layer._reference_forward(x), layer._reference_forward(x)
        layer.reseed(layer.cfg.seed)
        again = layer._reference_forward(x)
    assert not torch.equal(first, second) and torch.equal(first, again)


# ----- torch.compile ------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(compile_available() is not None,
                                    reason=f"torch.compile unavailable: {compile_available()}")


class _Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _assert_within_rounding(compiled, eager):
    """Inductor multiplies and adds separately where ATen fuses them: the outputs may
    differ by float rounding of the reconstruction (a few ulps), never by a code."""
    assert compiled.dtype == eager.dtype
    ulp = torch.finfo(eager.dtype).eps * eager.abs().max()
    assert float((compiled - eager).abs().max()) <= 8 * ulp


@needs_compiler
@pytest.mark.parametrize("scheme,mode", [("hybrid", "static"), ("hybrid", "dynamic"),
                                         ("bitserial", "static"), ("w8a8", "dynamic")])
def test_compiled_layer_is_one_graph_equal_to_the_eager_reference(reference_forward, scheme,
                                                                  mode):
    torch._dynamo.reset()
    x = heavy_tailed(3, 16, 64, seed=7)
    layer = _layer(scheme, mode, tiles=32, noise=2.0, x=x)
    net = _Wrap(layer)
    with torch.no_grad():
        with sample_context(net, [4, 5, 6]):
            eager = [net(x), net(x)]
        reference_forward.undo()  # traced layers take the reference path by themselves
        with sample_context(net, [4, 5, 6]), compiled_forward(net, fullgraph=True):
            compiled = [net(x), net(x)]
    for c, e in zip(compiled, eager):
        _assert_within_rounding(c, e)
    # call keys are graph inputs: a new call draws new noise (W8A8 has no analog read)
    assert torch.equal(compiled[0], compiled[1]) == (not layer.adc_paths)


@needs_compiler
def test_compiled_backbone_is_one_graph_per_shape_and_equals_the_eager_reference(
        monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_jit("JiT-T/4", input_size=16, num_classes=10, depth=3).eval()
    with torch.no_grad():
        for p in net.parameters():  # adaLN gates start at zero: make the FFNs count
            p.normal_(0, 0.2)
    quantize_model(net, {"scheme": "hybrid", "mode": "static", "adc": {"noise_sigma_lsb": 2.0}})
    for layer in quantized_layers(net).values():
        layer.set_static(3.0, {"lsb": 2e4})
    x, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([1, 2, 3])
    from torch._dynamo.utils import counters

    counters.clear()
    # inference mode, as in Lightning's test loop where the FID images are generated
    with torch.inference_mode(), sample_context(net, [7, 8, 9]), \
            compiled_forward(net, fullgraph=True):
        compiled = [net(x, t, y) for _ in range(3)]
    assert counters["stats"]["unique_graphs"] == 1  # new call keys are new inputs, not graphs
    monkeypatch.setattr(QuantLinear, "forward", QuantLinear._reference_forward)
    with torch.no_grad(), sample_context(net, [7, 8, 9]):
        eager = [net(x, t, y) for _ in range(3)]
    for c, e in zip(compiled, eager):
        # the float blocks around the layers are fused too: agreement to float rounding
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)
    assert not torch.equal(compiled[0], compiled[1])


def test_compile_unavailable_is_one_line_before_any_work(monkeypatch, tmp_path):
    from test_run import compose_run
    from torch._inductor import cpp_builder

    from jit import tasks
    from jit.config import ConfigError

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert compile_available() == "Inductor cannot find a C++ compiler (no C++ compiler found)"
    cfg = compose_run(["model.compile=true", f"paths.output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(tasks, "evaluate", lambda cfg, settings: pytest.fail("evaluation started"))
    with pytest.raises(ConfigError, match=r"^model.compile=true: Inductor cannot find a C\+\+ "
                       r"compiler \(no C\+\+ compiler found\); run with model.compile=false$"):
        tasks.dispatch(cfg)
    assert not (tmp_path / "run").exists()


def test_traced_layers_take_the_reference_path_only_for_plain_inference(monkeypatch):
    """Under tracing, gradients, observers and statistics keep the fast path, which has
    them; plain inference takes reference.py."""
    from jit.quant import enable_stats

    x = heavy_tailed(2, 5, 64, seed=8)
    layer = _layer("hybrid", "static", x=x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    taken = []
    monkeypatch.setattr(QuantLinear, "_reference_forward",
                        lambda self, v: taken.append("reference") or v.new_zeros(1))
    with torch.no_grad():
        layer(x)
    assert taken == ["reference"]
    layer(x.requires_grad_())  # gradients wanted: straight-through path
    with torch.no_grad():
        enable_stats(layer)
        layer(x)
        enable_stats(layer, False)
        layer.observer = lambda *args: None
        layer(x)
    assert taken == ["reference"]
