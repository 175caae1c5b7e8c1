"""Pictures of latent maps without a plotting library: colormaps, heatmaps, colour bars, grids, overlays.

Every function returns a float tensor `[3, H, W]` in 0..1 (the ComfyUI layer turns it into
`[B, H, W, 3]`; `images.save_png` writes it). Maps are `[h, w]` (one value per latent cell) or
`[C, h, w]`. Text uses Pillow's built-in font, so nothing else is needed.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError
from .images import to_uint8

# 33 anchors (entries 0, 8, ..., 248, 255) of matplotlib's 256-entry viridis/magma/inferno tables
# (van der Walt & Smith, CC0). Linear interpolation between them stays within 0.007 of the
# originals on every channel.
_ANCHORS = {
    "viridis": (
        "440154 470d60 48186a 482374 472d7b 453781 424086 3e4989 3b528b 375b8d 33638d 2f6b8e "
        "2c728e 297a8e 26828e 23898e 21918c 1f988b 1fa088 22a785 28ae80 32b67a 3fbc73 4ec36b "
        "5ec962 70cf57 84d44b 98d83e addc30 c2df23 d8e219 ece51b fde725"
    ),
    "magma": (
        "000004 030312 0a0822 130d34 1d1147 29115a 36106b 440f76 51127c 5d177f 6a1c81 762181 "
        "832681 902a81 9c2e7f aa337d b73779 c43c75 d0416f dc4869 e75263 ef5d5e f56b5c f9795d "
        "fc8961 fd9869 fea772 feb67c fec488 fed395 fde2a3 fcf0b2 fcfdbf"
    ),
    "inferno": (
        "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e 7d1e6d "
        "8a226a 972766 a32c61 b0315b bc3754 c73e4c d24644 db503b e45a31 eb6628 f1731d f68013 "
        "f98e09 fb9d07 fcac11 fbbc21 f9cb35 f5db4c f2ea69 f3f68a fcffa4"
    ),
    "gray": "000000 ffffff",
}
CMAPS = tuple(_ANCHORS)
_ANCHOR_POS = {33: list(range(0, 256, 8)) + [255], 2: [0, 255]}
NAN_COLOR = (0.5, 0.5, 0.5)
BACKGROUND = (1.0, 1.0, 1.0)
TEXT = (0, 0, 0)


@lru_cache(maxsize=None)
def _lut_array(name: str) -> np.ndarray:
    if name not in _ANCHORS:
        raise InputError("cmap", f"{name!r}", f"one of {', '.join(CMAPS)}")
    hexes = _ANCHORS[name].split()
    rgb = np.array([[int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)] for h in hexes])
    pos = _ANCHOR_POS[len(hexes)]
    return np.stack([np.interp(np.arange(256), pos, rgb[:, c]) for c in range(3)], 1).astype(np.float32)


def colormap_lut(name: str) -> torch.Tensor:
    """The colormap as a `[256, 3]` float32 table (0 = low end)."""
    return torch.from_numpy(_lut_array(name).copy())


def value_range(values: torch.Tensor, vmin: Optional[float] = None, vmax: Optional[float] = None,
                percentiles: Sequence[float] = (1.0, 99.0)) -> tuple[float, float]:
    """The (vmin, vmax) a map is drawn with: given values win, missing ones come from percentiles of
    the finite values (percentiles (0, 100) = min..max). Never an empty range."""
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise InputError("percentiles", f"{tuple(percentiles)}", "0 <= low < high <= 100")
    v = values.detach().float().cpu().numpy().ravel()
    v = v[np.isfinite(v)]
    if vmin is None:
        vmin = float(np.percentile(v, lo_p)) if v.size else 0.0
    if vmax is None:
        vmax = float(np.percentile(v, hi_p)) if v.size else 1.0
    return _checked_range(vmin, vmax)


def _checked_range(vmin: float, vmax: float) -> tuple[float, float]:
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmin > vmax:
        raise InputError("value range", f"vmin {vmin:g}, vmax {vmax:g}", "finite numbers with vmin <= vmax")
    if vmin == vmax:  # a flat map: centre it in a unit range rather than divide by zero
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return float(vmin), float(vmax)


def _as_map(values, name="values", dims=2) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != dims or values.numel() == 0:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        layout = "[h, w]" if dims == 2 else "[C, h, w]"
        raise InputError(name, f"got {got}", f"a non-empty {layout} tensor")
    return values.detach().float().cpu()


def apply_cmap(values: torch.Tensor, cmap: str = "viridis", vmin: Optional[float] = None,
               vmax: Optional[float] = None, percentiles=(1.0, 99.0)) -> torch.Tensor:
    """`[h, w]` values → `[3, h, w]` colours; out-of-range values clip, NaN shows mid-grey."""
    v = _as_map(values)
    vmin, vmax = value_range(v, vmin, vmax, percentiles)
    lut = colormap_lut(cmap)
    t = ((v - vmin) / (vmax - vmin)).clamp(0, 1)
    idx = torch.nan_to_num(t, nan=0.0).mul(255).round().long()
    out = lut[idx].permute(2, 0, 1).contiguous()
    nan = torch.isnan(v)
    if nan.any():
        out[:, nan] = torch.tensor(NAN_COLOR).view(3, 1)
    return out


def heatmap(values: torch.Tensor, cmap: str = "viridis", vmin: Optional[float] = None,
            vmax: Optional[float] = None, scale: int = 1, percentiles=(1.0, 99.0)) -> torch.Tensor:
    """`[h, w]` → `[3, h*scale, w*scale]`, each cell a crisp `scale`×`scale` block."""
    if not isinstance(scale, int) or scale < 1:
        raise InputError("scale", f"{scale!r}", "a positive integer")
    rgb = apply_cmap(values, cmap, vmin, vmax, percentiles)
    return rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2) if scale > 1 else rgb


# ---------------------------------------------------------------- text and PIL round trips

@lru_cache(maxsize=8)
def font(size: int):
    """The one font of every picture the pack draws (Pillow's scalable default)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(text: str, font) -> tuple[int, int]:
    l, t, r, b = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return r - l, b - t


def _to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(img), "RGB")


def _from_pil(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _canvas(h: int, w: int) -> torch.Tensor:
    return torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).expand(3, h, w).clone()


def _check_image(img, name="image") -> torch.Tensor:
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3 or img.numel() == 0:
        got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise InputError(name, f"got {got}", "a [3, H, W] float tensor in 0..1")
    return img.detach().float().cpu().clamp(0, 1)


def format_ticks(ticks: Sequence[float]) -> list[str]:
    """Tick labels with just enough decimals to tell neighbours apart."""
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:]) if b != a), default=1.0)
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    if decimals > 6 or max(abs(t) for t in ticks) >= 1e6:
        return [f"{t:.4g}" for t in ticks]
    return [f"{t + 0.0:.{decimals}f}" for t in ticks]  # + 0.0 turns -0.0 into 0.0


def nice_ticks(vmin: float, vmax: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 × 10^k) inside [vmin, vmax]; the ends if none fit."""
    span = vmax - vmin
    if not math.isfinite(span) or span <= 0:
        return [vmin]
    raw = span / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs(math.log(st / raw)))
    first = math.ceil(vmin / step - 1e-9) * step
    ticks = [round(first + i * step, 12) for i in range(int((vmax - first) / step + 1e-9) + 1)]
    return ticks if len(ticks) >= 2 else [vmin, vmax]


def caption(img: torch.Tensor, text: str, size: int = 12) -> torch.Tensor:
    """Add a strip with `text` above `img`."""
    img = _check_image(img)
    face = font(size)
    tw, th = _text_size(text, face)
    strip = _to_pil(_canvas(th + 6, max(img.shape[2], tw + 6)))
    ImageDraw.Draw(strip).text((3, 2), text, fill=TEXT, font=face)
    out = _canvas(strip.height + img.shape[1], strip.width)
    out[:, :strip.height] = _from_pil(strip)
    out[:, strip.height:, :img.shape[2]] = img
    return out


# ---------------------------------------------------------------- colour bars

def colorbar(cmap: str, vmin: float, vmax: float, length: int = 256, label: str = "",
             thickness: int = 14, font_size: int = 11) -> torch.Tensor:
    """A vertical colour bar `[3, length, W]`: high values on top, round numbers beside it and
    `label` written upwards along the right edge."""
    if not isinstance(length, int) or length < 16:
        raise InputError("length", f"{length!r}", "an integer of at least 16 pixels")
    vmin, vmax = _checked_range(float(vmin), float(vmax))
    face = font(font_size)
    ticks = nice_ticks(vmin, vmax)
    labels = format_ticks(ticks)
    text_w = max(_text_size(s, face)[0] for s in labels)
    _, text_h = _text_size("0", face)
    margin = text_h // 2 + 2  # room for the top and bottom numbers
    bar_len = length - 2 * margin
    label_w = _text_size(label, face)[1] + 6 if label else 0
    width = 4 + thickness + 4 + text_w + 4 + label_w
    ramp = torch.linspace(vmax, vmin, bar_len).view(bar_len, 1).expand(bar_len, thickness)
    canvas = _canvas(length, width)
    canvas[:, margin:margin + bar_len, 4:4 + thickness] = apply_cmap(ramp, cmap, vmin, vmax)
    im = _to_pil(canvas)
    draw = ImageDraw.Draw(im)
    draw.rectangle([3, margin - 1, 4 + thickness, margin + bar_len], outline=TEXT)
    for t, s in zip(ticks, labels):
        y = margin + round((vmax - t) / (vmax - vmin) * (bar_len - 1))
        draw.line([4 + thickness, y, 4 + thickness + 3, y], fill=TEXT)
        draw.text((4 + thickness + 5, y), s, fill=TEXT, font=face, anchor="lm")
    if label:
        tw, th = _text_size(label, face)
        side = Image.new("RGB", (tw + 4, th + 6), tuple(int(c * 255) for c in BACKGROUND))
        ImageDraw.Draw(side).text((2, 1), label, fill=TEXT, font=face)
        side = side.rotate(90, expand=True)
        top = max(0, (length - side.height) // 2)
        im.paste(side.crop((0, 0, side.width, min(side.height, length))), (width - label_w, top))
    return _from_pil(im)


def with_colorbar(img: torch.Tensor, cmap: str, vmin: float, vmax: float, label: str = "",
                  min_length: int = 128) -> torch.Tensor:
    """`img` with a colour bar on its right, both as tall as the taller of image and `min_length`."""
    img = _check_image(img)
    h = max(img.shape[1], min_length)
    bar = colorbar(cmap, vmin, vmax, length=h, label=label)
    out = _canvas(h, img.shape[2] + 6 + bar.shape[2])
    top = (h - img.shape[1]) // 2
    out[:, top:top + img.shape[1], :img.shape[2]] = img
    out[:, :, img.shape[2] + 6:] = bar
    return out


# ---------------------------------------------------------------- grids and overlays

def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) for n tiles: the squarest grid with no empty tile when one exists
    (4 → 2×2, 8 → 2×4, 12 → 3×4, 16 → 4×4), else a near-square one."""
    if n < 1:
        raise InputError("channel count", f"{n}", "at least one map")
    side = math.ceil(math.sqrt(n))
    for cols in range(side, 2 * side + 1):
        if n % cols == 0:
            return n // cols, cols
    return math.ceil(n / side), side


def zoom_for(h: int, w: int, target: int = 256) -> int:
    """The one enlargement rule: the whole-number zoom that brings the longer side of an h×w
    picture or map to about `target` pixels (1 when it is already that large)."""
    return max(1, round(target / max(h, w)))


def enlarge(img: torch.Tensor, zoom: int) -> torch.Tensor:
    """`[..., H, W]` → `[..., H*zoom, W*zoom]`, nearest: cells stay crisp blocks."""
    return img.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1) if zoom > 1 else img


def channel_grid(maps: torch.Tensor, cmap: str = "viridis", vmin: Optional[float] = None,
                 vmax: Optional[float] = None, scale: Optional[int] = None, percentiles=(1.0, 99.0),
                 labels: Optional[Sequence[str]] = None, bar: bool = True, label: str = "",
                 gap: int = 4) -> torch.Tensor:
    """`[C, h, w]` maps → one picture: a tile per channel (any C), each titled with its channel
    index, all on one shared value range, with a colour bar on the right when `bar`."""
    m = _as_map(maps, "maps", dims=3)
    c, h, w = m.shape
    labels = list(labels) if labels is not None else [f"c{i}" for i in range(c)]
    if len(labels) != c:
        raise InputError("labels", f"{len(labels)} labels for {c} maps", "one label per channel")
    vmin, vmax = value_range(m, vmin, vmax, percentiles)
    scale = scale or zoom_for(h, w, 128)
    tiles = [caption(heatmap(m[i], cmap, vmin, vmax, scale), labels[i], size=11) for i in range(c)]
    out = tile_grid(tiles, per_row=grid_shape(c)[1], gap=gap)
    return with_colorbar(out, cmap, vmin, vmax, label) if bar else out


def tile_grid(tiles: Sequence[torch.Tensor], per_row: int = 8, gap: int = 4) -> torch.Tensor:
    """`[3, h_i, w_i]` tiles of any sizes → one picture, `per_row` to a row, top-left aligned."""
    if not tiles:
        raise InputError("tiles", "there are none", "at least one picture")
    th, tw = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    rows, cols = math.ceil(len(tiles) / per_row), min(per_row, len(tiles))
    out = _canvas(rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap)
    for i, t in enumerate(tiles):
        y, x = (i // cols) * (th + gap), (i % cols) * (tw + gap)
        out[:, y:y + t.shape[1], x:x + t.shape[2]] = t
    return out


def mark_cells(img: torch.Tensor, marks: Sequence[tuple[int, int]], cell: int = 8,
               offset: tuple[int, int] = (0, 0), color=(255, 255, 255), zoom: int = 1) -> torch.Tensor:
    """Draw a box around each latent cell (y, x): `color` inside a black outline, so it shows on
    any colormap. `offset` (top, left) is where cell (0, 0) starts in `img` before `zoom`."""
    im = _to_pil(_check_image(img))
    draw = ImageDraw.Draw(im)
    size = cell * zoom
    for y, x in marks:
        top, left = (offset[0] + int(y) * cell) * zoom, (offset[1] + int(x) * cell) * zoom
        draw.rectangle([left - 3, top - 3, left + size + 2, top + size + 2], outline=(0, 0, 0))
        draw.rectangle([left - 2, top - 2, left + size + 1, top + size + 1], outline=tuple(color), width=2)
    return _from_pil(im)


def overlay(image: torch.Tensor, values: torch.Tensor, alpha: float = 0.5, cmap: str = "magma",
            marks: Sequence[tuple[int, int]] = (), cell: int = 8, vmin: Optional[float] = None,
            vmax: Optional[float] = None, percentiles=(1.0, 99.0), offset: tuple[int, int] = (0, 0),
            zoom: int = 1) -> torch.Tensor:
    """Blend a `[h, w]` latent map over `image [3, H, W]` (cell (0, 0) at pixel `offset`, each cell
    `cell` px) and box the `marks` (latent (y, x) cells). Pixels outside the map keep the image.
    `zoom` enlarges the result (nearest) so small images stay readable. Returns `[3, H*zoom, W*zoom]`."""
    img = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise InputError("alpha", f"{alpha!r}", "a number in 0..1")
    if not isinstance(zoom, int) or zoom < 1:
        raise InputError("zoom", f"{zoom!r}", "a positive integer")
    heat = heatmap(values, cmap, vmin, vmax, cell, percentiles)
    out = img.clone()
    top, left = offset
    H, W = img.shape[1:]
    y0, x0, y1, x1 = max(0, top), max(0, left), min(H, top + heat.shape[1]), min(W, left + heat.shape[2])
    if y1 > y0 and x1 > x0:
        patch = heat[:, y0 - top:y1 - top, x0 - left:x1 - left]
        out[:, y0:y1, x0:x1] = (1 - alpha) * img[:, y0:y1, x0:x1] + alpha * patch
    if zoom > 1:
        out = out.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    return mark_cells(out, marks, cell, offset, zoom=zoom) if len(marks) else out
