"""Lightning callbacks of the framework."""

from .evaluation import FIDConfig, FIDEvaluation, balanced_labels, initial_noise, shard_indices

__all__ = ["FIDConfig", "FIDEvaluation", "balanced_labels", "initial_noise", "shard_indices"]
