"""Evaluation without Lightning: the sample plan (plan.py), FID/IS generation and
results.json (fid.py), static calibration before an evaluation (calibration.py). The
task layer (jit/tasks.py) runs these on every process inside Lightning's test loop."""

from .calibration import CalibrationConfig, run_calibration
from .fid import FIDConfig, FIDEvaluation
from .plan import EvaluationConfigError, balanced_labels, index_chunks, initial_noise, shard_indices

__all__ = ["CalibrationConfig", "EvaluationConfigError", "FIDConfig", "FIDEvaluation",
           "balanced_labels", "index_chunks", "initial_noise", "run_calibration", "shard_indices"]
