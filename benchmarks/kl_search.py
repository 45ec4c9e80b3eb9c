"""KL calibration: convergence in the bin count, speed of the threshold search.

    python -m benchmarks.kl_search                # everything
    python -m benchmarks.kl_search --skip-digits
    python -m benchmarks.kl_search --tiny         # smoke run: small samples, two bin counts

1. Convergence: the INT11 KL clip (as a share of max|x|) against `calibration.num_bins` on
   |Student-t(2)| and |Student-t(4)| (1M samples, three seeds), on sparse tails
   (|Student-t(3)|, |Student-t(4)|, 200k samples), and on every layer of the
   shipped digits model as the default run calibrates it (experiment=digits_demo: 200
   calibration images, hybrid W8A11, activations INT11 and the 10-bit ADC path), each
   calibration timed.
2. Speed: one threshold at the default bins for 8, 10 and 11 bits, and all thresholds of
   JiT-B/16's 24 FFN layers.
Prints Markdown sections for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch

from jit.quant.calibration import AbsHistogram
from jit.quant.calibrators import (
    default_bins,
    kl_candidates,
    kl_threshold,
    levels_for,
)


class Sizes(NamedTuple):
    bins: tuple[int, ...]
    default: int  # default_bins(11), one of `bins` but the last
    samples: int  # the large synthetic samples
    sparse_samples: int  # sparse tails
    calibration_images: int | None  # None: the experiment's own
    repeats: int
    ffn_layers: int  # JiT-B/16 has 24


FULL = Sizes((4096, 8192, 16384, 32768, 65536, 131072, 262144), 131072, 1_000_000, 200_000,
             None, 5, 24)
TINY = Sizes((4096, 8192, 16384), 8192, 20_000, 5_000, 8, 1, 2)
SIZES = FULL  # main() switches to TINY for --tiny


def student_t_abs(dof: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(dof, n, generator=gen, dtype=torch.float64).square().sum(0)
    return (normal / (chi2 / dof).sqrt()).abs().float()


def abs_hist(values: torch.Tensor, num_bins: int) -> AbsHistogram:
    hist = AbsHistogram(num_bins)
    hist.add(values)
    return hist


def heavy_tailed_hist(num_bins: int, seed: int, n: int) -> AbsHistogram:
    """|Student-t(3)| samples: a long sparse tail like real activations and ADC inputs."""
    return abs_hist(student_t_abs(3, n, seed), num_bins)


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def compare(num_bins: int, bits: int) -> dict:
    hist = heavy_tailed_hist(num_bins, seed=bits, n=SIZES.samples)
    seconds, _ = median_time(lambda: kl_threshold(hist, bits), SIZES.repeats)
    candidates = len(kl_candidates(hist.counts, levels_for(bits)))
    return {"bins": num_bins, "bits": bits, "candidates": candidates, "ms": seconds * 1e3}


def whole_model(act_bits: int, adc_paths: int) -> tuple[float, int]:
    """Seconds to compute every FFN threshold of JiT-B/16 from its histograms."""
    hists = [(heavy_tailed_hist(default_bins(bits), seed=i, n=SIZES.sparse_samples), bits)
             for i, bits in enumerate([act_bits] + [10] * adc_paths)]
    # every layer has its own histograms; the work per histogram does not depend on
    # which layer it came from, so a few distinct ones are cycled through
    jobs = [hists[k % len(hists)] for k in range(SIZES.ffn_layers * (1 + adc_paths))]
    start = time.perf_counter()
    for hist, bits in jobs:
        kl_threshold(hist, bits)
    return time.perf_counter() - start, len(jobs)


def change(values: list[float]) -> str:
    """Relative change of the clip when the default bin count doubles."""
    steps = [abs(b / a - 1) for a, b in itertools.pairwise(values)]
    return f"{100 * steps[SIZES.bins.index(SIZES.default)]:.1f}%"


def synthetic_convergence() -> None:
    print("INT11 (1024 levels) KL clip / max|x| on |Student-t| (1M samples) against "
          "`calibration.num_bins` (bins over [0, the power of two above max|x|)); last column: "
          f"change from the default {SIZES.default} to {2 * SIZES.default} bins.\n")
    print("| data | seed | " + " | ".join(str(b) for b in SIZES.bins) + " | default doubled |")
    print("| --- | ---: |" + " ---: |" * len(SIZES.bins) + " ---: |")
    big, sparse = SIZES.samples, SIZES.sparse_samples
    for dof, n in ((2, big), (4, big), (3, sparse), (4, sparse)):
        for seed in range(3):
            values = student_t_abs(dof, n, seed=seed)
            amax = float(values.max())
            clips = [kl_threshold(abs_hist(values, b), 11) / amax for b in SIZES.bins]
            print(f"| \\|t({dof})\\|, {n // 1000}k (max {amax:.0f}) | {seed} | "
                  + " | ".join(f"{c:.4f}" for c in clips) + f" | {change(clips)} |")
    print()


def digits_convergence() -> None:
    """Every layer of the shipped digits model, calibrated as the default run does."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from jit.builders import load_module
    from jit.config import register_schemas, to_plain
    from jit.evaluation.calibration import (
        CalibrationConfig,
        _calibration_batches,
        _data_forward,
        _eval_weights,
    )
    from jit.quant import build_quant_config, quantize_model
    from jit.quant.calibration import calibrate
    from jit.quant.layers import quantized_layers
    from jit.quant.surgery import adc_bypassed, noise_disabled

    register_schemas()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        overrides = ["experiment=digits_demo", "paths.output_dir=unused"]
        if SIZES.calibration_images is not None:
            overrides.append(f"calibration.num_images={SIZES.calibration_images}")
        cfg = compose("run", overrides=overrides)
    module, _ = load_module(cfg)
    quantize_model(module.denoiser.net, build_quant_config(cfg.quant, device=cfg.get("device")))
    calib = CalibrationConfig.from_any(to_plain(cfg.calibration))
    batches = _calibration_batches(instantiate(cfg.data), calib)
    forward = _data_forward(module.denoiser, "cpu")
    clips, seconds = {}, {}
    with _eval_weights(module, None):
        for bins in SIZES.bins:
            start = time.perf_counter()
            artefact = calibrate(module.denoiser.net, batches, method="kl", num_bins=bins,
                                 seed=calib.seed, forward=forward)
            seconds[bins] = time.perf_counter() - start
            clips[bins] = artefact["layers"]
    # clip / max: the max of each quantity is the grid-independent amax of its histogram
    amax = {}
    net = module.denoiser.net

    def record(name, kind, tensor):
        if (kind == "act") == (mode == "dynamic"):  # act max in the act pass, ADC in the ADC pass
            amax[(name, kind)] = max(amax.get((name, kind), 0.0), float(tensor.abs().max()))

    layers = quantized_layers(net)
    with torch.no_grad(), noise_disabled(net), adc_bypassed(net), _eval_weights(module, None):
        for mode in ("dynamic", "static"):
            for name, layer in layers.items():
                layer.cfg = dataclasses.replace(layer.cfg, mode=mode)
                layer.observer = record
                if mode == "static":
                    layer.set_static(clips[SIZES.default][name]["act_clip"])
            for index, batch in enumerate(batches):
                forward(batch, torch.Generator().manual_seed(calib.seed * 1_000_003 + index))
    for layer in layers.values():
        layer.observer = None
    print(f"Shipped digits model (JiT-S/4, 16 px), `experiment=digits_demo` calibration "
          f"({calib.num_images} images, source {calib.source}), hybrid W8A11: KL clip / max per "
          "layer; activations INT11 (1024 levels), ADC path `lsb` 10 bits (512 levels), "
          f"the same `num_bins` for both. ADC maxima are those under the {SIZES.default}-bin act clips.\n")
    print("| layer | quantity | " + " | ".join(str(b) for b in SIZES.bins) + " | default doubled |")
    print("| --- | --- |" + " ---: |" * len(SIZES.bins) + " ---: |")
    worst = 0.0
    for name in layers:
        act = [clips[b][name]["act_clip"] / amax[(name, "act")] for b in SIZES.bins]
        adc = [clips[b][name]["adc_clip"]["lsb"] / amax[(name, "adc.lsb")] for b in SIZES.bins]
        for kind, row in (("act", act), ("ADC lsb", adc)):
            worst = max(worst, float(change(row)[:-1]))
            print(f"| {name} | {kind} | " + " | ".join(f"{c:.4f}" for c in row)
                  + f" | {change(row)} |")
    print(f"\nLargest change from {SIZES.default} to {2 * SIZES.default} bins over all digits layers: "
          f"{worst:.1f}%. Calibration wall time (two passes over the images, all thresholds): "
          + ", ".join(f"{b}: {seconds[b]:.1f} s" for b in seconds)
          + ".\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-digits", action="store_true", help="no digits-model calibration")
    parser.add_argument("--tiny", action="store_true",
                        help="small samples and bin counts (smoke run; figures mean nothing)")
    args = parser.parse_args()
    global SIZES
    SIZES = TINY if args.tiny else FULL
    torch.set_num_threads(2)
    print("## KL calibration\n")
    print(f"`python -m benchmarks.kl_search`; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 2 threads, shared 2-core machine "
          f"(load average {os.getloadavg()[0]:.1f} at start).\n")
    synthetic_convergence()
    if not args.skip_digits:
        digits_convergence()
    rows = [compare(default_bins(bits), bits) for bits in (8, 10, 11)]
    print("One threshold at the default bins (128 per level) on |Student-t(3)| (1M samples), "
          "median of 5.\n")
    print("| bins | bits (levels) | candidates | time |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['bins']} | {r['bits']} ({levels_for(r['bits'])}) | {r['candidates']} | "
              f"{r['ms']:.0f} ms |")
    print()
    print(f"All KL thresholds of {SIZES.ffn_layers} FFN layers (JiT-B/16 has 24) from collected histograms "
          "(default bins):\n")
    print("| scheme | thresholds | total (s) |")
    print("| --- | ---: | ---: |")
    for scheme, act_bits, paths in (("hybrid W8A11", 11, 1), ("bit-serial W8A12", 12, 2)):
        seconds, count = whole_model(act_bits, paths)
        print(f"| {scheme} | {count} (act + {paths} ADC path{'s' * (paths > 1)}) | {seconds:.2f} |")


if __name__ == "__main__":
    main()
