"""Image files ↔ tensors. Engine images are `[B, 3, H, W]` float32 in 0..1."""
from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError


MAX_PIXELS = 40_000_000  # 6300 x 6300: far above what any VAE is run on, far below a decompression bomb
EXPECTED_IMAGE = f"a PNG, JPEG or WebP image file of at most {MAX_PIXELS:,} pixels"
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError, Image.DecompressionBombWarning, ZeroDivisionError)


def load_image(path) -> torch.Tensor:
    """An image file → `[1, 3, H, W]` float32 in 0..1. Alpha is dropped, greyscale expanded, 16-bit
    greyscale scaled (not clipped). The size is checked before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image '{path}'", "no such file", EXPECTED_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # corrupt EXIF and the like: the outcome is reported
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS or w < 1 or h < 1:
                    raise InputError(f"image '{path}'", f"it is {w}x{h} pixels", EXPECTED_IMAGE)
                if (covered := _tile_area(im)) < w * h and im.format != "GIF":  # GIF frames may leave background
                    raise ValueError(f"its pixel data covers {covered:,} of its {w}x{h} pixels; truncated or damaged")
                im.load()
                arr = _as_rgb_array(im)
    except _DECODE_ERRORS as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"image '{path}'", f"not a readable image ({detail})", EXPECTED_IMAGE) from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _tile_area(im: Image.Image) -> int:
    """Pixels the decoder's tiles span; PIL leaves the rest black (a 1 KB TIFF whose one strip
    holds 16 of its 1.5 million rows would read as a 36-million-pixel image)."""
    if not getattr(im, "tile", None):
        return im.size[0] * im.size[1]  # decoded by its plugin in one piece (WebP)
    area = 0
    for tile in im.tile:
        x0, y0, x1, y1 = tile[1] or (0, 0, *im.size)
        area += max(0, min(x1, im.size[0]) - max(x0, 0)) * max(0, min(y1, im.size[1]) - max(y0, 0))
    return area


def _as_rgb_array(im: Image.Image) -> np.ndarray:
    """`[H, W, 3]` float32 0..1; 16- and 32-bit greyscale by their own range."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or grey.max() <= 65535 else float(2 ** 31 - 1)
        grey = (grey.clip(0, top) / top).astype(np.float32)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        if nan := int(np.isnan(grey).sum()):  # clip keeps NaN: it would reach the VAE
            raise ValueError(f"{nan} of its float pixels are NaN")
        grey = grey.clip(0, 1)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


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
