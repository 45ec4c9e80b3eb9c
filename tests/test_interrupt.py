"""jit/interrupt.py: stop signals end the block that runs an evaluation, wherever they land."""

import os
import signal
import sys

import pytest

from jit.interrupt import RunInterrupted, stop_on_signals


class SignalsWhileFinalised:
    """Sends `signum` to this process from its finaliser, as a signal would land while the
    garbage collector runs some library's `__del__`."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        sum(range(1000))  # Python runs the handler here, inside the finaliser


@pytest.fixture(autouse=True)
def _handled_signals():
    """The interpreter's own handlers: a pytest-xdist worker starts with SIGINT ignored,
    and stop_on_signals rightly leaves an ignored signal ignored (nohup)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_raised_away_inside_a_finaliser_still_ends_the_block(signum, code, monkeypatch):
    dropped, reached = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: dropped.append(info.exc_type))
    with pytest.raises(RunInterrupted) as stopped:
        with stop_on_signals():
            finalised = SignalsWhileFinalised(signum)
            del finalised  # the handler's exception is dropped ("Exception ignored in ...")
            reached.append("the rest of the block")
    assert reached == ["the rest of the block"]
    assert dropped == [RunInterrupted]  # Python dropped the handler's exception
    assert stopped.value.exit_code == code
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # restored


def test_a_signal_in_the_block_raises_where_the_program_is():
    reached = []
    with pytest.raises(RunInterrupted):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
            reached.append("after the signal")
    assert reached == []


def test_a_block_without_a_signal_ends_normally():
    with stop_on_signals():
        value = sum(range(10))
    assert value == 45
