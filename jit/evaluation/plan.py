"""The sample plan of an evaluation: which label and initial noise each global image index
gets, and how the indices are grouped into the forwards every process runs.

Image i gets label labels[i] and initial noise drawn from a generator seeded with
seed * 1_000_003 + i; i is also its sample id for the quantized layers' thermal noise.

All per-image work runs in fixed chunks of the global index: chunk k holds images
[kC, min((k+1)C, N)), C = `fid.chunk_size`, and one forward (a sampling step, a feature
extraction) covers exactly one chunk. Rank r of W takes chunks r, r + W, r + 2W, ...
Matrix kernels choose their algorithm, and so their rounding, by the number of rows; with
the rows fixed by the chunk, every layout (process count, order) computes the same
forwards, so the generated images and their features depend on C and on nothing else
about the run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from jit.chunks import index_chunks

LABEL_STRATEGIES = ("repeat", "spread")
NOISE_SEED_STRIDE = 1_000_003  # prime: (seed, index) pairs map to distinct seeds for index < stride


class EvaluationConfigError(ValueError):
    """An fid.* setting is invalid."""


def balanced_labels(num_images: int, num_classes: int, strategy: str = "repeat") -> torch.Tensor:
    """Conditioning label of every global image index, class-balanced.

    When num_classes divides num_images both strategies give labels i % C (exactly
    N / C images per class). Otherwise `repeat` keeps cycling 0..C-1, so the first
    N % C classes get one extra image; `spread` gives the extra images to N % C classes
    spaced evenly over the class range. In both, the classes take turns, so any prefix
    of the index range is balanced too.
    """
    if strategy not in LABEL_STRATEGIES:
        raise EvaluationConfigError(f"label strategy {strategy!r}; allowed: {', '.join(LABEL_STRATEGIES)}")
    base, extra = divmod(num_images, num_classes)
    counts = np.full(num_classes, base)
    if strategy == "repeat":
        counts[:extra] += 1
    else:
        counts[(np.arange(extra) * num_classes) // max(extra, 1)] += 1
    # Round j lists, in class order, every class that still has a j-th image.
    labels = [c for j in range(int(counts.max())) for c in np.flatnonzero(counts > j)]
    return torch.tensor(labels, dtype=torch.long)


def shard_indices(num_images: int, rank: int, world_size: int, chunk_size: int = 1
                  ) -> torch.Tensor:
    """All global indices `rank` generates (its chunks, concatenated in order)."""
    chunks = index_chunks(num_images, chunk_size, rank, world_size)
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


def initial_noise(seed: int, indices, shape, noise_scale: float) -> torch.Tensor:
    """noise_scale * N(0, I) per image from (seed, index), on the CPU so any device agrees."""
    out = torch.empty(len(indices), *shape)
    gen = torch.Generator()
    for row, index in enumerate(indices):
        gen.manual_seed(int(seed) * NOISE_SEED_STRIDE + int(index))
        out[row] = torch.randn(shape, generator=gen)
    return out * noise_scale


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
