"""Exponential moving averages of a module's parameters, several decays at once.

The official JiT recipe keeps two EMAs (decays 0.9999 and 0.9996) of every parameter and
updates them after each optimizer step: shadow <- d * shadow + (1 - d) * param.

Lightning's `WeightAveraging` callback holds one `AveragedModel` (a full module copy)
per callback; two EMAs would mean two callbacks, two model copies with their own buffers
and no single place to say "evaluate with ema2". A small holder of float32 tensors is
simpler, and its state goes into checkpoints through the LightningModule's hooks.

Shadows are plain tensors, not registered buffers: DDP would otherwise broadcast them
from rank 0 at every forward, and the module's `state_dict()` stays equal to the
official Denoiser's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from jit.config import Weights, choices

WEIGHTS = choices(Weights)  # raw, ema1, ema2: EMA index = position - 1


class EMA:
    """float32 shadows of `module`'s parameters for each decay in `decays`."""

    def __init__(self, module: nn.Module, decays: Sequence[float]):
        decays = [float(d) for d in decays]
        for d in decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA decay must be in [0, 1), got {d}")
        self.decays = decays
        self.names = [name for name, _ in module.named_parameters()]
        self.shadows: list[list[torch.Tensor]] = [
            [p.detach().float().clone() for p in module.parameters()] for _ in decays
        ]

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        named = list(module.named_parameters())
        if [n for n, _ in named] != self.names:
            raise ValueError("the module's parameters differ from those the EMA was built for")
        return [p for _, p in named]

    def to(self, device) -> EMA:
        self.shadows = [[s.to(device) for s in shadow] for shadow in self.shadows]
        return self

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One step of every EMA towards the module's current parameters."""
        params = [p.detach().float() for p in self._params(module)]
        if self.shadows and self.shadows[0] and self.shadows[0][0].device != params[0].device:
            self.to(params[0].device)
        for decay, shadow in zip(self.decays, self.shadows):
            # lerp(s, p, 1 - d) = d * s + (1 - d) * p, fused over all tensors.
            torch._foreach_lerp_(shadow, params, 1.0 - decay)

    @torch.no_grad()
    def reset(self, module: nn.Module, index: int | None = None) -> None:
        """Set one (or every) shadow to the module's current parameters."""
        params = self._params(module)
        for i in range(len(self.decays)) if index is None else [index]:
            for s, p in zip(self.shadows[i], params):
                s.copy_(p.detach().float())

    @torch.no_grad()
    def copy_to(self, module: nn.Module, index: int) -> None:
        """Write shadow `index` into the module's parameters (cast to their dtype)."""
        for p, s in zip(self._params(module), self.shadows[index]):
            p.copy_(s.to(p.dtype))

    def as_dict(self, index: int) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadows[index]))

    @torch.no_grad()
    def load_dict(self, index: int, values: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in values]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, s in zip(self.names, self.shadows[index]):
            v = values[name]
            if tuple(v.shape) != tuple(s.shape):
                raise ValueError(
                    f"EMA tensor {name}: shape {tuple(v.shape)}, expected {tuple(s.shape)}"
                )
            s.copy_(v.float())

    def state_dict(self) -> dict:
        return {
            "decays": list(self.decays),
            "shadows": [
                {n: s.detach().clone() for n, s in self.as_dict(i).items()}
                for i in range(len(self.decays))
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadows"]) != len(self.decays):
            raise ValueError(
                f"EMA state holds {len(state['shadows'])} averages, expected {len(self.decays)}"
            )
        # The configured decays win over the saved ones: changing them on resume is allowed.
        for i, values in enumerate(state["shadows"]):
            self.load_dict(i, values)


class WeightSwap:
    """Puts the raw, ema1 or ema2 weights into a module for a while (`use`), restoring on exit.

    A stack: contexts nest, and entry [0] always holds the training (raw) weights, so the
    raw weights stay reachable (`training_state_dict`, checkpoints) while an EMA is in
    place. `hold_only`: the module was loaded with those weights alone and no EMA copies
    (an evaluation-only module); only they can be used, and no copy is made.
    """

    def __init__(self, ema: EMA, hold_only: str | None = None):
        self.ema = ema
        self.hold_only = hold_only
        self.backups: list[list[torch.Tensor]] = []

    @contextlib.contextmanager
    def use(self, module: nn.Module, which: str) -> Iterator[nn.Module]:
        if which not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
        if self.hold_only is not None:
            if which != self.hold_only:
                raise ValueError(f"only the {self.hold_only} weights were loaded for evaluation, not {which} "
                                 f"(eval_weights and fid.eval_weights must agree)")
            yield module  # already in place: no backup copy needed
            return
        if which == "raw" and not self.backups:
            yield module
            return
        params = list(module.parameters())
        backup = [p.detach().clone() for p in params]
        self.backups.append(backup)
        try:
            with torch.no_grad():
                if which == "raw":
                    for p, b in zip(params, self.backups[0]):
                        p.copy_(b)
                else:
                    self.ema.copy_to(module, WEIGHTS.index(which) - 1)
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
            self.backups.pop()

    @property
    def swapped(self) -> bool:
        """Whether other weights than the training ones are in place now."""
        return bool(self.backups)

    def training_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's training weights, even while `use` has swapped them out."""
        state = module.state_dict()
        if self.backups:
            names = [n for n, _ in module.named_parameters()]
            state.update(zip(names, self.backups[0]))
        return state
