"""Reference statistics (mu, sigma) for FID: from an npz file or computed once and cached.

Accepted files: the official JiT `fid_stats/jit_in256_stats.npz` (512 px models:
`jit_in512_stats.npz`) and ADM's `VIRTUAL_imagenet256_labeled.npz` all hold `mu` and `sigma` (ADM adds images `arr_0`
and spatial `mu_s`/`sigma_s`, ignored here). A file with only `arr_0` (NHWC uint8 images,
as ADM-style sample exports) is reduced to statistics with the current extractor.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from jit.atomic import atomic_path

from .features import FeatureSpace
from .fid import GaussianStats


class ReferenceStatsError(ValueError):
    """Reference statistics are missing or do not fit the feature extractor."""


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """np.savez, atomically: readers never see half a statistics file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _check(mu, sigma, feature_dim: int, source) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ReferenceStatsError(
            f"reference statistics {source} have mu {mu.shape} and sigma {sigma.shape}, but the feature "
            f"extractor gives {feature_dim}-d features (expected mu ({feature_dim},), sigma "
            f"({feature_dim}, {feature_dim})); were they computed with a different extractor?"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceStatsError(f"reference statistics {source} contain NaN or Inf values")
    return mu, sigma


def stats_of_images(images, space: FeatureSpace, batch_size: int = 100) -> GaussianStats:
    """Statistics of NHWC uint8 images (e.g. an `arr_0` array), batch by batch."""
    stats = GaussianStats(space.feature_dim)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        stats.update(space(batch)[0], torch.arange(start, start + batch.shape[0]))
    return stats


def _array(data, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as exc:  # an object array: reading it would need pickle
        raise ReferenceStatsError(f"reference statistics file {path}: array {key!r} holds pickled Python "
                                  f"objects, not numbers ({exc})") from exc


def load_reference_stats(path, space: FeatureSpace, reduce_images: bool = True):
    """(mu, sigma) from an npz; raises ReferenceStatsError with the reason when unusable.

    With `reduce_images=False` a file of images (`arr_0`) is left alone and None returned:
    a quick check of a statistics file at startup.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReferenceStatsError(f"reference statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ReferenceStatsError(f"reference statistics file {path} is not a readable npz: {exc}") from exc
    with data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            return _check(_array(data, "mu", path), _array(data, "sigma", path), space.feature_dim, path)
        if "arr_0" in keys:
            if not reduce_images:
                return None
            images = _array(data, "arr_0", path)
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ReferenceStatsError(
                    f"{path} has no mu/sigma and its arr_0 is {images.dtype} {images.shape}, "
                    "not NHWC uint8 RGB images to compute them from"
                )
            if images.shape[0] < 2:
                raise ReferenceStatsError(f"{path} holds {images.shape[0]} image(s); statistics need at least 2")
            return stats_of_images(images, space).mu_sigma()
    raise ReferenceStatsError(
        f"reference statistics file {path} lacks 'mu' and 'sigma' (found keys: {', '.join(sorted(keys)) or 'none'})"
    )


def cache_file(cache_dir, dataset: str, split: str, img_size: int, extractor: str) -> Path:
    """The cache key: dataset, split, resolution and feature extractor."""
    return Path(cache_dir).expanduser() / f"{dataset}_{split}_{img_size}px_{extractor}.npz"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def compute_split_stats(datamodule, split: str, space: FeatureSpace) -> GaussianStats:
    """Statistics of a datamodule split; each rank reads every world-size-th image, then all-reduce."""
    rank, world = _rank_world()
    if hasattr(datamodule, "split_dataset"):
        dataset = datamodule.split_dataset(split)
        mine = range(rank, len(dataset), world)
        loader = DataLoader(Subset(dataset, mine), batch_size=getattr(datamodule, "batch_size", 64),
                            num_workers=getattr(datamodule, "num_workers", 0))
        stats = GaussianStats(space.feature_dim)
        done = 0
        for images, labels in loader:  # in order: the k-th image of this shard is mine[k]
            ids = torch.tensor(mine[done:done + images.shape[0]])
            readable = labels >= 0  # a negative label marks a file the data module skipped as corrupt
            if readable.any():
                stats.update(space(images[readable])[0], ids[readable])
            done += images.shape[0]
        return stats.all_reduce()
    # A bare loader: every rank iterates it and keeps its share of the batches.
    stats = GaussianStats(space.feature_dim)
    start = 0
    for i, (images, _labels) in enumerate(datamodule.dataloader(split)):
        if i % world == rank:
            stats.update(space(images)[0], torch.arange(start, start + images.shape[0]))
        start += images.shape[0]
    return stats.all_reduce()


def reference_stats(space: FeatureSpace, stats_file=None, datamodule=None, split: str = "reference",
                    cache_dir=None) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """(mu, sigma) and a description of where they came from.

    An explicit `stats_file` wins; otherwise statistics of `split` of the datamodule are read
    from the cache or computed (sharded over ranks) and written atomically by rank 0.
    """
    if stats_file:
        return load_reference_stats(stats_file, space), str(Path(stats_file).expanduser())
    if datamodule is None:
        raise ReferenceStatsError("no reference statistics: set fid.reference.stats_file or provide a datamodule")
    if cache_dir is None:
        raise ReferenceStatsError("fid.reference.cache_dir is needed to cache statistics computed from a split")
    path = cache_file(cache_dir, datamodule.dataset_name, split, datamodule.img_size, space.name)
    if path.is_file():
        return load_reference_stats(path, space), str(path)
    stats = compute_split_stats(datamodule, split, space)
    if stats.count < 2:
        raise ReferenceStatsError(f"the {split!r} split has {stats.count} image(s); statistics need at least 2")
    mu, sigma = stats.mu_sigma()
    rank, _ = _rank_world()
    if rank == 0:
        atomic_savez(path, mu=mu, sigma=sigma, num_images=np.int64(stats.count))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return (mu, sigma), f"{path} (computed from {stats.count} images)"
