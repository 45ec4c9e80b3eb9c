"""The fast engine: a quantized layer's forward as the hardware's stages, run with the
device plan of plan.py. docs/design.md "AIMC quantization" is the specification and
reference.py the same forward in whole-tensor torch; the tests hold the two equal.

    quantize_dac_input   x -> x_int = round(clamp(x, -c, c) / s_x), sliced by the scheme
    analog_mvm           acc = x_slice[:, tile] @ W_int[tile]     (exact integer sums)
    adc_convert_         codes = clamp(round(acc / s_adc + e), ADC range)
    digital_mvm          exact MSB x W_int, added with the scheme's radix gain
    reconstruct_         y = s_x s_w (sum of path gains x ADC codes x s_adc + digital) + b

The layer (layers.py) chooses the clips, thresholds, slices and noise keys; this module
only computes, in float32 (float64 for float64 inputs) on integer-valued tensors. On the
CPU plan the elementwise stages run in row blocks and the products may run on the INT8
kernel as base-128 digits (intmm.py); neither changes a bit of the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from . import native_noise
from .config import AdcConfig
from .intmm import GROUP_ELEMENTS, Int8Weights, int8_linear, new_digits, write_digits
from .noise import noise_keys
from .plan import SampleNoise, blockwise, noise_blocks, noise_helper, noise_rounds, row_blocks
from .quantizers import qmax, round_
from .reference import (
    ConverterErrors,
    adc_transfer,
    converter_input,
    read_noise_std_codes,
    read_noise_variance,
)

# A step or scale: a Python number for the whole call, or a [rows, 1] tensor per row.
RowScale = float | torch.Tensor
# Integer codes of an input slice, [tokens, in_features]: a float tensor, or its INT8
# base-128 digits (least significant first) when the INT8 kernel multiplies them.
Codes = torch.Tensor | list[torch.Tensor]
# What draws thermal noise: torch's CPU generator or a stream of the compiled kernel.
Generator = torch.Generator | native_noise.Stream


class WeightCodes(NamedTuple):
    codes_t: torch.Tensor  # INT codes transposed, [in_features, out_features], contiguous
    step: torch.Tensor  # s_w: 0-d, or [out_features] per channel
    clip: torch.Tensor | None  # |W| clip (for the straight-through mask); None if imported
    int8: Int8Weights | None = None  # the codes packed for the INT8 kernel, if it runs
    # The programmed arrays (device.py), transposed like codes_t; None: ideal devices.
    analog_t: torch.Tensor | None = None  # read-back weights in code units
    read_variance_t: torch.Tensor | None = None  # per read, code units^2
    compensation: float = 1.0  # global drift compensation of the analog outputs

    def analog(self) -> WeightCodes:
        """The weights the analog arrays compute with (the digital path keeps the codes)."""
        if self.analog_t is None:
            return self
        return self._replace(codes_t=self.analog_t, int8=None)


class AnalogPath(NamedTuple):
    name: str
    index: int  # position in the layer's adc_paths (part of the noise key)
    codes: Codes
    gain: float  # weight of this path's result in the reconstruction
    reads: int  # analog reads averaged (noise std shrinks by sqrt(reads))
    noisy: bool


class Split(NamedTuple):
    analog: list[AnalogPath]
    digital: Codes | None  # exact digital path input (codes) or None
    digital_gain: float


class Slicing(NamedTuple):
    """How a scheme slices activation codes: `split_block(x_int, msb)` turns a row block
    of codes into the slice x_int keeps and writes the other slice into `msb` (None: no
    split); `ranges` bounds the codes of x_int and of the MSB slice; `sparse_digital`:
    the MSB slice is a sparse digital input (its product may skip all-zero columns)."""

    split_block: Callable[[torch.Tensor, torch.Tensor], None] | None
    ranges: list[tuple[int, int]]
    sparse_digital: bool
    # Per slice (x_int, MSB): whether an analog array reads it. A programmed array
    # computes with read-back weights, not codes, so only digital slices may then take
    # the INT8 kernel.
    analog: tuple[bool, bool] = (True, True)


class ReadNoise(NamedTuple):
    """The devices' read noise of one tile's reads (reference.read_noise_variance)."""

    variance: torch.Tensor  # [tokens, out_features], accumulation units^2
    reads: int


class ArrayCall(NamedTuple):
    """What the analog and digital stages of one call need from the layer."""

    out_features: int
    tiles: list[slice]  # input rows per analog array
    adc: AdcConfig
    adc_step: Callable[[str, torch.Tensor], RowScale]  # (path, one tile's acc) -> s_adc
    observe: Callable[[str, torch.Tensor], None] | None  # ("adc.<path>", acc) hook
    stats: object | None  # stats.LayerStats
    noise: SampleNoise | None  # generator, rows per sample, one key per sample
    # (path index, tile) -> that array's converters (reference.converter_errors); None or
    # empty: ideal converters.
    converters: dict[tuple[int, int], ConverterErrors] | None = None


def rows_of(value: RowScale | torch.Tensor, rows: slice) -> RowScale | torch.Tensor:
    """The rows of a per-row [rows, 1] tensor; anything else applies to every row."""
    return value[rows] if isinstance(value, torch.Tensor) and value.dim() == 2 else value


def add_scaled_(out: torch.Tensor, src: torch.Tensor, alpha: RowScale) -> None:
    """out += alpha * src, alpha a number or per-row [rows of out, 1]."""
    if isinstance(alpha, torch.Tensor):
        out.addcmul_(src, alpha)
    else:
        out.add_(src, alpha=alpha)


# ----- DAC input ------------------------------------------------------------------------
def quantize_dac_input(x2: torch.Tensor, clip: RowScale, step: RowScale, slicing: Slicing,
                       as_digits: tuple[bool, bool], stats=None
                       ) -> tuple[Codes, Codes | None, torch.Tensor | None]:
    """(x_int sliced, MSB slice or None, input columns holding MSB codes or None): the
    activation quantizer and the split, fused per row block.

    `clip`/`step`: host numbers (static mode: ATen's scalar fast path, no device read) or
    device tensors, 0-d or per row [rows, 1]. `clip` is the activation clip of the stats
    (same value). `as_digits` says per slice (x_int, MSB) whether it comes as INT8
    digits, written block by block from a small float buffer; the column set is computed
    only for a float MSB slice. `stats` observes each block's codes while they are float:
    the activations, the MSB slice and the digital path's input."""
    has_msb = slicing.split_block is not None
    codes_digits, msb_digits = as_digits[0], as_digits[1] and has_msb
    with_analog = any(slicing.analog[:1 + has_msb])
    ranges = slicing.ranges + [(0, 0)]
    tokens = x2.shape[0]
    blocks = row_blocks(tokens, x2.shape[1], x2.device)
    buffer_shape = (min(blocks[0].stop, tokens), x2.shape[1])
    if codes_digits:
        x_int = new_digits(x2.shape, *ranges[0], x2.device)
        codes_buffer = x2.new_empty(buffer_shape)
    else:
        x_int = torch.empty_like(x2)
    msb = None
    if msb_digits:
        msb = new_digits(x2.shape, *ranges[1], x2.device)
        msb_buffer = x2.new_empty(buffer_shape)
    elif has_msb:
        msb = torch.empty_like(x2)
    for block in blocks:
        rows = slice(block.start, min(block.stop, tokens))
        n = rows.stop - rows.start
        codes_out = codes_buffer[:n] if codes_digits else x_int[rows]
        high = rows_of(clip, rows)
        codes = torch.clamp(x2[rows], -high, high, out=codes_out)
        round_(codes.div_(rows_of(step, rows)))  # |codes| <= qmax (1 + 2^-23): exact
        if stats is not None:
            stats.observe_activations(x2[rows], high, codes, rows.start)
        if has_msb:
            msb_out = msb_buffer[:n] if msb_digits else msb[rows]
            slicing.split_block(codes, msb_out)
            if stats is not None:
                stats.observe_msb(msb_out, rows.start)
                if not slicing.analog[1]:
                    stats.observe_digital(msb_out, with_analog, rows.start)
            if msb_digits:
                write_digits(msb_out, msb, rows, max(-ranges[1][0], ranges[1][1]))
        elif stats is not None and not slicing.analog[0]:
            stats.observe_digital(codes, with_analog, rows.start)
        if codes_digits:
            write_digits(codes, x_int, rows, max(-ranges[0][0], ranges[0][1]))
    columns = None
    if (slicing.sparse_digital and blockwise(x2.device) and has_msb and not msb_digits
            and tokens):
        # Narrowed only to at most half of the columns; when the first block alone has MSB
        # codes in more, the full scan cannot find fewer.
        first = msb[:min(blocks[0].stop, tokens)]
        if 2 * int(first.ne(0).any(0).sum()) <= msb.shape[1]:
            columns = msb.ne(0).any(0)
    return x_int, msb, columns


# ----- exact integer products (the array and the digital MAC) ---------------------------
def integer_mvm(codes: Codes, weights: WeightCodes, rows: slice, out: torch.Tensor,
                alpha: RowScale | None = None) -> None:
    """out = codes[:, rows] @ W_int[rows] (alpha None), or out += alpha * that, with the
    same float operations on either kernel: the product is exact, then added."""
    if alpha is not None:
        _add_product(codes, weights, rows, out, alpha)
        return
    if isinstance(codes, torch.Tensor):
        torch.matmul(codes[:, rows], weights.codes_t[rows], out=out)
        return
    if rows != slice(None):
        codes = [digit[:, rows] for digit in codes]
    int8_linear(codes, weights.int8, rows, out)


def _add_product(codes: Codes, weights: WeightCodes, rows: slice, out: torch.Tensor,
                 alpha: RowScale) -> None:
    """out += alpha * (codes[:, rows] @ W_int[rows]). The exact product waits in a scratch
    no larger than the input and is then added. The scratch holds either groups of token
    rows (on the CPU at most GROUP_ELEMENTS, to stay in cache), each multiplying all the
    weights, or (float codes) slabs of in_features output columns, each multiplying all
    the codes: whichever re-reads fewer elements, the weights once per row group or the
    codes once per column slab (benchmarks/RESULTS.md)."""
    tokens, out_features = out.shape
    in_features = weights.codes_t.shape[0]
    group_elements = tokens * in_features
    if blockwise(out.device):
        group_elements = min(group_elements, GROUP_ELEMENTS)
    group, width = max(1, group_elements // out_features), in_features
    inner = weights.codes_t[rows].shape[0]
    row_reads = -(-tokens // group) * inner * out_features
    column_reads = -(-out_features // width) * tokens * inner
    if isinstance(codes, torch.Tensor) and column_reads < row_reads:
        lhs, scratch = codes[:, rows], out.new_empty((tokens, min(width, out_features)))
        for start in range(0, out_features, width):
            columns = slice(start, min(start + width, out_features))
            part = scratch[:, :columns.stop - columns.start]
            torch.matmul(lhs, weights.codes_t[rows, columns], out=part)
            for block in row_blocks(*part.shape, part.device):
                add_scaled_(out[block, columns], part[block], rows_of(alpha, block))
        return
    scratch = out.new_empty((min(group, tokens), out_features))
    for start in range(0, tokens, group):
        part = scratch[:min(group, tokens - start)]
        rows_out = out[start:start + part.shape[0]]
        group_codes = (codes[start:start + part.shape[0]] if isinstance(codes, torch.Tensor)
                       else [digit[start:start + part.shape[0]] for digit in codes])
        integer_mvm(group_codes, weights, rows, part)
        group_alpha = rows_of(alpha, slice(start, start + part.shape[0]))
        for block in row_blocks(*part.shape, part.device):
            add_scaled_(rows_out[block], part[block], rows_of(group_alpha, block))


# ----- ADC ------------------------------------------------------------------------------
def adc_convert_(acc: torch.Tensor, step: RowScale, bits: int,
                 noise_sigma_codes: float = 0.0, noise: SampleNoise | None = None,
                 count_saturated: int = 0, errors: ConverterErrors | None = None,
                 read_noise: ReadNoise | None = None) -> int | torch.Tensor:
    """In place on a 2-D accumulation: acc -> clamp(round(acc/step + e), -2^(n-1), 2^(n-1)-1)
    with e ~ N(0, noise_sigma_codes^2), or with `read_noise` one std per element: the thermal
    sigma and the devices' read noise (reference.read_noise_std_codes, per row block while
    it is in cache). With `errors` the real converters (reference.adc_transfer)
    replace the rounding.

    The thermal noise is referred to the ADC input and expressed in ADC steps (docs/design.md:
    N(0, (sigma_lsb * s_adc)^2 / K) on `a`), so it is drawn with that std directly in the
    code domain, per sample from `noise` (`plan.noise_blocks`), into a buffer of one block
    (or of one round of blocks while a helper thread draws half of the samples:
    `plan.noise_rounds`), and each block is added, rounded and clamped while it is in
    cache. `step` is a Python number (one step for the whole tile) or a [rows, 1] tensor
    (one per row: the dynamic sample and token scopes). Returns the number of codes that
    saturated in the first `count_saturated` rows (a 0-d device tensor: no host sync), or 0.
    """
    code_max = qmax(bits)
    per_element = read_noise is not None
    if not per_element and noise_sigma_codes <= 0:
        noise = None
    elif noise is None:
        raise ValueError("adc_convert_: noise_sigma_codes > 0 needs the samples' noise keys")
    blocks = noise_blocks(*acc.shape, acc.device, noise)
    buffer, rounds = None, {}
    if noise is not None:
        # Each round's noise is drawn before its blocks are converted (noise_rounds).
        generators, helper = (noise.generator, None), noise_helper(acc.device)
        if _native_draw(acc, blocks):
            generators = native_noise.streams()
        rounds = dict(noise_rounds(blocks, acc.shape[1], helper is not None))
        buffer = acc.new_empty((max(blocks[last - 1][0].stop - blocks[first][0].start
                                    for first, last in rounds.items()), acc.shape[1]))
    per_row = isinstance(step, torch.Tensor)
    saturated = []
    for index, (rows, segments) in enumerate(blocks):
        chunk = acc[rows]
        if per_row:
            chunk.div_(step[rows])
        if buffer is not None:
            if index in rounds:
                round_start = rows.start
                generators = _draw_noise(buffer, blocks[index:rounds[index]], noise.keys,
                                         1.0 if per_element else noise_sigma_codes,
                                         generators, helper)
            buf = buffer[rows.start - round_start:rows.stop - round_start]
            if per_element:
                # The variance of these rows is used once: the std replaces it in place.
                variance = read_noise.variance[rows]
                buf.mul_(read_noise_std_codes(variance, noise_sigma_codes,
                                              step[rows] if per_row else step, read_noise.reads,
                                              out=variance))
            if per_row:
                chunk.add_(buf)
            else:
                torch.add(buf, chunk, alpha=1.0 / step, out=chunk)
        elif not per_row:
            chunk.div_(step)  # exact division: rounding ties as in the seed
        counted = min(chunk.shape[0], count_saturated - rows.start)
        if errors is not None:
            if counted > 0:
                seen = converter_input(chunk[:counted], errors, bits)
                saturated.append((seen > code_max + 0.5).sum() + (seen < -code_max - 1.5).sum())
            chunk.copy_(adc_transfer(chunk, errors, bits))
        else:
            round_(chunk)
            if counted > 0:
                saturated.append((chunk[:counted] > code_max).sum()
                                 + (chunk[:counted] < -code_max - 1).sum())
        chunk.clamp_(-code_max - 1, code_max)
    return torch.stack(saturated).sum() if saturated else 0


def _draw_noise(buffer: torch.Tensor, blocks: list[tuple[slice, list]], sample_keys: list[int],
                std: float, generators: tuple[Generator, Generator | None],
                helper: tuple[ThreadPoolExecutor, torch.Generator] | None
                ) -> tuple[Generator, Generator | None]:
    """Draws the noise segments of consecutive `blocks` (plan.noise_blocks) into the first
    rows of `buffer`, re-seeding with `sample_keys[s]` where sample s begins. With a
    `helper` (plan.noise_helper) the samples of the later half of the rows are drawn on
    its thread with a second generator, at the same time. A value depends only on its
    segment's key and the segments before it in its sample, so the values are the same on
    any thread: a sample is never split between the threads, and the generator that drew
    a sample's last segment draws its continuation in the next round (returned first in
    the pair). The generators are torch's, or two streams of the compiled kernel
    (native_noise.py: the same values; both of the pair are then given)."""
    sizes = [segment.stop - segment.start for _, segments in blocks for segment, _ in segments]
    cols = buffer.shape[1]
    keys = [None if sample is None else sample_keys[sample]
            for _, segments in blocks for _, sample in segments]
    native = isinstance(generators[0], native_noise.Stream)
    # The segments tile the rows in order: one split makes all their views (torch's draw).
    views = None if native else buffer[:sum(sizes)].split(sizes)
    half = len(sizes) if helper is None else _half_at_a_sample(sizes, keys)

    def draw(part: range, generator: Generator) -> None:
        if native:
            if part:
                rows = slice(sum(sizes[:part.start]), sum(sizes[:part.stop]))
                generator.draw(buffer[rows].view(-1), [sizes[i] * cols for i in part],
                               keys[part.start:part.stop], std)
            return
        for index in part:
            if keys[index] is not None:
                generator.manual_seed(keys[index])
            views[index].normal_(0.0, std, generator=generator)

    if half == len(sizes):
        draw(range(len(sizes)), generators[0])
        return generators
    executor, helper_generator = helper
    mine, theirs = generators[0], generators[1] or helper_generator
    # Inference mode is per thread: the helper writes the caller's (inference) tensors.
    inference = torch.is_inference_mode_enabled()

    def draw_beside(part: range, generator: Generator) -> None:
        with torch.inference_mode(inference):
            draw(part, generator)

    future = executor.submit(draw_beside, range(half, len(sizes)), theirs)
    try:
        draw(range(half), mine)
    finally:
        future.result()
    return theirs, mine


def _native_draw(acc: torch.Tensor, blocks: list[tuple[slice, list]]) -> bool:
    """Whether this conversion draws its noise with the compiled kernel (native_noise.py):
    float32 on the CPU plan, every segment long enough for torch's vectorised draw."""
    if acc.dtype != torch.float32 or not blockwise(acc.device) or not native_noise.available():
        return False
    shortest = min(segment.stop - segment.start for _, segments in blocks for segment, _ in segments)
    return shortest * acc.shape[1] >= native_noise.MIN_SEGMENT


def _half_at_a_sample(sizes: list[int], keys: list[int | None]) -> int:
    """The index of the keyed segment (a sample's first; never the first segment) that
    splits the rows of `sizes` most evenly; len(sizes) if there is none."""
    total = sum(sizes)
    best, best_gap, before = len(sizes), None, 0
    for index, (size, key) in enumerate(zip(sizes, keys)):
        if index and key is not None and (best_gap is None or abs(2 * before - total) < best_gap):
            best, best_gap = index, abs(2 * before - total)
        before += size
    return best


# ----- the array: analog paths through their ADCs, then the digital path ---------------
def accumulate(split: Split, weights: WeightCodes, tokens: int, call: ArrayCall,
               columns: torch.Tensor | None = None) -> tuple[torch.Tensor, RowScale]:
    """(acc, unit) with acc * unit = sum over analog paths and tiles of
    gain * ADC(codes[:, tile] @ W_int[tile]) + digital_gain * (digital @ W_int), in
    integer-product units, [tokens, out_features].

    acc is kept in the first analog conversion's code units so that its scale, the
    digital path and the final output scale fuse into few passes. `columns` (bool,
    [in_features]) marks the input columns in which the float digital codes may be
    non-zero: the digital product skips the others (and is skipped when there are none).
    Each path and tile mixes its own indices into the samples' noise keys."""
    adc, stats, tiles = call.adc, call.stats, call.tiles
    out = weights.codes_t.new_empty((tokens, call.out_features))
    scratch, unit = None, None
    if stats is not None:
        stats.observe_paths(split.analog, weights.codes_t.shape[0], call.out_features, len(tiles))
    # After one conversion `out` holds ADC codes, which fit in int16: they wait there
    # (half the memory of a second float accumulation) while `out` takes the next path's
    # accumulation. The paths are popped so that each slice's codes are freed once its
    # product has run.
    out_is_codes = False
    analog = weights.analog()
    gain_factor = weights.compensation
    while split.analog:
        path = split.analog.pop(0)
        sigma = adc.noise_sigma_lsb / math.sqrt(path.reads) if path.noisy else 0.0
        gain = path.gain if gain_factor == 1.0 else path.gain * gain_factor
        for tile_index, rows in enumerate(tiles):
            packed = None
            if unit is None:
                acc = out
            elif out_is_codes and len(tiles) == 1 and adc.bits <= 16:
                packed = torch.empty(out.shape, dtype=torch.int16, device=out.device)
                for block in row_blocks(*out.shape, out.device):
                    packed[block].copy_(out[block])
                acc = out
            else:
                scratch = torch.empty_like(out) if scratch is None else scratch
                acc = scratch
            analog_mvm(path.codes, analog, rows, acc)
            if call.observe is not None:
                call.observe(f"adc.{path.name}", acc)
            step = 1.0
            if not adc.bypass:
                step = call.adc_step(path.name, acc)
                read_noise = None
                if weights.read_variance_t is not None and call.noise is not None:
                    # One product for the whole tile; the std follows per row block.
                    variance = read_noise_variance(path.codes[:, rows],
                                                   weights.read_variance_t[rows])
                    read_noise = ReadNoise(variance, path.reads)
                draw = None
                if (sigma or read_noise is not None) and call.noise is not None:
                    draw = call.noise._replace(keys=noise_keys(call.noise.keys, path.index,
                                                               tile_index))
                saturated = adc_convert_(acc, step, adc.bits, sigma if draw else 0.0, draw,
                                         stats.rows if stats is not None else 0,
                                         (call.converters or {}).get((path.index, tile_index)),
                                         read_noise)
                if stats is not None:
                    stats.observe_adc(stats.rows * acc.shape[1], saturated)
            if unit is None:
                unit = step * gain
                out_is_codes = not adc.bypass
                continue
            alpha = step * gain / unit
            for block in row_blocks(*out.shape, out.device):
                if packed is not None and isinstance(alpha, torch.Tensor):
                    torch.addcmul(packed[block], out[block], alpha[block], out=out[block])
                elif packed is not None:  # codes + alpha * acc, as out.add_(acc, alpha)
                    torch.add(packed[block], out[block], alpha=alpha, out=out[block])
                else:
                    add_scaled_(out[block], acc[block], rows_of(alpha, block))
            out_is_codes = False
        del path
    if split.digital is None:
        return out, unit
    return digital_mvm(split.digital, split.digital_gain, weights, out, unit, columns)


def analog_mvm(codes: Codes, weights: WeightCodes, rows: slice, acc: torch.Tensor) -> None:
    """One array's accumulation before its ADC: acc = codes[:, tile] @ W_int[tile]."""
    integer_mvm(codes, weights, rows, acc)


def digital_mvm(digital: Codes, gain: float, weights: WeightCodes, out: torch.Tensor,
                unit: RowScale | None, columns: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RowScale]:
    """Adds the exact digital path, gain * (digital @ W_int), to `out` (in units of `unit`;
    None: `out` holds nothing yet). Returns (out, its unit)."""
    if columns is not None and unit is not None:
        index = columns.nonzero().squeeze(1)
        if index.numel() == 0:
            return out, unit  # no MSB codes: the digital path has nothing to add
        if 2 * index.numel() <= digital.shape[1]:
            weights = weights._replace(codes_t=weights.codes_t[index])
            digital = digital[:, index]
    if unit is None:
        integer_mvm(digital, weights, slice(None), out)
        return out, gain
    integer_mvm(digital, weights, slice(None), out, gain / unit)
    return out, unit


# ----- output ---------------------------------------------------------------------------
def reconstruct_(acc: torch.Tensor, act_step: torch.Tensor, weight_step: torch.Tensor,
                 unit: RowScale, bias: torch.Tensor | None) -> torch.Tensor:
    """In place: y = s_x s_w unit acc + b (steps 0-d or per row/channel)."""
    per_row = act_step.dim() == 2 or isinstance(unit, torch.Tensor)
    scale = None if per_row else act_step * weight_step * unit
    for rows in row_blocks(*acc.shape, acc.device):
        if per_row:
            scale = rows_of(act_step, rows) * weight_step * rows_of(unit, rows)
        if bias is not None:
            torch.addcmul(bias, acc[rows], scale, out=acc[rows])
        else:
            acc[rows].mul_(scale)
    return acc

