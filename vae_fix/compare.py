"""Two VAEs on the same images, side by side: verdicts, anomalies, KL, worst reach, reconstruction PSNR.

Each VAE is a `Codec` (its `name` is its side's name). Per image and VAE: the raw posterior
(`posterior.read_posterior`), its log-variance collapses (`anomaly.find_anomalies` against that VAE's
typical range over all the images) and, per VAE, the verdict (`verdict.verdict`), KL, the reconstruction of
the posterior mean and its PSNR against the image as encoded, and the fast reach map's worst cell
(`reach.fast_reach_map`). Images come as one `[B, 3, H, W]` batch or a list of them (files of
different sizes): rows are numbered across the list. One picture per image: original, both
reconstructions and both log-variance maps (lowest raw log-variance over channels, one shared range).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import viz
from .anomaly import find_pooled
from .codec import Codec
from .errors import InputError
from .posterior import prepare_images, read_posterior
from .progress import ProgressFn, Steps
from .reach import fast_reach_map, fitted_from, summarize_map
from .repair import psnr, side_by_side, to_unit
from .result import Result
from .verdict import verdict


@dataclass
class CompareResult(Result):
    report: dict
    rows: list                        # per image: [3, H, W] 0..1 picture
    reconstructions: list             # per VAE: a list of [3, H, W] 0..1 per image, or None (no decoder)

    json_name = "compare"

    def to_json(self) -> dict:
        return self.report

    def summary(self) -> str:
        """One line per VAE from the report's summary."""
        lines = []
        for vae in self.report["vaes"]:
            s = self.report["summary"][vae["name"]]
            parts = [f"{vae['name']}: {self.report['verdicts'][vae['name']]['line']}; {vae['latent_channels']} channels, "
                     f"{s['anomalies']} collapsed cells"]
            if s["kl_total_mean"] is not None:
                parts.append(f"KL {s['kl_total_mean']:.4g} nats per image")
            if s["psnr_db_mean"] is not None:
                parts.append(f"reconstruction {s['psnr_db_mean']:.2f} dB")
            if s["worst_reach_over_median_max"] is not None:
                parts.append(f"worst reach {s['worst_reach_over_median_max']:.3g}x the median")
            lines.append(", ".join(parts))
        return "\n".join(lines)

    def pictures(self) -> dict:
        return {"compare": self.rows}


def _reach(codec: Codec, mean: torch.Tensor, index: int, window: int) -> dict:
    try:  # the grid is fitted to small latents; one with no far field at all is reported, not fatal
        fast = fast_reach_map(codec.need_decoder(grad=True), mean, window=window, index=index, fit=True)
    except InputError as e:
        return {"skipped": str(e)}
    return dict(summarize_map(fast.reach, 3), **fitted_from(fast, window))


def _one_side(codec: Codec, images: torch.Tensor, size_policy: str, window: int, reach: bool, steps: Steps) -> dict:
    """One VAE on `images [B, 3, H, W]`: posterior, reconstruction and per-image entries."""
    post = read_posterior(codec, images, size_policy=size_policy)
    x, _ = prepare_images(images, post.size.downscale, size_policy)
    steps.step()
    recon = None
    if codec.decode is not None:
        recon = to_unit(codec.decode(post.mean.to(codec.device)))
    steps.step()
    per_image = []
    for i in range(post.batch):
        entry = {"kl_total": float(post.kl_total[i]), "kl_per_cell_mean": float(post.kl[i].mean()),
                 "logvar_raw_min": float(post.logvar_raw[i].min()),
                 "logvar_raw_median": float(post.logvar_raw[i].median()),
                 "latent_size": list(post.latent_size), "latent_channels": post.latent_channels}
        if recon is not None:
            entry["psnr_db"] = psnr(recon[i], x[i])
            if reach:
                entry["worst_reach"] = _reach(codec, post.mean, i, window)
        steps.step()
        per_image.append([entry, None])
    return {"codec": codec, "posterior": post, "images": x, "recon": recon, "per_image": per_image}


def _judge(groups: list[list[dict]]) -> list[dict]:
    """Per VAE (side): anomalies of every image against its typical range over all groups, its verdict."""
    verdicts = []
    for side in range(2):
        sides = [g[side] for g in groups]
        found = find_pooled([s["posterior"] for s in sides])
        for item, rep in zip((item for s in sides for item in s["per_image"]), found):
            item[1] = rep
            item[0].update({"anomaly_count": len(rep.anomalies), "clamp_floor_cells": len(rep.floor_hits),
                            "anomalies": [a.to_dict() for a in rep.anomalies[:16]]})
        verdicts.append(verdict(found).to_dict())
    return verdicts


def _batch(images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else 1


def compare_vaes(codec_a: Codec, codec_b: Codec, images, *, window: int = 3, reach: bool = True,
                 size_policy: str = "crop", cmap: str = "magma", paths: Optional[Sequence[str]] = None,
                 progress: Optional[ProgressFn] = None) -> CompareResult:
    """Run both VAEs on `images` (0..1: one `[B, 3, H, W]` batch, or a list of `[1, 3, H, W]` files
    of any sizes) and put the results side by side. `paths`: where each image came from (kept in its row)."""
    if codec_a.name == codec_b.name:
        raise InputError("names", f"both VAEs are called {codec_a.name!r}", "two different names")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise InputError("window", f"{window!r}", "a whole number of cells >= 0")
    groups = [images] if isinstance(images, torch.Tensor) else list(images)
    steps = Steps(progress, sum(2 * (2 + _batch(g)) for g in groups))
    sided = [[_one_side(c, group, size_policy, window, reach, steps) for c in (codec_a, codec_b)] for group in groups]
    verdicts = _judge(sided)
    rows, pictures, first = [], [], sided[0]
    recons: list = [[], []]
    for sides in sided:
        for i in range(sides[0]["posterior"].batch):
            rows.append(_row(len(rows), sides, i))
            pictures.append(compare_picture(sides, i, cmap))
        for kept, side in zip(recons, sides):
            kept.extend([] if side["recon"] is None else list(side["recon"]))
    for row, path in zip(rows, paths or ()):
        row["path"] = str(path)
    names = (codec_a.name, codec_b.name)
    report = {"vaes": [{"name": s["codec"].name, "side": tag, "downscale": s["posterior"].size.downscale,
                        "latent_channels": s["posterior"].latent_channels, "size_handling": s["posterior"].size.to_dict()}
                       for tag, s in zip("ab", first)],
              "settings": {"window": window, "reach": reach, "size_policy": size_policy},
              "verdicts": dict(zip(names, verdicts)),
              "summary": {n: _summary([row[n] for row in rows]) for n in names}, "images": rows,
              "vae_files": {c.name: c.info for c in (codec_a, codec_b)}}
    recon = [r if c.decode is not None else None for r, c in zip(recons, (codec_a, codec_b))]
    return CompareResult(report, pictures, recon)


def _row(index: int, sides: list[dict], i: int) -> dict:
    ea, eb = (s["per_image"][i][0] for s in sides)
    diff = {"kl_total": eb["kl_total"] - ea["kl_total"], "anomaly_count": eb["anomaly_count"] - ea["anomaly_count"]}
    if ea.get("psnr_db") is not None and eb.get("psnr_db") is not None:
        diff["psnr_db"] = eb["psnr_db"] - ea["psnr_db"]
    return {"index": index, sides[0]["codec"].name: ea, sides[1]["codec"].name: eb, "b_minus_a": diff}


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

def compare_picture(sides: list[dict], i: int, cmap: str = "magma", gap: int = 6) -> torch.Tensor:
    """Image `i`: original | recon A | recon B | log-variance A | log-variance B (+ colour bar)."""
    original = sides[0]["images"][i]
    zoom = viz.zoom_for(*original.shape[-2:])
    maps = [s["posterior"].logvar_raw[i].amin(dim=0) for s in sides]
    lo, hi = viz.value_range(torch.cat([m.flatten() for m in maps]), percentiles=(1.0, 99.0))
    tiles = [viz.caption(viz.enlarge(original, zoom), f"image {i}")]
    for s in sides:
        name, p = s["codec"].name, s["per_image"][i][0].get("psnr_db")
        if s["recon"] is None:
            tiles.append(viz.caption(viz.enlarge(torch.full_like(s["images"][i], 0.5), zoom), f"{name}: no decoder"))
        else:
            tiles.append(viz.caption(viz.enlarge(s["recon"][i], zoom), f"{name}: {'%.1f dB' % p if p is not None else 'identical'}"))
    for s, m in zip(sides, maps):
        ds, found = s["posterior"].size.downscale, s["per_image"][i][1]
        heat = viz.enlarge(viz.heatmap(m, cmap, lo, hi, ds), zoom)
        if found.anomalies:
            heat = viz.mark_cells(heat, found.marks(), cell=ds, zoom=zoom)
        tiles.append(viz.caption(heat, f"{s['codec'].name}: logvar, {len(found.anomalies)} collapsed"))
    return viz.with_colorbar(side_by_side(tiles, gap), cmap, lo, hi, "min raw log-variance (nats)")
