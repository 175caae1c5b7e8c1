"""Every weight of a VAE must be finite: one NaN or inf in a file turns every picture black.

`check_finite(sd, where)` checks a file's tensors: a few float32 sums over the tensors merged where
they lie back to back (a mapped safetensors file: one sum), exact per tensor only when a sum is not
finite. (Min and max per tensor, in a second thread beside the host's build, made Load VAE (strict)
1.19-1.36x core Load VAE on a 335 MB SD VAE: the thread waited for the GIL at every tensor, and
both wanted both cores.) `check_built(model, sd, where)` checks a model built from them, for a
dtype narrower than the file's: finite weights beyond float16's range become inf there.
"""
from __future__ import annotations

import ctypes
from itertools import chain

import numpy as np
import torch

from .errors import VAELoadError


def check_finite(sd: dict, where: str) -> None:
    """VAELoadError naming every floating-point tensor that holds NaN or inf (integer tensors, such
    as a batch-norm's counter, are left alone).

    A few float32 sums first (NaN or infinite whenever any value is), over the tensors merged where
    they lie back to back in memory (a safetensors file's, mapped: one sum for the whole file), so
    that the check is a few long calls that leave Python free; only when a sum is not finite are the
    tensors checked one by one, exactly (a sum that merely overflowed names nothing and passes)."""
    sd = {k: v for k, v in sd.items() if v.is_floating_point()}
    sums = [run.sum(dtype=torch.float32) for run in _back_to_back(sd.values())]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    _refuse(where, [b for b in (_non_finite(k, v) for k, v in sd.items()) if b])


def _back_to_back(tensors) -> list[torch.Tensor]:
    """The tensors as few flat tensors as possible: CPU tensors of one dtype that follow each other
    in memory without a gap are read as one (the memory is theirs: we hold them while it is read)."""
    runs, merged = [], []  # merged: [start address, end address, dtype]
    for t in sorted((t for t in tensors if t.numel()), key=lambda t: (t.device.type != "cpu", t.data_ptr())):
        ptr, size = t.data_ptr(), t.numel() * t.element_size()
        if t.device.type != "cpu" or not t.is_contiguous():
            runs.append(t.reshape(-1))
        elif merged and merged[-1][1] == ptr and merged[-1][2] == t.dtype:
            merged[-1][1] += size
        else:
            merged.append([ptr, ptr + size, t.dtype])
    memory = (lambda start, end: np.frombuffer((ctypes.c_uint8 * (end - start)).from_address(start), np.uint8))
    return runs + [torch.from_numpy(memory(start, end)).view(dtype) for start, end, dtype in merged]


def check_built(model: torch.nn.Module, sd: dict, where: str) -> None:
    """VAELoadError unless every weight of `model`, just built from the file's tensors `sd`, is finite.

    One pass over the built model, a float32 sum per tensor: NaN or infinite whenever any value is,
    and faster than min and max. Only when a sum is not finite is the file itself read, to name
    its non-finite tensors, or to say that finite weights overflowed the model's dtype (a sum that
    merely overflowed names nothing and passes)."""
    weights = [(n, w) for n, w in chain(model.named_parameters(), model.named_buffers())
               if w.is_floating_point() and w.numel()]
    sums = [w.detach().sum(dtype=torch.float32) for _, w in weights]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    check_finite(sd, where)
    overflowed = [f"{n} ({w.dtype})" for n, w in weights if not bool(torch.isfinite(w.detach()).all())]
    if overflowed:
        raise VAELoadError(where, f"{len(overflowed)} of its weights are finite in the file but overflow the "
                           "dtype the model was built in", "dtype float32 or bfloat16 for this VAE", overflowed)


def _non_finite(key: str, v: torch.Tensor) -> str | None:
    v = v.float()
    nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    return f"{key} ({nan} NaN, {inf} inf)" if nan or inf else None


def _refuse(where: str, bad: list) -> None:
    if bad:
        raise VAELoadError(where, f"{len(bad)} tensors contain NaN or infinite values",
                           "finite weights (the file is damaged or came from a diverged training run)", bad)
