"""What a result was computed with, beyond its config: the code revision and the machine.

Float GEMMs round differently between CPUs (and INT8 kernels are chosen per CPU,
jit/quant/plan.py), so results.json records the CPU, the torch version and the INT8
kernel next to the git revision of the code.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; (None, None) when it is not
    a git checkout (an installed wheel, an exported tree) or git is missing. Dirty: tracked
    files differ from the commit (untracked files, e.g. run outputs, do not count)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """The results.json fields naming the code and the machine."""
    import torch

    from jit.quant import native_noise
    from jit.quant.plan import int8_backend

    commit, dirty = git_state()
    return {"git_revision": commit, "git_dirty": dirty, "cpu_model": cpu_model(),
            "torch_version": torch.__version__,
            # the kernel of the INT8 products on this CPU (jit/quant/plan.py); float32: the float GEMM
            "int8_kernel": int8_backend() or "float32",
            # who draws the CPU thermal noise (same values either way): the compiled copy of
            # torch's draw (jit/quant/native_noise.py) or torch's normal_
            "cpu_noise_draw": "compiled" if native_noise.available() else "torch"}
