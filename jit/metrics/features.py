"""Feature extractors through torch-fidelity's registry, with the checks FID needs up front.

Creating the extractor is the first thing an evaluation does, so a missing weights file
or an offline machine is reported before any image is generated. torch-fidelity would
otherwise try to download the Inception weights in its constructor and hang or fail with
a network error.

torch-fidelity's Inception and VGG16 constructors read a weights file with full
unpickling (`torch.load(weights_only=False)`), so a crafted file would run code. For those
extractors the project reads the file itself (the user's file or the torch-hub cache) with
`weights_only=True` and hands torch-fidelity only the verified tensors, re-serialized in
memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor
from torchvision.models import VGG16_Weights

import jit.metrics.digits_cnn  # noqa: F401  (registers "digits-cnn" with torch-fidelity)

INCEPTION = "inception-v3-compat"
# Any of these set to 1/true means: never touch the network.
OFFLINE_ENV = ("JIT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROBE = ("github.com", 443)
# Extractors whose torch-fidelity constructor unpickles a weights file without restriction,
# with the URL of the default weights (file names carry a hash prefix that torch.hub checks).
UNRESTRICTED_LOADERS = {INCEPTION: URL_INCEPTION_V3, "vgg16": VGG16_Weights.IMAGENET1K_V1.url}


class FeatureExtractorError(RuntimeError):
    """The feature extractor cannot be created; the message says what to do."""


def registered_extractors() -> list[str]:
    return sorted(FEATURE_EXTRACTORS_REGISTRY)


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def inception_cache_path() -> Path:
    """Where torch.hub (used by torch-fidelity) keeps the downloaded Inception weights."""
    return hub_cache_path(URL_INCEPTION_V3)


def _offline_by_env() -> bool:
    return any(os.environ.get(key, "").lower() in ("1", "true", "yes") for key in OFFLINE_ENV)


def network_available(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to GitHub within `timeout` seconds?

    Runs in a daemon thread because name resolution ignores socket timeouts and can
    block for a long time on a machine without DNS.
    """
    if _offline_by_env():
        return False
    result = []

    def probe():
        try:
            socket.create_connection(_PROBE, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def resolve_weights(name: str, weights_path: str | os.PathLike | None) -> str | None:
    """The weights file to read, or None to let torch-fidelity use its cache/download."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FeatureExtractorError(f"feature extractor weights file not found: {path}")
        return str(path)
    if name in UNRESTRICTED_LOADERS:
        cached = hub_cache_path(UNRESTRICTED_LOADERS[name])
        if cached.is_file():
            return str(cached)
        if not network_available():
            option = "fid.inception_weights" if name == INCEPTION else "fid.extractor_weights"
            raise FeatureExtractorError(
                f"{name} weights are not available offline: no local file given and none cached at "
                f"{cached}. Download {UNRESTRICTED_LOADERS[name]} on a machine with internet access and "
                f"pass {option}=/path/to/weights.pth (or copy it to that cache path)."
            )
    return None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _load_failure(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words."""
    blocked = re.search(r"GLOBAL (\S+)", str(exc))
    if blocked:
        return f"it would unpickle the Python object {blocked.group(1)}, not just tensors"
    return _one_line(exc)


def verified_weights(name: str, path: str | None) -> io.BytesIO:
    """The state dict of `path` (or of a fresh hub download) read with weights_only=True,
    re-serialized in memory: what torch-fidelity then unpickles holds nothing but tensors."""
    try:
        if path is None:
            state = torch.hub.load_state_dict_from_url(UNRESTRICTED_LOADERS[name], map_location="cpu",
                                                       progress=False, check_hash=True, weights_only=True)
            path = str(hub_cache_path(UNRESTRICTED_LOADERS[name]))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatureExtractorError(
            f"{name} weights {path or UNRESTRICTED_LOADERS[name]} refused (read with "
            f"torch.load(weights_only=True)): {_load_failure(exc)}"
        ) from exc
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FeatureExtractorError(f"{name} weights {path} are not a state dict of named tensors")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@dataclass
class FeatureSpace:
    """A torch-fidelity extractor together with the layers used for FID and for logits."""

    name: str
    extractor: torch.nn.Module
    fid_layer: str
    logits_layer: str | None
    feature_dim: int
    device: torch.device
    weights_sha256: str | None = None  # `weights_digest` of the extractor: which weights made the features

    @property
    def is_inception(self) -> bool:
        return self.name == INCEPTION

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [B, 3, H, W] -> (features [B, D], logits [B, K] or None), float32 on the CPU,
        in one forward pass and one host copy.

        Convolution kernels pick their algorithm by batch size, so an image's features
        change in the last bits with the batch around it. Callers therefore hand in one
        fixed chunk of the global image index at a time (jit/sample_plan.py): the same
        images always form the same pass, whatever the run layout.
        """
        if images_uint8.shape[0] == 0:
            empty = torch.zeros(0, self.feature_dim)
            return empty, (torch.zeros(0, 0) if self.logits_layer else None)
        out = self.extractor.convert_features_tuple_to_dict(self.extractor(images_uint8.to(self.device)))
        features = out[self.fid_layer].float().cpu()
        logits = out[self.logits_layer].float().cpu() if self.logits_layer else None
        return features, logits


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names and values of a module's parameters and buffers: the same for
    the same weights whatever file or download they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def create_feature_space(name: str, weights_path=None, device="cpu", probe_size: int = 32) -> FeatureSpace:
    """Create the extractor `name` and find its feature dimension with one tiny forward pass."""
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise FeatureExtractorError(
            f"feature extractor {name!r} is not registered with torch-fidelity; "
            f"registered: {', '.join(registered_extractors())}"
        )
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    fid_layer = cls.get_default_feature_layer_for_metric("fid")
    try:
        logits_layer = cls.get_default_feature_layer_for_metric("isc")
    except KeyError:
        logits_layer = None
    layers = list(dict.fromkeys([fid_layer] + ([logits_layer] if logits_layer else [])))  # vgg16: same layer twice
    kwargs = {"verbose": False}
    weights = resolve_weights(name, weights_path)
    if name in UNRESTRICTED_LOADERS:
        kwargs["feature_extractor_weights_path"] = verified_weights(name, weights)
    elif weights is not None:
        kwargs["feature_extractor_weights_path"] = weights
    try:
        extractor = create_feature_extractor(name, layers, cuda=False, **kwargs)
    except FeatureExtractorError:
        raise
    except Exception as exc:
        source = f" from {weights}" if weights else ""
        raise FeatureExtractorError(
            f"could not create feature extractor {name!r}{source}: {_one_line(exc)}") from exc
    device = torch.device(device)
    digest = weights_digest(extractor)
    extractor.to(device)
    space = FeatureSpace(name, extractor, fid_layer, logits_layer, 0, device, digest)
    features, _ = space(torch.zeros(1, 3, probe_size, probe_size, dtype=torch.uint8))
    space.feature_dim = features.shape[1]
    return space
