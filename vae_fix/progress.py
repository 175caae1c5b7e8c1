"""Progress reporting shared by every long loop in the engine.

A `ProgressFn` is called as `progress(done, total)`; it may raise to cancel the work (the ComfyUI
layer raises the host's interrupt exception there). The engine never swallows that exception.
"""
from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Callable[[int, int], None]


def report(progress: Optional[ProgressFn], done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)
