"""Forward time and peak extra memory of the quantized linear layers vs nn.Linear.

    python -m benchmarks.quant_linear [--runs 15] [--threads 2] [--block-elements N] [--tiny]

JiT-B/16 FFN shapes (768->4096 and 2048->768), 288 tokens, batch 2 and 8, plus the
built-in digits model's FFN shapes ("digits JiT-S/4 FFN": 128->682 and 341->128, 32
tokens, batch 128 and 256, i.e. 4096 and 8192 tokens per call, where passes over the
output rather than the matmuls dominate), float32, no autograd. Inputs are Student-t (3
degrees of freedom): at the 99.8th percentile clip 92% of their INT11 codes lie in the
9-bit LSB range, the coverage the seed measured on real JiT activations (92.04%), so the
digital MSB path sees realistic sparsity. Static rows use thresholds calibrated on the
same input.

Time: median of `runs` calls after a warm-up, in this process with the default
allocator; "x nn.Linear" is the median of the per-round ratios, each layer call timed
right after an nn.Linear call on the same input (paired_ms). Peak extra memory: peak
RSS during one call (kernel VmHWM, reset through /proc/self/clear_refs) minus the same
for nn.Linear, whose output buffer is therefore not counted; shown in MB and as a
multiple of the input activation size. It is measured
in a child process with MALLOC_MMAP_THRESHOLD_ fixed, so that glibc returns every large
buffer to the kernel on free (otherwise freed buffers stay resident and hide peaks);
times are not taken there, since that setting makes every large allocation a fresh
mmap and penalises allocation-heavy code.

The "reference" rows are the yardstick, measured on the same machine in the same
process: the hybrid layer run through jit/quant/reference.py, the executable
specification (one whole-tensor torch op per docs/design.md formula, per-sample selections and
ADC peaks, the two float32 matmuls, counter-based noise, no blocking, no sparsity), i.e.
the straightforward implementation, eagerly and compiled by torch.compile (Inductor; its
compilation happens in the warm-up call and is not timed). Before timing, their outputs
with the ADC bypassed are checked against the project's layer, so every row computes the
same function.

`--tiny` runs one small shape once without the compiled rows: the test suite's smoke run,
which keeps this script working (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from jit.models.compile import compiled_forward
from jit.quant import adc_bypassed, build_quant_config, percentile_abs, plan, sample_context
from jit.quant.layers import LAYER_CLASSES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SHAPES = [  # (label, in_features, out_features, tokens per sample, batches)
    ("JiT-B/16 FFN", 768, 4096, 288, (2, 8)),
    ("JiT-B/16 FFN", 2048, 768, 288, (2, 8)),
    ("digits JiT-S/4 FFN", 128, 682, 32, (128, 256)),
    ("digits JiT-S/4 FFN", 341, 128, 32, (128, 256)),
]
PCM_ONE_DAY = {**OmegaConf.to_container(OmegaConf.load(CONFIGS / "device" / "pcm.yaml")),
               "t_inference_s": 86400.0}
TINY_SHAPES = [("tiny", 48, 80, 12, (2,))]
CASES = [  # (label, preset overrides, mode, device or None)
    ("hybrid", {"scheme": "hybrid"}, "dynamic", None),
    ("hybrid", {"scheme": "hybrid"}, "static", None),
    # Programmed PCM arrays one day after programming, without and with the read noise of
    # every read: the difference is what read noise costs.
    ("hybrid pcm, no read noise", {"scheme": "hybrid"}, "static",
     {**PCM_ONE_DAY, "read_noise_scale": 0.0}),
    ("hybrid pcm", {"scheme": "hybrid"}, "static", PCM_ONE_DAY),
    ("bitserial K=2", {"scheme": "bitserial"}, "dynamic", None),
    ("bitserial K=2", {"scheme": "bitserial"}, "static", None),
    ("w8a8", {"scheme": "w8a8"}, "dynamic", None),
]


def _rss_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_bytes(fn) -> int:
    """Peak resident memory added while fn runs (its result is dropped afterwards)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    base = _rss_bytes("VmRSS:")
    fn()
    return _rss_bytes("VmHWM:") - base


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def paired_times(fn, reference, runs: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `runs` calls of fn and of the reference, called alternately so
    that both see the same machine state: on a shared or throttled machine the speed drifts
    over seconds, which separate series would put into a ratio. One untimed warm-up pair."""
    fn(), reference()
    fn_s, reference_s = [], []
    for _ in range(runs):
        start = time.perf_counter()
        reference()
        middle = time.perf_counter()
        fn()
        end = time.perf_counter()
        fn_s.append(end - middle)
        reference_s.append(middle - start)
    return fn_s, reference_s


def paired_ms(fn, reference, runs: int) -> tuple[float, float]:
    """(median ms of fn, median of fn's time over the reference's) of `paired_times`."""
    fn_s, reference_s = paired_times(fn, reference, runs)
    ratios = [a / b for a, b in zip(fn_s, reference_s)]
    return 1e3 * statistics.median(fn_s), statistics.median(ratios)


def build(linear: nn.Linear, overrides: dict, mode: str, x: torch.Tensor,
          device: dict | None = None) -> nn.Module:
    cfg = build_quant_config({**overrides, "mode": mode}, device=device)
    layer = LAYER_CLASSES[cfg.scheme].from_linear(linear, cfg, "bench")
    if mode == "static":
        adc_peaks: dict[str, float] = {}

        def observe(name, kind, tensor):
            if kind.startswith("adc."):
                peak = float(tensor.abs().max())
                adc_peaks[kind[4:]] = max(adc_peaks.get(kind[4:], 0.0), peak)

        layer.set_static(float(percentile_abs(x, cfg.act.percentile)))
        layer.observer = observe
        with adc_bypassed(layer):
            layer(x)
        layer.observer = None
        clips = adc_peaks or None
        layer.set_static(layer.static.act_clip, clips)
    return layer


class _ReferenceCall(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer._reference_forward(x)


class Reference(nn.Module):
    """The yardstick: `layer` run through jit/quant/reference.py, the executable
    specification (one whole-tensor torch op per docs/design.md formula, counter-based noise,
    no blocking, no sparsity). Compiled (`compiled=True`): the same forward traced by
    torch.compile, as `model.compile=true` runs it."""

    def __init__(self, layer: nn.Module, compiled: bool = False) -> None:
        super().__init__()
        self.call = _ReferenceCall(layer)
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with sample_context(self.call, range(x.shape[0])), \
                compiled_forward(self.call, self.compiled):
            return self.call(x)


def reference_rows(layer: nn.Module, x: torch.Tensor, compiled: bool = True
                   ) -> list[tuple[str, Reference]]:
    """The reference rows for `layer` (built by `build`), checked to compute its function
    with the ADC bypassed, bitwise in eager mode and to float rounding compiled."""
    rows = [("reference (whole tensor)", Reference(layer))]
    if compiled:
        rows.append(("reference compiled", Reference(layer, compiled=True)))
    with adc_bypassed(layer):
        expected = layer(x)
        for label, module in rows:
            got = module(x)
            tolerance = 0.0 if not module.compiled else 8 * torch.finfo(x.dtype).eps
            if float((got - expected).abs().max()) > tolerance * float(expected.abs().max()):
                raise AssertionError(f"{label} differs from the layer")
    return rows


def machine() -> str:
    """CPU model and vector extensions, for the results header."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} ({', '.join(vector) or 'no AVX2'}), {os.cpu_count()} logical CPUs"


def cases(shapes: str | None = None, rows: str | None = None, tiny: bool = False):
    """(shape label, batch label, input, [(row label, mode, module)]) per input, nn.Linear
    first; modules are built lazily so that only one set is alive at a time. `shapes`,
    `rows`: only the shapes, scheme rows whose label contains that text; `tiny`: the tiny
    shape instead, without compiled rows."""
    for label_shape, in_features, out_features, tokens, batches in (
            TINY_SHAPES if tiny else SHAPES):
        if shapes and shapes not in label_shape:
            continue
        torch.manual_seed(0)
        with torch.inference_mode(False):  # parameters, even when iterated under inference
            linear = nn.Linear(in_features, out_features)
        for batch in batches:
            x = torch.distributions.StudentT(3.0).sample((batch, tokens, in_features))
            yield (f"{label_shape} {in_features}->{out_features}", f"{batch} x {tokens}",
                   x.contiguous(), _modules(linear, x, rows, compiled=not tiny))


def _modules(linear: nn.Linear, x: torch.Tensor, rows: str | None = None,
             compiled: bool = True):
    yield "nn.Linear", "-", linear
    for label, overrides, mode, device in CASES:
        if rows and rows not in label:
            continue
        layer = build(linear, overrides, mode, x, device)
        yield label, mode, layer
        if overrides["scheme"] == "hybrid" and device is None:
            for row, module in reference_rows(layer, x, compiled):
                yield row, mode, module


FILTERS: list = [None, None, False]  # --shapes, --rows, --tiny, for the peak-memory child


def peak_table() -> None:
    """Child process: one JSON line per row, {key: peak bytes of one call}."""
    with torch.inference_mode():
        for shape, rows, x, modules in cases(*FILTERS):
            for label, mode, module in modules:
                peak = min(peak_bytes(functools.partial(module, x)) for _ in range(3))
                print(json.dumps({"key": [label, mode, shape, rows], "peak": peak}), flush=True)


def peaks_from_child() -> dict[tuple, int]:
    """Peak memory per row, measured in a child process in which glibc returns every large
    buffer to the kernel on free (otherwise freed buffers stay resident and hide peaks).
    Times are not taken there: that allocator setting makes every large allocation a fresh
    mmap with page faults, which would penalise allocation-heavy code."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    child = subprocess.run([sys.executable, "-m", "benchmarks.quant_linear", "--peak-memory",
                            *sys.argv[1:]], env=env, capture_output=True, text=True,
                           check=True)
    rows = (json.loads(line) for line in child.stdout.splitlines())
    return {tuple(row["key"]): row["peak"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-elements", type=int, default=plan.CHUNK_ELEMENTS,
                        help="elements per row block of the CPU plan (plan."
                             "CHUNK_ELEMENTS; default %(default)s); 0: whole tensors")
    parser.add_argument("--shapes", default=None,
                        help="only the shapes whose label contains this text (e.g. 'JiT-B/16')")
    parser.add_argument("--rows", default=None,
                        help="only the scheme rows whose label contains this text (e.g. "
                             "'pcm'), after nn.Linear")
    parser.add_argument("--tiny", action="store_true",
                        help="one small shape, one run, no compiled rows (smoke run)")
    parser.add_argument("--peak-memory", action="store_true",
                        help="internal: print peak memory rows as JSON and exit")
    args = parser.parse_args()
    if args.block_elements < 0 or args.runs < 1 or args.threads < 1:
        parser.error("--block-elements must be >= 0, --runs and --threads >= 1")
    torch.set_num_threads(args.threads)
    # Every compiled row traces the same forward code with another layer and shape; past
    # Dynamo's default limit of 8 graphs per code object it would run the rest eagerly.
    torch._dynamo.config.recompile_limit = 64
    if args.block_elements > 0:
        plan.CHUNK_ELEMENTS = args.block_elements
    else:  # the accelerator plan: one op per whole tensor
        plan.BLOCKWISE_DEVICE_TYPES = frozenset()
    FILTERS[:] = [args.shapes, args.rows, args.tiny]
    if args.tiny:
        args.runs = 1
    if args.peak_memory:
        peak_table()
        return
    peaks = peaks_from_child()
    layout = (f"CPU row blocks of {plan.CHUNK_ELEMENTS} elements"
              if plan.blockwise(torch.device("cpu")) else "whole-tensor ops")
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, median of {args.runs}, {layout}")
    header = ("scheme", "mode", "shape", "batch x tokens", "ms", "x nn.Linear", "extra MB",
              "x input")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 4 + ["---:"] * 4) + "|")
    with torch.inference_mode():
        for shape, rows, x, modules in cases(*FILTERS):
            input_mb = x.numel() * x.element_size() / 2**20
            reference = ref_peak = None
            for label, mode, module in modules:
                call, peak = functools.partial(module, x), peaks[(label, mode, shape, rows)]
                if reference is None:  # nn.Linear comes first
                    reference, ref_peak = call, peak
                    ms, ratio = median_ms(call, args.runs), 1.0
                else:
                    ms, ratio = paired_ms(call, reference, args.runs)
                extra_mb = max(peak - ref_peak, 0) / 2**20
                print(f"| {label} | {mode} | {shape} | {rows} | {ms:.1f} | {ratio:.2f} "
                      f"| {extra_mb:.1f} | {extra_mb / input_mb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
