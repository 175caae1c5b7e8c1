"""Inspection nodes: read the raw posterior of any KL VAE the host loaded and draw it.

Inspect VAE: the black-hole detector (report, heatmap, overlay with the anomalous cells boxed).
Log-Variance Map: one map of the raw or clamped log-variance, or the KL per cell, any channel.
"""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..vae_fix import anomaly, posterior, report, viz
from ..vae_fix.errors import InputError
from . import host, wire

SIZE_POLICY_TIP = ("What to do when the image size is not a multiple of the VAE's downscale (8 for SD): "
                   "'crop' keeps the centre (as core's VAE Encode does), 'pad' repeats the edge so every pixel is seen.")
COLORMAP_TIP = "Colour scale: viridis/magma/inferno are perceptually uniform (dark = low); gray for plain intensity."
SHOW = {"lowest over channels": "min", "mean over channels": "mean", "every channel (grid)": "grid", "one channel": "one"}
VALUES = {"log-variance (raw)": "raw", "log-variance (clamped to -30..20)": "clamped", "KL per cell (nats)": "kl"}
LABELS = {"raw": "raw log-variance", "clamped": "clamped log-variance", "kl": "KL per cell (nats)"}
RANGES = ("percentile", "fixed")


def read_posterior(vae, image, size_policy: str) -> tuple[posterior.Posterior, torch.Tensor]:
    """The raw posterior of a ComfyUI IMAGE batch through the host's own VAE, image by image
    (progress and cancel after each). Returns it with the engine copy of the image `[B, 3, H, W]`."""
    x = wire.image_to_engine(image)
    post = posterior.read_posterior(host.codec(vae), x, size_policy=size_policy, batch_size=1,
                                    progress=host.progress_fn())
    return post, x


def _map_values(post: posterior.Posterior, value: str) -> torch.Tensor:
    """`[B, C, h, w]` (log-variance) or `[B, 1, h, w]` (KL) float32."""
    if value == "kl":
        return post.kl[:, None]
    return post.logvar_raw if value == "raw" else post.logvar


def _reduce(maps: torch.Tensor, show: str, channel: int) -> torch.Tensor:
    """`[B, C, h, w]` → `[B, h, w]` (min, mean, one channel) or `[B, C, h, w]` (grid)."""
    if show == "grid":
        return maps
    if show == "min":
        return maps.amin(dim=1)
    if show == "mean":
        return maps.mean(dim=1)
    if not 0 <= channel < maps.shape[1]:
        raise InputError("channel", f"{channel} but this map has {maps.shape[1]} channel(s)",
                                   f"0..{maps.shape[1] - 1}")
    return maps[:, channel]


def _value_range(values: torch.Tensor, mode: str, low: float, high: float) -> tuple[float, float]:
    if mode == "fixed":
        if not low < high:
            raise InputError("low/high", f"fixed range {low:g}..{high:g} is empty", "low < high")
        return float(low), float(high)
    if not 0 <= low < high <= 100:
        raise InputError("low/high", f"percentiles {low:g}..{high:g}", "0 <= low < high <= 100 in percentile mode")
    return viz.value_range(values, percentiles=(low, high))


class LogVarianceMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLogVarianceMap",
            display_name="Log-Variance Map",
            category="VAE Fix/inspect",
            is_output_node=True,  # shows its preview even when nothing is connected to it
            description=("Encodes the image with the VAE and draws its raw posterior log-variance (what core's VAE "
                         "Encode throws away), the clamped one, or the KL per latent cell, for the lowest/mean "
                         "channel, one channel or every channel. Works with any KL VAE (SD1.x/2.x, SDXL, SD3, Flux, "
                         "retrained)."),
            inputs=[
                io.Vae.Input("vae", tooltip="A KL VAE from Load VAE, Load VAE (strict) or a checkpoint loader."),
                io.Image.Input("image", tooltip="The image(s) to encode; every image of a batch gets its own map."),
                io.Combo.Input("value", options=list(VALUES), default="log-variance (raw)",
                               tooltip="Raw log-variance as the encoder outputs it (black holes go below -30), the "
                                       "clamped one the reference sampler uses, or the KL divergence per latent cell."),
                io.Combo.Input("show", options=list(SHOW), default="lowest over channels",
                               tooltip="Which channels: the lowest value over channels (shows black holes), the mean, "
                                       "every channel side by side, or the one chosen by 'channel'."),
                io.Int.Input("channel", default=0, min=0, max=255,
                             tooltip="Latent channel drawn when 'show' is 'one channel' (0-based; SD has 4, SD3/Flux 16)."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="magma", tooltip=COLORMAP_TIP),
                io.Combo.Input("range_mode", options=list(RANGES), default="percentile",
                               tooltip="'percentile': low/high are percentiles of the batch's values (robust to outliers); "
                                       "'fixed': low/high are the values at the ends of the colour scale."),
                io.Float.Input("low", default=1.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="Bottom of the colour scale: a percentile (0..100) or a value, per 'range_mode'."),
                io.Float.Input("high", default=99.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="Top of the colour scale: a percentile (0..100) or a value, per 'range_mode'."),
                io.Boolean.Input("colorbar", default=True, tooltip="Add a labelled colour bar on the right."),
                io.Combo.Input("size_policy", options=list(posterior.SIZE_POLICIES), default="crop", tooltip=SIZE_POLICY_TIP),
            ],
            outputs=[
                io.Image.Output("map", display_name="map",
                                tooltip="The map, one latent cell per downscale×downscale block (lines up with the processed image)."),
                io.String.Output("stats", display_name="stats",
                                 tooltip="JSON: colour range, per-image minimum/median/maximum, cells below the -30 clamp, "
                                         "size handling and tiling notes."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, value, show, channel, colormap, range_mode, low, high, colorbar, size_policy) -> io.NodeOutput:
        post, _ = read_posterior(vae, image, size_policy)
        maps = _reduce(_map_values(post, VALUES[value]), SHOW[show], channel)
        vmin, vmax = _value_range(maps, range_mode, low, high)
        cell = post.size.downscale
        label = LABELS[VALUES[value]]
        pictures = [_draw(m, colormap, vmin, vmax, cell, colorbar, label) for m in maps]
        out = wire.images_to_batch(pictures)
        stats = _stats(post, maps, vmin, vmax, value, show)
        return io.NodeOutput(out, json.dumps(stats, indent=2), ui=ui.PreviewImage(out, cls=cls))


def _draw(m: torch.Tensor, cmap: str, vmin: float, vmax: float, cell: int, bar: bool, label: str) -> torch.Tensor:
    if m.dim() == 3:  # every channel
        return viz.channel_grid(m, cmap, vmin, vmax, bar=bar, label=label)
    pic = viz.heatmap(m, cmap, vmin, vmax, scale=cell)
    return viz.with_colorbar(pic, cmap, vmin, vmax, label) if bar else pic


def _stats(post, maps: torch.Tensor, vmin: float, vmax: float, value: str, show: str) -> dict:
    per_image = []
    for i in range(post.batch):
        m = maps[i].float()
        below = int((post.logvar_raw[i] < posterior.LOGVAR_MIN).any(dim=0).sum())
        per_image.append({"min": float(m.min()), "median": float(m.median()), "max": float(m.max()),
                          "cells_below_clamp": below, "kl_total": float(post.kl_total[i])})
    return {"value": value, "show": show, "range": [vmin, vmax], "latent_channels": post.latent_channels,
            "latent_size": list(post.latent_size), "size": post.size.to_dict(),
            "tiling": post.tiling.to_dict() if post.tiling else None, "notes": list(post.notes), "images": per_image}


class InspectVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixInspectVAE",
            display_name="Inspect VAE (black holes)",
            category="VAE Fix/inspect",
            is_output_node=True,
            description=("Reads the VAE's full raw posterior on the image (mean and unclamped log-variance) and "
                         "finds anomalous latent cells: the SD-VAE 'black hole', a cell whose log-variance falls far "
                         "below the rest (often under the -30 clamp). Outputs the image with the map overlaid and "
                         "anomalies boxed, per-channel maps, a JSON report and a readable summary."),
            inputs=[
                io.Vae.Input("vae", tooltip="A KL VAE from Load VAE, Load VAE (strict) or a checkpoint loader."),
                io.Image.Input("image", tooltip="The image(s) to encode; each image of a batch is inspected on its own."),
                io.Float.Input("threshold", default=anomaly.DEFAULT_THRESHOLD, min=0.0, max=100.0, step=0.5,
                               tooltip="How far below the image's typical log-variance a cell must be, in robust "
                                       "standard deviations (median/MAD over the image's cells), to count as anomalous."),
                io.Float.Input("min_drop", default=anomaly.DEFAULT_MIN_DROP, min=0.0, max=100.0, step=0.5,
                               tooltip="...and at least this many nats below the median (3 nats = a variance 20x "
                                       "smaller); guards nearly constant maps."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="magma", tooltip=COLORMAP_TIP),
                io.Combo.Input("size_policy", options=list(posterior.SIZE_POLICIES), default="crop", tooltip=SIZE_POLICY_TIP),
            ],
            outputs=[
                io.Image.Output("overlay", display_name="overlay",
                                tooltip="The image (as encoded, enlarged when small) with the lowest raw log-variance "
                                        "per cell overlaid, anomalous cells boxed, and a colour bar."),
                io.Image.Output("channel_maps", display_name="channel maps",
                                tooltip="Raw log-variance of every latent channel side by side, one shared colour range."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON report (schema 1, as the CLI's report.json): per image the log-variance, "
                                         "mean and KL statistics, every anomalous cell with its score, clamp-floor hits, "
                                         "size handling and tiling notes."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="The report as a few readable lines per image."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, threshold, min_drop, colormap, size_policy) -> io.NodeOutput:
        post, x = read_posterior(vae, image, size_policy)
        encoded, _ = posterior.prepare_images(x, post.size.downscale, size_policy)
        entries, overlays, grids = [], [], []
        for i in range(post.batch):
            found = anomaly.find_anomalies(post, i, threshold=threshold, min_drop=min_drop)
            entries.append(report.image_entry(None, post, i, found))
            pics = report.report_pictures(encoded[i], post, i, found, cmap=colormap)
            overlays.append(pics["overlay"])
            grids.append(pics["logvar_grid"])
        settings = {"node": "VAEFixInspectVAE", "size_policy": size_policy, "threshold": threshold,
                    "min_drop": min_drop, "colormap": colormap}
        full = report.build_report(_vae_info(vae), entries, settings)
        overlay = wire.images_to_batch(overlays)
        return io.NodeOutput(overlay, wire.images_to_batch(grids), json.dumps(full, indent=2),
                             report.summary_text(full), ui=ui.PreviewImage(overlay, cls=cls))


def _vae_info(vae) -> dict:
    """The report's "vae" entry: a VAE input has no file path, so say what ComfyUI built."""
    return {"path": "from ComfyUI", "layout": type(vae.first_stage_model).__name__, **host.vae_summary(vae)}


NODES = [InspectVAE, LogVarianceMap]
