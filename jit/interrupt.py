"""SIGTERM and SIGINT stop an evaluation or a calibration at once, with the shell's exit
code (128 + the signal number: 143, 130) and the run folder's FAILED marker
(jit/runner.py). Training keeps Lightning's own handling: SIGTERM saves last.ckpt at the
next step (jit/train.py)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is: `except Exception`
    blocks on the way out do not swallow it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals(on_stop: Callable[[int], None] | None = None) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise RunInterrupted where the program is (a
    running torch operation finishes first), after `on_stop(signum)`; a second signal is
    ignored while the run winds down. A signal the process inherited as ignored (nohup)
    stays ignored. Only in the main thread, where Python delivers signals.

    Python drops an exception raised inside a finaliser (`__del__`, run by the garbage
    collector wherever the program is) with an "Exception ignored" message, so a signal
    that lands there would be lost: the block then raises RunInterrupted when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    received: list[int] = []

    def stop(signum, frame):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        received.append(signum)
        if on_stop is not None:
            on_stop(signum)
        raise RunInterrupted(signum)

    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)
    if received:  # the block ended normally: its RunInterrupted was dropped on the way
        raise RunInterrupted(received[0])
