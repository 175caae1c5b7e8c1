"""Progress reporting shared by every long loop in the engine.

A `ProgressFn` is called as `progress(done, total)`; it may raise to cancel the work (the ComfyUI
layer raises the host's interrupt exception there, the terminal bar raises KeyboardInterrupt on
Ctrl-C by itself). The engine never swallows that exception.

Loops count with `Steps`, which knows its total, so no caller adds up steps by hand:

    steps = Steps(progress, total=len(cells) + 1)
    for cell in cells:
        ...
        steps.step()
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

ProgressFn = Callable[[int, int], None]


def report(progress: Optional[ProgressFn], done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


class Steps:
    """Counts the steps of one piece of work and reports each to a `ProgressFn` (which may cancel).

    `total` may grow while the work runs (`add`), e.g. when a fallback adds tiles."""

    def __init__(self, progress: Optional[ProgressFn], total: int):
        self.progress, self.total, self.done = progress, max(int(total), 0), 0
        report(self.progress, 0, self.total)

    def add(self, more: int) -> None:
        self.total += max(int(more), 0)

    def step(self, n: int = 1) -> None:
        self.done += n
        report(self.progress, self.done, max(self.total, self.done))

    def sub(self, weight: int = 1) -> ProgressFn:
        """A `ProgressFn` for a sub-task worth `weight` of these steps (it may report any total)."""
        start = self.done

        def progress(done: int, total: int) -> None:
            report(self.progress, start + (weight * done) // max(total, 1), max(self.total, start + weight))

        return progress


def terminal_progress(label: str, quiet: bool = False) -> Optional[ProgressFn]:
    """A progress bar with ETA on a terminal (tqdm, which ComfyUI ships), nothing when piped or quiet."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="step", leave=False, file=sys.stderr)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress
