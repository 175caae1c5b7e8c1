"""Neutralise anomalous latent cells before decoding, and report what that changed.

Which cells (`source`): the posterior's log-variance collapses, as the verdict sees them
(`anomaly.find_anomalies` against the VAE's typical range over the batch, on the image the latent
was encoded from, read again by the same codec) or, with only a latent, `latent_outliers`: per
channel the robust z of each value, |z - median| / (1.4826·MAD), the largest over channels per cell,
flagged at `threshold` and at least `min_dev` latent units away (latents follow the image, edges
reach 3-6 robust sigmas, so only far larger ones count — the same rule as the anomaly detector's
mean test). "auto": the posterior when an image is given, else the latent.

How: each flagged cell becomes, per channel, the median of its 8 neighbours that are not flagged.
Touching flagged cells are filled from the outside in (a cell waits until one neighbour is known);
a latent that is flagged everywhere is left as it is.

The report compares before and after: the decoded image's change (all pixels, and outside the
windows of the repaired cells), the exact reach of each repaired cell (what its replacement alone
does to the far field, `reach.exact_reach`) and the fast reach map's worst cell before and after.

A video latent `[B, C, T, h, w]` is repaired frame by frame (`frames.fold`): its frames join the
batch, cells come from the latent's own outliers (the posterior of one image is not that of a
clip), and each frame is decoded on its own (`FRAMES_DECODED`); the report names item and frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import viz
from .anomaly import DEFAULT_MEAN_THRESHOLD, DEFAULT_MIN_MEAN_DEV, MAD_TO_SIGMA, AnomalyReport, find_pooled
from .codec import Codec
from .errors import InputError
from .frames import FRAMES_DECODED, FrameLayout, check_latent, fold
from .reach import exact_reach, fast_reach_map, fit_window, fitted_from, near_box, neighbour_median, summarize_map
from .posterior import read_posterior
from .progress import ProgressFn, Steps
from .result import Result

SOURCES = ("auto", "posterior", "latent")
METHOD = "flagged cells replaced by the per-channel median of their unflagged 8 neighbours"


def latent_outliers(z: torch.Tensor, threshold: float = DEFAULT_MEAN_THRESHOLD,
                    min_dev: float = DEFAULT_MIN_MEAN_DEV) -> tuple[torch.Tensor, torch.Tensor]:
    """(flagged `[B, h, w]` bool, score `[B, h, w]`): robust outliers of a latent alone."""
    check_latent(z)
    if not (threshold >= 0 and min_dev >= 0):
        raise InputError("threshold", f"{threshold!r} (min_dev {min_dev!r})", "numbers >= 0")
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


# ---------------------------------------------------------------- which cells

def resolve_source(source: str, image: Optional[torch.Tensor], video: bool = False) -> str:
    """'auto' → 'posterior' with an image, else 'latent'; 'posterior' without an image is refused,
    and so is an image with a video latent (its cells come from the latent alone)."""
    if source not in SOURCES:
        raise InputError("source", f"{source!r}", f"one of {', '.join(SOURCES)}")
    if video and (image is not None or source == "posterior"):
        raise InputError("image" if image is not None else "source",
                         "a video latent's cells cannot come from the posterior of images (each image would be "
                         "encoded alone, not as the clip the latent came from)",
                         "the latent outliers source, without an image, for a video latent [B, C, T, h, w]")
    if source == "auto":
        return "posterior" if image is not None else "latent"
    if source == "posterior" and image is None:
        raise InputError("source", "'posterior anomalies' needs the image the latent was encoded from",
                         "the image the latent came from, or the latent outliers source")
    return source


def flagged_cells(codec: Codec, z: torch.Tensor, source: str, image: Optional[torch.Tensor] = None,
                  threshold: Optional[float] = None):
    """(mask `[B, h, w]`, scores `[B, h, w]` or None): the cells of `z [B, C, h, w]` to repair for a
    resolved `source`; `image [B, 3, H, W]` (0..1) must encode to the latent's shape. `threshold`:
    the source's detector threshold (None: its default)."""
    kw = {} if threshold is None else {"threshold": threshold}
    if source == "latent":
        return latent_outliers(z, **kw)
    post = read_posterior(codec, image, size_policy="crop")  # crop: as core's VAE Encode does
    if tuple(post.mean.shape) != tuple(z.shape):
        raise InputError("image", f"it encodes to a latent of shape {list(post.mean.shape)}, the latent is {list(z.shape)}",
                         "the image the latent was made from with this VAE (VAE Encode of it)")
    found = find_pooled([post], **kw)
    return anomaly_mask(found, post.batch, *post.latent_size), None


# ---------------------------------------------------------------- before/after report

def psnr(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """PSNR in dB of two images in 0..1 (None when identical)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return None if mse == 0 else 10 * math.log10(1.0 / mse)


def to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output (-1..1, unclamped) → image 0..1 on the CPU."""
    return ((decoded.float().cpu() + 1) / 2).clamp(0, 1)


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


def _fast_summary(decode_grad, z, index, window) -> dict:
    try:
        fast = fast_reach_map(decode_grad, z, window=window, index=index, fit=True)
    except InputError as e:  # latent too small for any regions: say so instead of failing the repair
        return {"skipped": str(e)}
    return dict(summarize_map(fast.reach, 3), **fitted_from(fast, window))


def _ordered_cells(mask: torch.Tensor, scores: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    cells = [tuple(c) for c in torch.nonzero(mask).tolist()]
    if scores is not None:
        cells.sort(key=lambda c: -float(scores[c]))
    return cells


def repair(codec: Codec, z: torch.Tensor, *, source: str = "auto", image: Optional[torch.Tensor] = None,
           posterior_threshold: Optional[float] = None, latent_threshold: Optional[float] = None,
           window: int = 3, measure_cells: int = 8, fast_map: bool = True, inputs: Optional[dict] = None,
           progress: Optional[ProgressFn] = None) -> "RepairResult":
    """Choose the cells of `z [B, C, h, w]` (or of each frame of a video latent `[B, C, T, h, w]`; see
    the module notes), replace them and measure before/after.

    Thresholds: None is the detector's default. `measure_cells`: per latent (frame), how many flagged
    cells (highest score first) get the exact reach measure. `fast_map`: also compare the fast reach
    maps before and after (needs a differentiable decoder). `inputs`: where the latent and image came
    from, kept as the report's "input". Progress counts encodes, decodes and measures; it may raise to cancel.
    """
    frames, layout = fold(z)
    if isinstance(measure_cells, bool) or not isinstance(measure_cells, int) or measure_cells < 0:
        raise InputError("measure_cells", f"{measure_cells!r}", "a whole number >= 0")
    decode, decode_grad = codec.need_decoder(), codec.need_decoder(grad=True) if fast_map else None
    source = resolve_source(source, image, layout.video)
    b, _, h, w = frames.shape
    asked, window = window, fit_window(window, h, w)  # a small latent (32x VAE at 64 px: 2x2) shrinks it
    steps = Steps(progress, (source == "posterior") + 2 + b * (1 + 2 * fast_map))
    threshold = posterior_threshold if source == "posterior" else latent_threshold
    mask, scores = flagged_cells(codec, frames, source, image, threshold)
    if source == "posterior":
        steps.step()  # the encode
    fixed = neutralise(frames, mask)
    raw_before, raw_after = _decoded(decode, frames, steps), _decoded(decode, fixed, steps)
    before, after = to_unit(raw_before), to_unit(raw_after)
    ds = before.shape[-2] // h
    images = []
    for i in range(b):
        cells = _ordered_cells(mask[i], None if scores is None else scores[i])
        entry = {"index": i, "repaired_cells": len(cells), "cells": [list(c) for c in cells[:256]],
                 "image_change": _image_change(before[i], after[i], cells, window, ds)}
        if layout.video:
            entry["item"], entry["frame"] = layout.where(i)
        if cells[:measure_cells]:
            reach = exact_reach(decode, frames, cells[:measure_cells], window=window, index=i,
                                base=raw_before[i:i + 1], delta=(fixed[i:i + 1] - frames[i:i + 1]).float())
            entry["cell_reach_before"] = [r.to_dict() for r in reach]
        steps.step()
        if fast_map:
            for key, latent in (("fast_reach_before", frames), ("fast_reach_after", fixed)):
                entry[key] = _fast_summary(decode_grad, latent, i, window)
                steps.step()
        images.append(entry)
    report = {"source": source, "window": window, "downscale": ds, "latent_shape": list(z.shape),
              "repaired_cells": int(mask.sum()), "images": images, "method": METHOD, "vae": codec.info}
    if window != asked:
        report["window_fitted_from"] = asked
    if layout.video:
        report["video"] = dict(layout.to_json(), decoded=FRAMES_DECODED)
    if inputs:
        report["input"] = inputs
    return RepairResult(layout.unfold(fixed), mask, before, after, report, layout)


def _decoded(decode, z: torch.Tensor, steps: Steps) -> torch.Tensor:
    """`[B, 3, H, W]` -1..1 on the decoder's device, one step."""
    with torch.no_grad():
        out = decode(z).float()
    steps.step()
    return out


@dataclass
class RepairResult(Result):
    latent: torch.Tensor          # [B, C, h, w] (video: [B, C, T, h, w]) repaired, on the input's device and dtype
    mask: torch.Tensor            # [B, h, w] cells that were replaced (video: per frame, [B*T, h, w])
    before: torch.Tensor          # [B, 3, H, W] 0..1 decoded original (video: [B*T, ...], each frame alone)
    after: torch.Tensor           # [B, 3, H, W] 0..1 decoded repair
    report: dict
    layout: FrameLayout = FrameLayout(1)  # where the frames came from (an image latent: its own batch)

    json_name = "repair"

    def to_json(self) -> dict:
        return self.report

    def summary(self) -> str:
        lines = [f"{self.report['repaired_cells']} cells to repair ({self.report['source']})"]
        if self.layout.video:
            lines[0] += f" in a video latent of {self.layout.frames} frames; {FRAMES_DECODED}"
        for e in self.report["images"]:
            change, far = e["image_change"], e["image_change"]["far_mean_abs"]
            name = self.layout.label(e["index"]) if self.layout.video else f"image {e['index']}"
            line = (f"{name}: {e['repaired_cells']} cells repaired; mean |image change| "
                    f"{change['mean_abs']:.4f}, away from the cells {'n/a' if far is None else f'{far:.4f}'}")
            before, after = e.get("fast_reach_before", {}), e.get("fast_reach_after", {})
            if "max" in before and "max" in after:
                line += f"; worst fast reach {before['max']:.3g} -> {after['max']:.3g}"
            lines.append(line)
        return "\n".join(lines)

    def pictures(self) -> dict:
        """`repair_<i>` (video: `repair_item<b>_frame<t>`): per latent (frame), before (repaired cells
        boxed) | after | |after - before|."""
        if self.layout.video:
            return {"repair_item{}_frame{}".format(*self.layout.where(i)): repair_picture(self, i)
                    for i in range(self.before.shape[0])}
        return {f"repair_{i}": repair_picture(self, i) for i in range(self.before.shape[0])}


def repair_picture(result: RepairResult, index: int = 0, cmap: str = "magma") -> torch.Tensor:
    """before (repaired cells boxed) | after | |after - before| with a colour bar: `[3, H', W']`."""
    if not 0 <= index < result.before.shape[0]:
        raise InputError("index", f"{index}", f"0..{result.before.shape[0] - 1}")
    before, after = result.before[index], result.after[index]
    ds = before.shape[-2] // result.mask.shape[-2]
    marks = [tuple(c) for c in torch.nonzero(result.mask[index]).tolist()]
    diff = (after - before).abs().mean(0)
    vmax = max(float(diff.max()), 1e-6)
    zoom = viz.zoom_for(*before.shape[-2:])
    before, after, diff = (viz.enlarge(t, zoom) for t in (before, after, diff))
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
