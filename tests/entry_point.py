"""`python run.py ...` for the tests, without paying the interpreter's start-up each time.

Importing torch, Lightning (which imports torchmetrics and torchvision) and Hydra takes
about 5 s of every run.py process, more than most tiny test runs compute. A fork server
(multiprocessing's "forkserver" context) imports what run.py imports once per test worker,
and each run is a fork of it that executes run.py as `__main__` with its own argv,
working directory, environment, stdout and stderr: the real entry point, in a fresh
process, minus the imports.

A run whose environment sets a variable read only when a process starts (thread pools,
CUDA, the interpreter) gets a new interpreter instead, as does everything when the fork
server is unavailable (`JIT_AIMC_TEST_FRESH_PROCESS=1` forces it).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "run.py"
# Imported once by the fork server: what run.py and the tasks import at start-up.
PRELOAD = ["jit.runner"]
# Environment variables a process reads when it starts, not when run.py reads its config.
START_UP_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "CUDA_", "PYTHON", "LD_", "TORCH")

_context: multiprocessing.context.BaseContext | None = None


def _fork_server() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _needs_fresh_process(env: dict[str, str]) -> bool:
    if (os.environ.get("JIT_AIMC_TEST_FRESH_PROCESS") == "1"
            or "forkserver" not in multiprocessing.get_all_start_methods()):  # e.g. Windows
        return True
    return any(key.startswith(START_UP_PREFIXES) and os.environ.get(key) != value
               for key, value in env.items())


def _run_forked(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str,
                prelude: str) -> None:
    """In the forked process: become `python run.py *argv` in `cwd`, after `prelude`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(RUN_PY), *argv]
    sys.path.insert(0, str(ROOT))
    try:
        exec(compile(prelude, "<prelude>", "exec"), {"__name__": "__prelude__"})
        runpy.run_path(str(RUN_PY), run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_entry_point(argv: list[str], cwd: Path | str, env: dict[str, str],
                    timeout: float = 600, prelude: str = "") -> subprocess.CompletedProcess:
    """`python run.py *argv` in `cwd` with exactly the environment `env`; stdout and stderr
    captured as text, as subprocess.run(..., capture_output=True, text=True) gives them.
    `prelude`: Python source run first in the same process (e.g. a fault to inject)."""
    if _needs_fresh_process(env):
        script = (f"{prelude}\nimport runpy, sys\nsys.argv = {[str(RUN_PY), *argv]!r}\n"
                  f"runpy.run_path({str(RUN_PY)!r}, run_name='__main__')\n")
        return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True,
                              text=True, env=env, timeout=timeout)
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out, err):
            Path(path).touch()
        process = _fork_server().Process(target=_run_forked, args=(argv, str(cwd), env, out, err, prelude))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([str(RUN_PY), *argv], timeout)
        stdout, stderr = Path(out).read_text(), Path(err).read_text()
    code = process.exitcode
    # A process killed by a signal reads as -signal, as subprocess reports it.
    return subprocess.CompletedProcess([str(RUN_PY), *argv], code, stdout, stderr)
