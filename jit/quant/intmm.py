"""Exact integer matmuls of activation codes with INT<=8 weight codes on INT8 kernels.

The simulated array multiplies integers; its products are exact in float32 while sums
stay below 2**24. oneDNN's INT8 linear (`torch.ops.onednn.qlinear_pointwise`, weights
packed once per layer) computes the same products on INT8 units; on CPUs with AMX tiles
that beats a float32 matmul of the same shape, elsewhere it can be much slower, missing,
or (for signed INT8 activations, in some builds) not exact.

Codes wider than INT8 are cut into base-128 digits,
    v = sum_d 128^d * digit_d,  digit_0..n-2 in [0, 127], digit_n-1 signed,
each digit multiplied on the INT8 kernel with the scale 128^d (a power of two: exact)
and summed into the float32 output by the kernel itself. The result is the same integer
as the float32 matmul gives whenever that one is exact, so the choice of kernel never
changes a simulation's output.

Whether a layer uses this kernel is decided in plan.py (`use_int8`); this module only
checks that the kernel exists and is exact (`kernel_is_exact`).
"""

from __future__ import annotations

import functools

import torch

DIGIT_BASE = 128


@functools.cache
def kernel_is_exact() -> bool:
    """Whether oneDNN's INT8 linear exists in this torch build and multiplies signed INT8
    codes exactly on this CPU (checked once against the float32 product)."""
    gen = torch.Generator().manual_seed(0)
    a8 = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=gen)
    w8 = torch.randint(-128, 128, (96, 256), dtype=torch.int8, generator=gen)
    w_t = w8.float().t().contiguous()
    try:
        out = torch.full((64, 96), float("nan"))
        int8_linear([a8], Int8Weights(w_t), slice(None), out)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return torch.equal(out, a8.float() @ w_t)


def digit_count(low: int, high: int) -> int:
    """Base-128 digits needed for integer codes in [low, high]."""
    count = 1
    while low < -128 or high > 127:
        low, high = low // DIGIT_BASE, high // DIGIT_BASE
        count += 1
    return count


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
    write_digits(codes, digits, slice(None), max(-low, high))
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
