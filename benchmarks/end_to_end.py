"""End-to-end sampling time on the CPU: the float model against hybrid W8A11 static.

    python -m benchmarks.end_to_end [--model JiT-B/16] [--size 256] [--images 2]
                                    [--steps 3] [--runs 3] [--threads N]
    python -m benchmarks.end_to_end --tiny     # JiT-T/4 at 16 px, the test suite's smoke run

Random weights (seed 0), 1000 classes, the official B/16 sampler settings (Heun, CFG 3.0 on
the interval [0.1, 1.0]; configs/experiment/jit_b16_in256_eval.yaml) with fewer steps, the
same initial noise and labels for both models. The hybrid model is the default run's
quantization (`quantize_model` with the hybrid preset's defaults on the FFN projections,
static ranges, 2.0 LSB thermal noise keyed per image) calibrated with KL on the model's own
inputs: the initial noise at random t. The calibration is not timed.

Each timed hybrid sampling call is paired with a float one, alternately
(`benchmarks.quant_linear.paired_ms`), so both see the same machine state; the table gives
the median seconds of each and the median over the pairs of the hybrid's throughput
relative to the float model's (float seconds / hybrid seconds).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics

import torch

from benchmarks.quant_linear import machine, paired_times
from jit.models import Denoiser, build_jit
from jit.quant import artefact, quantize_model, sample_context
from jit.quant.calibration import calibrate

NUM_CLASSES = 1000
CFG_SCALE, INTERVAL = 3.0, (0.1, 1.0)


def build_models(name: str, size: int, images: int) -> tuple[Denoiser, Denoiser]:
    """(float, hybrid static) denoisers over the same random weights, the hybrid calibrated."""
    torch.manual_seed(0)
    net = build_jit(name, input_size=size, num_classes=NUM_CLASSES).eval()
    float_model = Denoiser(net, num_classes=NUM_CLASSES).eval()
    hybrid = copy.deepcopy(float_model)
    quantize_model(hybrid.net, {"scheme": "hybrid", "mode": "static"})
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(images, 3, size, size, generator=generator)
    t = torch.rand(images, generator=generator)
    labels = torch.arange(images) % NUM_CLASSES
    with torch.no_grad():
        artefact.apply(calibrate(hybrid.net, [(x, t, labels)], method="kl"), hybrid.net)
    return float_model, hybrid


def sampler(model: Denoiser, images: int, size: int, steps: int):
    labels = torch.arange(images) % NUM_CLASSES
    noise = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))

    def sample() -> torch.Tensor:
        with torch.no_grad(), sample_context(model.net, list(range(images))):
            return model.generate(labels, noise=noise, steps=steps, method="heun",
                                  cfg_scale=CFG_SCALE, interval=INTERVAL)
    return sample


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="JiT-B/16")
    parser.add_argument("--size", type=int, default=256, help="image size in px")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="Heun steps")
    parser.add_argument("--runs", type=int, default=3, help="timed pairs (after one warm-up pair)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="JiT-T/4, 16 px, 2 steps, 1 run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.size, args.steps, args.runs = "JiT-T/4", 16, 2, 1
    for key in ("size", "images", "steps", "runs"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    float_model, hybrid = build_models(args.model, args.size, args.images)
    sample_float = sampler(float_model, args.images, args.size, args.steps)
    sample_hybrid = sampler(hybrid, args.images, args.size, args.steps)
    if not (torch.isfinite(sample_float()).all() and torch.isfinite(sample_hybrid()).all()):
        raise SystemExit("end_to_end: the sampled images are not finite")
    hybrid_times, float_times = paired_times(sample_hybrid, sample_float, args.runs)
    hybrid_s, float_s = statistics.median(hybrid_times), statistics.median(float_times)
    throughput = statistics.median(f / h for f, h in zip(float_times, hybrid_times))

    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"{args.model} at {args.size} px, random weights, {args.images} images, "
          f"Heun {args.steps} steps, CFG {CFG_SCALE} on {list(INTERVAL)}; "
          f"median of {args.runs} paired calls")
    print("| model | s per call | images/s | x float throughput |")
    print("|---|---:|---:|---:|")
    print(f"| float | {float_s:.2f} | {args.images / float_s:.3f} | 1.00 |")
    print(f"| hybrid W8A11 static | {hybrid_s:.2f} | {args.images / hybrid_s:.3f} | "
          f"{throughput:.2f} |")


if __name__ == "__main__":
    main()
