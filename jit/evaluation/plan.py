"""The sample plan of an evaluation across processes (jit/sample_plan.py holds the plan
itself: labels, initial noise, chunks).

All per-image work runs in fixed chunks of the global index: chunk k holds images
[kC, min((k+1)C, N)), C = `fid.chunk_size`, and one forward (a sampling step, a feature
extraction) covers exactly one chunk. Rank r of W takes chunks r, r + W, r + 2W, ...
Matrix kernels choose their algorithm, and so their rounding, by the number of rows; with
the rows fixed by the chunk, every layout (process count, order) computes the same
forwards, so the generated images and their features depend on C and on nothing else
about the run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from jit.sample_plan import (  # noqa: F401  (the evaluation's plan, in one import)
    LABEL_STRATEGIES,
    balanced_labels,
    index_chunks,
    initial_noise,
)


class EvaluationConfigError(ValueError):
    """An fid.* setting is invalid."""


def shard_indices(num_images: int, rank: int, world_size: int, chunk_size: int = 1
                  ) -> torch.Tensor:
    """All global indices `rank` generates (its chunks, concatenated in order)."""
    chunks = index_chunks(num_images, chunk_size, rank, world_size)
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
