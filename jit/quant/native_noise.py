"""torch's CPU thermal-noise draw, compiled: the same values as `Tensor.normal_` with a
re-seeded generator (engine.py draws one segment per sample this way), at about 1 ns per
value against torch's 3.4-4.1, many segments per call, without the GIL.

The keyed mt19937 draw is what the CPU plan spent most of a noisy layer's time on
(benchmarks/RESULTS.md, "The default run"). `noise_kernel.cpp` is the reference MT19937
as torch seeds it, with torch's AVX2 Box-Muller steps around the vectorised log and
sincos of torch's installed `avx_mathfun.h`. On first use in a process
it is compiled with the system C++ compiler into the cache folder (under a second), and
then checked once against torch's `normal_` for several keys, sizes and stds. The engine
uses it only if it is bitwise equal there. Otherwise, or where there is no compiler, no
AVX2/FMA, or torch dispatches its kernels below AVX2 (its Box-Muller routine differs
there), the draw stays torch's. The values are the same either way; only the speed
changes (tests/test_quant_noise.py runs layers both ways).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from .plan import cpu_flags

SOURCE = Path(__file__).with_name("noise_kernel.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
MIN_SEGMENT = 16  # torch draws shorter segments on another path (double precision)


def cache_dir() -> Path:
    """Where compiled kernels are kept: $JIT_AIMC_CACHE/kernels (the runs' cache folder,
    configs/run.yaml `paths.cache_dir`), else ~/.cache/jit-aimc/kernels."""
    root = os.environ.get("JIT_AIMC_CACHE") or Path.home() / ".cache" / "jit-aimc"
    return Path(root) / "kernels"


def _build() -> Path | None:
    """The compiled kernel for this source, torch and compiler flags (built once,
    atomically: concurrent processes may build it side by side), or None."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        return None
    include = Path(torch.__file__).parent / "include"
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                            + " ".join(FLAGS).encode() + compiler.encode()).hexdigest()[:16]
    target = cache_dir() / f"noise_kernel-{digest}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(built)],
                           check=True, capture_output=True, timeout=120)
            os.replace(built, target)
    except (OSError, subprocess.SubprocessError):
        return None
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel if it may be used here and gives torch's values, else None."""
    if not {"avx2", "fma"} <= cpu_flags():
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    path = _build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.jit_noise_stream_new.restype = ctypes.c_void_p
    lib.jit_noise_stream_free.argtypes = [ctypes.c_void_p]
    lib.jit_noise_draw.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                   ctypes.c_void_p]
    return lib if _matches_torch(lib) else None


def _matches_torch(lib: ctypes.CDLL) -> bool:
    """Whether the kernel draws torch's values: keys of 32 and 64 bits, sizes on and off
    multiples of 16, several stds, a stream continued across segments."""
    stream = Stream(lib)
    generator = torch.Generator()
    for key in (0, 1, 2**31 + 7, 2**40 + 5, 2**63 - 1):
        for sizes in ((16,), (17, 40), (682 * 16,), (2048, 31, 100)):
            for std in (1.0, 2.0, 0.3):
                expected = []
                generator.manual_seed(key)
                for size in sizes:
                    expected.append(torch.empty(size).normal_(0.0, std, generator=generator))
                out = torch.empty(sum(sizes))
                stream.draw(out, list(sizes), [key] + [None] * (len(sizes) - 1), std)
                if not torch.equal(out, torch.cat(expected)):
                    return False
    return True


class Stream:
    """One mt19937 engine in the kernel, re-seeded per sample like a torch.Generator."""

    def __init__(self, lib: ctypes.CDLL | None = None) -> None:
        self._lib = lib or _library()
        self._handle = self._lib.jit_noise_stream_new()
        weakref.finalize(self, self._lib.jit_noise_stream_free, self._handle)

    def draw(self, out: torch.Tensor, sizes: list[int], keys: list[int | None],
             std: float) -> None:
        """Fills the contiguous float32 `out` with segments of `sizes` values (>= 16
        each): a segment with a key re-seeds the stream, one with None continues it.
        The GIL is released while it draws."""
        if sum(sizes) > out.numel() or not out.is_contiguous() or out.dtype != torch.float32:
            raise ValueError("native noise: out must be contiguous float32 holding the segments")
        if len(keys) != len(sizes) or (sizes and min(sizes) < MIN_SEGMENT):
            raise ValueError(f"native noise: one key per segment and segments of at least "
                             f"{MIN_SEGMENT} values (shorter ones are drawn by torch)")
        count = len(sizes)
        sizes_np = np.asarray(sizes, dtype=np.int64)
        keys_np = np.asarray([0 if key is None else key for key in keys], dtype=np.uint64)
        reseed = np.asarray([key is not None for key in keys], dtype=np.uint8)
        self._lib.jit_noise_draw(out.data_ptr(), count, sizes_np.ctypes.data,
                                 keys_np.ctypes.data, reseed.ctypes.data, std, self._handle)


def available() -> bool:
    """Whether the compiled draw is used in this process."""
    return _library() is not None


class _Streams(threading.local):
    pair: tuple[Stream, Stream] | None = None


_STREAMS = _Streams()


def streams() -> tuple[Stream, Stream]:
    """Two streams for the calling thread: its own and the one a helper thread draws with
    beside it (engine._draw_noise hands the continuing one back first)."""
    if _STREAMS.pair is None:
        _STREAMS.pair = (Stream(), Stream())
    return _STREAMS.pair
