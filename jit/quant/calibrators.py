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

Resolution. The KL compares the shape of |x| inside each quantisation level, so it must
see the levels at a resolution that does not depend on how finely the histogram was
stored: for every candidate clip the stored counts are resampled onto SUB_BINS_PER_LEVEL
equal sub-bins per level (linearly inside a stored bin), and the KL is taken on those.
Measured directly on the stored bins instead, a level holds more bins than values near a
heavy-tailed clip, the KL curve is set by which bins happen to be empty, and the clip
jumps by 10-40% whenever the bin count doubles. The stored grid (`default_bins`,
BINS_PER_LEVEL per level) only has to be fine enough for the resampling: doubling it moves
the clips by under 5% on Student-t data and on the digits model's layers
(benchmarks/RESULTS.md, "KL calibration").
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
# Sub-bins per quantisation level at which the KL compares P and Q (see "Resolution").
# Fewer leave the in-level shape unseen; more bring back the empty-bin noise of sparse tails.
SUB_BINS_PER_LEVEL = 8
# KL candidates per octave of the bin index: i in [2^k, 2^(k+1)) in steps of 2^k / 256
# (every bin below 256), i.e. clips 0.4-0.8 % apart. The same clip values stay candidates
# when the bins double, and the search costs O(log(bins) x 256 x levels), not O(bins x levels).
CANDIDATES_PER_OCTAVE = 256


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
def sub_bin_masses(counts, clips, sub_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(masses [len(clips), sub_bins], tail [len(clips)]): the counts resampled onto
    `sub_bins` equal bins over [0, clip) for every clip (in units of stored bins; values
    spread evenly inside a stored bin), and the mass at or above each clip."""
    h = np.asarray(counts, dtype=np.float64)
    clips = np.asarray(clips, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(h)])
    padded = np.append(h, 0.0)

    def mass_below(edge):
        whole = np.minimum(np.floor(edge).astype(np.intp), h.size)
        return cumulative[whole] + (edge - whole) * padded[whole]

    edges = np.multiply.outer(clips, np.arange(sub_bins + 1) / sub_bins)
    masses = np.maximum(np.diff(mass_below(edges), axis=1), 0.0)
    tail = np.maximum(cumulative[-1] - mass_below(clips), 0.0)
    return masses, tail


def kl_rows(masses: np.ndarray, tail: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) per row. P: the row with its `tail` folded into the last bin (clipping
    maps outliers onto the edge code). Q: the row *without* the fold quantised to `levels`
    equal groups of bins, each group's mass spread evenly over its bins that are non-empty
    in P. Q leaves the outliers out on purpose (as TensorRT's entropy calibrator does):
    quantising the folded P instead would make KL exactly 0 at one bin per level, whatever
    is clipped. Both are normalised to sum 1; with N the row's total mass incl. the tail,
        KL = (sum P log P - sum_levels S log(S / n) - tail log(S_edge / n_edge)) / N
             + log((N - tail) / N)
    (S: a level's unfolded mass, n: its non-empty bins). An edge level that is empty while
    outliers fold into it puts P > 0 where Q = 0: KL = inf."""
    rows, width = masses.shape
    total = masses.sum(1) + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        level_mass = masses.reshape(rows, levels, width // levels).sum(2)
        nonempty = (masses > 0).reshape(rows, levels, width // levels).sum(2).astype(np.float64)
        nonempty[:, -1] += (masses[:, -1] == 0) & (tail > 0)  # the fold fills the edge bin
        edge = masses[:, -1] + tail
        plogp = xlogy(masses[:, :-1], masses[:, :-1]).sum(1) + xlogy(edge, edge)
        filled = level_mass > 0
        log_q = np.log(np.where(filled, level_mass, 1.0) / np.where(filled, nonempty, 1.0))
        plogq = np.einsum("ij,ij->i", level_mass, log_q)
        plogq += np.where(tail > 0, tail * np.log(level_mass[:, -1] / nonempty[:, -1]), 0.0)
        kl = (plogp - plogq) / total + np.log((total - tail) / total)
    return np.where(tail < total, kl, np.inf)  # nothing below the clip: Q = 0


def kl_divergences(counts, levels: int, candidates,
                   sub_bins_per_level: int = SUB_BINS_PER_LEVEL) -> np.ndarray:
    """KL(P_c || Q_c) for every candidate clip c (in stored bins), on the counts resampled
    to `sub_bins_per_level` sub-bins per level below c (`sub_bin_masses`, `kl_rows`).
    Work arrays of at most _BLOCK_ELEMENTS elements per block of candidates."""
    candidates = np.asarray(candidates)
    width = levels * sub_bins_per_level
    rows = max(1, _BLOCK_ELEMENTS // (width + 1))
    out = [kl_rows(*sub_bin_masses(counts, candidates[start:start + rows], width), levels)
           for start in range(0, candidates.size, rows)]
    return np.concatenate(out) if out else np.empty(0)


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
