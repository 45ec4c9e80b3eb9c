"""Kept for existing imports: the atomic writer lives in `jit.atomic`."""

from jit.atomic import atomic_path

__all__ = ["atomic_path"]
