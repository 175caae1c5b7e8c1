"""Memory before work: how much an encode will need, how much the device has, and out-of-memory
recognised on every device (CUDA raises OutOfMemoryError, the CPU allocator a RuntimeError).

`VAEFIX_MEMORY_LIMIT` (bytes, or with a K/M/G suffix) caps what the pack plans for, on any device.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import InputError

_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")  # CUDA, CPU allocator, both
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
FRACTION = 0.8  # plan for at most this much of what is free: the OS and other models need the rest


def is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and any(w in str(err).lower() for w in _OOM_WORDS)


def memory_limit() -> Optional[int]:
    text = os.environ.get("VAEFIX_MEMORY_LIMIT", "").strip().upper().removesuffix("B")
    if not text:
        return None
    unit = text[-1] if text[-1] in _UNITS else ""
    try:
        value = float(text[:-1] if unit else text) * _UNITS[unit]
    except ValueError:
        raise InputError("VAEFIX_MEMORY_LIMIT", f"'{text}'", "bytes, optionally with K, M or G (e.g. 8G)") from None
    return int(value)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes the pack may plan for on `device` (free memory x FRACTION, capped by VAEFIX_MEMORY_LIMIT);
    None when unknown (then only out-of-memory errors decide)."""
    free = None
    if device.type == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            pass
    free = None if free is None else int(free * FRACTION)
    limit = memory_limit()
    return limit if free is None else (free if limit is None else min(free, limit))


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"
