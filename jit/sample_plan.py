"""The sample plan: what each global image index gets (label, initial noise) and the fixed
chunks of the index that every per-image forward covers.

Image i gets label labels[i] and initial noise drawn from a generator seeded with
seed * 1_000_003 + i; i is also its sample id for the quantized layers' thermal noise.

Matrix kernels (CPU BLAS, oneDNN, cuBLAS) choose their algorithm, and so their rounding, by
the number of rows. Grouping the work of an evaluation by batch size or by process would
make an image's result depend on who else shared its forward. Grouping it by chunk of
the global index, [k C, (k + 1) C) with C a constant of the experiment, makes every run
layout compute the same forwards. docs/design.md, "Reproducibility".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

# Images per forward where an experiment does not say (fid.chunk_size).
DEFAULT_CHUNK_SIZE = 64
LABEL_STRATEGIES = ("repeat", "spread")
NOISE_SEED_STRIDE = 1_000_003  # prime: (seed, index) pairs map to distinct seeds for index < stride


def index_chunks(count: int, chunk_size: int, rank: int = 0, world_size: int = 1
                 ) -> list[torch.Tensor]:
    """The chunks of [0, count) that `rank` of `world_size` processes: chunk
    k = [k C, min((k + 1) C, count)) for k = rank, rank + W, ... The last chunk may be
    shorter; it is the same on every layout."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    starts = range(rank * chunk_size, count, world_size * chunk_size)
    return [torch.arange(start, min(start + chunk_size, count)) for start in starts]


def rechunk(batches: Iterable, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index of the first image, images) for each chunk [k C, (k + 1) C), from
    (images, labels) batches of any size that arrive in index order."""
    pending, start, held = [], 0, 0
    for images, _labels in batches:
        pending.append(images)
        held += images.shape[0]
        while held >= chunk_size:
            joined = torch.cat(pending)
            yield start, joined[:chunk_size]
            pending, start, held = [joined[chunk_size:]], start + chunk_size, held - chunk_size
    if held:
        yield start, torch.cat(pending)


def balanced_labels(num_images: int, num_classes: int, strategy: str = "repeat") -> torch.Tensor:
    """Conditioning label of every global image index, class-balanced.

    When num_classes divides num_images both strategies give labels i % C (exactly
    N / C images per class). Otherwise `repeat` keeps cycling 0..C-1, so the first
    N % C classes get one extra image; `spread` gives the extra images to N % C classes
    spaced evenly over the class range. In both, the classes take turns, so any prefix
    of the index range is balanced too.
    """
    if strategy not in LABEL_STRATEGIES:
        raise ValueError(f"label strategy {strategy!r}; allowed: {', '.join(LABEL_STRATEGIES)}")
    base, extra = divmod(num_images, num_classes)
    counts = np.full(num_classes, base)
    if strategy == "repeat":
        counts[:extra] += 1
    else:
        counts[(np.arange(extra) * num_classes) // max(extra, 1)] += 1
    # Round j lists, in class order, every class that still has a j-th image.
    labels = [c for j in range(int(counts.max())) for c in np.flatnonzero(counts > j)]
    return torch.tensor(labels, dtype=torch.long)


def initial_noise(seed: int, indices, shape, noise_scale: float) -> torch.Tensor:
    """noise_scale * N(0, I) per image from (seed, index), on the CPU so any device agrees."""
    out = torch.empty(len(indices), *shape)
    gen = torch.Generator()
    for row, index in enumerate(indices):
        gen.manual_seed(int(seed) * NOISE_SEED_STRIDE + int(index))
        out[row] = torch.randn(shape, generator=gen)
    return out * noise_scale
