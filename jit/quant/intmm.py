"""Exact integer matmuls of activation codes with INT<=8 weight codes on INT8 kernels.

The simulated array multiplies integers; its products are exact in float32 while sums
stay below 2**24. An INT8 kernel computes the same products on the CPU's INT8 units, with
INT32 sums. Two are used, as plan.py chooses by CPU:

- `int_mm`: `torch._int_mm` (INT8 x INT8 -> INT32), fast on CPUs with AVX-512 VNNI;
- `onednn`: oneDNN's INT8 linear (`torch.ops.onednn.qlinear_pointwise`, weights packed
  once per tile, float32 output), fast on CPUs with AMX tiles.
Elsewhere either can be far slower than a float32 matmul, missing, or (for signed INT8
activations, in some builds) not exact; `kernel_is_exact` checks each once.

Codes wider than INT8 are cut into base-128 digits,
    v = sum_d 128^d * digit_d,  digit_0..n-2 in [0, 127], digit_n-1 signed,
each digit multiplied on the INT8 kernel and the products combined with the scales 128^d
(powers of two: exact). The result is the same integer as the float32 matmul gives
whenever that one is exact, so the choice of kernel never changes a simulation's output.
"""

from __future__ import annotations

import functools

import torch

BACKENDS = ("int_mm", "onednn")
DIGIT_BASE = 128


@functools.cache
def kernel_is_exact(backend: str) -> bool:
    """Whether `backend` exists in this torch build and multiplies signed INT8 codes
    exactly on this CPU (checked once against the float32 product)."""
    gen = torch.Generator().manual_seed(0)
    a8 = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=gen)
    w8 = torch.randint(-128, 128, (96, 256), dtype=torch.int8, generator=gen)
    w_t = w8.float().t().contiguous()
    try:
        out = torch.full((64, 96), float("nan"))
        int8_linear([a8], Int8Weights(w_t, backend), slice(None), out)
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
    """INT8 weight codes of one layer for one INT8 backend, prepared once per input-row
    tile. `codes_t`: integer codes (float) transposed, [in_features, out_features]."""

    def __init__(self, codes_t: torch.Tensor, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"INT8 backend must be one of {BACKENDS}, got {backend!r}")
        self.codes_t = codes_t  # identity key: the float codes these were made from
        self.backend = backend
        self._codes8 = codes_t.to(torch.int8)  # [in, out]
        self._tiles: dict[tuple, object] = {}
        out_features = codes_t.shape[1]
        self.unit_scale = torch.ones(out_features)  # oneDNN's per-channel output scale
        self.zero_point = torch.zeros(out_features, dtype=torch.int64)

    def tile(self, rows: slice):
        """The weights of input rows `rows` as the backend takes them: INT8 [rows, out]
        (int_mm) or oneDNN's packed [out, rows]."""
        key = (rows.start, rows.stop)
        if key not in self._tiles:
            codes = self._codes8[rows].contiguous()
            self._tiles[key] = (codes if self.backend == "int_mm" else
                                torch.ops.onednn.qlinear_prepack(codes.t().contiguous(), None))
        return self._tiles[key]


# Output elements per kernel call: the rows being combined stay in cache between the
# digit products, and temporaries stay small (int_mm's two INT32 temporaries: 2 MiB
# together; the group sizes tried are in benchmarks/RESULTS.md).
GROUP_ELEMENTS = 2**20
INT_MM_GROUP_ELEMENTS = 2**18


def int8_linear(digits: list[torch.Tensor], weights: Int8Weights, rows: slice,
                out: torch.Tensor) -> None:
    """out = (sum_d 128^d digits[d]) @ W_int[rows], exactly (sums below 2**24).
    `digits`: INT8 [tokens, len(rows)] each, least significant first; `out`: float32
    [tokens, out_features], contiguous."""
    tokens, width = out.shape
    tile = weights.tile(rows)
    elements = INT_MM_GROUP_ELEMENTS if weights.backend == "int_mm" else GROUP_ELEMENTS
    group_rows = max(1, elements // max(width, 1))
    for start in range(0, tokens, group_rows):
        group = slice(start, min(start + group_rows, tokens))
        rows_out = out[group]
        parts = [digit[group].contiguous() for digit in digits]
        if weights.backend == "int_mm":
            # Combined in INT32 (exact: plan.use_int8 bounds the sums), converted once.
            acc = torch._int_mm(parts[-1], tile)
            for part in reversed(parts[:-1]):
                acc = torch._int_mm(part, tile).add_(acc, alpha=DIGIT_BASE)
            rows_out.copy_(acc)
            continue
        rows_out.zero_()
        for d, part in enumerate(parts):
            torch.ops.onednn.qlinear_pointwise.binary(
                part, float(DIGIT_BASE**d), 0, tile, weights.unit_scale, weights.zero_point, rows_out,
                None, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")

