"""How long OpenMP's idle workers spin: a process setting that must be made before torch
loads, so the entry points (run.py, `python -m benchmarks.*`) call `prefer_short_spin()`
before they import torch.

After every parallel region, libgomp (the OpenMP runtime of torch's Linux wheels) keeps
its workers busy-waiting for the next one for GOMP_SPINCOUNT iterations, 300000 by
default: several milliseconds on a 2-core machine. That is the right trade for a model
that is nothing but parallel ops, the wrong one beside a thread of our own: on the CPU
plan a helper thread draws half of every layer's thermal noise (quant/plan.py,
`noise_helper`) right after the layer's parallel products, and a spinning worker holds
the core the helper needs. The hybrid digits model then sampled at 0.47x the float
model's throughput, at 0.49-0.59x with a spin of 1000-30000 (benchmarks/RESULTS.md,
"OpenMP's spin"); float sampling kept its speed, and an immediate sleep
(OMP_WAIT_POLICY=passive) made both slower.

A value already in the environment wins, and a process that imported torch first keeps
what its runtime read then. No result depends on it: only where the cores wait.
"""

from __future__ import annotations

import os
import sys

# Iterations an idle libgomp worker spins before it sleeps (the default is 300000).
GOMP_SPIN_COUNT = 10000


def prefer_short_spin() -> bool:
    """Sets GOMP_SPINCOUNT for this process and its children unless it is set already.
    Returns whether the setting can still take effect (torch not imported yet)."""
    os.environ.setdefault("GOMP_SPINCOUNT", str(GOMP_SPIN_COUNT))
    return "torch" not in sys.modules
