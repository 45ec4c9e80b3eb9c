"""The shipped digits JiT: small, loads like an official checkpoint, draws recognisable digits."""

import torch

from jit.builders import SHIPPED_DIGITS_MODEL
from jit.checkpoint import build_denoiser_from_checkpoint
from jit.datamodules import from_model_range
from jit.metrics import cond_accuracy


def test_shipped_model_is_small_and_loads_strictly():
    assert SHIPPED_DIGITS_MODEL.stat().st_size < 10 * 2**20
    denoiser, meta = build_denoiser_from_checkpoint(SHIPPED_DIGITS_MODEL, "model_ema1")
    assert meta["variant"] == "JiT-S/4" and meta["img_size"] == 16 and meta["num_classes"] == 10


def test_float_samples_are_the_requested_digits():
    denoiser, _ = build_denoiser_from_checkpoint(SHIPPED_DIGITS_MODEL, "model_ema1")
    labels = torch.arange(10).repeat(10)
    images = denoiser.eval().generate(labels, steps=10, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert cond_accuracy(from_model_range(images), labels) >= 0.9
