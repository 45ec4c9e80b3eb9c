"""x-prediction flow-matching wrapper around JiT: training loss and ODE samplers.

Time runs from t=0 (pure noise) to t=1 (clean image): z_t = t x + (1 - t) e.
The network predicts x; velocities are derived from it, v = (x - z) / (1 - t).
`state_dict()` equals the official wrapper's: the backbone lives in `self.net`.
"""

from __future__ import annotations

import torch
from torch import nn

SAMPLING_METHODS = ("heun", "euler")
TIME_SCHEDULES = ("linear", "logit_normal")


class NonFiniteSampleError(ValueError):
    """A sampling step produced NaN or Inf: the images would be scored as black pixels.

    `step` is the first step (1-based, of `steps`) that did; `rows` the batch rows that
    were non-finite after it, in order. Callers that know the rows' global image indices
    re-raise naming them (jit/evaluation/fid.py)."""

    def __init__(self, step: int, steps: int, rows: list[int], what: str = "batch row"):
        self.step, self.steps, self.rows = step, steps, rows
        self.what = what
        super().__init__(f"sampling step {step} of {steps} produced NaN or Inf values (first at "
                         f"{what} {rows[0]}); the sampler settings (sampler.cfg_scale, sampler.steps) "
                         "or the weights are unusable")

    def for_images(self, indices) -> NonFiniteSampleError:
        """The same error naming global image indices: `indices[row]` is the image of a row."""
        indices = [int(i) for i in indices]
        return NonFiniteSampleError(self.step, self.steps, [indices[row] for row in self.rows], "image")


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, num_classes: int, *, P_mean: float = -0.8, P_std: float = 0.8,
                 t_eps: float = 0.05, noise_scale: float = 1.0, label_drop_prob: float = 0.1):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.P_mean = P_mean
        self.P_std = P_std
        self.t_eps = t_eps
        self.noise_scale = noise_scale
        self.label_drop_prob = label_drop_prob

    @property
    def img_size(self) -> int:
        return self.net.input_size

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    # ---------------------------------------------------------------- training
    def sample_t(self, n: int, device=None, generator=None) -> torch.Tensor:
        """Logit-normal training times: sigmoid(N(P_mean, P_std^2))."""
        return torch.sigmoid(torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def noised(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z_t = t x + (1 - t) e with e ~ N(0, noise_scale^2); also used by calibration."""
        if noise is None:
            noise = torch.randn_like(x) * self.noise_scale
        t = t.view(-1, *([1] * (x.ndim - 1)))
        return t * x + (1 - t) * noise

    def velocity(self, pred_x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (z.ndim - 1))) if t.ndim else t
        return (pred_x - z) / (1 - t).clamp_min(self.t_eps)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean squared error between target and predicted velocity (v-loss on x-prediction)."""
        labels = self.drop_labels(labels) if self.training else labels
        t = self.sample_t(x.shape[0], device=x.device)
        z = self.noised(x, t)
        v_target = self.velocity(x, z, t)
        v_pred = self.velocity(self.net(z, t, labels), z, t)
        return (v_target - v_pred).pow(2).mean(dim=tuple(range(1, x.ndim))).mean()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(x, labels)

    # ---------------------------------------------------------------- sampling
    def timesteps(self, steps: int, schedule: str = "linear", device=None) -> torch.Tensor:
        """steps+1 times from 0 to 1: uniform, or quantiles of the logit-normal training law."""
        if schedule == "linear":
            return torch.linspace(0.0, 1.0, steps + 1, device=device)
        if schedule == "logit_normal":
            q = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)[1:-1]
            inner = torch.sigmoid(self.P_mean + self.P_std * torch.special.ndtri(q))
            return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)]).float().to(device)
        raise ValueError(f"unknown time schedule {schedule!r}; allowed: {', '.join(TIME_SCHEDULES)}")

    @staticmethod
    def guidance_mask(ts: torch.Tensor, interval) -> torch.Tensor:
        """Which times get CFG: low < t < high (low == 0 includes t = 0).

        Compared on the float32 time tensor, as the official sampler does: a time equal to
        a bound in float32 is outside the interval, which a float64 comparison would not say.
        """
        low, high = interval
        inside = ts < high
        return inside & (ts > low) if low != 0 else inside

    def guided_velocity(self, z, t, labels, scale: float) -> torch.Tensor:
        """v_u + scale (v_c - v_u); scale 1 is v_c alone (no unconditional pass)."""
        t_batch = t.expand(z.shape[0])
        v_cond = self.velocity(self.net(z, t_batch, labels), z, t)
        if scale == 1.0:
            return v_cond
        v_uncond = self.velocity(self.net(z, t_batch, torch.full_like(labels, self.num_classes)), z, t)
        return v_uncond + scale * (v_cond - v_uncond)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, noise: torch.Tensor | None = None, steps: int = 50,
                 method: str = "heun", cfg_scale: float = 1.0, interval=(0.1, 1.0),
                 schedule: str = "linear", generator: torch.Generator | None = None,
                 step_callback=None) -> torch.Tensor:
        """Integrate the probability-flow ODE from noise (t=0) to an image (t=1).

        `noise` is the initial state z_0 itself (already multiplied by noise_scale); when
        omitted it is drawn as noise_scale * N(0, I) from `generator`. `steps - 1` steps of
        `method` are followed by one Euler step, as in the official sampler. Returns images
        in the model's range (about [-1, 1]). `step_callback(done, steps)`, if given, is
        called after each step (progress display).

        A step that leaves any image non-finite raises NonFiniteSampleError naming that
        step and the first such batch row once the call ends: the verdict stays on the
        device (one host sync per call, not per step).
        """
        if method not in SAMPLING_METHODS:
            raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(SAMPLING_METHODS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        device = labels.device
        shape = (labels.shape[0], self.in_channels, self.img_size, self.img_size)
        if noise is None:
            z = self.noise_scale * torch.randn(shape, device=device, generator=generator)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"initial noise has shape {tuple(noise.shape)}, expected {shape}")
            z = noise.to(device)
        ts = self.timesteps(steps, schedule, device=device)
        # One host sync per call (not per step) decides which steps need the unconditional pass.
        scales = [cfg_scale if inside else 1.0 for inside in self.guidance_mask(ts, interval).tolist()]
        first_bad_step = torch.zeros(shape[0], dtype=torch.int32, device=device)  # 0: finite so far
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            v = self.guided_velocity(z, t, labels, scales[i])
            z_euler = z + (t_next - t) * v
            if method == "euler" or i == steps - 1:
                z = z_euler
            else:
                v_next = self.guided_velocity(z_euler, t_next, labels, scales[i + 1])
                z = z + (t_next - t) * 0.5 * (v + v_next)
            bad = ~torch.isfinite(z).flatten(1).all(1)
            first_bad_step = torch.where(bad & (first_bad_step == 0), i + 1, first_bad_step)
            if step_callback is not None:
                step_callback(i + 1, steps)
        if bool((first_bad_step != 0).any()):
            flagged = first_bad_step.cpu()
            step = int(flagged[flagged != 0].min())
            raise NonFiniteSampleError(step, steps, torch.nonzero(flagged == step).flatten().tolist())
        return z
