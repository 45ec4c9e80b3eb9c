"""A small CNN trained on scikit-learn's digits: the feature space of the built-in FID.

With no ImageNet and no Inception weights at hand, generated digits are judged in the
penultimate layer of this classifier ("fid_digits", never Inception FID), and by how often
it recognises the class a sample was conditioned on (`cond_accuracy`). The weights ship in
the package (jit/assets/digits_cnn.pt) and come from scripts/train_digits_classifier.py.

The classifier is also registered with torch-fidelity as the feature extractor
"digits-cnn", so the Inception and digits metrics go through one code path.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

DIGITS_EXTRACTOR = "digits-cnn"
DIGITS_FEATURES = "features"  # penultimate layer, for FID / KID / precision-recall
DIGITS_LOGITS = "logits"  # class scores, for Inception-Score-style metrics
DEFAULT_INPUT_SIZE = 32
DEFAULT_FEATURE_DIM = 64
NUM_CLASSES = 10
# What the weights file must record to rebuild the network.
ARCH_KEYS = ("input_size", "feature_dim", "num_classes", "width")


class DigitsCNN(nn.Module):
    """Three conv blocks and a hidden linear layer whose output is the feature vector.

    Takes uint8 RGB [B, 3, H, W] of any size: the channel mean is resized to
    `input_size` internally, so generated images of any resolution can be judged.
    The features are taken before the ReLU, so no unit is constantly zero and the
    covariance used by FID stays full rank.
    """

    def __init__(
        self,
        input_size: int = DEFAULT_INPUT_SIZE,
        feature_dim: int = DEFAULT_FEATURE_DIM,
        num_classes: int = NUM_CLASSES,
        width: int = 16,
    ) -> None:
        super().__init__()
        if input_size % 8 != 0:
            raise ValueError(
                f"input_size must be a multiple of 8 (three 2x poolings), got {input_size}"
            )
        self.input_size = input_size
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.width = width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            )

        self.convs = nn.Sequential(
            block(1, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.hidden = nn.Linear(4 * width * (input_size // 8) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        return {key: getattr(self, key) for key in ARCH_KEYS}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float grey [B, 1, input_size, input_size] in [-1, 1]."""
        check_images(images)
        x = images.to(self.head.weight.dtype).mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.input_size, self.input_size):
            # Antialiasing matters when shrinking large samples; without it thin strokes
            # alias away and the features would depend on the sample resolution.
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return x / 127.5 - 1.0

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed float input -> (features, logits); used by training with augmentation."""
        features = self.hidden(self.convs(x).flatten(1))
        logits = self.head(self.dropout(F.relu(features)))
        return features, logits

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> logits [B, num_classes]."""
        return self.features_and_logits(images)[1]


def check_images(images) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        kind = images.dtype if torch.is_tensor(images) else type(images).__name__
        raise TypeError(f"expected a uint8 image tensor [B, 3, H, W], got {kind}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images shaped [B, 3, H, W], got {tuple(images.shape)}")


def default_weights_path() -> Path:
    """The shipped classifier weights inside the installed package."""
    return Path(str(importlib.resources.files("jit").joinpath("assets", "digits_cnn.pt")))


def load_digits_classifier(path: str | Path | None = None) -> DigitsCNN:
    """The trained classifier in eval mode with frozen weights (default: the shipped one)."""
    path = default_weights_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; "
            "create them with: python scripts/train_digits_classifier.py"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = payload["meta"]
        model = DigitsCNN(**{key: int(meta[key]) for key in ARCH_KEYS})
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:
        raise ValueError(
            f"digits classifier weights at {path} are corrupt or not written by "
            f"scripts/train_digits_classifier.py ({type(exc).__name__}: {exc})"
        ) from exc
    model.meta = dict(meta)
    return model.requires_grad_(False).eval()


_default_classifier: DigitsCNN | None = None


def _shipped_classifier() -> DigitsCNN:
    # Loaded once: evaluation may ask for accuracy batch by batch.
    global _default_classifier
    if _default_classifier is None:
        _default_classifier = load_digits_classifier()
    return _default_classifier


@torch.no_grad()
def cond_accuracy(
    images_uint8: torch.Tensor,
    labels,
    classifier: DigitsCNN | None = None,
    batch_size: int = 500,
) -> float:
    """Fraction of images the classifier assigns to their conditioning label."""
    check_images(images_uint8)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != images_uint8.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("cond_accuracy needs at least one image")
    model = _shipped_classifier() if classifier is None else classifier
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, labels.numel(), batch_size):
        batch = images_uint8[start : start + batch_size].to(device)
        pred = model(batch).argmax(dim=1).cpu()
        correct += int((pred == labels[start : start + batch_size].cpu()).sum())
    return correct / labels.numel()


class FeatureExtractorDigitsCNN(FeatureExtractorBase):
    """torch-fidelity view of the digits classifier: uint8 [B, 3, H, W] in, float32 out.

    Provides "features" (penultimate layer, the default for FID/KID/PRC) and "logits"
    (the default for ISC). `feature_extractor_weights_path` selects other weights;
    without it the shipped ones are used, never a download.
    """

    def __init__(
        self,
        name,
        features_list,
        feature_extractor_weights_path=None,
        feature_extractor_internal_dtype=None,
        **kwargs,
    ):
        super().__init__(name, features_list)
        dtypes = {None: torch.float32, "float32": torch.float32, "float64": torch.float64}
        if feature_extractor_internal_dtype not in dtypes:
            raise ValueError(
                f"feature_extractor_internal_dtype must be float32 or float64, "
                f"got {feature_extractor_internal_dtype!r}"
            )
        self.model = load_digits_classifier(feature_extractor_weights_path)
        self.model.to(dtypes[feature_extractor_internal_dtype])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (DIGITS_FEATURES, DIGITS_LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {
            "isc": DIGITS_LOGITS,
            "fid": DIGITS_FEATURES,
            "kid": DIGITS_FEATURES,
            "prc": DIGITS_FEATURES,
        }[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x):
        features, logits = self.model.features_and_logits(x)
        out = {DIGITS_FEATURES: features.float(), DIGITS_LOGITS: logits.float()}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Register "digits-cnn" with torch-fidelity; a no-op when already registered by us.

    torch-fidelity refuses a second registration, and this runs on import, so
    re-imports and module reloads must not register again.
    """
    existing = FEATURE_EXTRACTORS_REGISTRY.get(DIGITS_EXTRACTOR)
    if existing is None:
        register_feature_extractor(DIGITS_EXTRACTOR, FeatureExtractorDigitsCNN)
    elif existing.__module__ == __name__ and existing.__qualname__ == "FeatureExtractorDigitsCNN":
        # A reloaded module: point the registry at the current class.
        FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR] = FeatureExtractorDigitsCNN
    else:
        raise RuntimeError(
            f'torch-fidelity feature extractor "{DIGITS_EXTRACTOR}" is already registered '
            f"by {existing.__module__}.{existing.__qualname__}"
        )


register()
