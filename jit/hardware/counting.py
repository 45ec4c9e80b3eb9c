"""Dense multiply-accumulates per generated image, layer by layer, from one sampling run.

What a layer costs in MACs depends only on tensor shapes, not on values, so one image
generated with the evaluation's sampler (steps, Heun, the CFG interval that doubles the
batch) gives the exact count per image. Counted: every nn.Linear and nn.Conv2d, and the
two products of each attention (Q K^T and A V). Elementwise work (norms, activations,
softmax, RoPE, the sampler's updates) and embedding lookups are not MACs and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from jit.models.denoiser import NonFiniteSampleError
from jit.models.layers import Attention
from jit.sample_plan import initial_noise


@dataclass
class DenseCounts:
    """MACs of one image: per nn.Linear by module name (with its shape) and the rest."""

    linear_macs: dict[str, int] = field(default_factory=dict)
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    conv_macs: int = 0
    attention_macs: int = 0

    def target_macs(self, targets: list[str]) -> int:
        return sum(self.linear_macs.get(name, 0) for name in targets)

    def rest_macs(self, targets: list[str]) -> int:
        """Everything outside the target layers: other linears, convolutions, attention."""
        chosen = set(targets)
        return (sum(m for name, m in self.linear_macs.items() if name not in chosen)
                + self.conv_macs + self.attention_macs)


def _is_attention(module: nn.Module) -> bool:

    return isinstance(module, Attention)


def count_dense_macs(net: nn.Module, run) -> DenseCounts:
    """Run `run()` (one image's generation) with counting hooks on `net`'s modules."""
    counts = DenseCounts()

    def on_linear(name):
        def hook(module, inputs, output):
            counts.linear_macs[name] = counts.linear_macs.get(name, 0) + output.numel() * module.in_features
            counts.linear_shapes[name] = (module.in_features, module.out_features)
        return hook

    def on_conv(module, inputs, output):
        kernel = module.weight[0].numel()  # in_channels / groups x kernel area
        counts.conv_macs += output.numel() * kernel

    def on_attention(module, inputs, output):
        batch, tokens, width = inputs[0].shape
        counts.attention_macs += 2 * batch * tokens * tokens * width  # Q K^T and A V, all heads

    handles = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(on_linear(name)))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif _is_attention(module):
            handles.append(module.register_forward_hook(on_attention))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counts


def dense_macs_per_image(module, fid_cfg, num_classes: int) -> DenseCounts:
    """One image of the FID set (index 0: its label and initial noise) generated with the
    evaluation's sampler and weights, counted."""
    denoiser = module.denoiser
    device = next(denoiser.parameters()).device
    shape = (denoiser.in_channels, denoiser.img_size, denoiser.img_size)
    labels = fid_cfg.labels(num_classes)[:1].to(device)
    noise = initial_noise(fid_cfg.seed, [0], shape, denoiser.noise_scale).to(device)
    try:
        return count_dense_macs(denoiser.net, lambda: module.generate(labels, noise=noise, **fid_cfg.sampler))
    except NonFiniteSampleError as err:
        raise err.for_images([0]) from None
