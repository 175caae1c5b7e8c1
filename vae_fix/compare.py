"""Two VAEs on the same images, side by side: anomalies, KL, worst reach, reconstruction PSNR.

Each VAE is given as callables (`moments_fn`, `decode_fn`), so the ComfyUI layer can pass the host's
models. Per image and VAE: the raw posterior (`posterior.read_posterior`), its anomalies
(`anomaly.find_anomalies`), KL, the reconstruction of the posterior mean and its PSNR against the
image as encoded, and the fast reach map's worst cell (`influence.fast_reach_map`).
Returns a JSON-safe report and one picture: per image a row of original, both reconstructions and
both log-variance maps (lowest raw log-variance over channels, one shared range per row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .anomaly import find_anomalies
from .errors import InputError
from .reach import fast_reach_map, summarize_map
from .posterior import prepare_images, read_posterior
from .progress import ProgressFn, report
from .repair import psnr, side_by_side, to_unit
from .jsonsafe import json_safe


@dataclass(frozen=True)
class VAESide:
    name: str
    moments_fn: Callable[[torch.Tensor], torch.Tensor]
    decode_fn: Optional[Callable[[torch.Tensor], torch.Tensor]]  # None: the VAE has no KL decoder
    downscale: Optional[int] = None                              # None: read from the model, else 8


@dataclass
class CompareResult:
    report: dict
    picture: torch.Tensor             # [3, H, W] 0..1
    reconstructions: list             # per side: [B, 3, H, W] 0..1 or None


def _reach(side: VAESide, mean: torch.Tensor, index: int, window: int) -> dict:
    try:  # a latent too small to have a far field at this window is reported, not fatal
        fast = fast_reach_map(side.decode_fn, mean, window=window, index=index)
    except InputError as e:
        return {"skipped": str(e)}
    return summarize_map(fast.reach, 3)


def _one_side(side: VAESide, images, size_policy, window, reach, anomaly_kwargs, tick) -> dict:
    post = read_posterior(side.moments_fn, images, size_policy=size_policy, downscale=side.downscale)
    x, _ = prepare_images(images, post.size.downscale, size_policy)
    tick()
    recon, mean = None, post.mean
    if side.decode_fn is not None:
        mean = post.mean.to(_device_of(side.decode_fn, post.mean))
        with torch.no_grad():
            recon = to_unit(side.decode_fn(mean).cpu())
    tick()
    per_image = []
    for i in range(post.batch):
        found = find_anomalies(post, i, **anomaly_kwargs)
        entry = {"anomaly_count": len(found.anomalies), "clamp_floor_cells": len(found.floor_hits),
                 "anomalies": [a.to_dict() for a in found.anomalies[:16]],
                 "kl_total": float(post.kl_total[i]), "kl_per_cell_mean": float(post.kl[i].mean()),
                 "logvar_raw_min": float(post.logvar_raw[i].min()),
                 "logvar_raw_median": float(post.logvar_raw[i].median()),
                 "latent_size": list(post.latent_size), "latent_channels": post.latent_channels}
        if recon is not None:
            entry["psnr_db"] = psnr(recon[i], x[i])
            if reach:
                entry["worst_reach"] = _reach(side, mean, i, window)
        tick()
        per_image.append((entry, found))
    return {"posterior": post, "images": x, "recon": recon, "per_image": per_image}


def _device_of(fn, fallback: torch.Tensor):
    owner = getattr(fn, "__self__", None)
    param = next(owner.parameters(), None) if isinstance(owner, torch.nn.Module) else None
    return param.device if param is not None else fallback.device


def compare_vaes(a: VAESide, b: VAESide, images: torch.Tensor, *, window: int = 3, reach: bool = True,
                 size_policy: str = "crop", anomaly_kwargs: Optional[dict] = None, cmap: str = "magma",
                 progress: Optional[ProgressFn] = None) -> CompareResult:
    """Run both VAEs on `images [B, 3, H, W]` (0..1) and put the results side by side."""
    if a.name == b.name:
        raise InputError("names", f"both VAEs are called {a.name!r}", "two different names")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise InputError("window", f"{window!r}", "a whole number of cells >= 0")
    batch = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else 1
    total, done = 2 * (2 + batch), [0]

    def tick():
        done[0] += 1
        report(progress, done[0], total)

    report(progress, 0, total)
    sides = [_one_side(s, images, size_policy, window, reach, anomaly_kwargs or {}, tick) for s in (a, b)]
    rows = []
    for i in range(batch):
        ea, eb = (s["per_image"][i][0] for s in sides)
        diff = {"kl_total": eb["kl_total"] - ea["kl_total"], "anomaly_count": eb["anomaly_count"] - ea["anomaly_count"]}
        if "psnr_db" in ea and "psnr_db" in eb and None not in (ea["psnr_db"], eb["psnr_db"]):
            diff["psnr_db"] = eb["psnr_db"] - ea["psnr_db"]
        rows.append({"index": i, a.name: ea, b.name: eb, "b_minus_a": diff})
    summary = {s.name: _summary([e for e, _ in side["per_image"]]) for s, side in zip((a, b), sides)}
    rep = json_safe({"vaes": [{"name": s.name, "side": tag, "downscale": side["posterior"].size.downscale,
                               "latent_channels": side["posterior"].latent_channels,
                               "size_handling": side["posterior"].size.to_dict()}
                              for tag, s, side in zip("ab", (a, b), sides)],
                     "settings": {"window": window, "reach": reach, "size_policy": size_policy},
                     "summary": summary, "images": rows})
    picture = compare_picture(sides, (a.name, b.name), cmap)
    return CompareResult(rep, picture, [s["recon"] for s in sides])


def _summary(entries: list[dict]) -> dict:
    def mean(key):
        vals = [e[key] for e in entries if e.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    worst = [e["worst_reach"] for e in entries if "max" in e.get("worst_reach", {})]
    return {"anomalies": sum(e["anomaly_count"] for e in entries), "kl_total_mean": mean("kl_total"),
            "psnr_db_mean": mean("psnr_db"),
            "worst_reach_max": max((w["max"] for w in worst), default=None),
            "worst_reach_over_median_max": max((w["max_over_median"] or 0 for w in worst), default=None)}


# ---------------------------------------------------------------- picture

def compare_picture(sides: list[dict], names: tuple[str, str], cmap: str = "magma", gap: int = 6) -> torch.Tensor:
    """Rows of: original | recon A | recon B | log-variance A | log-variance B (+ colour bar)."""
    from . import viz

    rows = []
    size = max(sides[0]["images"].shape[-2:])
    zoom = max(1, 256 // size)  # small test images stay readable

    def big(t):
        return t.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1) if zoom > 1 else t

    for i in range(sides[0]["posterior"].batch):
        maps = [s["posterior"].logvar_raw[i].amin(dim=0) for s in sides]
        both = torch.cat([m.flatten() for m in maps])
        lo, hi = viz.value_range(both, percentiles=(1.0, 99.0))
        tiles = [viz.caption(big(sides[0]["images"][i]), f"image {i}")]
        for s, name in zip(sides, names):
            entry = s["per_image"][i][0]
            if s["recon"] is None:
                tiles.append(viz.caption(big(torch.full_like(s["images"][i], 0.5)), f"{name}: no decoder"))
            else:
                p = entry.get("psnr_db")
                tiles.append(viz.caption(big(s["recon"][i]), f"{name}: {'%.1f dB' % p if p is not None else 'identical'}"))
        for s, name, m in zip(sides, names, maps):
            ds = s["posterior"].size.downscale
            heat = big(viz.heatmap(m, cmap, lo, hi, ds))
            found = s["per_image"][i][1]
            if found.anomalies:
                heat = viz.mark_cells(heat, found.marks(), cell=ds, zoom=zoom)
            tiles.append(viz.caption(heat, f"{name}: logvar, {len(found.anomalies)} anomalies"))
        rows.append(viz.with_colorbar(side_by_side(tiles, gap), cmap, lo, hi, "min raw log-variance (nats)"))
    return _stack(rows, gap)


def _stack(rows, gap):
    w = max(r.shape[2] for r in rows)
    out = torch.ones(3, sum(r.shape[1] for r in rows) + gap * (len(rows) - 1), w)
    y = 0
    for r in rows:
        out[:, y:y + r.shape[1], :r.shape[2]] = r
        y += r.shape[1] + gap
    return out


def merge_reports(reports: list[dict]) -> dict:
    """One report from several `compare_vaes` runs of the same two VAEs (e.g. one per image size)."""
    if not reports:
        raise InputError("reports", "none given", "at least one compare report")
    names = [v["name"] for v in reports[0]["vaes"]]
    images = []
    for rep in reports:
        for row in rep["images"]:
            images.append({**row, "index": len(images)})
    summary = {n: _summary([row[n] for row in images]) for n in names}
    return {**reports[0], "images": images, "summary": json_safe(summary)}
