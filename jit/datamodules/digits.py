"""scikit-learn's handwritten digits (1797 8x8 images, 10 classes) as a built-in dataset.

It ships inside scikit-learn, so tests and the default run work offline on real data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import (
    _STREAM_HOLDOUT,
    ImageDataModule,
    _require,
    index_and_flip,
    shared_args,
    stratified_order,
)

DIGITS_NUM_CLASSES = 10


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images [N, 1 or 3, H, W]; grey images are replicated to RGB."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, random_flip: bool = False):
        self.images = images
        self.labels = labels
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray, random_flip: bool = False) -> UInt8ImageDataset:
        return UInt8ImageDataset(
            self.images[torch.from_numpy(indices)], self.labels[indices], random_flip
        )

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, flip = index_and_flip(key, self.random_flip)
        img = self.images[index].expand(3, -1, -1)
        if flip:
            img = img.flip(-1)
        return img.contiguous(), int(self.labels[index])


def load_digits_uint8(img_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """All 1797 digits as uint8 [N, 1, img_size, img_size] (bright strokes on black)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    if img_size != x.shape[-1]:
        x = F.interpolate(
            x, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=True
        )
    return x.round().clamp(0, 255).to(torch.uint8), digits.target.astype(np.int64)


class DigitsDataModule(ImageDataModule):
    """The digits as a 10-class dataset with a seeded, stratified train/val split.

    Flips are off by default: a mirrored digit is a different (or no) digit.
    """

    dataset_name = "digits"

    def __init__(
        self,
        img_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        subset_frac: float = 1.0,
        random_flip: bool = False,
        calib_split: str = "train",
        calib_num_images: int = 200,
        reference_split: str = "val",
        seed: int = 0,
        num_classes: int | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__(**shared_args(locals()))
        self.save_hyperparameters()
        _require(
            isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0,
            f"val_fraction must be in (0, 1), got {val_fraction!r}",
        )
        self.val_fraction = float(val_fraction)
        # Known without loading anything, so a wrong model class count fails right away.
        self.check_compatible(num_classes=self._expected_num_classes)
        self._all: UInt8ImageDataset | None = None

    def _discover_num_classes(self) -> int:
        return DIGITS_NUM_CLASSES

    def _load_source(self, split: str) -> UInt8ImageDataset:
        if self._all is None:
            self._all = UInt8ImageDataset(*load_digits_uint8(self.img_size))
        order = stratified_order(self._all.labels, [self.seed, _STREAM_HOLDOUT])
        n_val = round(self.val_fraction * len(order))
        _require(
            0 < n_val < len(order),
            f"val_fraction={self.val_fraction} leaves an empty train or val split",
        )
        chosen = order[:n_val] if split == "val" else order[n_val:]
        return self._all.subset(np.sort(chosen))
