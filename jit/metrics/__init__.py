"""Evaluation metrics. Importing this package registers the "digits-cnn" torch-fidelity
feature extractor.

FID pieces: `fid` (Fréchet distance, streaming statistics, Inception Score), `features`
(torch-fidelity extractors with offline checks), `reference` (reference statistics).
"""

from .digits_cnn import (
    DIGITS_EXTRACTOR,
    DIGITS_FEATURES,
    DIGITS_LOGITS,
    DigitsCNN,
    FeatureExtractorDigitsCNN,
    cond_accuracy,
    default_weights_path,
    load_digits_classifier,
)
from .features import FeatureExtractorError, FeatureSpace, create_feature_space
from .fid import GaussianStats, InceptionScoreStats, frechet_distance
from .reference import ReferenceStatsError, load_reference_stats, reference_stats

__all__ = [
    "DIGITS_EXTRACTOR",
    "DIGITS_FEATURES",
    "DIGITS_LOGITS",
    "DigitsCNN",
    "FeatureExtractorDigitsCNN",
    "FeatureExtractorError",
    "FeatureSpace",
    "GaussianStats",
    "InceptionScoreStats",
    "ReferenceStatsError",
    "cond_accuracy",
    "create_feature_space",
    "default_weights_path",
    "frechet_distance",
    "load_digits_classifier",
    "load_reference_stats",
    "reference_stats",
]
