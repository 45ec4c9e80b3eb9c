"""Evaluation metrics. Importing this package registers the "digits-cnn" torch-fidelity
feature extractor."""

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

__all__ = [
    "DIGITS_EXTRACTOR",
    "DIGITS_FEATURES",
    "DIGITS_LOGITS",
    "DigitsCNN",
    "FeatureExtractorDigitsCNN",
    "cond_accuracy",
    "default_weights_path",
    "load_digits_classifier",
]
