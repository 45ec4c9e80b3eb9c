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

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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


class SamplePlan(Dataset):
    """The images an evaluation pass generates, as the dataset of Lightning's test loop.

    Item k is chunk k of the global index, [kC, min((k+1)C, N)): its indices, their labels
    and their initial noise (keyed by index, jit/sample_plan.py). One item is one forward
    of every sampling step, so the batch the loop hands `test_step` is exactly a chunk.
    Lightning shards the items over ranks with a DistributedSampler without shuffling:
    rank r of W gets chunks r, r + W, ..., as `index_chunks` plans, plus, when W does not
    divide the chunk count, a copy of a chunk from the front so every rank runs as many
    batches. `is_padding` tells those copies apart: their owner is another rank.
    `sharded=False`: every rank goes through every chunk (work whose result each rank
    needs whole, such as the per-layer statistics). `done`: chunks not to generate again,
    their results stored by an interrupted run (set by the FID callback).
    """

    def __init__(self, labels: torch.Tensor, num_images: int, chunk_size: int, seed: int,
                 image_shape: tuple[int, int, int], noise_scale: float, sharded: bool = True):
        if num_images > len(labels):
            raise ValueError(f"the plan has labels for {len(labels)} images, not {num_images}")
        if chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
        self.labels, self.num_images, self.chunk_size = labels, int(num_images), int(chunk_size)
        self.seed, self.image_shape, self.noise_scale = int(seed), tuple(image_shape), float(noise_scale)
        self.sharded = sharded
        self.done: set[int] = set()  # chunks an earlier run scored (jit/evaluation/chunks.py)

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.chunk_size)

    def __getitem__(self, chunk: int) -> dict[str, torch.Tensor]:
        if not 0 <= chunk < len(self):
            raise IndexError(f"chunk {chunk} of a plan with {len(self)} chunks")
        index = torch.arange(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_images))
        return {"index": index, "label": self.labels[index],
                "noise": initial_noise(self.seed, index, self.image_shape, self.noise_scale)}

    def loader(self) -> DataLoader:
        """One chunk per batch, in chunk order (`batch_size=None`: the items are batches).
        Unsharded, the loader brings its own one-replica sampler, which Lightning keeps."""
        sampler = None if self.sharded else DistributedSampler(self, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(self, batch_size=None, shuffle=False, sampler=sampler)

    def chunk_of(self, index: torch.Tensor) -> int:
        return int(index[0]) // self.chunk_size

    def is_padding(self, index: torch.Tensor, rank: int, world_size: int) -> bool:
        """True for a chunk the sampler handed `rank` only to even out the ranks' batches."""
        return self.sharded and self.chunk_of(index) % world_size != rank

    def skips(self, index: torch.Tensor, rank: int, world_size: int) -> bool:
        """Nothing to generate: a padding repeat, or a chunk whose results are stored."""
        return self.is_padding(index, rank, world_size) or self.chunk_of(index) in self.done
