"""Forward time and peak extra memory of the quantized linear layers vs nn.Linear.

    python -m benchmarks.quant_linear [--runs 15] [--threads 2]

JiT-B/16 FFN shapes (768->4096 and 2048->768), 288 tokens, batch 2 and 8, plus the
built-in digits model's FFN shapes ("digits JiT-S/4 FFN": 128->682 and 341->128, 32
tokens, batch 128 and 256, i.e. 4096 and 8192 tokens per call, where passes over the
output rather than the matmuls dominate), float32, no autograd. Inputs are Student-t (3
degrees of freedom): at the 99.8th percentile clip 92% of their INT11 codes lie in the
9-bit LSB range, the coverage the seed measured on real JiT activations (92.04%), so the digital MSB path sees realistic sparsity. Static rows use
thresholds calibrated on the same input. Time: median of `runs` calls after a warm-up.
Peak extra memory: peak RSS during one call (kernel VmHWM, reset through
/proc/self/clear_refs) minus the same for nn.Linear, whose output buffer is therefore
not counted; shown in MB and as a multiple of the input activation size. The script
re-executes itself with MALLOC_MMAP_THRESHOLD_ fixed so that glibc returns every large
buffer to the kernel on free; otherwise freed buffers stay resident and hide peaks.

The "minimal hybrid" rows are a yardstick measured on the same machine in the same
process: the hybrid forward written as one whole-tensor torch op per DESIGN.md formula
(percentile by `kthvalue`, the two float32 matmuls, `randn` noise, no blocking, no
sparsity), i.e. the straightforward implementation the ratio targets were set against.
Before timing, its output with the ADC bypassed is checked against the project's layer,
so both rows compute the same function.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from jit.quant import adc_bypassed, build_quant_config, percentile_abs
from jit.quant.config import QuantConfig
from jit.quant.layers import LAYER_CLASSES

SHAPES = [  # (label, in_features, out_features, tokens per sample, batches)
    ("JiT-B/16 FFN", 768, 4096, 288, (2, 8)),
    ("JiT-B/16 FFN", 2048, 768, 288, (2, 8)),
    ("digits JiT-S/4 FFN", 128, 682, 32, (128, 256)),
    ("digits JiT-S/4 FFN", 341, 128, 32, (128, 256)),
]
CASES = [  # (label, preset overrides, mode)
    ("hybrid", {"scheme": "hybrid"}, "dynamic"),
    ("hybrid", {"scheme": "hybrid"}, "static"),
    ("bitserial K=2", {"scheme": "bitserial"}, "dynamic"),
    ("bitserial K=2", {"scheme": "bitserial"}, "static"),
    ("w8a8", {"scheme": "w8a8"}, "dynamic"),
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


def measure(module: nn.Module, x: torch.Tensor, runs: int) -> tuple[float, int]:
    """(median ms, smallest peak of 3 calls in bytes) of module(x)."""
    ms = median_ms(lambda: module(x), runs)
    return ms, min(peak_bytes(lambda: module(x)) for _ in range(3))


def build(linear: nn.Linear, overrides: dict, mode: str, x: torch.Tensor) -> nn.Module:
    cfg = build_quant_config({**overrides, "mode": mode})
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


class MinimalHybrid(nn.Module):
    """The yardstick: hybrid W8A11 (DESIGN.md) as whole-tensor ops, per-tensor weights.
    `act_clip`/`adc_clip` given: static mode; None: dynamic."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig, act_clip: float | None = None,
                 adc_clip: float | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.act_clip, self.adc_clip = act_clip, adc_clip
        w = linear.weight.detach()
        self.w_step = w.abs().max() / (2 ** (cfg.weight.bits - 1) - 1)
        self.w_int_t = torch.round(w / self.w_step).t().contiguous()  # once, as a cache would
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, x2 = self.cfg, x.reshape(-1, x.shape[-1])
        a_max, adc_max = 2 ** (cfg.act.bits - 1) - 1, 2 ** (cfg.adc.bits - 1) - 1
        clip = self.act_clip
        if clip is None:
            flat = x2.abs().flatten()
            # torch.quantile's 'linear' rule (q rounded to x's dtype), by two selections
            q = float(torch.tensor(cfg.act.percentile / 100, dtype=x2.dtype))
            rank = q * (flat.numel() - 1)
            low = flat.kthvalue(int(rank) + 1).values
            high = flat.kthvalue(min(int(rank) + 2, flat.numel())).values
            clip = torch.lerp(low, high, rank - int(rank))
        step = clip / a_max
        x_int = torch.clamp(torch.round(torch.clamp(x2, -clip, clip) / step), -a_max - 1, a_max)
        lsb_max, radix = 2 ** (cfg.split.lsb_bits - 1) - 1, cfg.split.radix
        beyond = x_int - torch.clamp(x_int, -lsb_max - 1, lsb_max)
        msb = torch.sign(beyond) * torch.ceil(beyond.abs() / radix)
        lsb = x_int - radix * msb
        acc = lsb @ self.w_int_t
        if cfg.adc.bypass:
            y_lsb = acc
        else:
            adc_step = (acc.abs().max() if self.adc_clip is None else self.adc_clip) / adc_max
            sigma = cfg.adc.noise_sigma_lsb / cfg.adc.samples ** 0.5
            noisy = acc + torch.randn(acc.shape, generator=self.generator) * (sigma * adc_step)
            y_lsb = torch.clamp(torch.round(noisy / adc_step), -adc_max - 1, adc_max) * adc_step
        y = (radix * (msb @ self.w_int_t) + y_lsb) * (step * self.w_step)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def minimal_hybrid(linear: nn.Linear, layer: nn.Module, x: torch.Tensor) -> MinimalHybrid:
    """The yardstick for `layer` (a hybrid built by `build`, same mode and thresholds),
    checked to compute the same function with the ADC bypassed."""
    cfg, act_clip, adc_clip = layer.cfg, None, None
    if layer.static is not None:
        act_clip, adc_clip = layer.static.act_clip, layer.static.adc_clips["lsb"]
    bypassed = dataclasses.replace(cfg, adc=dataclasses.replace(cfg.adc, bypass=True))
    with adc_bypassed(layer):
        expected = layer(x)
    error = float((MinimalHybrid(linear, bypassed, act_clip, adc_clip)(x) - expected).abs().max()
                  / expected.abs().max())
    if error > 1e-4:  # a wrong formula is off by far more; a clip one ulp apart is not
        raise AssertionError(f"minimal hybrid differs from the layer (relative {error:.2e})")
    return MinimalHybrid(linear, cfg, act_clip, adc_clip)


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


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.quant_linear",
                                   *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, median of {args.runs}")
    header = ("scheme", "mode", "shape", "batch x tokens", "ms", "x nn.Linear", "extra MB",
              "x input")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 4 + ["---:"] * 4) + "|")
    for label_shape, in_features, out_features, tokens, batches in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features)
        shape = f"{label_shape} {in_features}->{out_features}"
        for batch in batches:
            rows = f"{batch} x {tokens}"
            x = torch.distributions.StudentT(3.0).sample((batch, tokens, in_features))
            x = x.contiguous()
            input_mb = x.numel() * x.element_size() / 2**20
            with torch.inference_mode():
                ref_ms, ref_peak = measure(linear, x, args.runs)
                print(f"| nn.Linear | - | {shape} | {rows} | "
                      f"{ref_ms:.1f} | 1.00 | 0.0 | 0.0 |")
                for label, overrides, mode in CASES:
                    layer = build(linear, overrides, mode, x)
                    timed = [(label, layer)]
                    if overrides["scheme"] == "hybrid":
                        timed.append(("minimal hybrid", minimal_hybrid(linear, layer, x)))
                    for name, module in timed:
                        ms, peak = measure(module, x, args.runs)
                        extra_mb = max(peak - ref_peak, 0) / 2**20
                        print(f"| {name} | {mode} | {shape} | {rows} | "
                              f"{ms:.1f} | {ms / ref_ms:.2f} | {extra_mb:.1f} | "
                              f"{extra_mb / input_mb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
