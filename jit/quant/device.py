"""The memory devices of the analog arrays (docs/design.md "Device non-idealities"), one
formula per function; part of the executable specification with reference.py.

An INT weight code c (|c| <= code_max) is programmed into a differential pair of devices:
|c| / code_max * g_max on G+ for c > 0 (on G- for c < 0), the other device of the pair
programmed to 0. The array computes with the read-back weight (G+ - G-) / g_max *
code_max, in code units. The devices' model (configs/device/, jit/quant/config.py
DeviceConfig) is the PCM fit of Nandakumar et al. (ICECS 2019) as AIHWKit's
PCMLikeNoiseModel applies it: programming noise, power-law drift with an exponent per
device, 1/f read noise, plus stuck devices and global drift compensation.

`program` runs the whole chain once per layer and t_inference (the layer caches its
result); both the fast engine and reference.py read the analog arrays from it, so the
two paths compute with the same conductances. Every draw is keyed (device seed, layer,
draw, weight index) through reference.keyed_normal / keyed_uniform: the same array on
every device, batch size and process count.

Conductances are computed in float64 (g in uS); the read-back weights come back in the
caller's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .config import DeviceConfig
from .noise import noise_key
from .quantizers import stable_seed
from .reference import keyed_normal, keyed_uniform

# Below this relative conductance the drift statistics take their value at the floor
# (ln 0 is -inf), as the published fit does.
_G_REL_FLOOR = 1e-7
# The 1/f read noise's relative spread q(g) is capped for small conductances via
# g_rel^k >= this floor (the published fit's clamp).
_READ_Q_FLOOR = 1e-3

# Which draw a key belongs to (mixed into the layer's device key with the pair side).
_DRAW_PROGRAMMING, _DRAW_DRIFT, _DRAW_STUCK = 1, 2, 3
_SIDES = (0, 1)  # G+ and G-


def layer_key(seed: int, layer_name: str) -> int:
    """The key of one layer's devices: apart from its thermal-noise key (a different
    name space), identical in every process."""
    return stable_seed(seed, f"device/{layer_name}")


def draw_key(key: int, draw: int, side: int) -> int:
    return noise_key(key, draw, side)


# ----- programming ---------------------------------------------------------------------
def target_conductances(codes: torch.Tensor, code_max: int, g_max_uS: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G+, G-) targets in uS: |c| / code_max * g_max on the side of the code's sign."""
    g = codes.abs() / code_max * g_max_uS
    zero = torch.zeros_like(g)
    return torch.where(codes > 0, g, zero), torch.where(codes < 0, g, zero)


def programming_sigma_uS(g_uS: torch.Tensor, cfg: DeviceConfig) -> torch.Tensor:
    """sigma_prog(g) = c0 + c1 g_rel + c2 g_rel^2 (uS), g_rel = g / g_max."""
    c0, c1, c2 = cfg.programming_noise_uS
    g_rel = g_uS / cfg.g_max_uS
    return c0 + c1 * g_rel + c2 * g_rel * g_rel


def programmed(g_uS: torch.Tensor, cfg: DeviceConfig, normal: torch.Tensor) -> torch.Tensor:
    """g_prog = max(0, g + scale * sigma_prog(g) * N(0, 1)): no negative conductance."""
    noisy = g_uS + cfg.programming_noise_scale * programming_sigma_uS(g_uS, cfg) * normal
    return noisy.clamp(min=0.0)


# ----- drift -----------------------------------------------------------------------------
def _log_linear(g_uS: torch.Tensor, cfg: DeviceConfig, coeffs: tuple[float, ...]
                ) -> torch.Tensor:
    """clamp(a ln(g_rel) + b, low, high) for coeffs (a, b, low, high)."""
    slope, intercept, low, high = coeffs
    g_rel = (g_uS / cfg.g_max_uS).clamp(min=_G_REL_FLOOR)
    return (slope * torch.log(g_rel) + intercept).clamp(min=low, max=high)


def drift_nu_mean(g_uS: torch.Tensor, cfg: DeviceConfig) -> torch.Tensor:
    """mu_nu(g) = clamp(a ln g_rel + b, low, high), (a, b, low, high) = drift_nu_mean."""
    return _log_linear(g_uS, cfg, cfg.drift_nu_mean)


def drift_nu_std(g_uS: torch.Tensor, cfg: DeviceConfig) -> torch.Tensor:
    """sigma_nu(g) = clamp(a ln g_rel + b, low, high), (a, b, low, high) = drift_nu_std."""
    return _log_linear(g_uS, cfg, cfg.drift_nu_std)


def drift_exponent(g_target_uS: torch.Tensor, cfg: DeviceConfig, normal: torch.Tensor
                   ) -> torch.Tensor:
    """nu = drift_scale * |mu_nu(g) + sigma_nu(g) N(0, 1)| per device, from the target
    conductance."""
    nu = (drift_nu_mean(g_target_uS, cfg) + drift_nu_std(g_target_uS, cfg) * normal).abs()
    return cfg.drift_scale * nu


def model_time_s(cfg: DeviceConfig) -> float:
    """The model's time since programming: t = t0 + t_inference (t_inference 0: t0, no
    drift yet)."""
    return cfg.drift_t0_s + cfg.t_inference_s


def drifted(g_uS: torch.Tensor, nu: torch.Tensor, cfg: DeviceConfig) -> torch.Tensor:
    """G(t) = G(t0) (t / t0)^-nu."""
    return g_uS * torch.pow(model_time_s(cfg) / cfg.drift_t0_s, -nu)


# ----- stuck devices ---------------------------------------------------------------------
def stuck(g_uS: torch.Tensor, uniform: torch.Tensor, cfg: DeviceConfig) -> torch.Tensor:
    """A share stuck_at_zero_fraction of the devices holds 0, the next
    stuck_at_max_fraction holds g_max, whatever they were programmed to (u ~ U(0, 1) per
    device picks which)."""
    at_zero = uniform < cfg.stuck_at_zero_fraction
    at_max = ~at_zero & (uniform < cfg.stuck_at_zero_fraction + cfg.stuck_at_max_fraction)
    g = torch.where(at_zero, torch.zeros_like(g_uS), g_uS)
    return torch.where(at_max, torch.full_like(g_uS, cfg.g_max_uS), g)


# ----- read noise ------------------------------------------------------------------------
def read_noise_q(g_prog_uS: torch.Tensor, cfg: DeviceConfig) -> torch.Tensor:
    """Relative 1/f spread q(g) = min(q0 / max(g_rel^k, 1e-3), q_max), (q0, k, q_max) =
    read_noise_q, from the programmed conductance."""
    q0, exponent, q_max = cfg.read_noise_q
    g_rel = (g_prog_uS / cfg.g_max_uS).abs()
    return (q0 / torch.pow(g_rel, exponent).clamp(min=_READ_Q_FLOOR)).clamp(max=q_max)


def read_noise_time_factor(cfg: DeviceConfig) -> float:
    """sqrt(ln((t + t_read) / (2 t_read))): the 1/f noise accumulated over the read
    window t_read at time t since programming."""
    t = model_time_s(cfg)
    return math.sqrt(max(0.0, math.log((t + cfg.read_time_s) / (2 * cfg.read_time_s))))


def read_noise_sigma_uS(g_uS: torch.Tensor, g_prog_uS: torch.Tensor, cfg: DeviceConfig
                        ) -> torch.Tensor:
    """Std of one read of a device at conductance g(t): read_noise_scale |g(t)| q(g_prog)
    sqrt(ln((t + t_read) / (2 t_read)))."""
    return (cfg.read_noise_scale * read_noise_time_factor(cfg)) * g_uS.abs() * read_noise_q(
        g_prog_uS, cfg)


# ----- the pair as a weight ----------------------------------------------------------------
def read_back(g_plus_uS: torch.Tensor, g_minus_uS: torch.Tensor, code_max: int,
              g_max_uS: float) -> torch.Tensor:
    """The weight the array computes with, in code units: (G+ - G-) / g_max * code_max."""
    return (g_plus_uS - g_minus_uS) / g_max_uS * code_max


def read_variance(sigma_plus_uS: torch.Tensor, sigma_minus_uS: torch.Tensor, code_max: int,
                  g_max_uS: float) -> torch.Tensor:
    """Variance of one read of the read-back weight, code units squared: the two devices'
    read noise is independent."""
    return (sigma_plus_uS.square() + sigma_minus_uS.square()) * (code_max / g_max_uS) ** 2


def compensation_factor(reference: torch.Tensor, current: torch.Tensor) -> float:
    """Global drift compensation: sum |W(programmed)| / sum |W(t)|. The hardware reads
    each row once with a one-hot input at programming time and again at t_inference
    (AIHWKit's GlobalDriftCompensation: the mean |output| of those reads) and rescales the
    array's outputs digitally by the ratio."""
    now = float(current.abs().sum())
    return float(reference.abs().sum()) / now if now > 0 else 1.0


def weight_snr_db(codes: torch.Tensor, read_back: torch.Tensor) -> float:
    """10 log10(sum c^2 / sum (w - c)^2) of the read-back weights w against the codes c
    (inf for exact weights)."""
    codes, read_back = codes.double(), read_back.double()
    error = float((read_back - codes).square().sum())
    signal = float(codes.square().sum())
    return 10 * math.log10(signal / error) if error > 0 else math.inf


def weight_drift_factor(codes: torch.Tensor, read_back: torch.Tensor) -> float:
    """sum |w| / sum |c|: how much of the weights' magnitude the arrays keep."""
    total = float(codes.double().abs().sum())
    return float(read_back.double().abs().sum()) / total if total > 0 else 1.0


class ProgrammedWeights(NamedTuple):
    """One layer's analog array at t_inference, in code units, [out, in]."""

    read_back: torch.Tensor  # (G+ - G-) / g_max * code_max, before compensation
    read_variance: torch.Tensor | None  # per read (None: no read noise)
    compensation: float  # digital gain on the array's outputs (1: none)

    def compensated(self) -> torch.Tensor:
        """The read-back weight as the layer's outputs see it (after compensation)."""
        return self.read_back * self.compensation


def program(codes: torch.Tensor, code_max: int, cfg: DeviceConfig, key: int
            ) -> ProgrammedWeights:
    """Program the INT codes [out, in] into device pairs and read them back at
    t = t0 + t_inference: targets, programming noise, drift, stuck devices, read-noise
    variance and compensation, each draw keyed by (key, draw, pair side, weight index)."""
    codes = codes.detach().to(torch.float64)
    shape, where = tuple(codes.shape), codes.device
    targets = target_conductances(codes, code_max, cfg.g_max_uS)
    at_t0, at_t, sigmas = [], [], []
    for side, g_target in zip(_SIDES, targets):
        g = g_target
        if cfg.programming_noise:
            normal = keyed_normal(draw_key(key, _DRAW_PROGRAMMING, side), shape, where)
            g = programmed(g_target, cfg, normal.double())
        g_prog = g
        if cfg.drifts:
            normal = keyed_normal(draw_key(key, _DRAW_DRIFT, side), shape, where)
            g = drifted(g_prog, drift_exponent(g_target, cfg, normal.double()), cfg)
        if cfg.stuck:
            uniform = keyed_uniform(draw_key(key, _DRAW_STUCK, side), shape, where).double()
            g_prog, g = stuck(g_prog, uniform, cfg), stuck(g, uniform, cfg)
        at_t0.append(g_prog)
        at_t.append(g)
        if cfg.read_noise:
            sigmas.append(read_noise_sigma_uS(g, g_prog, cfg))
    weights = read_back(*at_t, code_max, cfg.g_max_uS)
    compensation = 1.0
    if cfg.drift_compensation == "global":
        compensation = compensation_factor(read_back(*at_t0, code_max, cfg.g_max_uS), weights)
    variance = read_variance(*sigmas, code_max, cfg.g_max_uS) if sigmas else None
    return ProgrammedWeights(weights, variance, compensation)


def training_draw(cfg: DeviceConfig) -> DeviceConfig:
    """The device a hardware-aware training step sees: the preset's programming noise
    alone (a fresh draw per step, the caller's key), no drift, read noise or stuck
    devices (AIHWKit's noise injection during training)."""
    return dataclasses.replace(cfg, t_inference_s=0.0, drift_compensation="none",
                               read_noise_scale=0.0, stuck_at_zero_fraction=0.0,
                               stuck_at_max_fraction=0.0)
