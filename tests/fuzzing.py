"""What every fuzzer shares: a per-case deadline that nothing in the code under test can swallow."""
from __future__ import annotations

import signal
from contextlib import contextmanager


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` under test can swallow it."""


@contextmanager
def deadline(seconds: float):
    """Raise `Hang` in the main thread when the block runs longer than `seconds`."""
    def ring(*_):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
