"""Quantizer math of DESIGN.md "AIMC quantization", one function per formula.

All integer codes are carried in floating-point tensors: products of INT8 weights and
INT<=12 activations and their sums are exact in float32 while partial sums stay below
2**24, which keeps the simulation on the fast BLAS path.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .config import WeightConfig

# topk of the largest k is much cheaper than a selection when k is a small share of n
# (high percentiles, the usual case); beyond that share two kthvalue calls win.
_TOPK_MAX_SHARE = 1 / 16


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, layer name), identical across processes and
    Python versions (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def qmax(bits: int) -> int:
    """Largest code of a signed `bits` integer."""
    return 2 ** (bits - 1) - 1


def percentile_abs(x: torch.Tensor, percentile: float, dim: int | None = None) -> torch.Tensor:
    """`percentile` (0..100] of |x| over all elements (dim=None) or along `dim`.

    Linear interpolation between order statistics exactly as torch.quantile's 'linear'
    method (q rounded to x's dtype, rank = q * (n - 1) in float64, lerp in x's dtype
    between the floor and ceil ranks), but through topk/kthvalue, so it works for any
    number of elements (torch.quantile refuses inputs above 2**24 elements on older
    releases).
    """
    a = x.detach().abs()
    a = a.reshape(-1) if dim is None else a.movedim(dim, -1)
    n = a.shape[-1]
    rank = float(torch.tensor(percentile / 100.0, dtype=a.dtype)) * (n - 1)
    low, high = math.floor(rank), min(math.ceil(rank), n - 1)
    weight = torch.tensor(rank - low, dtype=a.dtype, device=a.device)
    k_top = n - low  # how many elements are >= the low order statistic
    if k_top <= max(2, int(n * _TOPK_MAX_SHARE)):
        top = a.topk(k_top, dim=-1, largest=True, sorted=True).values
        v_low, v_high = top[..., k_top - 1], top[..., n - 1 - high]
    else:
        v_low = a.kthvalue(low + 1, dim=-1).values
        v_high = v_low if high == low else a.kthvalue(high + 1, dim=-1).values
    return torch.lerp(v_low, v_high, weight)


def _safe_step(clip: torch.Tensor, code_max: int) -> torch.Tensor:
    """clip / code_max, with step 1 where clip is 0 (everything clips to code 0 then)."""
    return torch.where(clip > 0, clip / code_max, torch.ones_like(clip))


def quantize_symmetric(x: torch.Tensor, clip: torch.Tensor, bits: int) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """DESIGN.md: x_int = clamp(round(clamp(x, -c, c) / s), -2^(b-1), 2^(b-1)-1), s = c/qmax.
    Returns (codes as a new float tensor, step s). `clip` broadcasts against x."""
    code_max = qmax(bits)
    step = _safe_step(clip, code_max)
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


def center_out_split_(x_int: torch.Tensor, lsb_bits: int, radix: int) -> torch.Tensor:
    """Hybrid split of DESIGN.md step 2, in place: returns M and turns x_int into L, with
    x_int == radix*M + L, L in the signed `lsb_bits` range and M == 0 exactly when the
    code already lies in that range (maximal MSB sparsity).

    With r = x - clamp(x, Lmin, Lmax) (0 inside, else the distance past the range),
    DESIGN's M = ceil(r/R) above and -ceil(-r/R) below is r/R rounded away from zero,
    i.e. trunc((r + sign(r) (R - 1)) / R): five passes instead of two ceil chains.
    """
    lsb_min, lsb_max = -(2 ** (lsb_bits - 1)), 2 ** (lsb_bits - 1) - 1
    msb = torch.clamp(x_int, lsb_min, lsb_max)
    torch.sub(x_int, msb, out=msb)
    msb.add_(msb.sign(), alpha=radix - 1).div_(radix, rounding_mode="trunc")
    x_int.sub_(msb, alpha=radix)
    return msb


def bitserial_split_(x_int: torch.Tensor, lsb_bits: int, lsb_gain_shift: int = 0) -> torch.Tensor:
    """Seed bit-serial split, in place: returns MSB = floor(x / 2^lb) (signed) and turns
    x_int into LSB * 2^g with LSB = x mod 2^lb in [0, 2^lb - 1] (the DAC gain shift g)."""
    msb = torch.div(x_int, 2**lsb_bits, rounding_mode="floor")
    x_int.sub_(msb, alpha=2**lsb_bits)
    if lsb_gain_shift:
        x_int.mul_(2**lsb_gain_shift)
    return msb


def adc_convert_(acc: torch.Tensor, step: float, bits: int, noise_sigma_codes: float = 0.0,
                 generator: torch.Generator | None = None, count_saturated: bool = False,
                 chunk_rows: int | None = None) -> int:
    """In place on a 2-D accumulation: acc -> clamp(round(acc/step + e), -2^(n-1), 2^(n-1)-1)
    with e ~ N(0, noise_sigma_codes^2).

    The thermal noise is referred to the ADC input and expressed in ADC steps (DESIGN.md:
    N(0, (sigma_lsb * s_adc)^2 / K) on `a`), so it is drawn with that std directly in the
    code domain. It is drawn `chunk_rows` rows at a time to bound the buffer. Returns the
    number of codes that saturated when `count_saturated`, else 0.
    """
    code_max = qmax(bits)
    if noise_sigma_codes > 0:
        rows = acc.shape[0] if chunk_rows is None else max(1, chunk_rows)
        noise = acc.new_empty((min(rows, acc.shape[0]), acc.shape[1]))
        for start in range(0, acc.shape[0], rows):
            chunk = acc[start:start + rows]
            buf = noise[:chunk.shape[0]].normal_(0.0, noise_sigma_codes, generator=generator)
            torch.round(buf.add_(chunk, alpha=1.0 / step), out=chunk)
    else:
        acc.div_(step).round_()  # exact division: rounding ties as in the seed
    saturated = 0
    if count_saturated:
        saturated = int((acc > code_max).sum() + (acc < -code_max - 1).sum())
    acc.clamp_(-code_max - 1, code_max)
    return saturated
