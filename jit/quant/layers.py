"""Quantized drop-ins for nn.Linear: hybrid W8A11, legacy bit-serial and W8A8.

A layer owns its configuration, thresholds, noise keys and gradients. It computes on two
paths that share one set of formulas (reference.py) and one store of weight codes and
devices (arrays.py): fast_path.py runs engine.py's hardware stages (every eager call and
every gradient), reference_call.py the whole-tensor specification (what torch.compile
traces for inference, and what the tests hold the fast path to). A scheme only says how
an activation code is sliced (`slicing`) into analog paths, each read by its own ADC,
and an optional exact digital path (`_paths`). docs/design.md "AIMC quantization" is the specification.

Each layer keeps the original `weight`/`bias` Parameters (the very same objects as the
replaced nn.Linear) and adds no persistent state, so state dicts are unchanged.

Calibration-facing API (used by the calibration module, also fine by hand):

- `layer.set_static(act_clip, adc_clip, weight_int=None, weight_scale=None)` stores
  thresholds as clip values in the units of the clipped quantity (activation units for
  `act_clip`; raw analog accumulation units, i.e. sum of INT weight x INT input slice
  products, for each ADC path) plus the bit widths they were made for. The step used at
  run time is always clip / (2^(bits-1) - 1) of the layer's current bit width.
  `layer.static` returns them; `layer.clear_static()` forgets them.
- `layer.observer`: None (free) or a callable `observer(layer_name, kind, tensor)` called
  during forward with kind "act" (the float input, as given) and "adc.<path>" (the
  noiseless pre-ADC accumulation of one analog path, [tokens, out_features], once per
  tile). The tensors are live buffers: read them (e.g. into a histogram), do not keep or
  modify them.

Noise is stateless (noise.py): a sample's draws are keyed on stable_seed(cfg.seed, layer
name), its sample id and the call index that `sample_context` supplies (outside one: the
row and the layer's count of noisy forwards, which `reseed` restarts), so a sample gets
the same noise at any batch size, position, process count or order. Non-ideal devices
(`cfg.device`) and converters are drawn once per layer in arrays.py; `programming_draw`
selects a fresh programming, as hardware-aware training does each step. Dynamic ranges
are taken over `cfg.dynamic_scope`: a token, a sample (default) or the whole call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import arrays, reference
from .config import QuantConfig, build_quant_config
from .engine import AnalogPath, Codes, Slicing, Split, WeightCodes
from .fast_path import StraightThrough
from .noise import SampleContext, noise_key, noise_keys
from .quantizers import (
    bitserial_split_,
    center_out_split_,
    qmax,
    stable_seed,
    step_of,
)
from .reference_call import reference_forward

Observer = Callable[[str, str, torch.Tensor], None]


@dataclass(frozen=True)
class StaticThresholds:
    """Calibrated thresholds of one layer: clip values plus the bits they were made for."""

    act_clip: float
    act_bits: int
    adc_clips: dict[str, float]
    adc_bits: int
    weight_int: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None


def _check_clip(layer: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"layer '{layer}': {what} must be a finite number > 0, got {value!r}")
    return float(value)


class QuantLinear(nn.Linear):
    """Common pipeline; subclasses implement `_paths` (and `slicing`). Build with
    `from_linear`."""

    scheme = ""
    adc_paths: tuple[str, ...] = ()
    # The seed's dynamic ADC step is max|a|/qmax + 1e-8; the hybrid follows docs/design.md.
    dynamic_step_eps = 0.0

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 cfg: QuantConfig | dict | None = None, name: str = "", device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        cfg = build_quant_config({"scheme": self.scheme} if cfg is None else cfg)
        if cfg.scheme != self.scheme:
            raise ValueError(f"{type(self).__name__} needs quant.scheme={self.scheme!r}, "
                             f"got {cfg.scheme!r}")
        self.cfg = cfg
        self.layer_name = name
        self.observer: Observer | None = None
        self.stats = None  # a stats.LayerStats while statistics are enabled
        # Integer products on an INT8 kernel (CPU only; never changes a result): None lets
        # plan.use_int8 choose by CPU, True forces an exact one, False the float32 GEMM.
        self.int8_matmul: bool | None = None
        self._static: StaticThresholds | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._sample_context: SampleContext | None = None  # set by noise.sample_context
        self._noise_calls = 0  # noisy forwards outside a context (their call index)
        self._noise_base: tuple[tuple[int, str], int] | None = None  # stable_seed memo
        self.seed_base()
        # dtype -> (act_clip, act bits, clip, step): the static quantizer's host numbers
        self._static_numbers: dict[torch.dtype, tuple[float, int, float, float]] = {}
        self._weight_cache: tuple[tuple, WeightCodes] | None = None
        # Which programming of the arrays the device draws come from: None the layer's
        # own (device.seed, name); an int a fresh draw (hardware-aware training steps).
        self.programming_draw: int | None = None
        self._converter_cache: tuple[tuple, dict] | None = None
        self._static_act_cache: tuple | None = None  # fast_path.StaticAct of a clip

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig, name: str = "") -> QuantLinear:
        """A quantized layer sharing `linear`'s weight and bias Parameters."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg,
                    name, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{super().extra_repr()}, scheme={c.scheme}, mode={c.mode}, "
                f"w{c.weight.bits}a{c.act.bits}, adc={'bypass' if c.adc.bypass else c.adc.bits}")

    def __getstate__(self):
        # Generators and the weight cache are rebuilt lazily (deepcopy, pickling); a copy
        # restarts the default call count, like `reseed`, and belongs to no context.
        state = super().__getstate__()
        state = dict(state, _generators={}, _weight_cache=None, _converter_cache=None,
                     _static_act_cache=None, _sample_context=None, _noise_calls=0)
        return state

    # ----- static thresholds -------------------------------------------------------
    def set_static(self, act_clip: float, adc_clip: float | dict[str, float] | None = None,
                   weight_int: torch.Tensor | None = None,
                   weight_scale: torch.Tensor | float | None = None,
                   act_bits: int | None = None, adc_bits: int | None = None) -> None:
        """Thresholds for static mode (see module docstring for units).

        `adc_clip`: one float for a layer with one ADC path, or {path: clip} covering
        every path in `adc_paths`; None leaves the ADC uncalibrated (allowed while
        calibrating with the ADC bypassed; a static forward through the ADC then fails).
        `weight_int`/`weight_scale`: optional imported INT weights ([out, in]) and their
        step (scalar or [out]); the forward then ignores `weight`.
        `act_bits`/`adc_bits`: the widths the clips were made for (default: current).
        """
        name = self.layer_name
        act_clip = _check_clip(name, "act_clip", act_clip)
        if adc_clip is None:
            clips = {}
        elif isinstance(adc_clip, dict):
            if set(adc_clip) != set(self.adc_paths):
                raise ValueError(f"layer '{name}': adc_clip needs exactly the paths "
                                 f"{list(self.adc_paths)}, got {sorted(adc_clip)}")
            clips = {k: _check_clip(name, f"adc_clip[{k!r}]", v) for k, v in adc_clip.items()}
        elif len(self.adc_paths) == 1:
            clips = {self.adc_paths[0]: _check_clip(name, "adc_clip", adc_clip)}
        else:
            raise ValueError(f"layer '{name}': {self.scheme} has ADC paths "
                             f"{list(self.adc_paths)}; give adc_clip as a dict per path")
        if (weight_int is None) != (weight_scale is None):
            raise ValueError(f"layer '{name}': weight_int and weight_scale go together")
        if weight_int is not None:
            weight_int, weight_scale = self._check_weight_import(weight_int, weight_scale)
        self._static = StaticThresholds(act_clip, act_bits or self.cfg.act.bits, clips,
                                        adc_bits or self.cfg.adc.bits, weight_int, weight_scale)
        self._weight_cache = None
        for dtype in (torch.float32, torch.float64):
            self.static_act_numbers(dtype)

    def _check_weight_import(self, weight_int, weight_scale):
        name, bits = self.layer_name, self.cfg.weight.bits
        weight_int = torch.as_tensor(weight_int).detach()
        if tuple(weight_int.shape) != (self.out_features, self.in_features):
            raise ValueError(f"layer '{name}': weight_int has shape {tuple(weight_int.shape)}, "
                             f"expected {(self.out_features, self.in_features)}")
        w = weight_int.double()
        if not torch.equal(w, w.round()) or w.min() < -qmax(bits) - 1 or w.max() > qmax(bits):
            raise ValueError(f"layer '{name}': weight_int must hold integers in "
                             f"[{-qmax(bits) - 1}, {qmax(bits)}] (quant.weight.bits={bits})")
        weight_scale = torch.as_tensor(weight_scale, dtype=torch.float64).detach().reshape(-1)
        if weight_scale.numel() not in (1, self.out_features) or not bool(
                (weight_scale > 0).all() and weight_scale.isfinite().all()):
            raise ValueError(f"layer '{name}': weight_scale must be finite and > 0, one value "
                             f"or one per output channel ({self.out_features})")
        return weight_int, weight_scale.reshape(()) if weight_scale.numel() == 1 else weight_scale

    @property
    def static(self) -> StaticThresholds | None:
        return self._static

    def clear_static(self) -> None:
        self._static = None
        self._weight_cache = None

    # ----- noise keys -----------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Key this layer's noise on `seed` (and the layer name) from now on, and restart
        the call count used outside a sample context."""
        self.cfg = dataclasses.replace(self.cfg, seed=seed)
        self._noise_calls = 0
        self.seed_base()

    def seed_base(self) -> int:
        """stable_seed(quant seed, layer name), remembered while both stay (SHA-256 is
        host work that a compiled graph cannot hold)."""
        key = (self.cfg.seed, self.layer_name)
        if self._noise_base is None or self._noise_base[0] != key:
            self._noise_base = (key, stable_seed(*key))
        return self._noise_base[1]

    def call_key(self, batch: int) -> tuple[int, list[int] | range]:
        """(key of this call, sample ids of the batch rows): noise.py's context, or the
        default outside one. Checks the batch against the context."""
        base = self.seed_base()
        context = self._sample_context
        if context is None:
            return base, range(batch)
        context.check(self.layer_name, batch)
        return noise_key(base, context.calls, context.next_use(self)), context.sample_ids

    def sample_keys(self, call_key: int, sample_ids) -> list[int]:
        """One key per sample for this call's noise (outside a context, each noisy call
        counts as the layer's next call)."""
        if self._sample_context is None:
            call_key = noise_key(call_key, self._noise_calls)
            self._noise_calls += 1
        return noise_keys(call_key, sample_ids)

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator per device, re-seeded with a sample's key before each draw."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def reads_noisy(self) -> bool:
        """Whether this layer's analog reads draw noise (thermal or the devices')."""
        adc = self.cfg.adc
        return bool(self.adc_paths) and not adc.bypass and (
            adc.noise_sigma_lsb > 0 or self.cfg.device.read_noise)

    # ----- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self._inference_only(x):
            return self._reference_forward(x)
        return StraightThrough.apply(x, self.weight, self.bias, self)

    def _inference_only(self, x: torch.Tensor) -> bool:
        """Whether reference.py serves this call: no gradients wanted, no observer and no
        statistics (the reference path has none of them; otherwise Dynamo traces, or
        breaks its graph around, the fast path, which has them)."""
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad
                                   for p in (self.weight, self.bias)))
        return not wants_grad and self.observer is None and self.stats is None

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward through reference.py (reference_call.py)."""
        return reference_forward(self, x)

    def _weight_codes(self, device: torch.device, dtype: torch.dtype) -> WeightCodes:
        """The INT weight codes and programmed arrays (arrays.py)."""
        return arrays.weight_codes(self, device, dtype)

    def static_act_numbers(self, dtype: torch.dtype) -> tuple[float, float]:
        """The static activation clip and step as host numbers exactly representable in
        `dtype`. Computed eagerly (set_static and sample_context fill them for float32
        and float64) because reading a tensor on the host breaks a compiled graph; a
        traced call only looks them up."""
        static = self._require_static()
        bits = self.cfg.act.bits
        entry = self._static_numbers.get(dtype)
        if entry is None or entry[0] != static.act_clip or entry[1] != bits:
            clip = torch.tensor(static.act_clip, dtype=dtype)
            entry = (static.act_clip, bits, float(clip), float(step_of(clip, bits)))
            self._static_numbers[dtype] = entry
        return entry[2], entry[3]

    def _require_static(self) -> StaticThresholds:
        if self._static is None:
            raise RuntimeError(f"layer '{self.layer_name}' is in static mode but has no "
                               "thresholds: calibrate it or call set_static()")
        return self._static

    def static_adc_clip(self, path: str) -> float:
        clip = self._require_static().adc_clips.get(path)
        if clip is None:
            raise RuntimeError(f"layer '{self.layer_name}' is in static mode but has no "
                               f"ADC clip for path '{path}': calibrate it or call "
                               "set_static(adc_clip=...)")
        return clip

    def read_back_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(INT codes, read-back weights after drift compensation), [out, in] float32 in
        code units, at the current device.t_inference_s."""
        return arrays.read_back_codes(self)

    def read_back_weight(self) -> torch.Tensor:
        """The weights the analog arrays compute with at the current device.t_inference_s,
        after drift compensation, in the weight's units [out, in] (float32): the INT codes
        times s_w for ideal devices."""
        step = self._weight_codes(self.weight.device, torch.float32).step
        return self.read_back_codes()[1] * (step.reshape(-1, 1) if step.dim() else step)

    # ----- what a scheme defines --------------------------------------------------------
    def tiles(self) -> list[slice]:
        """Input rows of each analog array."""
        return reference.tiles(self.in_features, self.cfg.adc.tile_rows)

    def slicing(self) -> Slicing:
        """How this scheme slices activation codes (engine.Slicing). Default: no split,
        the full activation range, read by the analog arrays if the scheme has any."""
        code_max = qmax(self.cfg.act.bits)
        return Slicing(None, [(-code_max - 1, code_max)], sparse_digital=False,
                       analog=(bool(self.adc_paths), False))

    def _paths(self, x_int: Codes, msb: Codes | None) -> Split:
        """The analog and digital paths over the sliced codes."""
        raise NotImplementedError


class HybridLinear(QuantLinear):
    """Hybrid W8A11 (docs/design.md): center-out split; the LSB slice runs on the analog array
    (noise, ADC, optional tiles), the sparse MSB slice on an exact digital MAC whose
    result alone carries the radix gain."""

    scheme = "hybrid"
    adc_paths = ("lsb",)

    def slicing(self) -> Slicing:
        """Center-out split, the sparse MSB slice digital. L in the signed lsb_bits range;
        |M| <= ceil((qmax_act - Lmax) / R) (codes never pass +-qmax_act)."""
        s = self.cfg.split
        lsb_max = 2 ** (s.lsb_bits - 1) - 1
        msb_max = max(0, -(-(qmax(self.cfg.act.bits) - lsb_max) // s.radix))
        return Slicing(lambda x_int, msb: center_out_split_(x_int, s.lsb_bits, s.radix, out=msb),
                       [(-lsb_max - 1, lsb_max), (-msb_max, msb_max)], sparse_digital=True,
                       analog=(True, False))

    def _paths(self, x_int: Codes, msb: Codes | None) -> Split:
        analog = AnalogPath("lsb", 0, x_int, 1.0, self.cfg.adc.samples, True)
        return Split([analog], msb, float(self.cfg.split.radix))


class BitSerialLinear(QuantLinear):
    """The seed's legacy bit-serial layer (docs/design.md "Legacy bit-serial"): signed MSB slice
    read `samples` times (noise averaged), unsigned LSB slice with DAC gain 2^g and no
    noise, each through its own ADC."""

    scheme = "bitserial"
    adc_paths = ("msb", "lsb")
    dynamic_step_eps = 1e-8

    def slicing(self) -> Slicing:
        """Bit-serial split. LSB * 2^g in [0, (2^lb - 1) 2^g]; MSB = floor(x / 2^lb) over
        the INT range."""
        s, code_max = self.cfg.split, qmax(self.cfg.act.bits)
        return Slicing(
            lambda x_int, msb: bitserial_split_(x_int, s.lsb_bits, s.lsb_gain_shift, out=msb),
            [(0, (2**s.lsb_bits - 1) * 2**s.lsb_gain_shift),
             ((-code_max - 1) >> s.lsb_bits, code_max >> s.lsb_bits)], sparse_digital=False)

    def _paths(self, x_int: Codes, msb: Codes | None) -> Split:
        s = self.cfg.split
        analog = [AnalogPath("msb", 0, msb, float(2**s.lsb_bits), self.cfg.adc.samples, True),
                  AnalogPath("lsb", 1, x_int, 2.0**-s.lsb_gain_shift, 1, False)]
        return Split(analog, None, 1.0)

    def adc_clips_from_output_step(self, output_step: float,
                                   act_clip: float | None = None) -> dict[str, float]:
        """The seed's single `*_acc` scale (step of the reconstructed output) as ADC clips
        per path: s_M = r/(s_x s_w 2^lb), s_L = r/(s_x s_w / 2^g), clip = step * qmax.
        `act_clip` defaults to the layer's static activation clip."""
        if act_clip is None:
            act_clip = self._require_static().act_clip
        weights = self._weight_codes(self.weight.device, torch.float32)
        if weights.step.dim():
            raise ValueError(f"layer '{self.layer_name}': an output-domain ADC step needs "
                             "per-tensor weights (quant.weight.granularity=tensor)")
        s = self.cfg.split
        scale = act_clip / qmax(self.cfg.act.bits) * float(weights.step)
        code_max = qmax(self.cfg.adc.bits)
        return {"msb": output_step / (scale * 2**s.lsb_bits) * code_max,
                "lsb": output_step / (scale / 2**s.lsb_gain_shift) * code_max}


class W8A8Linear(QuantLinear):
    """Single pass INT8 x INT8 (the seed's debug path): no slicing, no ADC."""

    scheme = "w8a8"

    def _paths(self, x_int: Codes, msb: Codes | None) -> Split:
        return Split([], x_int, 1.0)


LAYER_CLASSES: dict[str, type[QuantLinear]] = {
    cls.scheme: cls for cls in (HybridLinear, BitSerialLinear, W8A8Linear)}


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """{module name: quantized layer} in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
