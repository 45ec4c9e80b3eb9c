"""What a run prints: one log handler and no dependency chatter.

Hydra configures logging before the job starts (console and `<run dir>/run.log`, see
configs/run.yaml). Lightning, imported later, attaches its own console handler to the
`lightning` logger while letting records propagate to Hydra's, so every Lightning line
would be printed twice; `quiet_dependencies` removes that handler and filters messages
that are advertising or restate a setting, not information about this run.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings

# Lightning messages that carry nothing about this run: product tips, and lines that only
# restate a Trainer argument the config set (`limit_val_batches=1.0`, `val_check_interval`).
_CHATTER = re.compile(r"Tip: For seamless|`Trainer\([a-z_]+=[^)]*\)` was configured so")

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _CHATTER.search(record.getMessage())


def quiet_dependencies() -> None:
    """Idempotent: one handler per record (Hydra's), chatter filtered, known dependency
    deprecation warnings that users cannot act on silenced. Lightning's handler stays
    where nothing else would print its records (no root handler: plain Python use)."""
    keep_handler = not logging.getLogger().handlers
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [] if keep_handler else list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own console handler
                logger.removeHandler(handler)
        logger.propagate = logger.propagate or not keep_handler
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropChatter) for f in logger.filters):
            logger.addFilter(_DropChatter())
    # Raised inside Lightning's own pytree helper on recent torch releases, on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                            category=Warning)


# ------------------------------------------------------------------------------ progress
# Seconds between the plain progress lines printed where stdout is not a terminal
# (`progress_interval_s` in the run config; jit/tasks.py sets it before any work).
_progress_interval_s = 30.0


def configure_progress(interval_s: float) -> None:
    global _progress_interval_s
    _progress_interval_s = float(interval_s)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def announce(message: str) -> None:
    """One line saying which phase starts (rank 0), in the run log and on the console."""
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PhaseProgress:
    """Progress of one phase over `total` units.

    On a terminal a rich bar (count, rate, elapsed, remaining). Without one (SLURM, nohup,
    CI: stdout is not a TTY, where rich would draw nothing until the end) a plain line
    every `progress_interval_s` seconds with the count, the rate and the time left, and
    one when the phase ends. `enabled=False` (other ranks, fid.progress=false) shows nothing.
    """

    def __init__(self, label: str, total: float, unit: str = "images", enabled: bool = True,
                 terminal: bool | None = None, initial: float = 0):
        self.label, self.total, self.unit, self.enabled = label, float(total), unit, enabled
        self.terminal = stdout_is_terminal() if terminal is None else terminal
        self.completed = self.initial = float(initial)  # initial: done before (a resumed training)
        self._bar = None
        self._task = None

    def __enter__(self):
        self._start = self._last_line = time.monotonic()
        self._last_count = self.completed
        if self.enabled and self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.initial, rate="")
        return self

    def _rate(self, now: float) -> float:
        return (self.completed - self.initial) / max(now - self._start, 1e-9)

    def update(self, completed: float) -> None:
        self.completed = min(float(completed), self.total)
        if not self.enabled:
            return
        now = time.monotonic()
        rate = self._rate(now)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, rate=f"{rate:.2f} {self.unit}/s")
        elif (now - self._last_line >= _progress_interval_s and self._last_count != self.completed
              and self.completed < self.total):  # the last count is the closing line's
            self._last_line, self._last_count = now, self.completed
            left = (self.total - self.completed) / rate if rate > 0 else float("inf")
            eta = _duration(left) if left != float("inf") else "unknown"
            announce(f"{self.label}: {self.completed:.0f}/{self.total:.0f} {self.unit} "
                     f"({100 * self.completed / max(self.total, 1):.0f}%), {rate:.3g} {self.unit}/s, ETA {eta}")

    def advance(self, amount: float) -> None:
        self.update(self.completed + amount)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
        elif self.enabled and exc_type is None:
            now = time.monotonic()
            announce(f"{self.label}: {self.completed:.0f}/{self.total:.0f} {self.unit} in "
                     f"{_duration(now - self._start)} ({self._rate(now):.3g} {self.unit}/s)")
