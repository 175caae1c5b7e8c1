"""Log-Variance Map: draw what a plain encode throws away, the raw posterior log-variance per
latent cell (or the clamped one, or the KL per cell), for the lowest/mean channel, one channel or
every channel. Cells where the log-variance collapses (the verdict's rule, `anomaly`, against the
VAE's typical range over the batch) are boxed on single maps and listed in the stats. One call for the node and the CLI: `logvar_map(codec, images, ...) -> LogVarMapResult`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import viz
from .codec import Codec
from .anomaly import find_pooled
from .clips import clip_summary, per_frame, read_clip
from .errors import InputError
from .posterior import LOGVAR_MIN, Posterior, read_posterior
from .progress import ProgressFn
from .result import Picture, Result
from .verdict import verdict

VALUES = ("raw", "clamped", "kl")
SHOWS = ("min", "mean", "grid", "one")
RANGE_MODES = ("percentile", "fixed")
LABELS = {"raw": "raw log-variance", "clamped": "clamped log-variance", "kl": "KL per cell (nats)"}
SHOW_WORDS = {"min": "lowest over channels", "mean": "mean over channels", "grid": "every channel", "one": "channel"}


@dataclass
class LogVarMapResult(Result):
    """One map picture per image and the stats JSON (colour range, per-image min/median/max...)."""
    json_name = "stats"

    maps: list
    stats: dict

    def to_json(self) -> dict:
        return dict(self.stats)

    def summary(self) -> str:
        s = self.stats
        what = SHOW_WORDS[s["show"]] + (f" {s['channel']}" if s["show"] == "one" else "")
        lines = [f"Verdict: {s['verdict']}",
                 f"{LABELS[s['value']]}, {what}; colour range {s['range'][0]:.2f}..{s['range'][1]:.2f}"]
        for i, e in enumerate(s["images"]):
            lines.append(f"image {i}: min {e['min']:.2f}, median {e['median']:.2f}, max {e['max']:.2f}; "
                         f"{e['cells_below_clamp']} cells below the {LOGVAR_MIN:g} clamp, {len(e['collapsed_cells'])} collapsed "
                         f"(boxed); KL {e['kl_total']:.1f} nats")
        return "\n".join(lines + [f"note: {n}" for n in s["notes"]])

    def pictures(self) -> dict[str, list[Picture]]:
        return {"map": list(self.maps)}


def logvar_map(codec: Codec, images: torch.Tensor, *, value: str = "raw", show: str = "min", channel: int = 0,
               cmap: str = "magma", range_mode: str = "percentile", low: float = 1.0, high: float = 99.0,
               colorbar: bool = True, size_policy: str = "crop", clip: Optional[str] = None,
               progress: Optional[ProgressFn] = None) -> LogVarMapResult:
    """Maps of `images [B, 3, H, W]` (0..1; a list of `[1, 3, H, W]` of one size is stacked),
    encoded one by one (progress and cancel after each). `range_mode` 'percentile': `low`/`high`
    are percentiles of the whole batch's values; 'fixed': the values at the ends of the scale.
    `clip` (video VAEs): the images are the frames of one clip, mapped per latent frame: 'every'
    (one map each), 'lowest' (the lowest log-variance over time, or the highest KL) or a frame number."""
    _check_choices(value=(value, VALUES), show=(show, SHOWS), range_mode=(range_mode, RANGE_MODES),
                   cmap=(cmap, viz.CMAPS))
    frames, kept = None, None
    if clip is None:
        post = read_posterior(codec, _as_batch(images), size_policy=size_policy, batch_size=1, progress=progress)
    else:
        post, frames, _ = read_clip(codec, _as_batch(images), size_policy)
    maps = reduce_maps(map_values(post, value), show, channel)
    found = find_pooled(per_frame(post) if frames else [post])
    marks = [f.marks() for f in found]
    if frames is not None:
        maps, marks, kept = over_time(maps, marks, clip, value)
    vmin, vmax = color_range(maps, range_mode, low, high)
    pictures = [_draw(m, cmap, vmin, vmax, post.size.downscale, colorbar, LABELS[value], mk)
                for m, mk in zip(maps, marks)]
    stats = _stats(post, maps, vmin, vmax, value, show, channel, kept)
    if frames is not None:
        stats["clip"] = {**clip_summary(len(_as_batch(images)), frames, codec.frame_step), "show": clip,
                         "maps_of_latent_frames": kept}
    for entry, mk in zip(stats["images"], marks):
        entry["collapsed_cells"] = [list(c) for c in mk[:256]]
    stats["verdict"] = verdict(found, unit="latent frame" if frames is not None else "image").line()
    return LogVarMapResult(pictures, stats)


def over_time(maps: torch.Tensor, marks: list, clip: str, value: str):
    """Per-latent-frame maps `[T, ...]` → what `clip` asks: every frame, the lowest over time (the
    highest for KL, where a collapse raises the value) with every frame's marks, or one frame.
    Returns (maps, marks per map, the latent frames each map is of)."""
    t = maps.shape[0]
    if clip == "every":
        return maps, marks, [[i] for i in range(t)]
    if clip == "lowest":
        joined = maps.amax(dim=0, keepdim=True) if value == "kl" else maps.amin(dim=0, keepdim=True)
        return joined, [sorted({c for mk in marks for c in mk})], [list(range(t))]
    if not str(clip).isdigit() or int(clip) >= t:
        raise InputError("frame", f"{clip!r} for a clip of {t} latent frame(s)", f"'every', 'lowest' or 0..{t - 1}")
    i = int(clip)
    return maps[i:i + 1], [marks[i]], [[i]]


def map_values(post: Posterior, value: str) -> torch.Tensor:
    """`[B, C, h, w]` (log-variance) or `[B, 1, h, w]` (KL) float32."""
    if value == "kl":
        return post.kl[:, None]
    return post.logvar_raw if value == "raw" else post.logvar


def reduce_maps(maps: torch.Tensor, show: str, channel: int) -> torch.Tensor:
    """`[B, C, h, w]` → `[B, h, w]` (min, mean, one channel) or `[B, C, h, w]` (grid)."""
    if show == "grid":
        return maps
    if show == "min":
        return maps.amin(dim=1)
    if show == "mean":
        return maps.mean(dim=1)
    if not 0 <= channel < maps.shape[1]:
        raise InputError("channel", f"{channel} but this map has {maps.shape[1]} channel(s)", f"0..{maps.shape[1] - 1}")
    return maps[:, channel]


def color_range(values: torch.Tensor, mode: str, low: float, high: float) -> tuple[float, float]:
    """(vmin, vmax) of the colour scale: `low`/`high` themselves ('fixed') or percentiles of `values`."""
    if mode == "fixed":
        if not low < high:
            raise InputError("low/high", f"fixed range {low:g}..{high:g} is empty", "low < high")
        return float(low), float(high)
    if not 0 <= low < high <= 100:
        raise InputError("low/high", f"percentiles {low:g}..{high:g}", "0 <= low < high <= 100 in percentile mode")
    return viz.value_range(values, percentiles=(low, high))


def _as_batch(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    sizes = {tuple(x.shape[2:]) for x in images}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
        raise InputError("images", f"they have different sizes ({shown})", "images of one size (one batch)")
    return torch.cat(list(images))


def _check_choices(**given) -> None:
    for name, (value, choices) in given.items():
        if value not in choices:
            raise InputError(name, f"{value!r}", f"one of {', '.join(choices)}")


def _draw(m: torch.Tensor, cmap: str, vmin: float, vmax: float, cell: int, bar: bool, label: str,
          marks=()) -> Picture:
    """`[h, w]` → one cell per `cell`×`cell` block (lines up with the image), `marks` boxed outside
    their block (the values stay visible); `[C, h, w]` → a grid."""
    if m.dim() == 3:
        return viz.channel_grid(m, cmap, vmin, vmax, bar=bar, label=label)
    pic = viz.heatmap(m, cmap, vmin, vmax, scale=cell)
    pic = viz.mark_cells(pic, marks, cell) if marks else pic
    return viz.with_colorbar(pic, cmap, vmin, vmax, label) if bar else pic


def _stats(post: Posterior, maps: torch.Tensor, vmin: float, vmax: float, value: str, show: str, channel: int,
           kept: Optional[list] = None) -> dict:
    """Per map: its values' range, cells under the clamp and KL over the images (latent frames) it shows."""
    per_image = []
    for i, frames in enumerate(kept or [[i] for i in range(post.batch)]):
        m = maps[i].float()
        below = int((post.logvar_raw[frames] < LOGVAR_MIN).any(dim=1).any(dim=0).sum())
        per_image.append({"min": float(m.min()), "median": float(m.median()), "max": float(m.max()),
                          "cells_below_clamp": below, "kl_total": float(post.kl_total[frames].sum())})
    return {"value": value, "show": show, "channel": channel, "range": [vmin, vmax],
            "latent_channels": post.latent_channels, "latent_size": list(post.latent_size), "size": post.size.to_dict(),
            "tiling": post.tiling.to_dict() if post.tiling else None, "notes": list(post.notes), "images": per_image}
