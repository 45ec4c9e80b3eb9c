"""Stateless thermal noise: which sample and which call a layer's rows belong to.

Every analog read's noise is a pure function of (quant seed, layer name, sample id, call
index of that sample, use of the layer within that call, analog path, tile, output
element, read): the layer derives one 63-bit key per (sample, path, tile) by a stable
integer mix of these numbers (`noise_key`, plain Python ints: no device work, no host
sync) and draws that sample's noise from a generator re-seeded with the key
(`engine.adc_convert_`). A sample's noise is drawn on its own rows only, in
blocks that depend on its own shape and the device type alone, so it does not depend on
the batch it is in, its position there, the process that runs it or the calls before it.
CPU and CUDA generators produce different (equally distributed) values for one key. The
CPU generator (mt19937) seeds from the key's low 32 bits only, so two keys that agree
there draw the same values (probability 2^-32 per pair; docs/design.md, Reproducibility).

The loops that own the samples say who is who:

    with sample_context(net, sample_ids):   # host-side ints, one per batch row
        images = sampler(net, ...)          # every net(...) call is one call index

`sample_context` registers a forward pre-hook on `net` that counts its calls, so each
sampling step, Heun stage or CFG branch gets its own call index without the network
knowing; the quantized layers inside `net` read the active context. A layer called with
a batch whose leading dimension is not `len(sample_ids)` raises ValueError naming it.

Outside any context (plain nn.Module use) a layer takes sample id = row index in the
batch (the leading dimension) and call index = the number of its own forwards that drew
noise since creation, copy or `reseed`. That default depends on batch composition and
call order; reproducible runs use a context.

NaN/Inf inputs. Inside a context a layer keeps its verdict on the device and the context
raises FloatingPointError naming the first such layer when the block ends, so sampling
costs one host sync per context instead of one per layer call; outside a context the
layer raises at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

# Sample ids are mixed into 64-bit keys; the bound keeps them well apart from the other
# key parts and is far above any data set (2^48 images).
SAMPLE_ID_BOUND = 2**48
_MASK64 = 2**64 - 1


def _splitmix64(value: int) -> int:
    """The splitmix64 finaliser: a bijective avalanche of 64-bit integers."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def noise_key(base: int, *parts: int) -> int:
    """A 63-bit generator seed from `base` (the layer's stable_seed) and integer `parts`
    (sample id, call index, ...), identical in every process and Python version."""
    key = base & _MASK64
    for part in parts:
        # splitmix64 is a bijection: for one prefix, distinct parts give distinct keys.
        key = _splitmix64(key ^ (part & _MASK64))
    return key & (2**63 - 1)


# splitmix64 constants as signed int64: torch has no uint64 arithmetic, and int64
# multiplication wraps modulo 2^64 on every backend, which is the uint64 product's bits.
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits: torch's >> is arithmetic."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (bit-identical to _splitmix64 after its
    gamma step, which callers add)."""
    z = (z ^ shift_right(z, 30)) * _MIX1
    z = (z ^ shift_right(z, 27)) * _MIX2
    return z ^ shift_right(z, 31)


def as_int64(value: int) -> int:
    """The int64 with the same 64 low bits as `value`."""
    value &= _MASK64
    return value - 2**64 if value >= 2**63 else value


def mix_keys(keys: torch.Tensor, part: int | torch.Tensor) -> torch.Tensor:
    """Per-sample int64 keys mixed with one more integer (a layer, use, path or tile) or
    one per sample, as noise_key does on host integers: splitmix64(key ^ part)."""
    if not isinstance(part, torch.Tensor):
        part = as_int64(part)
    return mix64((keys ^ part) + _GAMMA)


def _int64_tensor(values: int | Sequence[int]) -> torch.Tensor:
    if isinstance(values, int):
        return torch.tensor([as_int64(values)], dtype=torch.int64)
    try:
        return torch.tensor(values, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):  # outside int64: the low 64 bits
        return torch.tensor([as_int64(value) for value in values], dtype=torch.int64)


def noise_keys(bases: int | Sequence[int], *parts: int | Sequence[int]) -> list[int]:
    """noise_key element by element over the samples of a call, in whole-tensor ops
    (mix_keys): each of `bases` and `parts` is one integer or a sequence with one per
    sample (broadcast), as the per-sample keys of every layer call need (a Python loop of
    noise_key cost ~0.2 s of a 7 s chunk of the default run)."""
    key = _int64_tensor(bases)
    for part in parts:
        key = mix_keys(key, part if isinstance(part, int) else _int64_tensor(part))
    return (key & (2**63 - 1)).tolist()


class SampleContext:
    """Sample ids of the rows of every batch `net` is called with, and its call count."""

    def __init__(self, sample_ids: Iterable[int] | torch.Tensor) -> None:
        if isinstance(sample_ids, torch.Tensor):
            if sample_ids.is_floating_point() or sample_ids.dim() != 1:
                raise TypeError("sample_ids must be a 1-D integer tensor or a sequence of ints")
            sample_ids = sample_ids.cpu().tolist()
        ids = list(sample_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError("sample_ids must be integers")
        self.sample_ids = ids
        self.low = min(ids, default=0)
        self.high = max(ids, default=0)
        # One flag for the layers to read: a compiled graph guards on what it reads, and
        # the ids themselves change with every batch.
        self.ids_in_range = self.low >= 0 and self.high < SAMPLE_ID_BOUND
        self.calls = -1  # the pre-hook makes the first call index 0
        self.call_keys: torch.Tensor | None = None  # int64 [samples] of the current call
        self.uses: dict[int, int] = {}  # id(layer) -> its forwards within the current call
        self.finite: dict[str, torch.Tensor] = {}  # layer name -> all inputs finite (device)
        self.pending_finite: list[tuple[str, torch.Tensor]] = []  # this call's verdicts

    def begin_call(self, device: torch.device | None = None) -> None:
        """A new call of the network. On `device` (that of its input) the call's keys
        noise_key(call index, sample id) wait as an int64 tensor for the whole-tensor engine
        (reference.py): a compiled graph takes them as an input, so a new call is a new
        tensor value, not a new graph."""
        self.calls += 1
        self.uses.clear()
        self._fold_finite()
        if device is not None:
            keys = noise_keys(self.calls, self.sample_ids) if self.sample_ids else []
            self.call_keys = torch.tensor(keys, dtype=torch.int64, device=device)

    def check(self, layer_name: str, batch: int) -> None:
        """Errors naming the layer for a batch that is not the context's samples."""
        if batch != len(self.sample_ids):
            raise ValueError(f"layer '{layer_name}': called with a batch of {batch} samples "
                             f"inside a sample_context of {len(self.sample_ids)} sample ids")
        if not self.ids_in_range:
            raise ValueError(f"layer '{layer_name}': sample ids must lie in [0, "
                             f"{SAMPLE_ID_BOUND}), got {self.low}..{self.high}")

    def record_finite(self, layer_name: str, finite: torch.Tensor) -> None:
        # Appended, not merged: a compiled graph then reads nothing from the context
        # (a read would be a guard that changes after the first call).
        self.pending_finite.append((layer_name, finite))

    def _fold_finite(self) -> None:
        """The pending verdicts into one device flag per layer (no host sync)."""
        for layer_name, finite in self.pending_finite:
            seen = self.finite.get(layer_name)
            self.finite[layer_name] = finite if seen is None else seen & finite
        self.pending_finite.clear()

    def raise_if_nonfinite(self) -> None:
        """FloatingPointError naming the first layer (in order of first use) that saw a
        NaN or Inf input in this context: one host sync."""
        self._fold_finite()
        if not self.finite:
            return
        names = list(self.finite)
        device = self.finite[names[0]].device
        finite = torch.stack([self.finite[name].to(device) for name in names])
        if bool(finite.all()):
            return
        first = names[int((~finite).nonzero()[0, 0])]
        raise FloatingPointError(f"layer '{first}': NaN or Inf in the input activations")

    def next_use(self, layer: nn.Module) -> int:
        use = self.uses.get(id(layer), 0)
        self.uses[id(layer)] = use + 1
        return use


def _quantized_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if hasattr(m, "_sample_context")]


@contextlib.contextmanager
def sample_context(net: nn.Module, sample_ids: Iterable[int] | torch.Tensor
                   ) -> Iterator[SampleContext]:
    """Inside the block, every forward of `net` is one call of the samples `sample_ids`
    (host-side ints, one per row of the batch, in [0, SAMPLE_ID_BOUND)); the quantized
    layers in `net` key their thermal noise on (sample id, call index). Nesting on the
    same layers restores the outer context on exit."""
    context = SampleContext(sample_ids)
    layers = _quantized_layers(net)
    prior = [(layer, layer._sample_context) for layer in layers]
    def begin_call(module: nn.Module, args: tuple) -> None:
        first = args[0] if args else None
        context.begin_call(first.device if isinstance(first, torch.Tensor) else None)

    handle = net.register_forward_pre_hook(begin_call)
    try:
        for layer in layers:
            layer._sample_context = context
            layer.seed_base()  # host work here, not inside a compiled call
            if layer.static is not None:
                for dtype in (torch.float32, torch.float64):
                    layer.static_act_numbers(dtype)
        yield context
        context.raise_if_nonfinite()
    finally:
        handle.remove()
        for layer, previous in prior:
            layer._sample_context = previous
