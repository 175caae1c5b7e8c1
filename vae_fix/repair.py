"""Neutralise anomalous latent cells before decoding, and report what that changed.

Which cells: the posterior's anomalies (`anomaly.find_anomalies`, when the image and encoder are
at hand) or, with only a latent, `latent_outliers`: per channel the robust z of each value,
|z - median| / (1.4826·MAD), the largest over channels per cell, flagged at `threshold` and at least
`min_dev` latent units away (latents follow the image, edges reach 3-6 robust sigmas, so only far
larger ones count — the same rule as the anomaly detector's mean test).

How: each flagged cell becomes, per channel, the median of its 8 neighbours that are not flagged.
Touching flagged cells are filled from the outside in (a cell waits until one neighbour is known);
a latent that is flagged everywhere is left as it is.

The report compares before and after: the decoded image's change (all pixels, and outside the
windows of the repaired cells), the exact reach of each repaired cell (what its replacement alone
does to the far field, `influence.exact_reach`) and the fast reach map's worst cell before and after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .anomaly import DEFAULT_MEAN_THRESHOLD, DEFAULT_MIN_MEAN_DEV, MAD_TO_SIGMA, AnomalyReport
from .edit import check_latent
from .errors import InputError
from .reach import exact_reach, fast_reach_map, near_box, neighbour_median, summarize_map
from .progress import ProgressFn, report
from .jsonsafe import json_safe

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


def latent_outliers(z: torch.Tensor, threshold: float = DEFAULT_MEAN_THRESHOLD,
                    min_dev: float = DEFAULT_MIN_MEAN_DEV) -> tuple[torch.Tensor, torch.Tensor]:
    """(flagged `[B, h, w]` bool, score `[B, h, w]`): robust outliers of a latent alone."""
    check_latent(z)
    if not (threshold >= 0 and min_dev >= 0):
        raise InputError("threshold/min_dev", f"{threshold!r}/{min_dev!r}", "numbers >= 0")
    zf = z.detach().float().cpu()
    flat = zf.flatten(2)                                         # [B, C, h*w]
    med = flat.nanmedian(dim=2, keepdim=True).values
    dev = (flat - med).abs()
    sigma = (MAD_TO_SIGMA * dev.nanmedian(dim=2, keepdim=True).values).clamp_min(1e-6)
    score_c = torch.nan_to_num(dev / sigma, nan=0.0)
    hit_c = (score_c >= threshold) & (dev >= min_dev)
    b, _, h, w = zf.shape
    return hit_c.any(dim=1).view(b, h, w), score_c.amax(dim=1).view(b, h, w)


def anomaly_mask(reports, batch: int, h: int, w: int) -> torch.Tensor:
    """`[B, h, w]` bool from AnomalyReports (each one says which image `index` it belongs to)."""
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    for rep in ([reports] if isinstance(reports, AnomalyReport) else reports):
        if tuple(rep.latent_size) != (h, w) or not 0 <= rep.index < batch:
            raise InputError("anomalies", f"report for image {rep.index} of size {rep.latent_size}",
                             f"reports of a {batch}-image batch of {h}x{w} latents")
        for a in rep.anomalies:
            mask[rep.index, a.y, a.x] = True
    return mask


def _as_mask(mask, b: int, h: int, w: int) -> torch.Tensor:
    m = torch.as_tensor(mask).bool().cpu()
    if m.dim() == 2 and tuple(m.shape) == (h, w):
        m = m.expand(b, h, w)
    if tuple(m.shape) != (b, h, w):
        raise InputError("cells", f"mask of shape {list(m.shape)}", f"a [{b}, {h}, {w}] or [{h}, {w}] bool mask")
    return m


def neutralise(z: torch.Tensor, mask) -> torch.Tensor:
    """A copy of `z [B, C, h, w]` with every cell flagged in `mask` (`[B, h, w]` / `[h, w]`)
    replaced by the per-channel median of its unflagged neighbours (outside-in for groups)."""
    check_latent(z)
    b, c, h, w = z.shape
    remaining = _as_mask(mask, b, h, w).clone()
    out = z.detach().float().cpu().clone()
    while remaining.any():
        estimate = neighbour_median(out, exclude=remaining)      # NaN where no known neighbour
        ready = remaining & torch.isfinite(estimate).all(dim=1)
        if not ready.any():
            break  # everything flagged: nothing to estimate from
        out = torch.where(ready[:, None], estimate, out)
        remaining &= ~ready
    return out.to(device=z.device, dtype=z.dtype)


# ---------------------------------------------------------------- before/after report

@dataclass
class RepairResult:
    latent: torch.Tensor          # [B, C, h, w] repaired
    mask: torch.Tensor            # [B, h, w] cells that were replaced
    before: torch.Tensor          # [B, 3, H, W] 0..1 decoded original
    after: torch.Tensor           # [B, 3, H, W] 0..1 decoded repair
    report: dict = field(default_factory=dict)


def psnr(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """PSNR in dB of two images in 0..1 (None when identical)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return None if mse == 0 else 10 * math.log10(1.0 / mse)


def _image_change(before: torch.Tensor, after: torch.Tensor, cells, window: int, ds: int) -> dict:
    """before/after `[3, H, W]` 0..1 → how much changed, everywhere and away from the repaired cells."""
    diff = (after - before).abs().mean(0)
    far = torch.ones_like(diff, dtype=torch.bool)
    for y, x in cells:
        t, b, l, r = near_box(y, x, window, ds, diff.shape)
        far[t:b, l:r] = False
    far_vals = diff[far]
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "psnr_db": psnr(before, after),
            "changed_fraction": float((diff > 1 / 255).float().mean()),
            "far_mean_abs": float(far_vals.mean()) if far_vals.numel() else None,
            "far_max_abs": float(far_vals.max()) if far_vals.numel() else None}


def _fast_summary(decode_fn, z, index, window, mode) -> dict:
    try:
        fast = fast_reach_map(decode_fn, z, window=window, index=index, mode=mode)
    except InputError as e:  # latent too small for the regions: say so instead of failing the repair
        return {"skipped": str(e)}
    return summarize_map(fast.reach, 3)


@torch.no_grad()
def _decode(decode_fn, z: torch.Tensor) -> torch.Tensor:
    return decode_fn(z).float()


def to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output (-1..1, unclamped) → image 0..1."""
    return ((decoded.float() + 1) / 2).clamp(0, 1)


def _ordered_cells(mask: torch.Tensor, scores: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    cells = [tuple(c) for c in torch.nonzero(mask).tolist()]
    if scores is not None:
        cells.sort(key=lambda c: -float(scores[c]))
    return cells


def repair_latent(decode_fn: DecodeFn, z: torch.Tensor, mask, *, scores: Optional[torch.Tensor] = None,
                  window: int = 3, measure_cells: int = 8, fast_map: bool = True, mode: str = "median",
                  source: str = "given", progress: Optional[ProgressFn] = None) -> RepairResult:
    """Replace the flagged cells of `z [B, C, h, w]` and measure before/after.

    `scores` (`[B, h, w]`, optional) orders the cells, highest first, in the report.
    `measure_cells`: per image, how many flagged cells (highest score first) get the exact reach measure.
    `fast_map`: also compare the fast reach maps before and after (needs a differentiable decoder).
    Progress counts the steps (two decodes, then per image the measures); may raise to cancel.
    """
    check_latent(z)
    b, _, h, w = z.shape
    mask = _as_mask(mask, b, h, w)
    fixed = neutralise(z, mask)
    steps, done = 2 + b * (1 + 2 * fast_map), 0
    report(progress, done, steps)
    raw_before = _decode(decode_fn, z)
    report(progress, done := done + 1, steps)
    raw_after = _decode(decode_fn, fixed)
    report(progress, done := done + 1, steps)
    before, after = to_unit(raw_before), to_unit(raw_after)
    ds = before.shape[-2] // h
    images = []
    for i in range(b):
        cells = _ordered_cells(mask[i], None if scores is None else scores[i])
        entry = {"index": i, "repaired_cells": len(cells), "cells": [list(c) for c in cells[:256]],
                 "image_change": _image_change(before[i], after[i], cells, window, ds)}
        measured = cells[:measure_cells]
        if measured:
            reach = exact_reach(decode_fn, z, measured, window=window, index=i, base=raw_before[i:i + 1],
                                delta=(fixed[i:i + 1] - z[i:i + 1]).float())
            entry["cell_reach_before"] = [r.to_dict() for r in reach]
        report(progress, done := done + 1, steps)
        if fast_map:
            entry["fast_reach_before"] = _fast_summary(decode_fn, z, i, window, mode)
            report(progress, done := done + 1, steps)
            entry["fast_reach_after"] = _fast_summary(decode_fn, fixed, i, window, mode)
            report(progress, done := done + 1, steps)
        images.append(entry)
    rep = {"source": source, "window": window, "downscale": ds, "latent_shape": list(z.shape),
           "repaired_cells": int(mask.sum()), "images": images,
           "method": "flagged cells replaced by the per-channel median of their unflagged 8 neighbours"}
    return RepairResult(fixed, mask, before, after, json_safe(rep))


def repair_picture(result: RepairResult, index: int = 0, cmap: str = "magma") -> torch.Tensor:
    """before (repaired cells boxed) | after | |after - before| with a colour bar: `[3, H', W']`."""
    from . import viz

    if not 0 <= index < result.before.shape[0]:
        raise InputError("index", f"{index}", f"0..{result.before.shape[0] - 1}")
    before, after = result.before[index], result.after[index]
    ds = before.shape[-2] // result.mask.shape[-2]
    marks = [tuple(c) for c in torch.nonzero(result.mask[index]).tolist()]
    diff = (after - before).abs().mean(0)
    vmax = max(float(diff.max()), 1e-6)
    zoom = max(1, 256 // max(before.shape[-2:]))  # small images stay readable
    before, after, diff = (t.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1) for t in (before, after, diff))
    tiles = [viz.caption(viz.mark_cells(before, marks, cell=ds, zoom=zoom) if marks else before, "before"),
             viz.caption(after, "after (cells repaired)"),
             viz.caption(viz.with_colorbar(viz.heatmap(diff, cmap, 0.0, vmax), cmap, 0.0, vmax, "|change|"),
                         "|after - before|")]
    return side_by_side(tiles)


def side_by_side(tiles: list[torch.Tensor], gap: int = 6) -> torch.Tensor:
    """`[3, h_i, w_i]` tiles in one row on white, top-aligned."""
    h = max(t.shape[1] for t in tiles)
    out = torch.ones(3, h, sum(t.shape[2] for t in tiles) + gap * (len(tiles) - 1))
    x = 0
    for t in tiles:
        out[:, :t.shape[1], x:x + t.shape[2]] = t
        x += t.shape[2] + gap
    return out
