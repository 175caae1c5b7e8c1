"""The built-in probe set of the VAE Health Check: content of every kind a detector could mistake for
a VAE anomaly (flat colour, hard edges, a lone object, text, fine lines, checkerboards, noise,
gradients) and three small public-domain photos (scikit-image's astronaut, coffee and chelsea,
CC0 / no known restrictions, 256² JPEGs in `probe_photos/`), each at two sizes or more.

A black hole is a property of the VAE: it recurs whatever the content. So the verdict counts in
how many of these images a collapsed cell appears (`verdict.py`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .images import load_image

PHOTOS = Path(__file__).with_name("probe_photos")
PHOTO_NAMES = ("astronaut", "coffee", "chelsea")
SIZES = (128, 256)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs) `[size, size]` in 0..1."""
    t = torch.linspace(0, 1, size)
    return t.view(-1, 1).expand(size, size), t.view(1, -1).expand(size, size)


def _rgb(*channels) -> torch.Tensor:
    return torch.stack(channels).clamp(0, 1)[None]          # [1, 3, H, W]


def flat(size: int) -> torch.Tensor:
    return torch.full((1, 3, size, size), 0.5).mul(torch.tensor([0.9, 0.7, 0.5]).view(1, 3, 1, 1))


def lone_square(size: int) -> torch.Tensor:
    """A dark flat field with one bright 8x8-pixel square, off centre."""
    img = torch.full((1, 3, size, size), 0.08)
    y, x = size // 3, size // 2 + 4
    img[:, :, y:y + 8, x:x + 8] = 0.95
    return img


def shapes(size: int) -> torch.Tensor:
    """A disc, a bar and a triangle with hard edges on a diagonal gradient."""
    ys, xs = _grid(size)
    base = 0.3 + 0.4 * (xs + ys) / 2
    disc = ((ys - 0.35) ** 2 + (xs - 0.3) ** 2) < 0.2 ** 2
    bar = (ys > 0.62) & (ys < 0.78) & (xs > 0.1) & (xs < 0.9)
    tri = (ys > 0.1) & (ys < 0.5) & ((xs - 0.75).abs() < (ys - 0.1) / 2)
    r = torch.where(disc, 0.95, torch.where(bar, 0.05, torch.where(tri, 0.2, base)))
    g = torch.where(disc, 0.2, torch.where(bar, 0.05, torch.where(tri, 0.8, base)))
    b = torch.where(disc, 0.1, torch.where(bar, 0.05, torch.where(tri, 0.3, base * 0.8)))
    return _rgb(r, g, b)


def lines(size: int) -> torch.Tensor:
    """One-pixel and one-cell (8 px) lines, white on black, and a frame on the image border."""
    img = torch.zeros(1, 3, size, size)
    img[:, :, :, size // 5] = 1.0
    img[:, :, size // 3, :] = 1.0
    img[:, :, size // 2:size // 2 + 8, size // 8:] = 1.0
    img[:, :, :, -2:] = img[:, :, -2:, :] = img[:, :, :2, :] = img[:, :, :, :2] = 0.8
    return img


def checkerboard(size: int) -> torch.Tensor:
    """8-px squares (one latent cell each for an 8x VAE) in two saturated colours."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    odd = ((ys // 8 + xs // 8) % 2).bool()
    return _rgb(torch.where(odd, 0.9, 0.1), torch.where(odd, 0.1, 0.6), torch.where(odd, 0.2, 0.9))


def noise(size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))


def text(size: int) -> torch.Tensor:
    """Black text on white (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    from .viz import font

    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    for row in range(1, size // 24):
        draw.text((6, row * 22 - 14), "VAE black hole? 0123", fill="black", font=font(14))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def photo(name: str, size: int) -> torch.Tensor:
    img = load_image(PHOTOS / f"{name}.jpg")
    return img if img.shape[-1] == size else F.interpolate(img, size=(size, size), mode="area")


PROCEDURAL = {"flat": flat, "lone_square": lone_square, "shapes": shapes, "lines": lines,
              "checkerboard": checkerboard, "noise": noise, "text": text}


def check_sizes(sizes, name: str = "sizes") -> tuple[int, ...]:
    """Probe or proof sizes as given (ints, or text '128, 256'): multiples of 64 from 64 to 4096."""
    if isinstance(sizes, str):
        try:
            sizes = [int(p) for p in sizes.replace(",", " ").split()]
        except ValueError:
            raise InputError(name, f"'{sizes}'", "sizes in pixels such as '128, 256'") from None
    sizes = tuple(sizes)
    if not sizes or any(not isinstance(s, int) or not 64 <= s <= 4096 or s % 64 for s in sizes):
        raise InputError(name, f"{list(sizes)}", "one or more sizes in pixels, multiples of 64 from 64 to 4096")
    return sizes


def probe_images(sizes=SIZES) -> tuple[list[torch.Tensor], list[str]]:
    """(images `[1, 3, S, S]` 0..1, names like 'probe:shapes@256'): every probe at every size."""
    images, names = [], []
    for size in sizes:
        for name, make in PROCEDURAL.items():
            images.append(make(size))
            names.append(f"probe:{name}@{size}")
        for name in PHOTO_NAMES:
            images.append(photo(name, size))
            names.append(f"probe:{name}@{size}")
    return images, names
