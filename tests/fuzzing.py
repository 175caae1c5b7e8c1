"""What every fuzzer shares: a per-case deadline that nothing in the code under test can swallow,
and the one verdict on a case: read and valid, or refused with the clear error, the file unchanged."""
from __future__ import annotations

import hashlib
import signal
from contextlib import contextmanager
from typing import Callable

import pytest

from vae_fix.errors import InputError

CASE_SECONDS = 10  # a hang, not a slow case: speed is measured in bench/bench_hostile.py


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


def outcome(path, read: Callable[[], object], check: Callable[[object], None], max_message: int = 1200) -> str:
    """'read' (`check` passed on what `read()` gave) or 'refused' (an InputError naming the file, under
    `max_message` characters); anything else, a hang included, fails the test, as does a changed file."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        with deadline(CASE_SECONDS):
            value = read()
        check(value)
        result = "read"
    except InputError as e:
        assert type(e) is InputError and path.name in str(e) and len(str(e)) < max_message, str(e)[:300]
        result = "refused"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__}: {str(e)[:300]}")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "reading changed the file"
    return result
