"""Image files ↔ tensors. Engine images are `[B, 3, H, W]` float32 in 0..1."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError


def load_image(path) -> torch.Tensor:
    """An image file → `[1, 3, H, W]` float32 in 0..1. Alpha is dropped, greyscale expanded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image '{path}'", "no such file", "a PNG, JPEG or WebP image file")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image '{path}'", f"not a readable image ({e})", "a PNG, JPEG or WebP image file") from None
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """`[3, H, W]` or `[H, W, 3]` (or `[H, W]`) float in 0..1 → uint8 `[H, W, 3]`/`[H, W]` array."""
    t = image.detach().float().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
        t = t.permute(1, 2, 0)
    if t.dim() == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    return (t.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()


def save_png(image: torch.Tensor, path) -> Path:
    """Write a `[3, H, W]` / `[H, W, 3]` / `[H, W]` 0..1 tensor as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, format="PNG")
    return path
