"""Find latent cells where a VAE's posterior log-variance collapses: the SD "black hole".

A black hole is a property of the VAE, not of the picture: the encoder's raw log-variance at a cell
falls far below the VAE's own typical range. Image content moves means a lot (edges, flat areas,
bright spots) and log-variances a little, so only the log-variance decides. Per cell take the lowest
raw log-variance over channels, `v[y, x]`. The reference level is the lower of the image's own
median of `v` and the VAE's typical median (`Baseline`, pooled over every image of a run), so a
whole image that sits low is content, not a cell. A cell is a VAE anomaly ("logvar_low") when

    drop = reference - v >= max(min_drop, threshold * max(sigma, spread_floor))

where sigma is the VAE's typical robust spread (1.4826·MAD of `v`, pooled). Defaults, against SD's
published numbers (typical -17..-23, holes "-30 on the dot" on the clamped map, raw lower still):
- `threshold = 4`: SD's spread is about 2 nats, so a cell must lie 8 nats under the median, at -28.
- `spread_floor = 1` nat: a near-constant map (MAD near 0) makes any wiggle "many sigmas" out.
- `min_drop = 8` nats: a variance e^8 = 3000x smaller than the typical cell. Smooth random VAEs
  reach 1.7 nats on the probe images at 64..1024 px, plain random ones 6.6 (see the README).
Means are supporting evidence only: a large mean (per channel `|mu - median| >= 8` robust sigmas
and >= 1 unit) at an anomalous cell adds "mean_magnitude" to its `kinds`; elsewhere it is image
content, listed under `content_outliers`, never as an anomaly. Clamp-floor hits (raw <= -30) are
listed apart: they are what the clamped maps show as "-30 on the dot". Touching cells form a group.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .errors import InputError
from .posterior import LOGVAR_MIN, Posterior

MAD_TO_SIGMA = 1.4826
DEFAULT_THRESHOLD = 4.0
DEFAULT_MIN_DROP = 8.0
SPREAD_FLOOR = 1.0
DEFAULT_MEAN_THRESHOLD = 8.0
DEFAULT_MIN_MEAN_DEV = 1.0
MAX_LISTED = 256
STATISTIC = ("drop of the per-cell minimum over channels of raw log-variance below min(image median, VAE "
             "median), in units of the VAE's robust spread (1.4826 * MAD, at least spread_floor)")


@dataclass
class Anomaly:
    y: int                      # latent cell row
    x: int                      # latent cell column
    kind: str                   # always "logvar_low": only a log-variance collapse is a VAE anomaly
    kinds: list[str]            # + "mean_magnitude" when a large mean supports it
    score: float                # drop in units of the VAE's spread
    logvar_raw_min: float       # lowest raw log-variance over channels at this cell
    drop: float                 # nats below the reference level
    clamp_floor_hit: bool       # logvar_raw_min <= -30: the clamped map shows -30 here
    channels: list[int]         # channels that collapse here
    mean_abs_max: float         # largest |mean| over channels at this cell
    logvar_score: float
    mean_score: float           # robust z of the mean (supporting evidence)
    group: int = -1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Baseline:
    """A VAE's typical range of the per-cell minimum log-variance: median and robust spread."""
    median: float
    sigma: float
    images: int

    def to_dict(self) -> dict:
        return {"median": self.median, "sigma": self.sigma, "images": self.images}


@dataclass
class AnomalyReport:
    index: int
    latent_size: tuple[int, int]
    anomalies: list[Anomaly]                # deepest first
    groups: list[dict]
    floor_hits: list[tuple[int, int]]       # cells with raw log-variance <= -30 in any channel
    floor_hit_elements: int                 # (channel, cell) values <= -30
    baseline: dict
    thresholds: dict
    content_outliers: list[dict] = field(default_factory=list)  # large means alone: image content
    notes: list[str] = field(default_factory=list)

    def marks(self) -> list[tuple[int, int]]:
        """(y, x) of every anomalous cell, for `viz.overlay`."""
        return [(a.y, a.x) for a in self.anomalies]

    def to_dict(self, max_items: int = MAX_LISTED) -> dict:
        return {
            "anomaly_count": len(self.anomalies),
            "anomalies": [a.to_dict() for a in self.anomalies[:max_items]],
            "anomalies_left_out": max(0, len(self.anomalies) - max_items),
            "groups": self.groups[:max_items],
            "clamp_floor": {"cells": len(self.floor_hits), "elements": self.floor_hit_elements,
                            "floor": LOGVAR_MIN, "list": [list(c) for c in self.floor_hits[:max_items]],
                            "left_out": max(0, len(self.floor_hits) - max_items)},
            "content_outliers": {"count": len(self.content_outliers), "cells": self.content_outliers[:16],
                                 "rule": "large mean alone: image content, not a VAE anomaly"},
            "baseline": dict(self.baseline), "thresholds": dict(self.thresholds), "notes": list(self.notes),
        }


def robust_center_spread(values: torch.Tensor) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of the finite entries; (nan, nan) when there are none."""
    finite = torch.isfinite(values)
    v = values.flatten() if bool(finite.all()) else values[finite]
    if v.numel() == 0:
        return float("nan"), float("nan")
    med = v.median()
    return float(med), float(MAD_TO_SIGMA * (v - med).abs().median())


def min_map(posterior: Posterior, index: int) -> torch.Tensor:
    """`[h, w]` lowest raw log-variance over channels of image `index`."""
    return posterior.logvar_raw[index].float().cpu().amin(dim=0)


def vae_baseline(maps: list[torch.Tensor]) -> Baseline:
    """The typical range pooled over per-cell minimum maps `[h, w]` of every image a VAE encoded."""
    med, sigma = robust_center_spread(torch.cat([m.flatten() for m in maps]))
    return Baseline(med, sigma, len(maps))


def find_pooled(posteriors: list[Posterior], **options) -> list[AnomalyReport]:
    """The anomalies of every image of every posterior, each judged against the VAE's typical range
    pooled over all of them (the verdict's rule). `options`: those of `find_anomalies`."""
    pairs = [(p, i) for p in posteriors for i in range(p.batch)]
    base = vae_baseline([min_map(p, i) for p, i in pairs])
    return [find_anomalies(p, i, baseline=base, **options) for p, i in pairs]


def _check(posterior, index, **numbers) -> None:
    if not isinstance(posterior, Posterior):
        raise InputError("posterior", f"got {type(posterior).__name__}", "a Posterior from read_posterior")
    if not isinstance(index, int) or not 0 <= index < posterior.batch:
        raise InputError("index", f"{index!r}", f"an image index 0..{posterior.batch - 1}")
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(name, f"{value!r}", "a number >= 0")


def _mean_outliers(mu: torch.Tensor, threshold: float, min_dev: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`mu [C, h, w]` → (hit `[C, h, w]`, robust z `[C, h, w]`) per channel against its own median."""
    med = mu.flatten(1).nanmedian(dim=1).values.view(-1, 1, 1)
    dev = torch.nan_to_num((mu - med).abs(), nan=0.0)
    sigma = (MAD_TO_SIGMA * dev.flatten(1).median(dim=1).values).clamp_min(1e-6).view(-1, 1, 1)
    z = dev / sigma
    return (z >= threshold) & (dev >= min_dev), z


def find_anomalies(posterior: Posterior, index: int = 0, *, baseline: Optional[Baseline] = None,
                   threshold: float = DEFAULT_THRESHOLD, min_drop: float = DEFAULT_MIN_DROP,
                   spread_floor: float = SPREAD_FLOOR, mean_threshold: float = DEFAULT_MEAN_THRESHOLD,
                   min_mean_dev: float = DEFAULT_MIN_MEAN_DEV) -> AnomalyReport:
    """VAE anomalies of image `index` of `posterior` (module docstring). `baseline`: the VAE's
    typical range over all images of the run (default: this image's own)."""
    _check(posterior, index, threshold=threshold, min_drop=min_drop, spread_floor=spread_floor,
           mean_threshold=mean_threshold, min_mean_dev=min_mean_dev)
    lv = posterior.logvar_raw[index].float().cpu()   # [C, h, w]
    mu = posterior.mean[index].float().cpu()         # [C, h, w]
    lv_min = lv.amin(dim=0)                          # [h, w]
    med, img_sigma = robust_center_spread(lv_min)
    base = baseline or Baseline(med, img_sigma, 1)
    reference = min(med, base.median)
    sigma = max(base.sigma, spread_floor) if base.sigma == base.sigma else spread_floor
    needed = max(min_drop, threshold * sigma)
    drop = torch.nan_to_num(reference - lv_min, nan=0.0)
    hit = drop >= needed
    ch_med = lv.flatten(1).nanmedian(dim=1).values.view(-1, 1, 1)
    ch_hit = torch.nan_to_num(torch.minimum(ch_med, torch.tensor(reference)) - lv, nan=0.0) >= needed
    mean_hit_c, mean_z_c = _mean_outliers(mu, mean_threshold, min_mean_dev)
    mean_hit, mean_z, abs_max = mean_hit_c.any(dim=0), mean_z_c.amax(dim=0), mu.abs().amax(dim=0)

    anomalies = []
    for y, x in torch.nonzero(hit).tolist():
        chans = [c for c in range(lv.shape[0]) if ch_hit[c, y, x]] or [int(lv[:, y, x].argmin())]
        score = float(drop[y, x]) / sigma
        anomalies.append(Anomaly(
            y=y, x=x, kind="logvar_low", kinds=["logvar_low"] + (["mean_magnitude"] if mean_hit[y, x] else []),
            score=score, logvar_raw_min=float(lv_min[y, x]), drop=float(drop[y, x]),
            clamp_floor_hit=bool(lv_min[y, x] <= LOGVAR_MIN), channels=chans,
            mean_abs_max=float(abs_max[y, x]), logvar_score=score, mean_score=float(mean_z[y, x])))
    anomalies.sort(key=lambda a: -a.drop)
    content = [{"y": y, "x": x, "mean_score": float(mean_z[y, x]), "mean_abs_max": float(abs_max[y, x]),
                "channels": torch.nonzero(mean_hit_c[:, y, x]).flatten().tolist()}
               for y, x in torch.nonzero(mean_hit & ~hit).tolist()]
    content.sort(key=lambda c: -c["mean_score"])

    floor = lv <= LOGVAR_MIN
    floor_hits = sorted((tuple(c) for c in torch.nonzero(floor.any(dim=0)).tolist()), key=lambda c: float(lv_min[c]))
    notes = []
    if not torch.isfinite(lv_min).all():
        notes.append(f"{int((~torch.isfinite(lv_min)).sum())} cells have non-finite log-variance and were skipped")
    baseline_d = {"logvar_raw_min_median": med, "logvar_raw_min_sigma": img_sigma, "vae_typical": base.to_dict(),
                  "reference": reference, "needed_drop": needed,
                  "logvar_raw_median": float(lv.nanmedian()), "mean_abs_median": float(mu.abs().nanmedian())}
    thresholds = {"threshold": float(threshold), "min_drop": float(min_drop), "spread_floor": float(spread_floor),
                  "mean_threshold": float(mean_threshold), "min_mean_dev": float(min_mean_dev),
                  "clamp_floor": LOGVAR_MIN, "statistic": STATISTIC}
    return AnomalyReport(index, tuple(lv_min.shape), anomalies, _group(anomalies), floor_hits, int(floor.sum()),
                         baseline_d, thresholds, content, notes)


def _group(anomalies: list[Anomaly]) -> list[dict]:
    """Label 8-connected anomalous cells; sets `Anomaly.group` and returns one summary per group."""
    where = {(a.y, a.x): a for a in anomalies}
    groups = []
    for start in anomalies:  # deepest first, so group 0 holds the worst cell
        if start.group >= 0:
            continue
        gid, stack, members = len(groups), [start], []
        start.group = gid
        while stack:
            a = stack.pop()
            members.append(a)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    b = where.get((a.y + dy, a.x + dx))
                    if b is not None and b.group < 0:
                        b.group = gid
                        stack.append(b)
        ys, xs = [m.y for m in members], [m.x for m in members]
        peak = max(members, key=lambda m: m.drop)
        groups.append({"id": gid, "cells": len(members), "bbox": [min(ys), min(xs), max(ys), max(xs)],
                       "peak": {"y": peak.y, "x": peak.x, "score": peak.score, "kind": peak.kind},
                       "logvar_raw_min": min(m.logvar_raw_min for m in members),
                       "clamp_floor_hits": sum(m.clamp_floor_hit for m in members),
                       "kinds": sorted({k for m in members for k in m.kinds})})
    return groups
