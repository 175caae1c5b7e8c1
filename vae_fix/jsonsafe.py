"""Plain-JSON copies of results: what every report, node output and CLI file is made of."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def json_safe(obj):
    """A copy of `obj` made of dict/list/str/int/float/bool/None only, non-finite floats → None."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return json_safe(obj.item())
    return str(obj)
