"""Static calibration: stream |x| histograms of every quantized layer, pick thresholds.

`calibrate(model, batches, ...)` runs the model on every batch twice, with thermal noise
off and the ADCs bypassed (ideal read-out) so no stale or missing ADC threshold affects
what is measured:

1. activation pass, layers in dynamic mode: a histogram of each layer's input -> act clip;
2. ADC pass, layers in static mode with those act clips: a histogram of each analog
   path's pre-ADC accumulation -> ADC clip per path. The accumulations depend on the
   activation codes, so they are measured with the very act clips static mode will use.

Pass 1 runs with the ADCs bypassed, so the activation clips do not depend on any ADC
setting (bits, noise, converter errors): `act_clips` taken from a calibration of the same
model, inputs and settings that differs only there skip it, and the artefact is bit for
bit the one a full calibration gives (task=search reuses them across ADC choices).

Every layer's mode, thresholds, observer, statistics and noise settings are restored
afterwards; the model is left as it was and the result is returned as an artefact dict
(see artefact.py) for `artefact.save` / `apply`.

Every histogram's grid is fixed in advance (AbsHistogram), so the thresholds are exactly
the same for any order or split of the calibration batches. Memory is
O(layers x paths x num_bins): histograms, never stored tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from . import artefact as art
from .calibrators import METHODS, default_bins, levels_for, threshold
from .layers import QuantLinear, quantized_layers
from .quantizers import qmax, quantize_symmetric, weight_clip
from .stats import collect_stats, enable_stats
from .surgery import adc_bypassed, ideal_devices, noise_disabled

SOURCES = ("data", "sampling")
_INDEX_CHUNK = 1 << 22


class CalibrationError(ValueError):
    """Calibration cannot produce thresholds from what it was given."""


class AbsHistogram:
    """Histogram of |x|: `num_bins` equal bins over [0, upper), on a grid fixed before
    counting, so that the counts (and every threshold drawn from them) are the same for any
    order or split of the data.

    `upper` is the smallest power of two above max|x|, not max|x| itself: when a later
    batch raises the max, `upper` doubles d times and every 2^d neighbouring bins merge.
    A bin of the finer grid lies inside exactly one bin of the coarser one, and the bin of
    a value is a floor of x * 2^k (exact in float64), so the result equals counting all the
    data at once with the final `upper`. The max|x| itself covers between half and all of
    the bins. Zeros always land in bin 0.
    """

    def __init__(self, num_bins: int):
        if (isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2
                or num_bins & (num_bins - 1)):
            raise CalibrationError(f"calibration.num_bins must be a power of two >= 2 or null, "
                                   f"got {num_bins!r}")
        self.counts = torch.zeros(num_bins, dtype=torch.int64)
        self.upper = 0.0
        self.amax = 0.0
        self.total = 0

    def _raise_upper(self, upper: float) -> None:
        shift = min(round(math.log2(upper / self.upper)), 62)
        old = torch.arange(self.counts.numel())
        self.counts = torch.zeros_like(self.counts).index_add_(0, old >> shift, self.counts)
        self.upper = upper

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1).abs().float()
        if a.numel() == 0:
            return
        m = float(a.max())
        if not math.isfinite(m):
            raise CalibrationError("non-finite values (NaN or Inf) in a calibration tensor")
        if m > 0:
            upper = math.ldexp(1.0, math.frexp(m)[1])  # smallest power of two > m
            if self.upper == 0.0:
                self.upper = upper
            elif upper > self.upper:
                self._raise_upper(upper)
            # float64 makes x * (num_bins / upper), a scaling by a power of two, exact
            scale = self.counts.numel() / self.upper
            for chunk in a.split(_INDEX_CHUNK):
                index = torch.floor(chunk.double() * scale).long()
                self.counts += torch.bincount(index, minlength=self.counts.numel()).cpu()
        else:
            self.counts[0] += a.numel()
        self.amax = max(self.amax, m)
        self.total += a.numel()

    def share_above(self, value: float) -> float:
        """Share of the values above `value` (linear inside the bin that holds it)."""
        if self.total == 0 or value >= self.upper:
            return 0.0
        pos = value / self.upper * self.counts.numel()
        k = int(pos)
        above = float(self.counts[k + 1:].sum()) + float(self.counts[k]) * (k + 1 - pos)
        return above / self.total


# ------------------------------------------------------------------------ helpers ----
def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if torch.is_tensor(first) and first.dim() else 1


def _default_forward(model: nn.Module) -> Callable:
    def forward(batch, generator):
        return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    return forward


@contextlib.contextmanager
def _restored(layers: dict[str, QuantLinear]):
    """Put back each layer's config, thresholds, observer and statistics on exit."""
    saved = [(layer, layer.cfg, layer.static, layer.observer, layer.stats)
             for layer in layers.values()]
    try:
        yield
    finally:
        for layer, cfg, static, observer, stats in saved:
            layer.cfg, layer.observer, layer.stats = cfg, observer, stats
            if static is None:
                layer.clear_static()
            else:
                layer.set_static(static.act_clip, static.adc_clips or None, static.weight_int,
                                 static.weight_scale, static.act_bits, static.adc_bits)


def _set_mode(layers: dict[str, QuantLinear], mode: str) -> None:
    for layer in layers.values():
        layer.cfg = dataclasses.replace(layer.cfg, mode=mode)


def _bits(layer: QuantLinear, kind: str) -> int:
    return layer.cfg.act.bits if kind == "act" else layer.cfg.adc.bits


def _observe(layers: dict[str, QuantLinear], hists: dict, kinds: Callable[[str], bool],
             num_bins: int | None) -> None:
    """Install observers feeding `hists[(layer name, kind)]` for the kinds wanted."""
    for name, layer in layers.items():
        def observer(_, kind, tensor, name=name, layer=layer):
            if not kinds(kind):
                return
            if tensor.numel() == 0:
                raise CalibrationError(f"layer {name}: got an empty {kind} tensor")
            hist = hists.get((name, kind))
            if hist is None:
                bins = num_bins or default_bins(_bits(layer, kind))
                hist = hists[(name, kind)] = AbsHistogram(bins)
            try:
                hist.add(tensor)
            except CalibrationError as err:
                raise CalibrationError(f"layer {name} ({kind}): {err}") from None
        layer.observer = observer


def _run(forward, batches, seed: int) -> int:
    """One pass; each batch gets its own seeded generator, so every pass (and every call
    with the same seed) sees identical noise draws, timesteps and sampling noise."""
    images = 0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            forward(batch, generator)
            images += _batch_size(batch)
    return images


def _check_bins(method: str, num_bins: int, layers: dict[str, QuantLinear]) -> None:
    if method != "kl":
        return
    for name, layer in layers.items():
        for kind in ("act", *(f"adc.{path}" for path in layer.adc_paths)):
            levels = levels_for(_bits(layer, kind))
            if num_bins < levels:
                raise CalibrationError(
                    f"calibration.num_bins={num_bins} is below the {levels} levels of layer "
                    f"{name} ({kind}); KL needs num_bins >= 2^(bits-1), or null for the default")


def _clip(method, hist, bits, percentile, name) -> float:
    try:
        return threshold(method, hist, bits, percentile=percentile, name=name)
    except ValueError as err:
        raise CalibrationError(str(err)) from None


def _search_workers(jobs: int) -> int:
    return min(jobs, torch.get_num_threads())


def _clips(method: str, percentile: float, jobs: list[tuple[Any, int, str]]) -> list[float]:
    """`_clip` of every (histogram, bits, name) job, in order, on the intra-op threads: each
    search is numpy work on its own histogram (the KL search over 12 layers of 11-bit
    activations is seconds), so searches run side by side and give the same clips."""
    def one(job):
        return _clip(method, job[0], job[1], percentile, job[2])

    workers = _search_workers(len(jobs))
    if workers <= 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def export_weights(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's INT weight codes and their step, as static mode would compute them."""
    w = layer.weight.detach().float().cpu()
    codes, step = quantize_symmetric(w, weight_clip(w, layer.cfg.weight), layer.cfg.weight.bits)
    dtype = torch.int8 if layer.cfg.weight.bits <= 8 else torch.int16
    return codes.to(dtype), step.reshape(-1) if step.dim() else step


def _check_images(images: int) -> int:
    if images == 0:
        raise CalibrationError("calibration saw zero images: the calibration input is "
                               "empty (check calibration.num_images / the split)")
    return images


def _given_act_clips(act_clips: Mapping[str, float], layers: dict[str, QuantLinear]) -> dict[str, float]:
    """`act_clips` checked against the model: one finite, non-negative clip per quantized layer."""
    missing, extra = sorted(set(layers) - set(act_clips)), sorted(set(act_clips) - set(layers))
    if missing or extra:
        raise CalibrationError(f"act_clips: must name every quantized layer and no other (missing: "
                               f"{missing[:4]}, not quantized: {extra[:4]})")
    clips = {}
    for name in layers:
        clip = act_clips[name]
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf:
            raise CalibrationError(f"act_clips[{name!r}]: must be a finite number >= 0, got {clip!r}")
        clips[name] = float(clip)
    return clips


# ---------------------------------------------------------------------- calibrate ----
def calibrate(model: nn.Module, batches: Iterable, *, method: str = "kl",
              num_bins: int | None = None, percentile: float = 99.99, seed: int = 0,
              forward: Callable[[Any, torch.Generator], Any] | None = None,
              source: str = "data", save_weights: bool = False,
              coverage: list | None = None, announce: Callable[[str], None] | None = None,
              on_device: bool = False, act_clips: Mapping[str, float] | None = None) -> dict:
    """Thresholds for every quantized layer of `model`, as an artefact dict.

    batches: a re-iterable (list, DataLoader) of inputs; it is read twice (once with `act_clips`).
    forward(batch, generator): runs one batch through the model (default `model(*batch)`);
        use `generator` for any randomness so calibration is reproducible.
    method: kl | percentile | minmax | mse (calibrators.py), for activations and ADCs.
    num_bins: histogram bins over [0, the power of two above max|x|) (a power of two);
        None: BINS_PER_LEVEL per level of each quantizer (`calibrators.default_bins`).
    coverage: if a list is given, one row per layer is appended (see `coverage_rows`).
    announce(message): told when each clip search starts (progress of long calibrations).
    on_device: calibrate through the programmed arrays and real converters (quant.device,
        quant.adc errors) instead of ideal ones; noise is off either way.
    act_clips: {layer name: activation clip} of every quantized layer, from a calibration
        whose settings differ from these in ADC settings at most (see the module doc):
        the activation pass is skipped and the batches are read once.
    Layer names are relative to `model`; pass the module the artefact will be applied to.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; allowed: {', '.join(METHODS)}")
    if source not in SOURCES:
        raise CalibrationError(f"unknown calibration source {source!r}; allowed: {', '.join(SOURCES)}")
    layers = quantized_layers(model)
    if not layers:
        raise CalibrationError("the model has no quantized layers to calibrate "
                               "(quant.scheme=fp, or quantize_model was not called)")
    # Layers of several schemes (quant.layers) each get their own thresholds; the
    # artefact's per-layer `made_for` records what each was made for.
    schemes = "+".join(sorted({layer.cfg.scheme for layer in layers.values()}))
    if num_bins is not None:
        AbsHistogram(num_bins)  # validates num_bins before any work
        _check_bins(method, num_bins, layers)
    given = act_clips is not None
    if given:
        act_clips = _given_act_clips(act_clips, layers)
    forward = forward or _default_forward(model)
    hists: dict[tuple[str, str], AbsHistogram] = {}
    was_training = model.training
    model.eval()
    try:
        devices = contextlib.nullcontext() if on_device else ideal_devices(model)
        with _restored(layers), devices, noise_disabled(model), adc_bypassed(model):
            if not given:
                _observe(layers, hists, lambda kind: kind == "act", num_bins)
                _set_mode(layers, "dynamic")
                images = _check_images(_run(forward, batches, seed))
                if announce is not None:
                    announce(f"calibration: {method} search for the activation clips of {len(layers)} layers")
                for name in layers:
                    if (name, "act") not in hists:
                        raise CalibrationError(f"layer {name} was never called during calibration")
                act_clips = dict(zip(layers, _clips(method, percentile, [
                    (hists[(name, "act")], layer.cfg.act.bits, f"layer {name} (act)")
                    for name, layer in layers.items()])))
            adc_clips: dict[str, dict[str, float]] = {name: {} for name in layers}
            # With given clips this pass also counts the images, so it always runs.
            if given or coverage is not None or any(layer.adc_paths for layer in layers.values()):
                _observe(layers, hists, lambda kind: kind.startswith("adc."), num_bins)
                _set_mode(layers, "static")
                for name, layer in layers.items():
                    layer.set_static(act_clips[name])
                enable_stats(model)
                read = _run(forward, batches, seed)
                if given:
                    images = _check_images(read)
                if announce is not None:
                    announce(f"calibration: {method} search for the ADC clips of {len(layers)} layers")
                searched = [(name, path) for name, layer in layers.items() for path in layer.adc_paths]
                for name, path in searched:
                    if (name, f"adc.{path}") not in hists:
                        raise CalibrationError(f"layer {name}: ADC path {path} was never read")
                clips = _clips(method, percentile, [
                    (hists[(name, f"adc.{path}")], layers[name].cfg.adc.bits, f"layer {name} (ADC {path})")
                    for name, path in searched])
                for (name, path), clip in zip(searched, clips):
                    adc_clips[name][path] = clip
                if coverage is not None:
                    coverage.extend(coverage_rows(collect_stats(model), hists, adc_clips, layers))
    finally:
        model.train(was_training)
    entries = {}
    for name, layer in layers.items():
        entry = {"act_clip": act_clips[name], "adc_clip": adc_clips[name],
                 "made_for": art.made_for(layer.cfg), "weights_sha256": art.weights_digest(layer)}
        if save_weights:
            entry["weight_int"], entry["weight_scale"] = export_weights(layer)
        entries[name] = entry
    options = {"num_bins": num_bins, "seed": seed}
    if method == "percentile":
        options["percentile"] = percentile
    return art.new_artefact(scheme=schemes, method=method, num_images=images,
                            source=source, layers=entries, options=options)


COVERAGE_COLUMNS = ("layer", "lsb_range_coverage", "int8_range_coverage", "msb_density",
                    "act_clip_rate", "adc_saturation_rate")


def coverage_rows(stats_rows: list[dict], hists: dict, adc_clips: dict, layers: dict) -> list[dict]:
    """Per layer under the calibrated act clips: shares of activation codes inside the
    LSB range and inside [-128, 127], MSB density, act clip rate (from the layer
    statistics), and the ADC saturation rate the calibrated ADC clips would give
    (share of |a| above (qmax + 1/2) steps, from the ADC histograms; worst path)."""
    by_name = {row["layer"]: row for row in stats_rows}
    rows = []
    for name, layer in layers.items():
        stats = by_name.get(name, {})
        row = {key: stats.get(key) for key in COVERAGE_COLUMNS}
        row["layer"] = name
        rates = []
        for path, clip in adc_clips[name].items():
            hist = hists[(name, f"adc.{path}")]
            rates.append(hist.share_above(clip * (1 + 0.5 / qmax(layer.cfg.adc.bits))))
        row["adc_saturation_rate"] = max(rates) if rates else None
        rows.append(row)
    return rows
