"""Quantizer math of docs/design.md "AIMC quantization", one function per formula.

All integer codes are carried in floating-point tensors: products of INT8 weights and
INT<=12 activations and their sums are exact in float32 while partial sums stay below
2**24, which keeps the simulation on the fast BLAS path.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

from .config import WeightConfig
from .plan import blockwise

# topk of the largest k is much cheaper than a selection when k is a small share of n
# (high percentiles, the usual case); beyond that share two kthvalue calls win.
_TOPK_MAX_SHARE = 1 / 16
# Elements per pass of the candidate selection in _largest_abs (|.|, compare, select).
_SELECTION_BLOCK = 32767

# x + 1.5 * 2^(p-1) - 1.5 * 2^(p-1) rounds x to an integer, ties to even, exactly as
# torch.round, for |x| < 2^(p-2) (p: significand bits): two adds with ATen's default
# grain size. torch.round is a VML-style kernel that forks OpenMP threads from 2048
# elements on, which a busy machine pays for on every call.
_ROUND_MAGIC = {torch.float32: 1.5 * 2.0**23, torch.float64: 1.5 * 2.0**52}
ROUND_EXACT_BELOW = {torch.float32: 2.0**22, torch.float64: 2.0**51}


def round_(t: torch.Tensor) -> torch.Tensor:
    """In place t.round_() (half to even) for |t| < ROUND_EXACT_BELOW[dtype]; beyond that
    the result stays at or beyond that bound with the same sign (callers clamp to far
    smaller codes) and a zero may lose its sign. Other dtypes: torch.round_."""
    magic = _ROUND_MAGIC.get(t.dtype)
    if magic is None:
        return t.round_()
    return t.add_(magic).sub_(magic)


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, layer name), identical across processes and
    Python versions (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def qmax(bits: int) -> int:
    """Largest code of a signed `bits` integer."""
    return 2 ** (bits - 1) - 1


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` as torch.tensor(value, dtype=dtype) does, as a host number
    (float32/float64 without creating a tensor)."""
    if dtype == torch.float64:
        return value
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", value))[0]
    return float(torch.tensor(value, dtype=dtype))


def percentile_abs(x: torch.Tensor, percentile: float, dim: int | None = None) -> torch.Tensor:
    """`percentile` (0..100] of |x| over all elements (dim=None) or along `dim`.

    Linear interpolation between order statistics exactly as torch.quantile's 'linear'
    method (q rounded to x's dtype, rank = q * (n - 1) in float64, lerp in x's dtype
    between the floor and ceil ranks), but through topk/kthvalue, so it works for any
    number of elements (torch.quantile refuses inputs above 2**24 elements on older
    releases).
    """
    if dim is None:
        a = x.detach().reshape(-1)  # |.| taken lazily: _largest_abs may never need all of it
    else:
        a = x.detach().abs().movedim(dim, -1)
    n = a.shape[-1]
    rank = _in_dtype(percentile / 100.0, a.dtype) * (n - 1)
    low, high = math.floor(rank), min(math.ceil(rank), n - 1)
    weight = torch.tensor(rank - low, dtype=a.dtype, device=a.device)
    k_top = n - low  # how many elements are >= the low order statistic
    if dim is None and k_top <= max(2, int(n * _TOPK_MAX_SHARE)):
        top = _largest_abs(a, k_top)
        v_low, v_high = top[k_top - 1], top[n - 1 - high]
        return torch.lerp(v_low, v_high, weight)
    if dim is None:
        a = a.abs()
    if k_top <= max(2, int(n * _TOPK_MAX_SHARE)):
        top = a.topk(k_top, dim=-1, largest=True, sorted=True).values
        v_low, v_high = top[..., k_top - 1], top[..., n - 1 - high]
    else:
        v_low = a.kthvalue(low + 1, dim=-1).values
        v_high = v_low if high == low else a.kthvalue(high + 1, dim=-1).values
    return torch.lerp(v_low, v_high, weight)


def _largest_abs(x: torch.Tensor, k: int, stride: int = 16) -> torch.Tensor:
    """|x|.topk(k).values (sorted, largest first) of a 1-D x, exactly, without a selection
    over all of x: a threshold t from a strided sample, then a selection over the elements
    not below t (NaN kept, as topk ranks it largest), checked to number at least k, so they
    hold the k largest; otherwise (rare: the sample misled) the full topk."""
    n, block_size = x.numel(), _SELECTION_BLOCK
    if n <= 8 * block_size or k * stride * 4 > n or not blockwise(x.device):
        return x.abs().topk(k, largest=True, sorted=True).values
    sample = x[::stride].abs()
    threshold = sample.topk(min(sample.numel(), 2 * (k // stride) + 16), largest=True,
                            sorted=True).values[-1]
    parts = []
    for start in range(0, n, block_size):
        block = x[start:start + block_size].abs()
        parts.append(block[~(block < threshold)])
    candidates = torch.cat(parts)
    if candidates.numel() < k:
        return x.abs().topk(k, largest=True, sorted=True).values
    return candidates.topk(k, largest=True, sorted=True).values


def step_of(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """s = c / qmax, and 1 where c = 0 (everything then rounds to code 0)."""
    return torch.where(clip > 0, clip / qmax(bits), torch.ones_like(clip))


def quantize_symmetric(x: torch.Tensor, clip: torch.Tensor, bits: int) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """docs/design.md: x_int = clamp(round(clamp(x, -c, c) / s), -2^(b-1), 2^(b-1)-1), s = c/qmax.
    Returns (codes as a new float tensor, step s). `clip` broadcasts against x."""
    step = step_of(clip, bits)
    # |clamp(x, -c, c) / s| <= qmax (1 + 2^-23): rounding cannot leave [-qmax, qmax], so
    # the outer clamp of the formula is implied and costs no pass.
    codes = torch.clamp(x, -clip, clip)
    return codes.div_(step).round_(), step


def weight_clip(weight: torch.Tensor, cfg: WeightConfig) -> torch.Tensor:
    """Clip value of |W|: max or `clip_pct` percentile, per tensor (0-d) or per output
    channel ([out, 1])."""
    w = weight.detach()
    if cfg.granularity == "tensor":
        return w.abs().amax() if cfg.clip_pct is None else percentile_abs(w, cfg.clip_pct)
    if cfg.clip_pct is None:
        return w.abs().amax(dim=1, keepdim=True)
    return percentile_abs(w, cfg.clip_pct, dim=1).unsqueeze(1)


def center_out_split_(x_int: torch.Tensor, lsb_bits: int, radix: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid split of docs/design.md step 2, in place: returns M and turns x_int into L, with
    x_int == radix*M + L, L in the signed `lsb_bits` range and M == 0 exactly when the
    code already lies in that range (maximal MSB sparsity).

    With r = x - clamp(x, Lmin, Lmax) (0 inside, else the distance past the range),
    DESIGN's M = ceil(r/R) above and -ceil(-r/R) below is r/R rounded away from zero,
    i.e. trunc((r + sign(r) (R - 1)) / R): five passes instead of two ceil chains.
    `out` (same shape as x_int) receives M if given.
    """
    lsb_min, lsb_max = -(2 ** (lsb_bits - 1)), 2 ** (lsb_bits - 1) - 1
    msb = torch.clamp(x_int, lsb_min, lsb_max, out=out)
    torch.sub(x_int, msb, out=msb)
    msb.add_(msb.sign(), alpha=radix - 1).div_(radix, rounding_mode="trunc")
    x_int.sub_(msb, alpha=radix)
    return msb


def bitserial_split_(x_int: torch.Tensor, lsb_bits: int, lsb_gain_shift: int = 0,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Seed bit-serial split, in place: returns MSB = floor(x / 2^lb) (signed) and turns
    x_int into LSB * 2^g with LSB = x mod 2^lb in [0, 2^lb - 1] (the DAC gain shift g).
    `out` (same shape as x_int) receives MSB if given."""
    msb = torch.div(x_int, 2**lsb_bits, rounding_mode="floor", out=out)
    x_int.sub_(msb, alpha=2**lsb_bits)
    if lsb_gain_shift:
        x_int.mul_(2**lsb_gain_shift)
    return msb
