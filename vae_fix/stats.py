"""Per-channel statistics of raw latents `[B, C, h, w]`, the scale/shift they imply, histograms.

The sampler's scale factor is 1/std of a family's latents and its shift their mean (SD1.x: 0.18215,
no shift). `latent_statistics` reports what the given latents imply, next to the known families'
values and how the latents look in each family's model space (ideally mean 0, std 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import viz
from .edit import check_latent
from .errors import InputError
from .families import FAMILIES
from .result import Result

PERCENTILES = (1, 5, 50, 95, 99)


def _describe(values: np.ndarray, percentiles) -> dict:
    """Summary of a 1-D float64 array of finite values (empty → None entries)."""
    if values.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None,
                "percentiles": {str(p): None for p in percentiles}, "implied_scale": None, "implied_shift": None}
    mean, std = float(values.mean()), float(values.std())
    pct = np.percentile(values, percentiles)
    return {
        "mean": mean, "std": std, "min": float(values.min()), "max": float(values.max()),
        "percentiles": {str(p): float(v) for p, v in zip(percentiles, pct)},
        "implied_scale": 1.0 / std if std > 0 else None,
        "implied_shift": mean,
    }


def _family_view(values: np.ndarray, channels: int, overall: dict) -> list[dict]:
    rows = []
    for fam in FAMILIES.values():
        row = fam.to_dict()
        row["channels_match"] = fam.channels == channels
        if values.size:
            model = (values - fam.shift) * fam.scale
            row["model_space_mean"], row["model_space_std"] = float(model.mean()), float(model.std())
        if overall["implied_scale"]:
            row["scale_ratio"] = overall["implied_scale"] / fam.scale  # 1.0: the data fits this family
        rows.append(row)
    return rows


@dataclass
class StatsResult(Result):
    stats: dict                      # see `channel_stats`
    histogram: torch.Tensor          # [3, H, W] 0..1, one panel per channel

    json_name = "stats"

    def to_json(self) -> dict:
        return self.stats

    def summary(self) -> str:
        """A few readable lines: each channel, the implied scale, then the families with this channel count."""
        s = self.stats
        lines = [f"latent {s['shape']} (B, C, h, w), {s['values_per_channel']} values per channel"]
        for row in s["channels"]:
            if row["mean"] is None:
                lines.append(f"ch {row['channel']}: no finite values")
                continue
            bad = f", {row['nonfinite']} non-finite" if row["nonfinite"] else ""
            lines.append(f"ch {row['channel']}: mean {row['mean']:.4g}  std {row['std']:.4g}  "
                         f"min {row['min']:.4g}  max {row['max']:.4g}{bad}")
        overall = s["overall"]
        lines.append(f"implied scale 1/std = {overall['implied_scale']:.5g}, implied shift (mean) = "
                     f"{overall['implied_shift']:.4g}" if overall["implied_scale"] else "implied scale: undefined (no spread)")
        for fam in s["families"]:
            if fam["channels_match"] and "scale_ratio" in fam:
                lines.append(f"{fam['label']}: scale {fam['scale']:g}, shift {fam['shift']:g} -> model-space mean "
                             f"{fam['model_space_mean']:.3g}, std {fam['model_space_std']:.3g} (ideal 0 and 1)")
        return "\n".join(lines)

    def pictures(self) -> dict:
        return {"histogram": self.histogram}


def latent_statistics(z: torch.Tensor, *, bins: int = 64, clip_percentile: float = 0.5,
                      columns: int = 4) -> StatsResult:
    """Statistics of `z [B, C, h, w]` over the whole batch and a histogram picture (see `histogram_image`)."""
    if bins < 2:
        raise InputError("bins", f"{bins}", "at least 2")
    return StatsResult(channel_stats(z), histogram_image(z, bins, clip_percentile, columns))


def _per_channel(z: torch.Tensor) -> np.ndarray:
    """`[B, C, h, w]` → float64 `[C, B*h*w]` on the CPU."""
    check_latent(z)
    return z.detach().double().cpu().permute(1, 0, 2, 3).reshape(z.shape[1], -1).numpy()


def channel_stats(z: torch.Tensor, percentiles=PERCENTILES) -> dict:
    """JSON-safe statistics over the whole batch: per channel and over all channels.

    Non-finite values are counted (`nonfinite`) and left out of every statistic.
    """
    per_channel = _per_channel(z)
    b, c, h, w = z.shape
    finite = np.isfinite(per_channel)
    channels = []
    for i in range(c):
        row = {"channel": i, **_describe(per_channel[i][finite[i]], percentiles)}
        row["nonfinite"] = int((~finite[i]).sum())
        channels.append(row)
    all_values = per_channel[finite]
    overall = _describe(all_values, percentiles)
    overall["nonfinite"] = int((~finite).sum())
    return {
        "shape": [b, c, h, w], "values_per_channel": b * h * w, "percentile_levels": list(percentiles),
        "channels": channels, "overall": overall, "families": _family_view(all_values, c, overall),
    }


# ---------------------------------------------------------------- histogram picture

PANEL_W, PANEL_H, PAD = 300, 170, 8
BAR_COLOUR, AXIS_COLOUR, TEXT_COLOUR, MEAN_COLOUR = (70, 130, 200), (90, 90, 90), (20, 20, 20), (220, 80, 40)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _draw_panel(draw: ImageDraw.ImageDraw, ox: int, oy: int, values: np.ndarray, lo: float, hi: float,
                bins: int, title: str, font) -> None:
    plot_x0, plot_x1 = ox + PAD + 4, ox + PANEL_W - PAD
    plot_y0, plot_y1 = oy + PAD + 18, oy + PANEL_H - PAD - 18
    draw.text((ox + PAD, oy + PAD - 2), title, fill=TEXT_COLOUR, font=font)
    counts, _ = np.histogram(values.clip(lo, hi), bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1) if counts.size else 1
    bar_w = (plot_x1 - plot_x0) / bins
    for i, n in enumerate(counts):
        if n:
            height = (plot_y1 - plot_y0) * n / top
            x0 = plot_x0 + i * bar_w
            draw.rectangle([x0, plot_y1 - height, x0 + max(bar_w - 1, 1), plot_y1], fill=BAR_COLOUR)
    draw.line([plot_x0, plot_y1, plot_x1, plot_y1], fill=AXIS_COLOUR)
    if values.size:
        mean_x = plot_x0 + (plot_x1 - plot_x0) * (float(values.mean()) - lo) / (hi - lo)
        if plot_x0 <= mean_x <= plot_x1:
            draw.line([mean_x, plot_y0, mean_x, plot_y1], fill=MEAN_COLOUR, width=2)
    draw.text((plot_x0, plot_y1 + 3), _fmt(lo), fill=TEXT_COLOUR, font=font)
    right = _fmt(hi)
    draw.text((plot_x1 - draw.textlength(right, font=font), plot_y1 + 3), right, fill=TEXT_COLOUR, font=font)
    if lo < 0 < hi:
        zero_x = plot_x0 + (plot_x1 - plot_x0) * (-lo) / (hi - lo)
        draw.line([zero_x, plot_y1, zero_x, plot_y1 + 3], fill=AXIS_COLOUR)
        draw.text((zero_x - 3, plot_y1 + 3), "0", fill=TEXT_COLOUR, font=font)


def histogram_image(z: torch.Tensor, bins: int = 64, clip_percentile: float = 0.5, columns: int = 4) -> torch.Tensor:
    """One histogram per channel, on a shared x range (the `clip_percentile`..100-`clip_percentile`
    range over all channels, so rare spikes do not squash the rest; values outside are piled into
    the end bins and counted in the title). Orange line: the channel mean. Returns `[3, H, W]` 0..1.
    """
    per_channel = _per_channel(z)
    c = z.shape[1]
    finite_all = per_channel[np.isfinite(per_channel)]
    if finite_all.size:
        lo, hi = (float(v) for v in np.percentile(finite_all, [clip_percentile, 100 - clip_percentile]))
    else:
        lo, hi = -1.0, 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    cols = max(1, min(columns, c))
    rows = -(-c // cols)
    img = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H), "white")
    draw, font = ImageDraw.Draw(img), viz.font(12)
    for i in range(c):
        vals = per_channel[i][np.isfinite(per_channel[i])]
        outside = int(((vals < lo) | (vals > hi)).sum())
        title = f"ch {i}  mean {_fmt(vals.mean()) if vals.size else '-'}  std {_fmt(vals.std()) if vals.size else '-'}"
        if outside:
            title += f"  ({outside} outside)"
        _draw_panel(draw, (i % cols) * PANEL_W, (i // cols) * PANEL_H, vals, lo, hi, bins, title, font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
