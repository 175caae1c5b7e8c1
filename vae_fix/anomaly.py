"""Find latent cells whose posterior is an outlier against the image's own map ("black holes").

Log-variance: for each cell take the lowest raw log-variance over channels, `v[y, x]`. Against the
image's own median and MAD over cells (robust: a few holes do not move them) each cell gets the
score `z = (median - v) / (1.4826 * MAD)`, a robust z (1.4826·MAD is the standard deviation for
normal data). A cell is anomalous ("logvar_low") when `z >= threshold` AND it lies at least
`min_drop` nats below the median. Only the centre and spread of the image's own map are used, so it
works the same whether the typical value is -20 or -5 (only the clamp floor at -30 is absolute).

Defaults, against the numbers published for the SD VAE (typical log-variance -17..-23, max about
-13, holes "-30 on the dot" on the clamped map, i.e. raw below the -30 clamp):
- `threshold = 5`: -17..-23 is median -20 ± 3; read as the central ~87 % (±1.5 sigma) that is sigma
  about 2 nats (MAD about 1.35). A hole at -30 or below is then >= 10 / 2 = 5 robust sigmas out,
  deeper raw values more. For normal data, 5 sigma is passed by 3 cells in 10 million, so a 64x64
  map gives about 0.001 false cells.
- `min_drop = 3` nats: a variance e^3 = 20x smaller than the median cell. Guards maps that are almost
  constant (MAD near 0) where tiny wiggles would have huge z.
- Clamp-floor hits (raw <= -30) are listed separately whatever their z: they are exactly what the
  clamped maps show as "-30 on the dot".
- Means ("mean_magnitude"): per channel `|mu - median| / (1.4826 * MAD)`, max over channels, flagged
  at `mean_threshold = 8` and at least `min_mean_dev = 1` latent unit: latent means follow the image
  (edges give 3-6 robust sigmas), so only much larger ones, like the over-bright spot at a hole, count.
Anomalous cells that touch (8-neighbourhood) form a group.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .errors import InputError
from .posterior import LOGVAR_MIN, Posterior

MAD_TO_SIGMA = 1.4826
DEFAULT_THRESHOLD = 5.0
DEFAULT_MIN_DROP = 3.0
DEFAULT_MEAN_THRESHOLD = 8.0
DEFAULT_MIN_MEAN_DEV = 1.0
SIGMA_FLOOR = 1e-6  # a perfectly constant map has MAD 0; min_drop then decides


@dataclass
class Anomaly:
    y: int                      # latent cell row
    x: int                      # latent cell column
    kind: str                   # "logvar_low" or "mean_magnitude" (the first of `kinds`)
    kinds: list[str]
    score: float                # robust z of its kind (logvar z when both)
    logvar_raw_min: float       # lowest raw log-variance over channels at this cell
    drop: float                 # nats below the image's median of logvar_raw_min
    clamp_floor_hit: bool       # logvar_raw_min <= -30: the clamped map shows -30 here
    channels: list[int]         # channels that are outliers here (for its kind)
    mean_abs_max: float         # largest |mean| over channels at this cell
    logvar_score: float
    mean_score: float
    group: int = -1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AnomalyReport:
    index: int
    latent_size: tuple[int, int]
    anomalies: list[Anomaly]                # most anomalous first
    groups: list[dict]
    floor_hits: list[tuple[int, int]]       # cells with raw log-variance <= -30 in any channel
    floor_hit_elements: int                 # (channel, cell) values <= -30
    baseline: dict
    thresholds: dict
    notes: list[str] = field(default_factory=list)

    def marks(self) -> list[tuple[int, int]]:
        """(y, x) of every anomalous cell, for `viz.overlay`."""
        return [(a.y, a.x) for a in self.anomalies]

    def to_dict(self, max_items: int = 256) -> dict:
        return {
            "anomaly_count": len(self.anomalies),
            "anomalies": [a.to_dict() for a in self.anomalies[:max_items]],
            "anomalies_left_out": max(0, len(self.anomalies) - max_items),
            "groups": self.groups[:max_items],
            "clamp_floor": {"cells": len(self.floor_hits), "elements": self.floor_hit_elements,
                            "floor": LOGVAR_MIN, "list": [list(c) for c in self.floor_hits[:max_items]],
                            "left_out": max(0, len(self.floor_hits) - max_items)},
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


def _per_channel_z(maps: torch.Tensor, low_side: bool) -> torch.Tensor:
    """`[C, h, w]` → `[C, h, w]` robust z per channel: below the median when `low_side`, else |dev|."""
    out = torch.zeros_like(maps)
    for c in range(maps.shape[0]):
        med, sigma = robust_center_spread(maps[c])
        dev = (med - maps[c]) if low_side else (maps[c] - med).abs()
        out[c] = dev / max(sigma, SIGMA_FLOOR)
    return torch.nan_to_num(out, nan=0.0)


def _check(posterior, index, **numbers) -> None:
    if not isinstance(posterior, Posterior):
        raise InputError("posterior", f"got {type(posterior).__name__}", "a Posterior from read_posterior")
    if not isinstance(index, int) or not 0 <= index < posterior.batch:
        raise InputError("index", f"{index!r}", f"an image index 0..{posterior.batch - 1}")
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(name, f"{value!r}", "a number >= 0")


def find_anomalies(posterior: Posterior, index: int = 0, *, threshold: float = DEFAULT_THRESHOLD,
                   min_drop: float = DEFAULT_MIN_DROP, mean_threshold: float = DEFAULT_MEAN_THRESHOLD,
                   min_mean_dev: float = DEFAULT_MIN_MEAN_DEV) -> AnomalyReport:
    """Anomalous cells of image `index` of `posterior` (see the module docstring for the rules)."""
    _check(posterior, index, threshold=threshold, min_drop=min_drop, mean_threshold=mean_threshold,
           min_mean_dev=min_mean_dev)
    lv = posterior.logvar_raw[index].float().cpu()   # [C, h, w]
    mu = posterior.mean[index].float().cpu()         # [C, h, w]
    lv_min = lv.amin(dim=0)                          # [h, w]
    med, sigma = robust_center_spread(lv_min)
    drop = torch.nan_to_num(med - lv_min, nan=0.0)
    lv_z = drop / max(sigma, SIGMA_FLOOR)
    lv_hit = (lv_z >= threshold) & (drop >= min_drop)
    ch_z = _per_channel_z(lv, low_side=True)
    ch_drop = torch.nan_to_num(lv.flatten(1).nanmedian(dim=1).values.view(-1, 1, 1) - lv, nan=0.0)
    mean_z_c = _per_channel_z(mu, low_side=False)
    mean_dev = torch.nan_to_num((mu - mu.flatten(1).nanmedian(dim=1).values.view(-1, 1, 1)).abs(), nan=0.0)
    mean_hit_c = (mean_z_c >= mean_threshold) & (mean_dev >= min_mean_dev)
    mean_hit = mean_hit_c.any(dim=0)
    mean_z = mean_z_c.amax(dim=0)
    abs_max = mu.abs().amax(dim=0)

    anomalies = []
    for y, x in torch.nonzero(lv_hit | mean_hit).tolist():
        kinds = (["logvar_low"] if lv_hit[y, x] else []) + (["mean_magnitude"] if mean_hit[y, x] else [])
        if kinds[0] == "logvar_low":
            chans = [c for c in range(lv.shape[0]) if ch_z[c, y, x] >= threshold and ch_drop[c, y, x] >= min_drop]
            chans = chans or [int(lv[:, y, x].argmin())]
        else:
            chans = [c for c in range(mu.shape[0]) if mean_hit_c[c, y, x]]
        anomalies.append(Anomaly(
            y=y, x=x, kind=kinds[0], kinds=kinds,
            score=float(lv_z[y, x] if kinds[0] == "logvar_low" else mean_z[y, x]),
            logvar_raw_min=float(lv_min[y, x]), drop=float(drop[y, x]),
            clamp_floor_hit=bool(lv_min[y, x] <= LOGVAR_MIN), channels=chans,
            mean_abs_max=float(abs_max[y, x]), logvar_score=float(lv_z[y, x]), mean_score=float(mean_z[y, x])))
    anomalies.sort(key=lambda a: (a.kind != "logvar_low", -a.score))
    groups = _group(anomalies)

    floor = lv <= LOGVAR_MIN
    floor_cells = floor.any(dim=0)
    floor_hits = sorted((tuple(c) for c in torch.nonzero(floor_cells).tolist()), key=lambda c: float(lv_min[c]))
    notes = []
    if not torch.isfinite(lv_min).all():
        notes.append(f"{int((~torch.isfinite(lv_min)).sum())} cells have non-finite log-variance and were skipped")
    baseline = {"logvar_raw_min_median": med, "logvar_raw_min_sigma": sigma,
                "logvar_raw_median": float(lv.nanmedian()), "mean_abs_median": float(mu.abs().nanmedian())}
    thresholds = {"threshold": float(threshold), "min_drop": float(min_drop), "mean_threshold": float(mean_threshold),
                  "min_mean_dev": float(min_mean_dev), "clamp_floor": LOGVAR_MIN, "statistic":
                  "robust z of the per-cell minimum over channels of raw log-variance: (median - v) / (1.4826 * MAD)"}
    return AnomalyReport(index, tuple(lv_min.shape), anomalies, groups, floor_hits, int(floor.sum()),
                         baseline, thresholds, notes)


def _group(anomalies: list[Anomaly]) -> list[dict]:
    """Label 8-connected anomalous cells; sets `Anomaly.group` and returns one summary per group."""
    where = {(a.y, a.x): a for a in anomalies}
    groups = []
    for start in anomalies:  # highest score first, so group 0 holds the worst cell
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
        peak = max(members, key=lambda m: (m.kind == "logvar_low", m.score))
        groups.append({"id": gid, "cells": len(members), "bbox": [min(ys), min(xs), max(ys), max(xs)],
                       "peak": {"y": peak.y, "x": peak.x, "score": peak.score, "kind": peak.kind},
                       "logvar_raw_min": min(m.logvar_raw_min for m in members),
                       "clamp_floor_hits": sum(m.clamp_floor_hit for m in members),
                       "kinds": sorted({k for m in members for k in m.kinds})})
    return groups
