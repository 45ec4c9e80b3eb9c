"""torch.compile of the backbone for sampling.

`compiled_forward(net)` swaps `net.forward` for its compiled version inside the block and
restores it on exit. The module itself is not wrapped (no `_orig_mod.` prefix in the
state dict, EMA swaps and checkpoints untouched), and its forward hooks run eagerly
around the compiled graph, so `jit.quant.sample_context` keeps counting calls.

Quantized layers traced by Dynamo run `jit/quant/reference.py` (whole-tensor torch, no
host syncs in static mode or the token and sample scopes), so Inductor fuses their
element-wise quantizer, split and ADC passes with the rest of the block. The compiled
path is for inference: it has no straight-through gradients, calibration observers or
statistics (those passes run eagerly, outside this block). Noisy layers need a
`sample_context` around each call (the loops of this project have one).

The first call of each input shape compiles; later calls of that shape reuse the graph.
`dynamic=False` because FID batches repeat one shape (the last, smaller batch of a run
compiles once more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def compile_available() -> str | None:
    """None if this torch can compile here, else the reason in one line."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except (ImportError, OSError, RuntimeError) as err:  # Inductor needs a C++ compiler for CPU code
        return f"Inductor cannot find a C++ compiler ({err})"
    return None


@contextlib.contextmanager
def compiled_forward(net: nn.Module, enabled: bool = True, fullgraph: bool = False
                     ) -> Iterator[nn.Module]:
    """Inside the block, `net(...)` runs the compiled forward (when `enabled`). Dynamo
    keeps its graphs with the forward's code, so a later block with the same shapes and
    modules reuses them instead of compiling again."""
    if not enabled:
        yield net
        return
    forward = type(net).forward.__get__(net)
    net.forward = torch.compile(forward, fullgraph=fullgraph, dynamic=False)
    try:
        yield net
    finally:
        del net.forward  # back to the class's eager forward
