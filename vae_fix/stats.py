"""Per-channel statistics of raw latents `[B, C, h, w]`, the scale/shift they imply, histograms.

The sampler's scale factor is 1/std of a family's latents and its shift their mean (SD1.x: 0.18215,
no shift). `latent_statistics` reports what the given latents imply, next to the known families'
values and how the latents look in each family's model space (ideally mean 0, std 1).

A video latent `[B, C, T, h, w]` is measured over all its frames (`frames.fold`), next to the video
families, and each frame again on its own (`per_frame`: item, frame, its channels and overall).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import viz
from .errors import InputError
from .families import families_of_kind
from .frames import describe, fold
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


def _model_values(per_channel: np.ndarray, finite: np.ndarray, fam) -> np.ndarray:
    """The finite values in a per-channel family's model space (Wan, Mochi: (z - mean_c) * scale / std_c)."""
    shift, scale = (t.numpy() for t in fam.channel_shift_scale())
    return np.concatenate([(per_channel[i][finite[i]] - shift[i]) * scale[i] for i in range(len(shift))])


def _family_row(fam, per_channel: np.ndarray, finite: np.ndarray, overall: dict) -> dict:
    """How the latent looks in `fam`'s model space; `scale_ratio` 1.0 when the data fits it."""
    row = dict(fam.to_dict(), channels_match=fam.channels == per_channel.shape[0])
    values = per_channel[finite]
    if fam.per_channel:  # Wan, Mochi: only a latent with their channels has a model space
        if row["channels_match"] and values.size:
            model = _model_values(per_channel, finite, fam)
            row["model_space_mean"], row["model_space_std"] = float(model.mean()), float(model.std())
            if row["model_space_std"] > 0:
                row["scale_ratio"] = 1.0 / row["model_space_std"]
        return row
    if values.size:
        model = (values - fam.shift) * fam.scale
        row["model_space_mean"], row["model_space_std"] = float(model.mean()), float(model.std())
    if overall["implied_scale"]:
        row["scale_ratio"] = overall["implied_scale"] / fam.scale  # 1.0: the data fits this family
    return row


def _family_view(per_channel: np.ndarray, finite: np.ndarray, overall: dict, video: bool) -> list[dict]:
    """A row (`_family_row`) for each known family of the latent's kind: image, or video."""
    return [_family_row(fam, per_channel, finite, overall) for fam in families_of_kind(video)]


@dataclass
class StatsResult(Result):
    stats: dict                      # see `channel_stats`
    histogram: torch.Tensor          # [3, H, W] 0..1, one panel per channel

    json_name = "stats"
    frame_lines = 32                 # per-frame lines in the summary (all of them are in the JSON)

    def to_json(self) -> dict:
        return self.stats

    def summary(self) -> str:
        """A few readable lines: each channel, the implied scale, the families with this channel
        count, then (video) each frame."""
        s = self.stats
        video = " (all frames)" if "video" in s else ""
        lines = [f"{describe(s['shape'])}, {s['values_per_channel']} values per channel{video}"]
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
        lines += [_family_line(fam) for fam in s["families"] if fam["channels_match"] and "scale_ratio" in fam]
        return "\n".join(lines + _frame_lines(s.get("per_frame", []), self.frame_lines))

    def pictures(self) -> dict:
        return {"histogram": self.histogram}


def _family_line(fam: dict) -> str:
    space = (f"model-space mean {fam['model_space_mean']:.3g}, std {fam['model_space_std']:.3g} (ideal 0 and 1)")
    if "channel_mean" in fam:
        return f"{fam['label']}: per-channel mean and std, scale {fam['scale']:g} -> {space}"
    return f"{fam['label']}: scale {fam['scale']:g}, shift {fam['shift']:g} -> {space}"


def _frame_lines(per_frame: list[dict], limit: int) -> list[str]:
    lines = []
    for row in per_frame[:limit]:
        o = row["overall"]
        where = f"item {row['item']}, frame {row['frame']}"
        lines.append(f"{where}: no finite values" if o["mean"] is None else
                     f"{where}: mean {o['mean']:.4g}  std {o['std']:.4g}  min {o['min']:.4g}  max {o['max']:.4g}"
                     + (f", {o['nonfinite']} non-finite" if o["nonfinite"] else ""))
    if len(per_frame) > limit:
        lines.append(f"... {len(per_frame) - limit} more frames in the JSON (per_frame)")
    return lines


def latent_statistics(z: torch.Tensor, *, bins: int = 64, clip_percentile: float = 0.5,
                      columns: int = 4) -> StatsResult:
    """Statistics of `z [B, C, h, w]` (or a video latent `[B, C, T, h, w]`: over all frames, and per
    frame) over the whole batch and a histogram picture (see `histogram_image`)."""
    if bins < 2:
        raise InputError("bins", f"{bins}", "at least 2")
    return StatsResult(channel_stats(z), histogram_image(z, bins, clip_percentile, columns))


def _per_channel(frames: torch.Tensor) -> np.ndarray:
    """Frames `[N, C, h, w]` → float64 `[C, N*h*w]` on the CPU."""
    return frames.detach().double().cpu().permute(1, 0, 2, 3).reshape(frames.shape[1], -1).numpy()


def _channel_rows(per_channel: np.ndarray, percentiles) -> tuple[list[dict], dict, np.ndarray]:
    """(a row per channel, the row over all channels, the finite mask) of `[C, n]` values."""
    finite = np.isfinite(per_channel)
    channels = []
    for i in range(per_channel.shape[0]):
        row = {"channel": i, **_describe(per_channel[i][finite[i]], percentiles)}
        row["nonfinite"] = int((~finite[i]).sum())
        channels.append(row)
    overall = _describe(per_channel[finite], percentiles)
    overall["nonfinite"] = int((~finite).sum())
    return channels, overall, finite


FRAME_CHANNEL_KEYS = ("channel", "mean", "std", "min", "max", "nonfinite")


def _frame_stats(frame: torch.Tensor, item: int, index: int, percentiles) -> dict:
    """One frame `[1, C, h, w]` on its own: per channel mean/std/min/max/non-finite, and overall."""
    channels, overall, _ = _channel_rows(_per_channel(frame), percentiles)
    return {"item": item, "frame": index, "overall": overall,
            "channels": [{k: row[k] for k in FRAME_CHANNEL_KEYS} for row in channels]}


def channel_stats(z: torch.Tensor, percentiles=PERCENTILES) -> dict:
    """JSON-safe statistics over the whole batch: per channel and over all channels.

    Non-finite values are counted (`nonfinite`) and left out of every statistic. A video latent
    adds `video` (items, frames) and `per_frame`: each frame measured alone.
    """
    frames, layout = fold(z)
    per_channel = _per_channel(frames)
    channels, overall, finite = _channel_rows(per_channel, percentiles)
    h, w = frames.shape[-2:]
    stats = {
        "shape": list(z.shape), "values_per_channel": layout.count * h * w, "percentile_levels": list(percentiles),
        "channels": channels, "overall": overall, "families": _family_view(per_channel, finite, overall, layout.video),
    }
    if layout.video:
        stats["video"] = layout.to_json()
        stats["per_frame"] = [_frame_stats(frames[i:i + 1], *layout.where(i), percentiles) for i in range(layout.count)]
    return stats


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
    """One histogram per channel (a video latent: over all its frames), on a shared x range (the `clip_percentile`..100-`clip_percentile`
    range over all channels, so rare spikes do not squash the rest; values outside are piled into
    the end bins and counted in the title). Orange line: the channel mean. Returns `[3, H, W]` 0..1.
    """
    frames, _ = fold(z)
    per_channel = _per_channel(frames)
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
