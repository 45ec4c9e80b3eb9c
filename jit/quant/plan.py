"""How the fast engine (engine.py) runs on a device: the one place that decides what the
CPU does differently.

On the CPU a kernel launch is cheap and reading a value on the host is free, so:
- elementwise chains run in row blocks of at most CHUNK_ELEMENTS elements, which keeps
  the temporaries of a chain (noise, slice codes) small next to the activations and a
  chain's block in cache;
- the sparse digital product is narrowed to the input columns that hold MSB codes;
- integer products may run on an INT8 kernel (intmm.py) where this CPU runs one faster
  than float32 (AVX-512 VNNI, AMX);
- with two or more intra-op threads, a helper thread draws half of the samples' thermal
  noise (a keyed draw runs on one core; `noise_helper`), with the compiled kernel of
  native_noise.py where it builds and gives torch's values.
On CUDA and other accelerators every op is one kernel over the whole tensor: blocks would
multiply launches, the narrowing would stall the queue on a host sync, and the GPU's
float GEMMs are exact for these integer products already.

The plan never changes a result: noiseless outputs are bit-identical between the plans,
and noise is drawn per sample in segments that depend on the sample's shape and the
device type alone (tests/test_quant_execution.py, tests/test_quant_intmm.py).
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from . import intmm

# Elements per row block of the CPU plan (512 KiB in float32). Each op still spreads over
# the cores (ATen's parallel grain size is 32768 elements). The size was chosen against
# cache-sized blocks and whole-tensor ops with benchmarks.quant_linear
# (benchmarks/RESULTS.md); larger blocks raise the bit-serial layer's peak memory.
CHUNK_ELEMENTS = 2**17

BLOCKWISE_DEVICE_TYPES = frozenset({"cpu"})

# Elements of thermal noise drawn per round (8 MiB in float32) on the CPU plan. A round's
# samples are shared between the calling thread and one helper thread: torch's CPU
# generator (mt19937 and the normal transform) runs on one core per draw, and the draw is
# about 30% of the hybrid digits model's sampling time on two cores (benchmarks/RESULTS.md).
# Rounds bound the noise buffer, which the elementwise ADC passes then read block by block.
NOISE_ROUND_ELEMENTS = 2**21

_INT32_SAFE = 2**31 - 1


def blockwise(device: torch.device) -> bool:
    """Whether `device` takes the CPU plan."""
    return device.type in BLOCKWISE_DEVICE_TYPES


def row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    """Row slices of at most CHUNK_ELEMENTS elements (at least one row each) on the CPU;
    all rows at once elsewhere. Where blocks fall depends only on the shape and the
    device type, so results (noise included) do not change with the thread count."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1)) if blockwise(device) else max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


class SampleNoise(NamedTuple):
    """Where a tile's thermal noise comes from: `generator` re-seeded with `keys[s]` for
    the rows of sample s (rows s * rows_per_sample onwards; noise.py derives the keys)."""

    generator: torch.Generator
    rows_per_sample: int
    keys: list[int]


def noise_blocks(rows: int, cols: int, device: torch.device, noise: SampleNoise | None
                 ) -> list[tuple[slice, list[tuple[slice, int | None]]]]:
    """Row blocks for the elementwise ADC passes and, inside each, the noise segments:
    (rows relative to the block, index of the sample whose key re-seeds the generator, or
    None to continue the stream).

    A sample's noise is drawn only on its own rows, in segments of a size that depends on
    its shape and the device type alone (on the CPU at most CHUNK_ELEMENTS, so they stay
    in cache; elsewhere the whole sample in one draw); blocks gather whole segments, so
    where they fall never changes the noise. Without noise: `row_blocks`."""
    if noise is None:
        return [(block, []) for block in row_blocks(rows, cols, device)]
    return _noise_blocks(rows, cols, blockwise(device), noise.rows_per_sample, len(noise.keys))


@functools.lru_cache(maxsize=256)
def _noise_blocks(rows: int, cols: int, cpu_plan: bool, per_sample: int, samples: int
                  ) -> list[tuple[slice, list[tuple[slice, int | None]]]]:
    """noise_blocks by shape (every call of a layer in a sampling loop has the same)."""
    segment = max(1, CHUNK_ELEMENTS // max(cols, 1)) if cpu_plan else per_sample
    segment = max(1, min(segment, per_sample))
    block_rows = max(segment, CHUNK_ELEMENTS // max(cols, 1)) if cpu_plan else rows
    blocks, start, segments = [], 0, []
    for sample in range(samples):
        first = sample * per_sample
        for offset in range(0, per_sample, segment):
            low, high = first + offset, first + min(offset + segment, per_sample)
            if high - start > block_rows and segments:
                blocks.append((slice(start, low), segments))
                start, segments = low, []
            segments.append((slice(low - start, high - start), sample if offset == 0 else None))
    if segments:
        blocks.append((slice(start, rows), segments))
    return blocks


def noise_rounds(blocks: list[tuple[slice, list]], cols: int, shared: bool
                 ) -> list[tuple[int, int]]:
    """The rounds in which the noise of `noise_blocks` is drawn, as block indices
    [first, last). Drawn on one thread (`shared` False), a round is one block, so its
    noise is still in cache when the block is converted; shared with the helper thread,
    blocks are gathered into rounds of at most NOISE_ROUND_ELEMENTS elements (at least
    one block each) so that each hand-over pays off."""
    if not shared:
        return [(index, index + 1) for index in range(len(blocks))]
    rounds, first, elements = [], 0, 0
    for index, (rows, _) in enumerate(blocks):
        size = (rows.stop - rows.start) * cols
        if index > first and elements + size > NOISE_ROUND_ELEMENTS:
            rounds.append((first, index))
            first, elements = index, 0
        elements += size
    if blocks:
        rounds.append((first, len(blocks)))
    return rounds


class _NoiseHelper(threading.local):
    """The helper thread of this process and the generator only it draws with."""

    pid: int | None = None
    executor: ThreadPoolExecutor | None = None
    generator: torch.Generator | None = None


_NOISE_HELPER = _NoiseHelper()


def noise_helper(device: torch.device) -> tuple[ThreadPoolExecutor, torch.Generator] | None:
    """(helper thread, its generator) for drawing noise beside the calling thread, or
    None where the draw stays on the calling thread: other devices (their generators run
    in parallel already) and one intra-op thread (torch.set_num_threads(1): the run asked
    for one core). One helper per process and calling thread (a forked child starts its
    own)."""
    if not blockwise(device) or torch.get_num_threads() < 2:
        return None
    helper = _NOISE_HELPER
    if helper.pid != os.getpid():
        helper.executor = ThreadPoolExecutor(1, thread_name_prefix="jit-noise")
        helper.generator = torch.Generator()
        helper.pid = os.getpid()
    return helper.executor, helper.generator


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


# The INT8 kernel (intmm.py) per CPU feature, first match wins: each is the one that
# beat the float32 GEMM on a CPU with that feature in benchmarks.digital_kernels
# (figures in benchmarks/RESULTS.md); on a CPU with neither, both lost to it.
INT8_BACKEND_BY_CPU_FLAG = (("amx_int8", "onednn"), ("avx512_vnni", "int_mm"))


@functools.cache
def int8_backend() -> str | None:
    """The INT8 kernel this CPU runs faster than float32, if it is exact here."""
    flags = cpu_flags()
    for flag, backend in INT8_BACKEND_BY_CPU_FLAG:
        if flag in flags and intmm.kernel_is_exact(backend):
            return backend
    return None


@functools.cache
def any_exact_int8_backend() -> str | None:
    """The chosen backend, else any exact one (for int8_matmul=True on other CPUs)."""
    return int8_backend() or next((b for b in intmm.BACKENDS if intmm.kernel_is_exact(b)), None)


def use_int8(low: int, high: int, inner: int, weight_bits: int, device: torch.device,
             dtype: torch.dtype, requested: bool | None) -> str | None:
    """The INT8 kernel (intmm.BACKENDS) that multiplies codes in [low, high] by
    INT`weight_bits` weights over `inner` rows, or None for the float32 GEMM.

    Only where it is exact: float32 on the CPU plan, INT<=8 weights, INT32 sums that
    cannot overflow. Then `requested` (QuantLinear.int8_matmul) decides; None takes the
    kernel this CPU runs fastest (`int8_backend`), True any exact one, False none."""
    if not blockwise(device) or dtype != torch.float32 or weight_bits > 8:
        return None
    if inner * max(-low, high) * 2 ** (weight_bits - 1) > _INT32_SAFE:
        return None
    if requested is None:
        return int8_backend()
    if not requested:
        return None
    backend = any_exact_int8_backend()
    if backend is None:
        raise RuntimeError("int8_matmul=True: no exact INT8 kernel (torch._int_mm, oneDNN's "
                           "INT8 linear) in this torch build on this CPU "
                           "(jit.quant.intmm.kernel_is_exact)")
    return backend
