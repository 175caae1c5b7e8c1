"""The verdict on a VAE: does it have a black hole? Built from the anomalies of every image it
encoded (`anomaly.find_anomalies` against the VAE's pooled typical range).

A black hole recurs whatever the content, so the verdict counts images: collapsed cells in at least
half of the images (and two or more) make `black_hole: true`. Fewer is content-triggered (listed, but
not a black hole); one image alone cannot confirm recurrence and says so. Per cell position it lists
in how many of the images that cover it the cell collapsed, its deepest raw log-variance and drop,
whether a large mean supports it and, when measured, its reach (`reach_ratio`: the fast reach map at
the cell over the map's median; a cell that smuggles global information reaches far, >= 10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .anomaly import AnomalyReport

RECURRENCE = 0.5          # share of the images a collapse must appear in to be the VAE's
FAR_REACH = 10.0          # reach_ratio above which a cell reaches far beyond its window
STATUSES = ("black_hole", "content", "single_image", "none")
LISTED = 32


@dataclass
class Verdict:
    black_hole: bool
    status: str                       # one of STATUSES
    images: int
    images_with_collapse: int
    cells: list[dict]                 # most often seen first, then deepest
    evidence: str
    names: list = field(default_factory=list)
    reach: Optional[dict] = None      # {"y", "x", "image", "reach_ratio", ...} or {"skipped": why}
    unit: str = "image"               # what was judged: images, or a clip's latent frames

    def to_dict(self) -> dict:
        return {"black_hole": self.black_hole, "status": self.status, "images": self.images,
                "images_with_collapse": self.images_with_collapse, "cells": self.cells[:LISTED],
                "cells_left_out": max(0, len(self.cells) - LISTED), "evidence": self.evidence,
                "reach": self.reach, "line": self.line()}

    def line(self) -> str:
        """One sentence: what was found and how sure it is."""
        n, k, unit = self.images, self.images_with_collapse, self.unit
        if self.status == "none":
            return f"no black hole found ({n} {unit}{'s' * (n != 1)}, no log-variance collapse)"
        top = self.cells[0]
        where = f"({top['y']}, {top['x']})"
        if self.status == "single_image":
            return (f"log-variance collapse at {where} in the only {unit}: one {unit} cannot confirm a black hole "
                    "(run the health check with no images to test recurrence)")
        if self.status == "content":
            return (f"log-variance collapse in {k}/{n} {unit}s only (first at {where}): content-triggered, "
                    "not a VAE black hole")
        fixed = top["images"] == top["of"] == n
        seen = "probes" if unit == "image" else f"{unit}s"
        place = f"at {where} in {top['images']}/{n} {seen}" if fixed or top["images"] >= k else \
            f"in {k}/{n} {unit}s, at varying cells (most often {where}, {top['images']}/{top['of']})"
        return f"black hole {place}{self._reach_words()}"

    def _reach_words(self) -> str:
        r = self.reach or {}
        if "reach_ratio" not in r:
            return ""
        far = "reaches far" if r["reach_ratio"] >= FAR_REACH else "does not reach far"
        return f"; it {far} (reach {r['reach_ratio']:.1f}x the median cell)"


def verdict(found: list[AnomalyReport], names: Optional[list] = None, unit: str = "image") -> Verdict:
    """The verdict over the reports of every image (one report per image, any latent sizes); `unit`
    names what was judged in its line (a clip's "latent frame")."""
    n = len(found)
    names = list(names) if names is not None else [f"image {i}" for i in range(n)]
    cells: dict[tuple[int, int], dict] = {}
    for i, rep in enumerate(found):
        for a in rep.anomalies:
            c = cells.setdefault((a.y, a.x), {"y": a.y, "x": a.x, "images": 0, "logvar_raw_min": a.logvar_raw_min,
                                              "drop": a.drop, "clamp_floor_hit": False, "mean_support": 0,
                                              "channels": set(), "seen_in": []})
            c["images"] += 1
            c["logvar_raw_min"] = min(c["logvar_raw_min"], a.logvar_raw_min)
            c["drop"] = max(c["drop"], a.drop)
            c["clamp_floor_hit"] |= a.clamp_floor_hit
            c["mean_support"] += "mean_magnitude" in a.kinds
            c["channels"].update(a.channels)
            c["seen_in"].append(names[i])
    for (y, x), c in cells.items():
        c["of"] = sum(1 for r in found if y < r.latent_size[0] and x < r.latent_size[1])
        c["channels"] = sorted(c["channels"])
        c["seen_in"] = c["seen_in"][:8]
        c["reach_ratio"] = None
    ordered = sorted(cells.values(), key=lambda c: (-c["images"], -c["drop"]))
    hit = sum(1 for r in found if r.anomalies)
    status = _status(n, hit)
    return Verdict(status == "black_hole", status, n, hit, ordered, _evidence(status, n, hit, found), names,
                   unit=unit)


def _status(n: int, hit: int) -> str:
    if hit == 0:
        return "none"
    if n == 1:
        return "single_image"
    return "black_hole" if hit >= max(2, math.ceil(RECURRENCE * n)) else "content"


def _evidence(status: str, n: int, hit: int, found: list[AnomalyReport]) -> str:
    base = found[0].baseline if found else {}
    typical = base.get("vae_typical", {})
    rule = (f"a cell counts when its lowest raw log-variance lies at least {base.get('needed_drop', float('nan')):.1f} "
            f"nats under the VAE's typical {typical.get('median', float('nan')):.1f} "
            f"(spread {typical.get('sigma', float('nan')):.2f}, over {typical.get('images', n)} images)")
    words = {"none": f"no cell of {n} images collapsed; {rule}",
             "single_image": f"collapse seen in the one image given; recurrence needs two or more; {rule}",
             "content": f"collapse in {hit} of {n} images, fewer than {RECURRENCE:.0%}: it follows the content; {rule}",
             "black_hole": f"collapse in {hit} of {n} images, whatever the content; {rule}"}
    return words[status]
