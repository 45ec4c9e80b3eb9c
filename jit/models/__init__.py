"""JiT backbone, its Denoiser and the variant registry (plain torch, no Lightning)."""

from .backbone import JiT
from .denoiser import Denoiser
from .registry import OFFICIAL_VARIANTS, VARIANTS, build_jit, variant_kwargs

__all__ = ["JiT", "Denoiser", "build_jit", "variant_kwargs", "VARIANTS", "OFFICIAL_VARIANTS"]
