"""KL threshold search: vectorised vs a per-threshold loop, and all of JiT-B/16's FFN.

    python -m benchmarks.kl_search

1. One histogram (heavy-tailed |x|, filling every bin): the vectorised search
   (`calibrators.kl_threshold`) against two per-threshold loops over the same candidates
   and the same definition of P and Q, each checked to choose the same clip:
   - straightforward: for each candidate, P and Q built level by level in Python (the
     shape of the usual entropy-calibration code, and of the seed's);
   - per-threshold numpy: the levels of one candidate in a few numpy calls (reduceat),
     only the loop over candidates left in Python - a stronger baseline.
   Both the classic 8-bit setting (2048 bins, 128 levels) and this project's INT11
   activations at the default 4096 bins (1024 levels).
2. Every threshold of JiT-B/16's 24 FFN layers (12 blocks x w12, w3) from collected
   histograms at the default 4096 bins: hybrid W8A11 (act INT11 + one 10-bit ADC path)
   and bit-serial W8A12 (act INT12 + two 10-bit ADC paths).
Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
import platform
import statistics
import time

import numpy as np
import torch

from jit.quant.calibration import AbsHistogram
from jit.quant.calibrators import clip_of_best, kl_candidates, kl_threshold, levels_for

FFN_LAYERS = 24


def heavy_tailed_hist(num_bins: int, seed: int, n: int = 1_000_000) -> AbsHistogram:
    """|Student-t(3)| samples: a long sparse tail like real activations and ADC inputs."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=gen)
    chi2 = torch.randn(3, n, generator=gen).square().sum(0)
    hist = AbsHistogram(num_bins)
    hist.add(normal / (chi2 / 3).sqrt())
    return hist


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def kl_straightforward(counts: np.ndarray, levels: int, candidates) -> np.ndarray:
    """Per candidate and per level, in Python."""
    out = []
    for i in candidates:
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()  # outliers folded into the edge bin
        q = np.zeros(i)
        for level in range(levels):
            lo, hi = -(-level * i // levels), -(-(level + 1) * i // levels)
            nonempty = p[lo:hi] > 0
            if nonempty.any():
                q[lo:hi][nonempty] = counts[lo:hi].sum() / nonempty.sum()
        out.append(_kl(p, q))
    return np.asarray(out)


def kl_per_threshold_numpy(counts: np.ndarray, levels: int, candidates) -> np.ndarray:
    """Per candidate in Python, its levels in numpy."""
    out = []
    for i in candidates:
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        starts = -((-np.arange(levels) * i) // levels)  # ceil(level * i / levels)
        mass = np.add.reduceat(counts[:i], starts)
        nonempty = np.add.reduceat((p > 0).astype(np.float64), starts)
        q = np.repeat(mass / np.maximum(nonempty, 1), np.diff(np.append(starts, i))) * (p > 0)
        out.append(_kl(p, q))
    return np.asarray(out)


def loop_threshold(kl_fn, hist: AbsHistogram, bits: int) -> float:
    candidates = kl_candidates(hist.counts, levels_for(bits))
    kl = kl_fn(hist.counts.numpy(), levels_for(bits), candidates.numpy())
    return clip_of_best(kl, candidates, hist)


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def compare(num_bins: int, bits: int) -> dict:
    hist = heavy_tailed_hist(num_bins, seed=bits)
    t_vec, c_vec = median_time(lambda: kl_threshold(hist, bits), 15)
    t_loop, c_loop = median_time(lambda: loop_threshold(kl_straightforward, hist, bits), 1)
    t_np, c_np = median_time(lambda: loop_threshold(kl_per_threshold_numpy, hist, bits), 3)
    assert c_vec == c_loop == c_np, (c_vec, c_loop, c_np)
    candidates = len(kl_candidates(hist.counts, levels_for(bits)))
    return {"bins": num_bins, "bits": bits, "candidates": candidates, "loop_s": t_loop,
            "np_ms": t_np * 1e3, "vec_ms": t_vec * 1e3}


def whole_model(act_bits: int, adc_paths: int, num_bins: int = 4096) -> tuple[float, int]:
    """Seconds to compute every FFN threshold of JiT-B/16 from its histograms."""
    hists = [(heavy_tailed_hist(num_bins, seed=i, n=200_000), bits)
             for i, bits in enumerate([act_bits] + [10] * adc_paths)]
    # every layer has its own histograms; the work per histogram does not depend on
    # which layer it came from, so a few distinct ones are cycled through
    jobs = [hists[k % len(hists)] for k in range(FFN_LAYERS * (1 + adc_paths))]
    start = time.perf_counter()
    for hist, bits in jobs:
        kl_threshold(hist, bits)
    return time.perf_counter() - start, len(jobs)


def main() -> None:
    torch.set_num_threads(2)
    rows = [compare(2048, 8), compare(4096, 11)]
    print("## KL calibration\n")
    print(f"`python -m benchmarks.kl_search`; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 2 threads, shared 2-core machine. Histograms of "
          "|Student-t(3)| (1M samples) filling every bin.\n")
    print("| bins | bits (levels) | candidates | straightforward loop | per-threshold numpy "
          "| vectorised | speed-up vs loop / vs numpy loop | same clip |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for r in rows:
        print(f"| {r['bins']} | {r['bits']} ({levels_for(r['bits'])}) | {r['candidates']} | "
              f"{r['loop_s']:.2f} s | {r['np_ms']:.0f} ms | {r['vec_ms']:.1f} ms | "
              f"{r['loop_s'] * 1e3 / r['vec_ms']:.0f}x / {r['np_ms'] / r['vec_ms']:.0f}x | yes |")
    print()
    print("All KL thresholds of JiT-B/16's 24 FFN layers from collected histograms "
          "(4096 bins):\n")
    print("| scheme | thresholds | total (s) |")
    print("| --- | ---: | ---: |")
    for scheme, act_bits, paths in (("hybrid W8A11", 11, 1), ("bit-serial W8A12", 12, 2)):
        seconds, count = whole_model(act_bits, paths)
        print(f"| {scheme} | {count} (act + {paths} ADC path{'s' * (paths > 1)}) | {seconds:.2f} |")


if __name__ == "__main__":
    main()
