"""Fixed chunks of a global index: the unit of every per-image forward.

Matrix kernels (CPU BLAS, oneDNN, cuBLAS) choose their algorithm, and so their rounding, by
the number of rows. Grouping the work of an evaluation by batch size or by process would
make an image's result depend on who else shared its forward. Grouping it by chunk of
the global index, [k C, (k + 1) C) with C a constant of the experiment, makes every run
layout compute the same forwards. docs/design.md, "Reproducibility".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

# Images per forward where an experiment does not say (fid.chunk_size).
DEFAULT_CHUNK_SIZE = 64


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
