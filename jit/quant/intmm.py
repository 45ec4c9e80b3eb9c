"""Exact integer matmuls of activation codes with INT<=8 weight codes on INT8 kernels.

The simulated array multiplies integers; its products are exact in float32 while sums
stay below 2**24. CPUs with INT8 dot-product units (VNNI, AMX) can run oneDNN's INT8
linear (`torch.ops.onednn.qlinear_pointwise`, weights packed once per layer) faster than
a float32 matmul of the same shape. On CPUs without them (AVX2 only) that kernel is not
exact for signed INT8 activations in the torch builds tried here, and the probe below
turns it off.

Codes wider than INT8 are cut into base-128 digits,
    v = sum_d 128^d * digit_d,  digit_0..n-2 in [0, 127], digit_n-1 signed,
each digit multiplied on the INT8 kernel with the scale 128^d (a power of two: exact)
and summed into the float32 output by the kernel itself. The result is the same integer
as the float32 matmul gives whenever that one is exact, so the choice of kernel never
changes a simulation's output.

Whether the INT8 kernel is worth it is measured once per process (`int8_speedup`), since
it depends on the CPU: a path with n digits uses it when n products take less time than
one float32 matmul. Where the kernel is missing or not exact the float path runs.
"""

from __future__ import annotations

import functools
import time

import torch

from .quantizers import blockwise, row_blocks

DIGIT_BASE = 128
_INT32_SAFE = 2**31 - 1

# None: measure once (int8_speedup); True/False: force the INT8 kernel on or off (tests,
# benchmarks). Results do not depend on it.
_forced: bool | None = None


def force_int8_matmul(enabled: bool | None) -> None:
    """Force the INT8 kernel on (True) or off (False), or back to measuring (None)."""
    global _forced
    _forced = enabled


@functools.cache
def int8_speedup() -> float:
    """Time of a float32 matmul over that of the INT8 linear at a mid-size shape, on this
    CPU (0.0 where the kernel is missing or not exact)."""
    gen = torch.Generator().manual_seed(0)
    a8 = torch.randint(-128, 128, (256, 1024), dtype=torch.int8, generator=gen)
    w8 = torch.randint(-128, 128, (512, 1024), dtype=torch.int8, generator=gen)
    a, w_t = a8.float(), w8.float().t().contiguous()
    try:
        weights = Int8Weights(w_t)
        out = torch.full((256, 512), float("nan"))
        int8_linear([a8], weights, slice(None), out)
        if not torch.equal(out, a @ w_t):
            return 0.0
    except (RuntimeError, AttributeError, NotImplementedError):
        return 0.0

    def best(fn) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        return best(lambda: torch.matmul(a, w_t, out=out)) / max(
            best(lambda: int8_linear([a8], weights, slice(None), out)), 1e-9)


def digit_count(low: int, high: int) -> int:
    """Base-128 digits needed for integer codes in [low, high]."""
    count = 1
    while low < -128 or high > 127:
        low, high = low // DIGIT_BASE, high // DIGIT_BASE
        count += 1
    return count


def use_int8(low: int, high: int, inner: int, weight_bits: int, device: torch.device,
             dtype: torch.dtype) -> bool:
    """Whether codes in [low, high] times INT`weight_bits` weights over `inner` rows go
    through the INT8 kernel: float32 on the CPU, INT32 sums that cannot overflow, and
    (unless forced) a measured speed-up larger than the number of digit matmuls."""
    if not blockwise(device) or dtype != torch.float32 or weight_bits > 8:
        return False
    if inner * max(-low, high) * 2 ** (weight_bits - 1) > _INT32_SAFE:
        return False  # the kernel's INT32 sums could overflow
    if _forced is not None:
        return _forced
    return int8_speedup() > digit_count(low, high)


def new_digits(shape: torch.Size | tuple, low: int, high: int,
               device: torch.device | None = None) -> list[torch.Tensor]:
    """Empty INT8 digit tensors for codes in [low, high]."""
    return [torch.empty(shape, dtype=torch.int8, device=device)
            for _ in range(digit_count(low, high))]


def write_digits(codes: torch.Tensor, digits: list[torch.Tensor], rows: slice, high: int
                 ) -> None:
    """Base-128 digits of a block of integer codes (float) into digits[d][rows], least
    significant first; `high` bounds |codes|."""
    if len(digits) == 1:
        digits[0][rows].copy_(codes)
        return
    rest = codes.to(torch.int16 if high < 2**15 else torch.int32)
    for digit in digits[:-1]:
        torch.bitwise_and(rest, DIGIT_BASE - 1, out=digit[rows])
        rest.bitwise_right_shift_(7)  # arithmetic shift: floor division by 128
    digits[-1][rows].copy_(rest)


def to_digits(codes: torch.Tensor, low: int, high: int) -> list[torch.Tensor]:
    """INT8 base-128 digits of integer codes in [low, high] (a float tensor), least
    significant first: codes == sum_d 128^d * digits[d]."""
    digits = new_digits(codes.shape, low, high, codes.device)
    bound = max(-low, high)
    for block in row_blocks(*codes.shape, codes.device):
        rows = slice(block.start, min(block.stop, codes.shape[0]))
        write_digits(codes[rows], digits, rows, bound)
    return digits


class Int8Weights:
    """INT8 weight codes of one layer, packed for the INT8 kernel once per input-row tile.
    `codes_t`: integer codes (float) transposed, [in_features, out_features]."""

    def __init__(self, codes_t: torch.Tensor) -> None:
        self.codes_t = codes_t  # identity key: the float codes these were made from
        self._codes = codes_t.t().to(torch.int8).contiguous()  # [out, in]
        out_features = self._codes.shape[0]
        self._unit_scale = torch.ones(out_features)
        self._zero_point = torch.zeros(out_features, dtype=torch.int64)
        self._packed: dict[tuple, torch.Tensor] = {}

    def packed(self, rows: slice) -> torch.Tensor:
        key = (rows.start, rows.stop)
        if key not in self._packed:
            tile = self._codes[:, rows].contiguous()
            self._packed[key] = torch.ops.onednn.qlinear_prepack(tile, None)
        return self._packed[key]

    def accumulate(self, digit: torch.Tensor, rows: slice, out: torch.Tensor,
                   scale: float) -> None:
        """out += scale * (digit @ W_int[rows]) (digit: INT8 [tokens, len(rows)])."""
        torch.ops.onednn.qlinear_pointwise.binary(
            digit, scale, 0, self.packed(rows), self._unit_scale, self._zero_point, out,
            None, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")


# Output rows per kernel call: the float32 rows it adds into stay in cache between the
# digit products, and the packed weights are reused across calls.
GROUP_ELEMENTS = 2**20


def int8_linear(digits: list[torch.Tensor], weights: Int8Weights, rows: slice,
                out: torch.Tensor) -> None:
    """out = (sum_d 128^d digits[d]) @ W_int[rows], exactly (sums below 2**24).
    `digits`: INT8 [tokens, len(rows)] each, least significant first; `out`: float32
    [tokens, out_features], contiguous."""
    tokens, width = out.shape
    group_rows = max(1, GROUP_ELEMENTS // max(width, 1))
    for start in range(0, tokens, group_rows):
        group = slice(start, min(start + group_rows, tokens))
        rows_out = out[group]
        rows_out.zero_()
        for d, digit in enumerate(digits):
            weights.accumulate(digit[group], rows, rows_out, float(DIGIT_BASE**d))
