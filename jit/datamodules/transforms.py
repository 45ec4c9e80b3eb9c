"""Pixel preprocessing shared by the data modules.

Loaders hand out uint8 tensors: a quarter of the host memory and PCIe traffic of float32,
and the scaling to the model's [-1, 1] range is one fused op on the device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_model_range(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> floats in [-1, 1] (x / 127.5 - 1)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {x.dtype}")
    return x.to(dtype) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 pixels; values outside the range are clipped."""
    return ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, dropping alpha like torchvision's default loader does.

    Matching that loader keeps our crops identical to the official JiT preprocessing, on
    which published FID reference statistics were computed.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # A plain convert() clips 16-bit and float data to 255, whitening the image.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's warning about byte transparency; pixels are
        # the same as a direct conversion.
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: a square of side `size` from the middle of the image.

    Halving with a box filter while the image is at least twice the target avoids the
    aliasing a single large bicubic reduction would produce; the last bicubic step then
    brings the short side to exactly `size`.
    """
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    new_size = (round(img.width * scale), round(img.height * scale))
    img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = (img.width - size) // 2
    top = (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_uint8_chw(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W], optionally mirrored left-right."""
    arr = np.asarray(img, dtype=np.uint8)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
