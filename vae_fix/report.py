"""report.json (schema 2) of Inspect VAE and its readable summary (the node and the CLI give the same).

Layout:
    {"schema": 2, "tool": "vae_fix", "version", "vae": {"path", "layout", "latent_channels", ...},
     "verdict": {"black_hole", "status", "images", "images_with_collapse", "line", "evidence",
                 "cells": [{"y", "x", "images", "of", "logvar_raw_min", "drop", "reach_ratio", ...}],
                 "reach": {...} | null},
     "settings": {...}, "summary": {...},
     "images": [{"path", "index", "latent_size": [h, w], "latent_channels", "size": {...},
                 "tiling": null | {...}, "logvar_raw": {"min", "median", "max", "mean", "per_channel"},
                 "mean": {...}, "kl_total", "kl_per_cell": {...}, "anomaly_count",
                 "anomalies": [{"y", "x", "kind", "score", "logvar_raw_min", "clamp_floor_hit", ...}],
                 "groups", "clamp_floor": {"cells", "elements", "list"}, "content_outliers",
                 "baseline", "thresholds", "notes", "files"}],
     "moments_files": [...] (CLI --save-moments only), "files": {...} (CLI: every file it wrote)}
Schema 2 (from 1): the top-level `verdict`; `anomalies` lists only log-variance collapses against the
VAE's typical range (a large mean alone is image content, under `content_outliers`); `baseline`
gains `vae_typical`, `reference` and `needed_drop`; `thresholds` gains `spread_floor`.
Numbers are plain floats; NaN and infinities become null, so any JSON reader accepts the file.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import __version__
from .anomaly import AnomalyReport
from .jsonsafe import json_safe
from .posterior import LOGVAR_MAX, LOGVAR_MIN, Posterior

SCHEMA = 2
MAX_LISTED = 256      # anomalies / floor-hit cells written per image (counts are always complete)
SUMMARY_LISTED = 8    # anomalies printed per image in the text summary


def _stats(t: torch.Tensor) -> dict:
    v = t[torch.isfinite(t)].double()
    if v.numel() == 0:
        return {"min": None, "median": None, "max": None, "mean": None}
    return {"min": float(v.min()), "median": float(v.median()), "max": float(v.max()), "mean": float(v.mean())}


def image_entry(path, posterior: Posterior, index: int, anomalies: AnomalyReport,
                files: Optional[dict] = None, max_listed: int = MAX_LISTED) -> dict:
    """The report entry of image `index` of `posterior` (`path` may be None for in-memory images)."""
    lv, mu, kl = posterior.logvar_raw[index], posterior.mean[index], posterior.kl[index]
    per_channel = [{"channel": c, **{k: v for k, v in _stats(lv[c]).items() if k != "mean"}}
                   for c in range(lv.shape[0])]
    kl_peak = divmod(int(kl.flatten().argmax()), kl.shape[1])
    outside = int(((lv < LOGVAR_MIN) | (lv > LOGVAR_MAX)).sum())
    found = anomalies.to_dict(max_listed)
    entry = {
        "path": None if path is None else str(path),
        "index": index,
        "latent_size": list(posterior.latent_size),
        "latent_channels": posterior.latent_channels,
        "size": posterior.size.to_dict(),
        "tiling": posterior.tiling.to_dict() if posterior.tiling else None,
        "logvar_raw": {**_stats(lv), "per_channel": per_channel,
                       "outside_clamp": outside, "clamp": [LOGVAR_MIN, LOGVAR_MAX]},
        "mean": {**_stats(mu), "abs_max": float(mu.abs().max())},
        "kl_total": float(posterior.kl_total[index]),
        "kl_per_cell": {**_stats(kl), "max_at": list(kl_peak), "unit": "nats",
                        "formula": "0.5 * sum_c (mu^2 + exp(logvar) - 1 - logvar), logvar clamped to [-30, 20]"},
        **{k: found[k] for k in ("anomaly_count", "anomalies", "anomalies_left_out", "groups",
                                 "clamp_floor", "content_outliers", "baseline", "thresholds")},
        "notes": list(posterior.notes) + found["notes"],
        "files": dict(files or {}),
    }
    return json_safe(entry)


def build_report(vae_info: dict, images: list[dict], settings: Optional[dict] = None,
                 verdict: Optional[dict] = None) -> dict:
    """The whole report: `vae_info` (at least path, layout, latent_channels), the verdict and image entries."""
    summary = {
        "images": len(images),
        "images_with_anomalies": sum(1 for e in images if e["anomaly_count"]),
        "anomalies": sum(e["anomaly_count"] for e in images),
        "clamp_floor_cells": sum(e["clamp_floor"]["cells"] for e in images),
        "tiled_images": sum(1 for e in images if e["tiling"]),
        "resized_images": sum(1 for e in images if e["size"]["changed"]),
    }
    return json_safe({"schema": SCHEMA, "tool": "vae_fix", "version": __version__, "vae": dict(vae_info),
                      "verdict": dict(verdict or {}), "settings": dict(settings or {}), "summary": summary, "images": list(images)})


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _num(v, fmt=".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _anomaly_line(a: dict) -> str:
    floor = "  [clamp floor hit]" if a["clamp_floor_hit"] else ""
    chans = ",".join(str(c) for c in a["channels"])
    return (f"    cell (y={a['y']}, x={a['x']}) {a['kind']}: z={_num(a['score'])}, raw min log-variance "
            f"{_num(a['logvar_raw_min'])} ({_num(a['drop'])} below median), |mean| max "
            f"{_num(a['mean_abs_max'], '.2f')}, channels {chans}{floor}")


def image_summary(e: dict) -> list[str]:
    name = e["path"] or f"image {e['index']}"
    h, w = e["latent_size"]
    lv = e["logvar_raw"]
    lines = [f"{name}: latent {h}x{w}x{e['latent_channels']}; {e['size']['note']}"]
    if e["tiling"]:
        lines.append(f"  {e['tiling']['note']}")
    lines.append(f"  raw log-variance: min {_num(lv['min'])}, median {_num(lv['median'])}, max {_num(lv['max'])} "
                 f"nats; KL {_num(e['kl_total'])} nats ({_num(e['kl_per_cell']['mean'], '.2f')} per cell)")
    floor = e["clamp_floor"]
    lines.append(f"  clamp floor (raw <= {floor['floor']:g}): {_count(floor['cells'], 'cell')}, "
                 f"{_count(floor['elements'], 'value')}")
    base = e["baseline"]
    lines.append(f"  log-variance collapses: {_count(e['anomaly_count'], 'cell')} in {_count(len(e['groups']), 'group')} "
                 f"(>= {_num(base['needed_drop'])} nats below {_num(base['reference'])}; image median "
                 f"{_num(base['logvar_raw_min_median'])}, VAE typical {_num(base['vae_typical']['median'])})")
    lines += [_anomaly_line(a) for a in e["anomalies"][:SUMMARY_LISTED]]
    more = e["anomaly_count"] - min(SUMMARY_LISTED, len(e["anomalies"]))
    if more > 0:
        lines.append(f"    ... and {more} more (see report.json)")
    content = e["content_outliers"]["count"]
    if content:
        lines.append(f"  {_count(content, 'cell')} with a large mean alone: image content, not an anomaly")
    lines += [f"  note: {n}" for n in e["notes"]]
    return lines


def summary_text(report: dict) -> str:
    """The verdict first, then a few readable lines per image: ranges, clamp-floor hits, collapses."""
    vae, verdict = report["vae"], report.get("verdict") or {}
    lines = [f"Verdict: {verdict['line']}" if verdict else "Verdict: none",
             f"VAE {vae.get('path', '?')}: {vae.get('layout', '?')} layout, "
             f"{vae.get('latent_channels', '?')} latent channels, downscale {vae.get('downscale', '?')}"]
    for e in report["images"]:
        lines += image_summary(e)
    s = report["summary"]
    if verdict:
        lines.append(f"evidence: {verdict['evidence']}")
    lines.append(f"{_count(s['images'], 'image')}, {s['images_with_anomalies']} with anomalies "
                 f"({_count(s['anomalies'], 'cell')}), {_count(s['clamp_floor_cells'], 'clamp-floor cell')}")
    return "\n".join(lines)
