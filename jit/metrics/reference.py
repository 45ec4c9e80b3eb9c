"""Reference statistics (mu, sigma) for FID: from an npz file or computed once and cached.

Accepted files: the official JiT `fid_stats/jit_in256_stats.npz` (512 px models:
`jit_in512_stats.npz`) and ADM's `VIRTUAL_imagenet256_labeled.npz` all hold `mu` and `sigma` (ADM adds images `arr_0`
and spatial `mu_s`/`sigma_s`, ignored here). A file with only `arr_0` (NHWC uint8 images,
as ADM-style sample exports) is reduced to statistics with the current extractor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from jit.atomic import atomic_path
from jit.console import PhaseProgress, announce
from jit.sample_plan import DEFAULT_CHUNK_SIZE, index_chunks, rechunk

from .features import FeatureSpace
from .fid import GaussianStats

log = logging.getLogger(__name__)


# How far sigma may be from symmetric, relative to its largest entry: round-off of a
# covariance stored in float32 is ~1e-7; an asymmetric matrix is not one at all.
SYMMETRY_RTOL = 1e-5


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
    asymmetry = float(np.abs(sigma - sigma.T).max())
    scale = float(np.abs(sigma).max())
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ReferenceStatsError(
            f"reference statistics {source}: sigma is not a covariance, it is not symmetric "
            f"(max |sigma - sigma^T| = {asymmetry:.3g} against entries up to {scale:.3g}; allowed "
            f"{SYMMETRY_RTOL:g} of that)")
    return mu, sigma


def stats_of_images(images, space: FeatureSpace, chunk_size: int) -> GaussianStats:
    """Statistics of NHWC uint8 images (e.g. an `arr_0` array), one extractor pass per
    fixed chunk of their index."""
    stats = GaussianStats(space.feature_dim)
    for start in range(0, len(images), chunk_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk_size])).permute(0, 3, 1, 2)
        stats.update(space(batch)[0], torch.arange(start, start + batch.shape[0]))
    return stats


def _array(data, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as exc:  # an object array: reading it would need pickle
        raise ReferenceStatsError(f"reference statistics file {path}: array {key!r} holds pickled Python "
                                  f"objects, not numbers ({exc})") from exc


def load_reference_stats(path, space: FeatureSpace, reduce_images: bool = True,
                         chunk_size: int = DEFAULT_CHUNK_SIZE):
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
            return stats_of_images(images, space, chunk_size).mu_sigma()
    raise ReferenceStatsError(
        f"reference statistics file {path} lacks 'mu' and 'sigma' (found keys: {', '.join(sorted(keys)) or 'none'})"
    )


def cache_file(cache_dir, dataset: str, split: str, img_size: int, extractor: str) -> Path:
    """Where statistics of a split are cached: named by dataset, split, resolution and
    extractor; what else they depend on is stored inside and checked (`cache_metadata`)."""
    return Path(cache_dir).expanduser() / f"{dataset}_{split}_{img_size}px_{extractor}.npz"


def listing_digest(dataset) -> str | None:
    """sha256 of which images a split holds: an image folder's relative paths, in-memory
    images' bytes; with the labels. None for a dataset of another kind."""
    digest = hashlib.sha256()
    files, images = getattr(dataset, "files", None), getattr(dataset, "images", None)
    if files is not None:
        for name in files:
            digest.update(bytes(name) + b"\0")
    elif isinstance(images, torch.Tensor):
        digest.update(images.contiguous().numpy().tobytes())
    else:
        return None
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        digest.update(np.asarray(labels, np.int64).tobytes())
    return digest.hexdigest()


def cache_metadata(datamodule, split: str, space: FeatureSpace, chunk_size: int) -> dict[str, str]:
    """What cached statistics depend on beyond their file name: the data root, the number
    and listing of the split's files, the extractor's weights and the chunk its passes
    covered (features round differently by batch size). A trial copy of ImageNet or other
    Inception weights give other values, so their statistics are not reused."""
    root = getattr(datamodule, "root", None)
    meta = {"data_root": str(Path(root).expanduser().resolve()) if root is not None else datamodule.dataset_name}
    if hasattr(datamodule, "split_dataset"):
        dataset = datamodule.split_dataset(split)
        meta["num_files"] = str(len(dataset))
        meta["listing_sha256"] = listing_digest(dataset) or "unknown"
    meta["extractor_weights_sha256"] = getattr(space, "weights_sha256", None) or "unknown"
    meta["chunk_size"] = str(chunk_size)
    return meta


def stale_cache_reason(path: Path, expected: dict[str, str]) -> str | None:
    """Why the cached statistics at `path` were made from other data or weights; None when they fit."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {key: str(data[key]) for key in expected if key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        return f"unreadable ({exc})"
    differ = [f"{key} {stored[key]!r} (now {value!r})" if key in stored else f"no {key} recorded"
              for key, value in expected.items() if stored.get(key) != value]
    return "; ".join(differ) or None


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def compute_split_stats(datamodule, split: str, space: FeatureSpace, chunk_size: int) -> GaussianStats:
    """Statistics of a datamodule split: one extractor pass per fixed chunk of the split's
    index, rank r taking chunks r, r + W, ... (jit/sample_plan.py), then all-reduce."""
    rank, world = _rank_world()
    stats = GaussianStats(space.feature_dim)
    if hasattr(datamodule, "split_dataset"):
        dataset = datamodule.split_dataset(split)
        chunks = index_chunks(len(dataset), chunk_size, rank, world)
        mine = torch.cat(chunks).tolist() if chunks else []
        # Every chunk but the global last is full, so each batch is exactly one chunk.
        loader = DataLoader(Subset(dataset, mine), batch_size=chunk_size,
                            num_workers=getattr(datamodule, "num_workers", 0))
        label = f"reference statistics ({split} split)"
        announce(f"{label}: computing {space.name} features of {len(dataset)} images")
        with PhaseProgress(label, len(dataset), "images", enabled=rank == 0) as progress:
            for chunk, (images, labels) in zip(chunks, loader, strict=True):
                readable = labels >= 0  # a negative label marks a file the data module skipped as corrupt
                if readable.any():
                    stats.update(space(images[readable])[0], chunk[readable])
                progress.update(min(len(dataset), (int(chunk[-1]) + 1)))
        return stats.all_reduce()
    # A bare loader: every rank iterates it and keeps its share of the chunks.
    for k, (start, images) in enumerate(rechunk(datamodule.dataloader(split), chunk_size)):
        if k % world == rank:
            stats.update(space(images)[0], torch.arange(start, start + images.shape[0]))
    return stats.all_reduce()


def stats_digest(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 of reference statistics as float64: equal for equal statistics, whatever file held them."""
    digest = hashlib.sha256(np.ascontiguousarray(mu, np.float64).tobytes())
    digest.update(np.ascontiguousarray(sigma, np.float64).tobytes())
    return digest.hexdigest()


def reference_stats(space: FeatureSpace, stats_file=None, datamodule=None, split: str = "reference",
                    cache_dir=None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """(mu, sigma) and a description of where they came from.

    An explicit `stats_file` wins; otherwise statistics of `split` of the datamodule are read
    from the cache or computed (in fixed chunks of `chunk_size` images, sharded over ranks)
    and written atomically by rank 0.
    """
    if stats_file:
        return load_reference_stats(stats_file, space, chunk_size=chunk_size), str(Path(stats_file).expanduser())
    if datamodule is None:
        raise ReferenceStatsError("no reference statistics: set fid.reference.stats_file or provide a datamodule")
    if cache_dir is None:
        raise ReferenceStatsError("fid.reference.cache_dir is needed to cache statistics computed from a split")
    path = cache_file(cache_dir, datamodule.dataset_name, split, datamodule.img_size, space.name)
    expected = cache_metadata(datamodule, split, space, chunk_size)
    if path.is_file():
        stale = stale_cache_reason(path, expected)
        if stale is None:
            return load_reference_stats(path, space, chunk_size=chunk_size), str(path)
        if _rank_world()[0] == 0:
            log.warning(f"recomputing the cached reference statistics {path}: made from other data or "
                        f"extractor weights ({stale})")
    stats = compute_split_stats(datamodule, split, space, chunk_size)
    if stats.count < 2:
        raise ReferenceStatsError(f"the {split!r} split has {stats.count} image(s); statistics need at least 2")
    mu, sigma = stats.mu_sigma()
    rank, _ = _rank_world()
    if rank == 0:
        atomic_savez(path, mu=mu, sigma=sigma, num_images=np.int64(stats.count),
                     **{key: np.str_(value) for key, value in expected.items()})
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return (mu, sigma), f"{path} (computed from {stats.count} images)"
