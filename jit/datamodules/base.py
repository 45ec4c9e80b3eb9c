"""What the ImageNet and digits data modules share: argument checks, seeded class-stratified
subsets, the named splits other parts of the framework ask for, and the loaders."""

from __future__ import annotations

import inspect
from typing import Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

SPLITS = ("train", "val", "calibration", "reference")
SOURCE_SPLITS = ("train", "val")

# Separate random streams, so that e.g. changing subset_frac never moves the calibration set.
_STREAM_SUBSET, _STREAM_CALIBRATION, _STREAM_HOLDOUT, _STREAM_FLIP = 1, 2, 3, 4


class SplitDataset(Protocol):
    """A map-style dataset of (uint8 [3, H, W], label) pairs that can be narrowed."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def subset(self, indices: np.ndarray, random_flip: bool = False) -> SplitDataset: ...


def stratified_order(labels: np.ndarray, seed, balanced: bool = False) -> np.ndarray:
    """A seeded permutation of sample indices whose every prefix is spread over classes.

    proportional (default): each class appears in a prefix of length n about
    n * class_size / total times (within one), so prefixes are stratified samples.
    balanced: classes take turns, so a prefix holds equal counts per class as long as
    every class still has images left (calibration sets).
    Prefixes are nested: a larger subset always contains the smaller one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    by_class = np.lexsort((rng.random(labels.size), labels))
    sorted_labels = labels[by_class]
    rank = np.empty(labels.size, dtype=np.int64)
    rank[by_class] = np.arange(labels.size) - np.searchsorted(sorted_labels, sorted_labels)
    if balanced:
        key = rank.astype(np.float64)
    else:
        key = (rank + 0.5) / np.bincount(labels)[labels]
    class_turn = rng.permutation(int(labels.max()) + 1)[labels]
    return np.lexsort((class_turn, key))


def index_and_flip(key, random_flip: bool) -> tuple[int, bool]:
    """A dataset key as (index, flip). The training sampler hands out (index, flip) pairs, so
    an image's flip follows from the seed and epoch alone, not from which loader worker
    reads it nor from the global RNG (which a resumed run must find as it was saved). A plain
    index flips at random when flips are enabled."""
    if isinstance(key, tuple):
        index, flip = key
        return int(index), random_flip and bool(flip)
    return int(key), random_flip and bool(torch.rand(()) < 0.5)


class ResumableSampler(DistributedSampler):
    """The training order: a permutation of the dataset drawn from (seed, epoch) alone, this
    rank's share of it, each index paired with its flip when the dataset flips. After
    `ResumableLoader.load_state_dict` the next pass starts `skip` samples into the epoch.

    A DistributedSampler, so that Lightning keeps it under DDP (it replaces or wraps any
    other sampler) and calls its `set_epoch` at every epoch start.
    """

    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                 flip: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.flip = flip
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        if not self.flip:
            return iter(indices)
        rng = np.random.default_rng([self.seed, _STREAM_FLIP, self.epoch])
        flips = rng.random(len(self.dataset)) < 0.5
        return iter([(i, bool(flips[i])) for i in indices])


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints (`state_dict`) and restores
    on resume (`load_state_dict`): a resumed run gets the rest of the interrupted epoch in the
    same order with the same flips, as if it had never stopped.

    The position counts batches handed to the training loop, not those workers prepared
    ahead. The workers' base seed comes from a generator seeded by the epoch, so starting a
    pass never draws from the global RNG, whose saved state the loss's noise continues from.
    """

    def __init__(self, dataset, sampler: ResumableSampler, **kwargs):
        super().__init__(dataset, sampler=sampler, generator=torch.Generator(), **kwargs)
        self._epoch = sampler.epoch
        self._batches = 0  # handed out in `self._epoch`
        self._start = 0  # where the next pass starts (set on resume)

    def __iter__(self):
        self._epoch, self._batches, self._start = self.sampler.epoch, self._start, 0
        self.generator.manual_seed(self.sampler.seed + self.sampler.epoch)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
        self._start = batches


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive_int(name: str, value) -> int:
    _require(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )
    return int(value)


class ImageDataModule(L.LightningDataModule):
    """Base for class-conditional image data modules with uint8 loaders.

    Named splits (see `split_dataset`):
      train       - the training split, `subset_frac` of it, random flips if enabled
      val         - the validation split, `subset_frac` of it, never flipped
      calibration - `calib_num_images` images of `calib_split`, class-balanced, not flipped
      reference   - all of `reference_split` (FID reference statistics), not flipped
    calibration and reference ignore `subset_frac`, so calibration artefacts and cached
    reference statistics stay valid across quick and full runs.
    """

    dataset_name: str = ""

    def __init__(
        self,
        *,
        img_size: int,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        subset_frac: float,
        random_flip: bool,
        calib_split: str,
        calib_num_images: int,
        reference_split: str,
        seed: int,
        num_classes: int | None,
        patch_size: int | None,
    ) -> None:
        super().__init__()
        self._img_size = _positive_int("img_size", img_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        _require(
            isinstance(num_workers, int) and num_workers >= 0,
            f"num_workers must be an integer >= 0, got {num_workers!r}",
        )
        _require(
            isinstance(subset_frac, (int, float)) and 0.0 < subset_frac <= 1.0,
            f"subset_frac must be in (0, 1], got {subset_frac!r}",
        )
        for key, value in (("calib_split", calib_split), ("reference_split", reference_split)):
            _require(
                value in SOURCE_SPLITS,
                f"{key}={value!r} is not a split; allowed values: {', '.join(SOURCE_SPLITS)}",
            )
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.subset_frac = float(subset_frac)
        self.random_flip = bool(random_flip)
        self.calib_split = calib_split
        self.calib_num_images = _positive_int("calib_num_images", calib_num_images)
        self.reference_split = reference_split
        self.seed = int(seed)
        self._expected_num_classes = (
            None if num_classes is None else _positive_int("num_classes", num_classes)
        )
        self._patch_size = None if patch_size is None else _positive_int("patch_size", patch_size)
        self.check_compatible(patch_size=self._patch_size)
        self._sources: dict[str, SplitDataset] = {}
        self._datasets: dict[str, SplitDataset] = {}

    # -- what a subclass provides -------------------------------------------------------

    def _load_source(self, split: str) -> SplitDataset:
        """The whole of source split "train" or "val", unflipped; raise on bad input."""
        raise NotImplementedError

    def _discover_num_classes(self) -> int:
        raise NotImplementedError

    def _finalize(self, name: str, dataset: SplitDataset) -> SplitDataset:
        """Last look at a named split before it is handed out (e.g. verifying files)."""
        return dataset

    # -- properties used as FID cache keys and by the model -------------------------------

    @property
    def img_size(self) -> int:
        return self._img_size

    @property
    def num_classes(self) -> int:
        return self._discover_num_classes()

    # -- checks --------------------------------------------------------------------------

    def check_compatible(self, patch_size: int | None = None, num_classes: int | None = None):
        """Raise ValueError if the model's patch size or class count does not fit the data."""
        if patch_size is not None and self._img_size % patch_size != 0:
            raise ValueError(
                f"img_size={self._img_size} is not divisible by patch_size={patch_size}; "
                "choose an image size that is a multiple of the model's patch size"
            )
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"num_classes={num_classes} (the model's) disagrees with the {self.dataset_name} data, "
                f"which has {self.num_classes} classes"
            )

    # -- splits --------------------------------------------------------------------------

    def _source(self, split: str) -> SplitDataset:
        if split not in self._sources:
            self._sources[split] = self._load_source(split)
        return self._sources[split]

    def _build(self, name: str) -> SplitDataset:
        if name in SOURCE_SPLITS:
            source = self._source(name)
            flip = self.random_flip and name == "train"
            if self.subset_frac == 1.0:
                return source.subset(np.arange(len(source)), random_flip=flip)
            n = max(1, round(self.subset_frac * len(source)))
            order = stratified_order(source.labels, [self.seed, _STREAM_SUBSET])
            return source.subset(np.sort(order[:n]), random_flip=flip)
        if name == "calibration":
            source = self._source(self.calib_split)
            _require(
                self.calib_num_images <= len(source),
                f"calib_num_images={self.calib_num_images} exceeds the {len(source)} images "
                f"of calib_split={self.calib_split!r}",
            )
            order = stratified_order(
                source.labels, [self.seed, _STREAM_CALIBRATION], balanced=True
            )
            return source.subset(np.sort(order[: self.calib_num_images]))
        source = self._source(self.reference_split)
        return source.subset(np.arange(len(source)))

    def split_dataset(self, name: str) -> SplitDataset:
        """The dataset of a named split: one of train, val, calibration, reference."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid names: {', '.join(SPLITS)}")
        if name not in self._datasets:
            self._datasets[name] = self._finalize(name, self._build(name))
        return self._datasets[name]

    def dataloader(
        self,
        name: str,
        shuffle: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        """A loader over a named split yielding (uint8 [B, 3, H, W], int64 [B])."""
        dataset = self.split_dataset(name)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if batch_size is None else batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            # Worker seeds from the data seed: starting a pass leaves the global RNG alone.
            generator=torch.Generator().manual_seed(self.seed),
            **self._worker_options(),
        )

    def _worker_options(self) -> dict:
        return {
            "num_workers": self.num_workers,
            # Pinning without a GPU only costs time and makes torch warn.
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    # -- Lightning hooks -----------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Build the splits the stage needs, so bad input fails before any step runs."""
        names = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("reference",),
            "predict": ("reference",),
        }.get(stage, ("train", "val"))
        for name in names:
            self.split_dataset(name)
        self.check_compatible(num_classes=self._expected_num_classes)

    def train_dataloader(self) -> DataLoader:
        size = len(self.split_dataset("train"))
        # Training drops the last partial batch; with fewer images than one batch an epoch
        # would silently have no steps at all.
        _require(
            size >= self.batch_size,
            f"the train split has {size} images, fewer than batch_size={self.batch_size}",
        )
        dataset = self.split_dataset("train")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(dataset, seed=self.seed, num_replicas=replicas, rank=rank,
                                   flip=bool(getattr(dataset, "random_flip", False)))
        return ResumableLoader(dataset, sampler, batch_size=self.batch_size, drop_last=True,
                               **self._worker_options())

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")


def shared_args(scope: dict) -> dict:
    """The arguments ImageDataModule takes, picked from a subclass __init__'s locals()."""
    names = inspect.signature(ImageDataModule.__init__).parameters
    return {name: scope[name] for name in names if name != "self"}
