"""The GPU check: one command that tells whether this revision is ready for a GPU node.

    bash scripts/gpu_check.sh [--out gpu_check.md]
    python -m benchmarks.gpu_check [--device cuda|cpu] [--out FILE]

On a CUDA machine it
1. runs the device-sensitive tests on CUDA (host syncs of the quantized forward,
   autocast immunity of the quantized layers: tests/test_quant_sync.py,
   tests/test_precision.py with `--device cuda`);
2. times the quantized linear layers (hybrid W8A11 static and dynamic, W8A8) against
   nn.Linear at the JiT-B/16 and JiT-L/16 FFN shapes, 64 images x 256 tokens, in float32
   and under bf16 autocast;
3. measures end-to-end images/s of JiT-B/16 at 256 px (random weights, 50 Heun steps, CFG
   on [0.1, 1]) for the float model and for hybrid W8A11 in static mode, eager and
   compiled (torch.compile of the backbone, jit/models/compile.py; the first call, which
   compiles, is reported apart);
4. reports the peak GPU memory of each measurement;
and writes one markdown report. Without CUDA it says so in one line and runs the same
code with tiny shapes on the CPU (tests/test_gpu_check.py runs that in CI).

Expectations on an H100-class GPU (to be confirmed by this script; no GPU was available
where it was written): the physical floor of the hybrid layer is two GEMMs, the analog
LSB slice and the digital MSB slice, each exact in bf16/fp16 operands with fp32
accumulation (9-bit x 8-bit codes); the simulation runs them in float32, so expect about
2-3x nn.Linear in float32 plus the element-wise ADC passes, which are memory-bound. Eager,
each element-wise pass is one kernel over the activations; compiled, Inductor fuses the
quantizer, split, ADC and noise passes into the GEMM prologues and epilogues, so the
compiled hybrid backbone should approach the two-GEMM floor per quantized layer.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import quant_linear
from jit.models.compile import compiled_forward
from jit.quant import build_quant_config, quantize_model, quantized_layers, sample_context
from jit.quant.layers import LAYER_CLASSES

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_quant_sync.py", "tests/test_precision.py"]
# (label, in_features, out_features): the two FFN projections (SwiGLU w12, w3).
FULL_SHAPES = [("JiT-B/16 w12", 768, 4096), ("JiT-B/16 w3", 2048, 768),
               ("JiT-L/16 w12", 1024, 5460), ("JiT-L/16 w3", 2730, 1024)]
TINY_SHAPES = [("tiny w12", 64, 128), ("tiny w3", 64, 64)]
LAYER_CASES = [("hybrid W8A11 static", "hybrid", "static"),
               ("hybrid W8A11 dynamic", "hybrid", "dynamic"),
               ("W8A8 dynamic", "w8a8", "dynamic")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def median_ms(fn, device: torch.device, runs: int) -> float:
    """benchmarks.quant_linear.median_ms, each call waiting for the device to finish."""
    return quant_linear.median_ms(lambda: (fn(), _sync(device)), runs)


def run_tests(device: torch.device, tiny: bool) -> tuple[str, bool]:
    """The device-sensitive tests on `device`; (summary line, passed)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--device={device.type}", *GPU_TESTS]
    if tiny:  # CI runs the whole files anyway; here the script's wiring is what is checked
        command += ["-k", "hybrid and (plain and static or ignores and static)"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return (lines[-1] if lines else done.stderr.strip()[-300:]), done.returncode == 0


def _static_layer(linear: nn.Linear, scheme: str, x: torch.Tensor):
    cfg = build_quant_config({"scheme": scheme, "mode": "static"})
    layer = LAYER_CLASSES[scheme].from_linear(linear, cfg, "check")
    clip = float(x.abs().amax())
    layer.set_static(clip, {path: clip * 127 * linear.in_features ** 0.5
                            for path in layer.adc_paths} or None)
    return layer


def time_layers(device: torch.device, shapes, batch: int, tokens: int, runs: int) -> list[dict]:
    rows = []
    for label, fan_in, fan_out in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(fan_in, fan_out).to(device)
        x = torch.distributions.StudentT(3.0).sample((batch, tokens, fan_in)).to(device)
        ids = list(range(batch))
        for precision in ("float32", "bf16 autocast"):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                      enabled=precision != "float32")
            with torch.no_grad(), autocast:
                _reset_peak(device)
                base = median_ms(lambda linear=linear, x=x: linear(x), device, runs)
                rows.append({"shape": label, "precision": precision, "layer": "nn.Linear",
                                 "ms": base, "ratio": 1.0, "peak_mb": _peak_mb(device)})
                for name, scheme, mode in LAYER_CASES:
                    if mode == "static":
                        layer = _static_layer(linear, scheme, x)
                    else:
                        cfg = build_quant_config({"scheme": scheme, "mode": mode})
                        layer = LAYER_CLASSES[scheme].from_linear(linear, cfg, "check")

                    def call(layer=layer, x=x, ids=ids):
                        with sample_context(layer, ids):
                            return layer(x)
                    _reset_peak(device)
                    ms = median_ms(call, device, runs)
                    rows.append({"shape": label, "precision": precision, "layer": name, "ms": ms,
                                     "ratio": ms / base, "peak_mb": _peak_mb(device)})
    return rows


def end_to_end(device: torch.device, tiny: bool, images: int) -> list[dict]:
    from jit.models import Denoiser, build_jit

    if tiny:
        net_kwargs, steps = {"name": "JiT-T/4", "input_size": 16, "num_classes": 10}, 2
    else:
        net_kwargs, steps = {"name": "JiT-B/16", "input_size": 256, "num_classes": 1000}, 50
    rows = []
    for label, compiled in itertools.product(("float", "hybrid W8A11 static"), (False, True)):
        torch.manual_seed(0)
        net = build_jit(net_kwargs["name"], input_size=net_kwargs["input_size"],
                        num_classes=net_kwargs["num_classes"])
        denoiser = Denoiser(net, num_classes=net_kwargs["num_classes"]).to(device).eval()
        if label != "float":
            quantize_model(net, {"scheme": "hybrid", "mode": "static"})
            for layer in quantized_layers(net).values():
                clip = 8.0  # random weights: a fixed clip and a wide ADC range
                layer.set_static(clip, {path: clip * 127 * layer.in_features ** 0.5
                                        for path in layer.adc_paths})
        labels = torch.arange(images, device=device) % net_kwargs["num_classes"]
        noise = torch.randn(images, 3, net_kwargs["input_size"], net_kwargs["input_size"],
                            generator=torch.Generator().manual_seed(1)).to(device)

        def sample(net=net, denoiser=denoiser, labels=labels, noise=noise, compiled=compiled):
            with torch.no_grad(), sample_context(net, list(range(images))), \
                    compiled_forward(net, compiled):
                return denoiser.generate(labels, noise=noise, steps=steps, method="heun",
                                         cfg_scale=2.9, interval=(0.1, 1.0))
        start = time.perf_counter()
        sample()  # warm-up: weight codes, kernels, and the compilation
        _sync(device)
        first = time.perf_counter() - start
        _reset_peak(device)
        start = time.perf_counter()
        out = sample()
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append({"model": label, "compiled": compiled, "first_call_s": first,
                     "images": images, "steps": steps, "seconds": seconds,
                         "images_per_s": images / seconds, "peak_mb": _peak_mb(device),
                         "finite": bool(torch.isfinite(out).all())})
    return rows


def report(device: torch.device, tiny: bool, tests: tuple[str, bool], layers: list[dict],
           e2e: list[dict]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    memory = "peak GPU memory allocated" if device.type == "cuda" else "process peak RSS"
    lines = [
        "# GPU check", "",
        f"Device: {device.type} ({name or platform.machine()}), torch {torch.__version__}"
        + (", tiny CPU variant" if tiny else "") + ".", "",
        "## Tests on the device", "",
        f"`pytest --device={device.type} {' '.join(GPU_TESTS)}`: {tests[0]}", "",
        "## Quantized layers vs nn.Linear", "",
        f"Median of the timed calls; memory: {memory} (MB).", "",
        "| shape | precision | layer | ms | x nn.Linear | memory (MB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['shape']} | {r['precision']} | {r['layer']} | {r['ms']:.2f} | "
              f"{r['ratio']:.2f} | {r['peak_mb']:.0f} |" for r in layers]
    lines += ["", "## End to end", "",
              (f"{e2e[0]['steps']} Heun steps, CFG 2.9 on [0.1, 1], random weights; the "
               "timed call follows a warm-up call (for compiled rows, the compilation)."), "",
              "| model | compiled | images | warm-up s | seconds | images/s | memory (MB) | finite |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {'yes' if r['compiled'] else 'no'} | {r['images']} | "
              f"{r['first_call_s']:.1f} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['finite']} |" for r in e2e]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else the tiny CPU variant")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device found; running the tiny CPU variant", flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = device.type == "cpu"
    tests = run_tests(device, tiny)
    print(f"tests: {tests[0]}", flush=True)
    if tiny:
        layers = time_layers(device, TINY_SHAPES, batch=2, tokens=16, runs=3)
        e2e = end_to_end(device, tiny, images=2)
    else:
        layers = time_layers(device, FULL_SHAPES, batch=64, tokens=256, runs=10)
        e2e = end_to_end(device, tiny, images=64)
    text = report(device, tiny, tests, layers, e2e)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"report: {args.out}", flush=True)
    return 0 if tests[1] and all(r["finite"] for r in e2e) else 1


if __name__ == "__main__":
    sys.exit(main())
