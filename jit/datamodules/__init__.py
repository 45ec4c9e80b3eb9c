"""Data modules: ImageNet (ImageFolder layout) and scikit-learn's built-in digits.

Loaders yield uint8 images [B, 3, H, W] and int64 labels; the model side maps pixels to
[-1, 1] on its device with `to_model_range` and back with `from_model_range`.
"""

from .base import SPLITS, ImageDataModule, stratified_order
from .digits import DigitsDataModule
from .imagenet import CorruptImageError, ImageNetDataModule
from .transforms import center_crop, from_model_range, to_model_range, to_rgb

__all__ = [
    "SPLITS",
    "CorruptImageError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "center_crop",
    "from_model_range",
    "stratified_order",
    "to_model_range",
    "to_rgb",
]
