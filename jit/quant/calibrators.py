"""Threshold (clip value) search on histograms of |x|.

Every calibrator takes an `AbsHistogram`-like object (`counts` of |x| in `num_bins`
equal bins over [0, upper]; `amax`: the exact max |x| seen; `total`) and the bit width of
the symmetric signed quantizer being calibrated, and returns a clip value c: the quantizer
then uses step c / (2^(bits-1) - 1).

Levels. A symmetric signed b-bit quantizer maps |x| in [0, c] onto the codes
0..qmax = 2^(b-1) - 1, i.e. 2^(b-1) distinct magnitudes. The KL calibrator therefore
quantises the reference histogram of |x| to 2^(b-1) levels (128 for INT8, as TensorRT's
entropy calibrator does; 1024 for INT11 activations, 512 for a 10-bit ADC), so each
quantizer is calibrated for its own resolution.

Resolution. What the KL compares is the shape of |x| inside each level, so what matters is
the number of bins below the clip, not below max|x|: with heavy tails the clip is a small
fraction of the max (about 1/8 on |Student-t(2)|), and too few bins per level make the
clip wander as the bin count changes. `default_bins` (BINS_PER_LEVEL per level) is where
the clip stops moving when the bins double (benchmarks/RESULTS.md, "KL calibration").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import xlogy

METHODS = ("kl", "percentile", "minmax", "mse")

# Candidates whose KL is within this of the minimum count as ties; the smallest clip wins
# (finer step for the same information loss). Also absorbs float summation-order noise.
_TIE = 1e-12
# Elements of the [candidates, levels] work arrays per block: bounds peak memory (~50 MB).
_BLOCK_ELEMENTS = 1 << 20
# Histogram bins per quantisation level by default (see "Resolution" above).
BINS_PER_LEVEL = 128
# KL candidates per octave of the bin index: i in [2^k, 2^(k+1)) in steps of 2^k / 512
# (every bin below 512), i.e. clips 0.1-0.2 % apart. The same clip values stay candidates
# when the bins double, and the search costs O(log(bins) x 512 x levels), not O(bins x levels).
CANDIDATES_PER_OCTAVE = 512


def levels_for(bits: int) -> int:
    """Distinct magnitudes |code| of a symmetric signed `bits`-bit quantizer: 2^(bits-1)."""
    return 1 << (bits - 1)


def default_bins(bits: int) -> int:
    """Histogram bins when calibration.num_bins is null: BINS_PER_LEVEL per level."""
    return BINS_PER_LEVEL * levels_for(bits)


def _last_nonempty(counts: torch.Tensor) -> int:
    """Number of bins up to and including the last non-empty one."""
    nz = torch.nonzero(counts > 0)
    return int(nz[-1]) + 1 if nz.numel() else 0


def _check(hist, name: str = "tensor") -> None:
    if hist.total <= 0:
        raise ValueError(f"{name}: no values were observed, cannot calibrate a threshold")
    if hist.amax <= 0:
        raise ValueError(
            f"{name}: all {int(hist.total)} observed values are zero (a constant tensor); "
            "a clip threshold is undefined"
        )


# ------------------------------------------------------------------------------- KL ----
def kl_divergences(counts, levels: int, candidates) -> np.ndarray:
    """KL(P_i || Q_i) for every candidate i (number of bins kept), all at once.

    P_i: the first i bins with the mass of bins >= i folded into bin i-1 (clipping maps
    outliers onto the edge code). Q_i: the first i bins *without* the fold quantised to
    `levels` levels - bin b goes to level floor(b * levels / i) - each level's mass spread
    evenly over the bins that are non-empty in P_i. Q_i leaves the outliers out on purpose
    (as TensorRT's entropy calibrator does): quantising the folded P_i instead would make
    KL exactly 0 at i = levels (one bin per level), whatever is clipped. Each is
    normalised to sum 1. With counts h, N = total, M = N - tail mass,
        KL = (sum_b P log P - sum_levels S log(S' / n)) / N + log(M / N)
    (S, S' = a level's mass in P_i resp. in the unfolded slice, n = its non-empty bins),
    so prefix sums give every term without materialising P_i or Q_i:
    O(candidates x levels) work. A candidate whose edge level is empty but receives
    outliers has Q = 0 where P > 0: KL = inf.
    """
    h = np.asarray(counts, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.intp)
    total = h.sum()
    mass = np.concatenate([[0.0], np.cumsum(h)])  # mass[k] = sum h[:k]
    nonempty = np.concatenate([[0.0], np.cumsum(h > 0)])
    hlogh = np.concatenate([[0.0], np.cumsum(xlogy(h, h))])
    # level k of candidate i holds bins [ceil(k i / L), ceil((k+1) i / L)); k / L is exact
    # in float64 because L is a power of two, so ceil() sees exact integers
    fractions = np.arange(levels + 1) / levels
    out = []
    rows = max(1, _BLOCK_ELEMENTS // (levels + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, candidates.size, rows):
            i = candidates[start:start + rows]
            edges = np.ceil(np.multiply.outer(i.astype(np.float64), fractions)).astype(np.intp)
            unfolded = np.diff(mass[edges], axis=1)
            n = np.diff(nonempty[edges], axis=1)
            tail = total - mass[i]
            edge_bin = h[i - 1]
            n[:, -1] += (edge_bin == 0) & (tail > 0)  # the fold makes the edge bin non-empty
            folded = edge_bin + tail
            plogp = hlogh[i - 1] + xlogy(folded, folded)
            # sum over P > 0 of P log Q: each level's unfolded mass, then the tail's share
            filled = unfolded > 0
            log_q = np.log(np.where(filled, unfolded, 1.0) / np.where(filled, n, 1.0))
            plogq = np.einsum("ij,ij->i", unfolded, log_q)
            plogq += np.where(tail > 0, tail * np.log(unfolded[:, -1] / n[:, -1]), 0.0)
            kl = (plogp - plogq) / total + np.log((total - tail) / total)
            out.append(np.where(tail < total, kl, np.inf))  # nothing below the clip: Q = 0
    return np.concatenate(out)


def kl_candidates(counts: torch.Tensor, levels: int) -> np.ndarray:
    """Candidate numbers of bins kept: from `levels` to the last non-empty bin (always a
    candidate: clipping at the max), CANDIDATES_PER_OCTAVE per octave of the index."""
    last = _last_nonempty(counts)
    parts = [np.arange(1 << k, 1 << (k + 1), max(1, (1 << k) // CANDIDATES_PER_OCTAVE))
             for k in range(max(last, 1).bit_length())]
    candidates = np.concatenate(parts)
    candidates = candidates[(candidates >= levels) & (candidates < last)]
    return np.append(candidates, last)


def kl_best(kl: np.ndarray) -> int:
    """Index of the first candidate whose KL ties the minimum (candidates ascending: the
    smallest clip wins, a finer step for the same information loss)."""
    return int(np.flatnonzero(kl <= kl.min() + _TIE)[0])


def kl_threshold(hist, bits: int, name: str = "tensor") -> float:
    """Entropy calibration: the clip minimising KL(P || Q) at 2^(bits-1) levels."""
    _check(hist, name)
    levels = levels_for(bits)
    if hist.counts.numel() < levels:
        raise ValueError(
            f"{name}: num_bins={hist.counts.numel()} is below the {levels} levels of a "
            f"{bits}-bit quantizer; KL calibration needs num_bins >= 2^(bits-1) "
            f"(converged at {default_bins(bits)}), raise calibration.num_bins or set it to null"
        )
    if _last_nonempty(hist.counts) <= levels:
        # The data fill no more bins than the quantizer has levels: the histogram cannot
        # resolve a better clip than the max.
        return float(hist.amax)
    candidates = kl_candidates(hist.counts, levels)
    kl = kl_divergences(hist.counts.double().numpy(), levels, candidates)
    clip = float(candidates[kl_best(kl)]) * float(hist.upper) / hist.counts.numel()
    return min(clip, float(hist.amax))


# ------------------------------------------------------------------ other methods ----
def _bin_width(hist) -> float:
    return float(hist.upper) / hist.counts.numel()


def percentile_threshold(hist, percentile: float, name: str = "tensor") -> float:
    """The `percentile`-th percentile of |x|, linearly interpolated inside its bin."""
    _check(hist, name)
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"calibration.percentile must be in (0, 100], got {percentile}")
    if percentile == 100.0:
        return float(hist.amax)
    h = hist.counts.to(torch.float64)
    cum = h.cumsum(0)
    target = percentile / 100.0 * float(cum[-1])
    k = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0])
    k = min(k, h.numel() - 1)
    below = float(cum[k - 1]) if k > 0 else 0.0
    frac = (target - below) / float(h[k]) if h[k] > 0 else 1.0
    return min((k + frac) * _bin_width(hist), float(hist.amax))


def minmax_threshold(hist, name: str = "tensor") -> float:
    """The exact max |x| seen: nothing is clipped."""
    _check(hist, name)
    return float(hist.amax)


def mse_threshold(hist, bits: int, name: str = "tensor") -> float:
    """The clip minimising the expected squared quantisation error of |x|.

    For clip c (step s = c / qmax), a value at bin centre x costs (x - c)^2 above c, x^2 if
    it rounds to zero (x < s/2) and s^2 / 12 otherwise (uniform rounding error); prefix
    sums evaluate every candidate c = i * bin_width in one pass.
    """
    _check(hist, name)
    qmax = levels_for(bits) - 1
    h = hist.counts.to(torch.float64)
    w = _bin_width(hist)
    x = (torch.arange(h.numel(), dtype=torch.float64) + 0.5) * w
    zero = h.new_zeros(1)
    H0, H1, H2 = (torch.cat([zero, (h * x**p).cumsum(0)]) for p in (0, 1, 2))
    last = max(_last_nonempty(h), 1)
    i = torch.arange(1, last + 1, dtype=torch.int64)
    c = i.to(torch.float64) * w
    s = c / qmax
    j = torch.minimum(torch.ceil(s / (2 * w) - 0.5).clamp_min(0).to(torch.int64), i)
    err = (
        H2[j]
        + (H0[i] - H0[j]) * s**2 / 12
        + (H2[-1] - H2[i]) - 2 * c * (H1[-1] - H1[i]) + c**2 * (H0[-1] - H0[i])
    )
    best = int(torch.argmin(err))
    return min(float(c[best]), float(hist.amax))


def threshold(method: str, hist, bits: int, *, percentile: float = 99.99,
              name: str = "tensor") -> float:
    """Clip value for a `bits`-bit symmetric quantizer by `method` (one of METHODS)."""
    if method == "kl":
        value = kl_threshold(hist, bits, name)
    elif method == "percentile":
        value = percentile_threshold(hist, percentile, name)
    elif method == "minmax":
        value = minmax_threshold(hist, name)
    elif method == "mse":
        value = mse_threshold(hist, bits, name)
    else:
        raise ValueError(f"unknown calibration method {method!r}; allowed: {', '.join(METHODS)}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: {method} calibration gave an invalid clip {value!r}")
    return value
