"""ImageNet (or any class-per-folder image tree) with the ADM centre crop."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import ImageDataModule, index_and_flip, shared_args
from .transforms import center_crop, pil_to_uint8_chw, to_rgb

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif"
)
# What PIL raises on truncated, garbled or unrecognised files (and on files that vanished).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


SKIPPED_LABEL = -1  # the label of a placeholder for an unreadable file (see ImageFolderSplit)


class CorruptImageError(RuntimeError):
    """An image file could not be decoded; the message names the file.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's
    traceback as the message; that is cut back to the one line that names the file.
    """

    def __init__(self, message: str = "", *args) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message, *args)


class ImageFolderSplit(Dataset):
    """Images of one split folder, centre-cropped to `img_size`, as uint8 [3, H, W].

    File names are kept in one numpy bytes array rather than a list of Python strings:
    forked loader workers then share it instead of copying it page by page as reference
    counts change.

    Unreadable files raise CorruptImageError, or with `skip_corrupt` are replaced by the
    next readable file in index order, which is deterministic whatever worker loads
    them. Skipped files are flagged in a shared-memory mask so the main process can
    count what its workers found. With `drop_corrupt` as well (the reference split, whose
    statistics must count each image once) an unreadable file yields a black placeholder
    labelled SKIPPED_LABEL instead, which the statistics leave out.
    """

    def __init__(
        self,
        folder: Path,
        files: np.ndarray,
        labels: np.ndarray,
        img_size: int,
        random_flip: bool = False,
        skip_corrupt: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.files = files
        self.labels = labels
        self.img_size = img_size
        self.random_flip = random_flip
        self.skip_corrupt = skip_corrupt
        self.drop_corrupt = False
        self.bad = torch.zeros(len(files), dtype=torch.bool).share_memory_()
        self.removed: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.folder / os.fsdecode(self.files[index])

    def subset(self, indices: np.ndarray, random_flip: bool = False) -> ImageFolderSplit:
        return ImageFolderSplit(
            self.folder, self.files[indices], self.labels[indices], self.img_size,
            random_flip=random_flip, skip_corrupt=self.skip_corrupt,
        )

    def decode(self, index: int) -> Image.Image:
        with Image.open(self.path(index)) as img:
            img.load()
            return to_rgb(img)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, flip = index_and_flip(key, self.random_flip)
        n = len(self)
        for step in range(n):
            j = (index + step) % n
            if self.bad[j]:
                continue
            try:
                img = center_crop(self.decode(j), self.img_size)
            except _READ_ERRORS as err:
                if not self.skip_corrupt:
                    raise CorruptImageError(
                        f"cannot read image {self.path(j)}: {err} "
                        "(data.skip_corrupt=true skips such files)"
                    ) from err
                self.bad[j] = True
                log.warning("skipping corrupt image %s: %s", self.path(j), err)
                if self.drop_corrupt:
                    return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), SKIPPED_LABEL
                continue
            return pil_to_uint8_chw(img, flip=flip), int(self.labels[j])
        raise CorruptImageError(f"no readable image in {self.folder}: all {n} files failed")

    def skipped_files(self) -> list[str]:
        flagged = torch.nonzero(self.bad).flatten().tolist()
        return self.removed + [str(self.path(j)) for j in flagged]

    def verify(self) -> ImageFolderSplit:
        """Decode every file now; raise naming the unreadable ones, or drop them."""
        failures = []
        for j in range(len(self)):
            try:
                self.decode(j)
            except _READ_ERRORS as err:
                failures.append((j, f"{self.path(j)}: {err}"))
        if not failures:
            return self
        if not self.skip_corrupt:
            shown = "\n  ".join(msg for _, msg in failures[:10])
            more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
            raise CorruptImageError(
                f"{len(failures)} unreadable image(s) in {self.folder}:\n  {shown}{more}\n"
                "(data.skip_corrupt=true skips such files)"
            )
        for _, msg in failures:
            log.warning("skipping corrupt image %s", msg)
        keep = np.setdiff1d(np.arange(len(self)), [j for j, _ in failures])
        kept = self.subset(keep, random_flip=self.random_flip)
        kept.removed = self.removed + [str(self.path(j)) for j, _ in failures]
        return kept


def _listing(folder: Path, limit: int = 10) -> str:
    names = sorted(os.listdir(folder))
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


class ImageNetDataModule(ImageDataModule):
    """ImageNet in ImageFolder layout: `root/train/<class>/<image>` and `root/val/...`.

    Class indices follow the sorted class folder names (as torchvision's ImageFolder), so
    labels match the official JiT checkpoints. Corrupt files are found when loaded (the
    error names the file), or all at once in `setup()` with `verify_images=True` (a full
    decoding pass: slow on ImageNet). `skip_corrupt=True` skips them instead;
    `num_skipped` / `skipped_files` report what was skipped so far.
    """

    dataset_name = "imagenet"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        img_size: int = 256,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        subset_frac: float = 1.0,
        random_flip: bool = True,
        skip_corrupt: bool = False,
        verify_images: bool = False,
        calib_split: str = "train",
        calib_num_images: int = 1000,
        reference_split: str = "val",
        seed: int = 0,
        num_classes: int | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__(**shared_args(locals()))
        self.save_hyperparameters()
        # Checked on first use rather than here, so a config can be instantiated (e.g. to
        # read num_classes for sampling-only evaluation) on a machine without the data.
        self.root = None if root is None else Path(root).expanduser()
        self.skip_corrupt = bool(skip_corrupt)
        self.verify_images = bool(verify_images)
        self._classes: list[str] | None = None

    def _root(self) -> Path:
        if self.root is None:
            raise ValueError(
                "data.root is not set: point it at the ImageNet folder that holds train/ "
                "and val/ in ImageFolder layout (e.g. data.root=/datasets/imagenet)"
            )
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"ImageNet root {self.root} {what} (data.root)")
        return self.root

    def _split_dir(self, split: str) -> Path:
        folder = self._root() / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"split folder {folder} not found; {self.root} contains: {_listing(self.root)}"
            )
        return folder

    def _class_names(self, folder: Path) -> list[str]:
        names = sorted(
            e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
        )
        if not names:
            raise ValueError(
                f"split folder {folder} has no class sub-folders (expected "
                f"{folder}/<class>/<image>); it contains: {_listing(folder)}"
            )
        return names

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names of train/ (of val/ where there is no train/)."""
        if self._classes is None:
            root = self._root()
            split = "train" if (root / "train").is_dir() else "val"
            self._classes = self._class_names(self._split_dir(split))
        return self._classes

    def _discover_num_classes(self) -> int:
        if self.root is None and self._expected_num_classes is not None:
            return self._expected_num_classes
        return len(self.classes)

    def _load_source(self, split: str) -> ImageFolderSplit:
        folder = self._split_dir(split)
        names = self._class_names(folder)
        if names != self.classes:
            missing = sorted(set(self.classes) - set(names))
            extra = sorted(set(names) - set(self.classes))
            raise ValueError(
                f"class folders of {folder} differ from those of the other split: "
                f"missing {missing[:10]}, extra {extra[:10]}"
            )
        files: list[bytes] = []
        labels: list[int] = []
        for label, name in enumerate(names):
            images = sorted(
                e.name for e in os.scandir(folder / name)
                if e.is_file() and not e.name.startswith(".")
                and e.name.lower().endswith(IMG_EXTENSIONS)
            )
            if not images:
                raise ValueError(
                    f"class folder {folder / name} contains no images "
                    f"(looked for {' '.join(IMG_EXTENSIONS)})"
                )
            files.extend(os.fsencode(f"{name}/{image}") for image in images)
            labels.extend([label] * len(images))
        return ImageFolderSplit(
            folder, np.array(files, dtype=bytes), np.array(labels, dtype=np.int64),
            self.img_size, skip_corrupt=self.skip_corrupt,
        )

    def _finalize(self, name: str, dataset: ImageFolderSplit) -> ImageFolderSplit:
        dataset = dataset.verify() if self.verify_images else dataset
        # Reference statistics count every image once: an unreadable one is left out, not
        # replaced by a duplicate of its neighbour.
        dataset.drop_corrupt = name == "reference"
        return dataset

    @property
    def skipped_files(self) -> list[str]:
        """Files skipped as corrupt so far, in any split and any loader worker."""
        return sorted({f for ds in self._datasets.values() for f in ds.skipped_files()})

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)
