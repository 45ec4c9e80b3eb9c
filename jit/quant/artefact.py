"""Calibration artefact: static thresholds per quantized layer, in one versioned file.

Format (a plain dict written with `torch.save`, loadable with `weights_only=True`):

    {
      "kind": "jit-aimc-calibration", "format_version": 1,
      "scheme": "hybrid",                    # quant.scheme the thresholds were made for
                                             # ("bitserial+hybrid" where quant.layers mixes schemes)
      "method": "kl", "num_images": 256, "source": "data",   # or "sampling", "seed:<file>"
      "options": {"num_bins": None, "percentile": ..., "seed": 0},  # None: default_bins
      "layers": {
        "blocks.0.mlp.w12": {
          "act_clip": 3.1,                   # activation clip value c (step c / qmax)
          "adc_clip": {"lsb": 5.2e4},        # clip per ADC path, raw accumulator domain
          "made_for": {"scheme", "act_bits", "adc_bits", "weight_bits", "lsb_bits",
                       "radix", "lsb_gain_shift", "tile_rows", "weight_clip_pct",
                       "weight_granularity"},
          "weights_sha256": "9f2c...",       # the layer's weights it was calibrated on
          "weight_int": int tensor, "weight_scale": float tensor,   # optional
        }, ...
      },
    }

Thresholds are clip values, never steps, so they stay meaningful whatever the code range;
`made_for` records everything that shapes the thresholds (bit widths, the split, the
tiling, the weight quantizer) of each layer under its own config (per-layer hardware,
quant.layers), and `apply` refuses an artefact made for anything else, naming the layer.

Provenance: `weights_sha256` (`weights_digest`) is the SHA-256 of the layer's weight and
bias as it was calibrated (float32, row-major, shape included). Thresholds of other
weights (another training run, a fine-tuned copy) would be applied silently, so `apply`
refuses an artefact whose digests differ from the model's unless told
`allow_foreign_weights` (quant.allow_foreign_calibration=true). Artefacts written before
the digest existed, and seed imports (whose weights are unknown), carry none: they are
applied with a warning that the weights could not be checked.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from jit.atomic import atomic_path

log = logging.getLogger(__name__)

KIND = "jit-aimc-calibration"
FORMAT_VERSION = 1
MADE_FOR_KEYS = ("scheme", "act_bits", "adc_bits", "weight_bits", "lsb_bits", "radix",
                 "lsb_gain_shift", "tile_rows", "weight_clip_pct", "weight_granularity")


class ArtefactError(ValueError):
    """A calibration artefact is unreadable, malformed or does not fit the model."""


def made_for(qcfg) -> dict[str, Any]:
    """What the thresholds of a layer quantized with `qcfg` depend on (see module doc)."""
    sliced = qcfg.scheme in ("hybrid", "bitserial")
    return {
        "scheme": qcfg.scheme,
        "act_bits": qcfg.act.bits,
        "adc_bits": qcfg.adc.bits if sliced else None,
        "weight_bits": qcfg.weight.bits,
        "lsb_bits": qcfg.split.lsb_bits if sliced else None,
        "radix": qcfg.split.radix if sliced else None,
        "lsb_gain_shift": qcfg.split.lsb_gain_shift if sliced else None,
        "tile_rows": qcfg.adc.tile_rows if sliced else None,
        "weight_clip_pct": qcfg.weight.clip_pct,
        "weight_granularity": qcfg.weight.granularity,
    }


def weights_digest(layer) -> str:
    """SHA-256 of a linear layer's weight and bias (if any) as float32, row-major, each
    preceded by its shape: what a layer's thresholds were calibrated on."""
    digest = hashlib.sha256()
    for tensor in (layer.weight, getattr(layer, "bias", None)):
        if tensor is None:
            digest.update(b"none\0")
            continue
        values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(str(tuple(values.shape)).encode() + b"\0")
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def new_artefact(*, scheme: str, method: str, num_images: int, source: str,
                 layers: dict[str, dict], options: dict | None = None) -> dict:
    artefact = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "scheme": scheme,
        "method": method,
        "num_images": int(num_images),
        "source": source,
        "options": dict(options or {}),
        "layers": layers,
    }
    validate(artefact)
    return artefact


# ---------------------------------------------------------------------------- checks ----
def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def validate(artefact: Any, origin: str = "artefact") -> dict:
    """Raise ArtefactError unless `artefact` has the structure described in the module doc."""
    def bad(message: str):
        raise ArtefactError(f"{origin}: {message}")

    if not isinstance(artefact, dict) or artefact.get("kind") != KIND:
        bad(f"not a calibration artefact (no kind={KIND!r} marker)")
    version = artefact.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        bad(f"format_version {version!r} is not supported (this code reads 1..{FORMAT_VERSION})")
    for key in ("scheme", "method", "source"):
        if not isinstance(artefact.get(key), str):
            bad(f"field {key!r} is missing or not a string")
    if not isinstance(artefact.get("num_images"), int) or artefact["num_images"] < 0:
        bad("field 'num_images' is missing or not a non-negative integer")
    layers = artefact.get("layers")
    if not isinstance(layers, dict) or not layers:
        bad("holds no layers")
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            bad(f"layer {name!r}: entry is not a mapping")
        if not _positive_finite(entry.get("act_clip")):
            bad(f"layer {name!r}: act_clip must be a positive finite number, "
                f"got {entry.get('act_clip')!r}")
        adc = entry.get("adc_clip")
        if not isinstance(adc, dict) or not all(_positive_finite(v) for v in adc.values()):
            bad(f"layer {name!r}: adc_clip must map ADC paths to positive finite numbers, "
                f"got {adc!r}")
        spec = entry.get("made_for")
        if not isinstance(spec, dict) or set(spec) != set(MADE_FOR_KEYS):
            bad(f"layer {name!r}: made_for must have the keys {', '.join(MADE_FOR_KEYS)}")
        if ("weight_int" in entry) != ("weight_scale" in entry):
            bad(f"layer {name!r}: weight_int and weight_scale come together")
        digest = entry.get("weights_sha256")
        if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            bad(f"layer {name!r}: weights_sha256 must be a SHA-256 hex digest or absent, got {digest!r}")
    return artefact


# ------------------------------------------------------------------------------- I/O ----
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def save(artefact: dict, path: str | os.PathLike) -> Path:
    """Write atomically (`jit.atomic`): a temporary file in the same folder, fsync, os.replace.

    A crash or an error mid-write leaves either the previous file or none, never a
    truncated artefact.
    """
    validate(artefact)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(artefact, f)
    return path


def load(path: str | os.PathLike) -> dict:
    """Read and validate an artefact; clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration artefact {str(path)!r} does not exist")
    try:
        artefact = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked or "unsupported global" in str(err).lower():
            what = f"the Python object {blocked.group(1)}" if blocked else "Python objects"
            raise ArtefactError(
                f"{path}: refused as unsafe: the calibration artefact would unpickle {what}, "
                "not just tensors and containers (loading it could run arbitrary code)") from None
        # Any other refusal of the restricted unpickler is a byte stream that is no pickle.
        raise ArtefactError(f"{path}: cannot read the calibration artefact (corrupt or truncated "
                            "file, or not written by torch.save)") from None
    except Exception as err:  # zip errors differ by torch version; all mean the same
        raise ArtefactError(
            f"{path}: cannot read the calibration artefact (corrupt or truncated file, or "
            f"not written by torch.save): {type(err).__name__}: {_first_line(err)}"
        ) from err
    return validate(artefact, origin=str(path))


# ----------------------------------------------------------------------------- apply ----
def check_fits(artefact: dict, layers: dict[str, Any], layer_cfg, *, allow_foreign_weights: bool = False,
               origin: str = "calibration artefact") -> None:
    """Raise ArtefactError naming every mismatch between the artefact and the model.

    `layers`: the model's layers by name (quantized, or the float nn.Linear modules they
    will replace; None skips the weight check); `layer_cfg(layer)` its QuantConfig.
    Unless `allow_foreign_weights`, the layers' weights must be those the artefact was
    calibrated on (see the module doc); `origin` names the artefact in messages.
    """
    validate(artefact, origin)
    entries = artefact["layers"]
    unknown = sorted(set(entries) - set(layers))
    missing = sorted(set(layers) - set(entries))
    problems = []
    if unknown:
        problems.append(f"layers not quantized in this model: {', '.join(unknown)}")
    if missing:
        problems.append(f"no thresholds for the model's layers: {', '.join(missing)}")
    for name in sorted(set(entries) & set(layers)):
        want = made_for(layer_cfg(layers[name]))
        have = entries[name]["made_for"]
        diffs = [f"{k}={have[k]!r} (model: {want[k]!r})" for k in MADE_FOR_KEYS if have[k] != want[k]]
        if diffs:
            problems.append(f"{name} was calibrated for {', '.join(diffs)}")
    if problems:
        raise ArtefactError(f"{origin} does not fit the model: " + "; ".join(problems))
    if not allow_foreign_weights:
        _check_weights(artefact, layers, origin)


def _check_weights(artefact: dict, layers: dict[str, Any], origin: str) -> None:
    entries = artefact["layers"]
    checked = [name for name in sorted(layers) if layers[name] is not None]
    unrecorded = [name for name in checked if entries[name].get("weights_sha256") is None]
    if unrecorded:
        log.warning(f"{origin} records no weight digest for {len(unrecorded)} layer(s) (written "
                    "before digests were recorded, or imported): applied without checking that it "
                    "was calibrated on these weights")
    foreign = [name for name in checked if name not in unrecorded
               and entries[name]["weights_sha256"] != weights_digest(layers[name])]
    if foreign:
        more = f" (and {len(foreign) - 1} more of {len(checked)} layers)" if len(foreign) > 1 else ""
        raise ArtefactError(
            f"{origin} was calibrated on other weights: layer {foreign[0]}{more} differs from the "
            "model's (weight digest); calibrate these weights (drop quant.calibration_file), or set "
            "quant.allow_foreign_calibration=true to apply another model's thresholds anyway")


_SEED_KEY = re.compile(r"^(?P<layer>.+)_(?P<kind>act|acc)$")


def parse_seed_scales(raw: dict) -> dict[str, dict[str, Any]]:
    """{'blocks.0.mlp.w12_act': s, 'blocks.0.mlp.w12_acc': r or [m, l]} -> per layer."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        match = _SEED_KEY.match(str(key))
        if match is None:
            raise ArtefactError(f"seed scale file: key {key!r} is not '<layer>_act' or '<layer>_acc'")
        values = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
        if len(values) not in (1, 2) or not all(_positive_finite(v) for v in values):
            raise ArtefactError(f"seed scale file: {key} must be one positive step or a "
                                f"(msb, lsb) pair, got {value!r}")
        if match["kind"] == "act" and len(values) != 1:
            raise ArtefactError(f"seed scale file: {key} must be a single activation step")
        out.setdefault(match["layer"], {})[match["kind"]] = values
    for layer, entry in out.items():
        if set(entry) != {"act", "acc"}:
            raise ArtefactError(f"seed scale file: layer {layer} needs both _act and _acc")
    return out


def apply(artefact: dict, model, *, allow_foreign_weights: bool = False,
          origin: str = "calibration artefact") -> list[str]:
    """Set every quantized layer's static thresholds (and imported weights) from the
    artefact after checking that it was made for this model and, unless
    `allow_foreign_weights`, calibrated on its weights; returns the layer names.

    Nothing is changed when a check fails. Layer names are relative to `model`.
    """
    from .layers import quantized_layers  # artefact I/O itself needs no layers

    layers = quantized_layers(model)
    if not layers:
        raise ArtefactError("the model has no quantized layers to apply a calibration "
                            "artefact to (quant.scheme=fp, or quantize_model was not called)")
    check_fits(artefact, layers, lambda layer: layer.cfg, allow_foreign_weights=allow_foreign_weights,
               origin=origin)
    for name, layer in layers.items():
        entry = artefact["layers"][name]
        layer.set_static(entry["act_clip"], entry["adc_clip"] or None,
                         entry.get("weight_int"), entry.get("weight_scale"),
                         act_bits=entry["made_for"]["act_bits"],
                         adc_bits=entry["made_for"]["adc_bits"])
    return list(layers)


def _read_seed_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"seed scale file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                return {key: data[key].tolist() for key in data.files}
        import json

        raw = json.loads(path.read_text())
    except Exception as err:
        raise ArtefactError(f"{path}: cannot read the seed scale file: {err}") from err
    if not isinstance(raw, dict):
        raise ArtefactError(f"{path}: a seed scale file is a JSON object of scales")
    return raw


def import_seed_json(path: str | os.PathLike, model) -> dict:
    """An artefact from the seed's static scale file (JSON, or its npz form).

    The seed stores steps as its bit-serial layer consumed them:
      <layer>_act  activation step s_x                -> act_clip = s_x * qmax_act
      <layer>_acc  one value r: step of the reconstructed output, converted to the raw
                   accumulator domains s_M = r / (s_x s_w 2^lb), s_L = r / (s_x s_w / 2^g)
                   (s_w from the layer's own weights), or a pair (s_M, s_L) already raw
                   -> ADC clip per path = step * qmax_adc.
    `model` must already be quantized with the bit-serial scheme and the bit widths the
    file was made for (e.g. configs/quant/bitserial_w8a12); layer names are relative to it.
    """
    from .layers import quantized_layers
    from .quantizers import qmax

    path = Path(path)
    scales = parse_seed_scales(_read_seed_file(path))
    layers = quantized_layers(model)
    unknown = sorted(set(scales) - set(layers))
    if unknown:
        raise ArtefactError(f"{path}: scales for layers not quantized in this model: "
                            f"{', '.join(unknown)}")
    entries = {}
    for name, values in scales.items():
        layer = layers[name]
        if layer.cfg.scheme != "bitserial":
            raise ArtefactError(f"{path}: seed scale files describe the bit-serial layer; "
                                f"layer {name} uses quant.scheme={layer.cfg.scheme}")
        act_clip = values["act"][0] * qmax(layer.cfg.act.bits)
        acc = values["acc"]
        if len(acc) == 1:
            adc_clip = layer.adc_clips_from_output_step(acc[0], act_clip)
        else:
            code_max = qmax(layer.cfg.adc.bits)
            adc_clip = {"msb": acc[0] * code_max, "lsb": acc[1] * code_max}
        entries[name] = {"act_clip": act_clip, "adc_clip": adc_clip,
                         "made_for": made_for(layer.cfg)}
    return new_artefact(scheme="bitserial", method="seed", num_images=0,
                        source=f"seed:{path.name}", layers=entries)
