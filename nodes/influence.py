"""Reach of latent cells: how much of the decoded image far away from a cell changes when that one
cell changes (the SD-VAE "smuggling" test).

Latent Reach Map: every cell at once, a first-order estimate from one decode and a few backward
passes through the host's own decoder. Latent Cell Reach: the exact measure for chosen cells, one
decode per cell. Units: change in 0..1 image units; near field = `window` cells around the cell.
"""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..vae_fix import influence, viz
from ..vae_fix.jsonsafe import json_safe
from . import host, wire

MODE_TIP = ("How each cell is changed: 'median' replaces it by the median of its 8 neighbours (removes a spike: "
            "the question 'what does this cell carry that its neighbours do not'), 'zero' sets it to 0, "
            "'scale' multiplies it by 'factor'.")
FACTOR_TIP = "Only for mode 'scale': the cell is multiplied by this (e.g. 2 or 0.5; 1 changes nothing)."
WINDOW_TIP = ("Near field, in latent cells around the cell (3: a 7x7-cell box, 56 px for SD). Changes inside it "
              "are expected; the reach is what changes outside it.")
INDEX_TIP = "Which latent of the batch to measure (0-based)."
MIN_PICTURE = 256  # px: smaller maps are enlarged (nearest) to about this
CELLS_EXAMPLE = "'9,21' or '9,21; 3,4' (y,x latent cells, 0-based), empty for every cell"


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """Decoder output `[3, H, W]` in -1..1 → 0..1 (as VAE Decode shows it)."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)


def zoom_for(height: int, width: int) -> int:
    """Whole-number enlargement that brings small pictures to about 256 px, so boxes and cells stay visible."""
    return max(1, round(MIN_PICTURE / max(height, width)))


def _drawn_map(values: torch.Tensor, cell: int, cmap: str, label: str) -> torch.Tensor:
    """`[h, w]` map → `[3, H, W']`: one cell per `cell` px block (times the zoom), a colour bar on the right.
    The scale runs from 0 (no change) to the largest value, so a standout cell shows as one. No boxes:
    on small cells they would hide the values (the overlay boxes the cells)."""
    vmin, vmax = viz.value_range(values, vmin=0.0, percentiles=(0.0, 100.0))
    zoom = zoom_for(values.shape[0] * cell, values.shape[1] * cell)
    return viz.with_colorbar(viz.heatmap(values, cmap, vmin, vmax, scale=cell * zoom), cmap, vmin, vmax, label)


class LatentReachMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentReachMap",
            display_name="Latent Reach Map",
            category="VAE Fix/reach",
            description=("For every latent cell at once: how much the decoded image changes far away from that cell "
                         "when the cell changes. A healthy decoder is local (small, even map); a cell that smuggles "
                         "global information stands out. Fast first-order estimate (one decode plus blocks x blocks "
                         "backward passes, whatever the size); check the top cells exactly with Latent Cell Reach."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder is tested (KL VAEs of any family, or TAESD)."),
                io.Latent.Input("latent", tooltip="The latent to test, e.g. from VAE Encode or a sampler."),
                io.Combo.Input("mode", options=list(influence.MODES), default="median", tooltip=MODE_TIP),
                io.Float.Input("factor", default=2.0, min=-100.0, max=100.0, step=0.1, tooltip=FACTOR_TIP),
                io.Int.Input("window", default=3, min=0, max=64, tooltip=WINDOW_TIP),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TIP),
                io.Int.Input("blocks", default=3, min=2, max=16,
                             tooltip="The far field is measured as the mean colour of blocks x blocks regions: one backward "
                                     "pass each. More regions see finer far changes but need a smaller window "
                                     "(blocks x (2 x window + 1) cells must fit the latent)."),
                io.Int.Input("top", default=5, min=1, max=64, tooltip="How many of the strongest cells to box and list."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="inferno",
                               tooltip="Colour scale of the map (dark = no reach)."),
            ],
            outputs=[
                io.Image.Output("map", display_name="map",
                                tooltip="The reach of every cell (RMS change of the far field, 0..1 units), one block per latent "
                                        "cell so it lines up with the decoded image (small ones enlarged)."),
                io.Image.Output("overlay", display_name="overlay",
                                tooltip="The decoded latent with the map blended over it and the top cells boxed."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON: the top cells with their values, the median, how far the worst stands above "
                                         "it (max_over_median), and the settings."),
                io.String.Output("top_cells", display_name="top_cells",
                                 tooltip="The top cells as 'y,x; y,x' text: connect it to Latent Cell Reach's 'top_cells' to "
                                         "measure them exactly."),
            ],
        )

    @classmethod
    def execute(cls, vae, latent, mode, factor, window, index, blocks, top, colormap) -> io.NodeOutput:
        z = wire.latent_samples(latent)
        decode = host.decode_fn(vae, differentiable=True)
        fast = influence.fast_reach_map(decode, z, mode=mode, factor=factor, window=window, blocks=blocks,
                                        index=index, progress=host.progress_fn())
        summary = influence.summarize_map(fast.reach, top)
        marks = [(c["y"], c["x"]) for c in summary["top_cells"]]
        cell = fast.downscale
        picture = wire.engine_to_image(_drawn_map(fast.reach, cell, colormap, "far change (RMS)"))
        decoded = _pixels(fast.image[0])
        over = wire.engine_to_image(viz.overlay(decoded, fast.reach, 0.5, colormap, marks, cell, vmin=0.0,
                                                   percentiles=(0.0, 100.0), zoom=zoom_for(*decoded.shape[1:])))
        report = dict(summary, method="first-order change of the far regions' mean colour (RMS, 0..1 image units)",
                      mode=mode, factor=factor if mode == "scale" else None, window=window, blocks=blocks, index=index,
                      backward_passes=fast.passes, latent_size=list(fast.reach.shape), downscale=cell)
        return io.NodeOutput(picture, over, json.dumps(json_safe(report), indent=2), influence.format_cells(marks),
                             ui=ui.PreviewImage(picture, cls=cls))


class LatentCellReach(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentCellReach",
            display_name="Latent Cell Reach (exact)",
            category="VAE Fix/reach",
            description=("Changes chosen latent cells one at a time, decodes each change and measures how much of the "
                         "image changes outside the cell's near window, against inside it. Exact, one decode per cell: "
                         "use it on the few cells Latent Reach Map points at (or on every cell of a small latent)."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder is tested (KL VAEs of any family, or TAESD)."),
                io.Latent.Input("latent", tooltip="The latent to test, e.g. from VAE Encode or a sampler."),
                io.String.Input("cells", default="", tooltip=f"Cells to measure: {CELLS_EXAMPLE}."),
                io.Combo.Input("mode", options=list(influence.MODES), default="median", tooltip=MODE_TIP),
                io.Float.Input("factor", default=2.0, min=-100.0, max=100.0, step=0.1, tooltip=FACTOR_TIP),
                io.Int.Input("window", default=3, min=0, max=64, tooltip=WINDOW_TIP),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TIP),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Changed latents decoded together: more is faster, needs more memory."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="inferno",
                               tooltip="Colour scale of the pictures (dark = no change)."),
                io.String.Input("top_cells", optional=True, force_input=True,
                                tooltip="Optional: connect Latent Reach Map's top_cells here to measure those cells; "
                                        "when connected, 'cells' is ignored."),
            ],
            outputs=[
                io.Image.Output("map", display_name="map",
                                tooltip="Mean far change of each measured cell on the latent grid (grey: not measured)."),
                io.Image.Output("difference", display_name="difference",
                                tooltip="For the cell with the largest far change: |change| of every pixel of the decoded "
                                        "picture (as VAE Decode shows it, 0..1) when only that cell changes; the cell boxed."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON per cell: mean change far and near (0..1 units), their ratio, the largest and "
                                         "the RMS far change, the far regions' mean-colour change (what the reach map "
                                         "estimates); sorted by mean far change, largest first."),
            ],
        )

    @classmethod
    def execute(cls, vae, latent, cells, mode, factor, window, index, batch_size, colormap,
                top_cells=None) -> io.NodeOutput:
        z = wire.latent_samples(latent)
        chosen = (influence.parse_cells(cells) if top_cells is None else influence.parse_cells(top_cells, "top_cells")) or None
        decode = host.decode_fn(vae)
        reach = influence.exact_reach(decode, z, chosen, mode=mode, factor=factor, window=window, index=index,
                                      batch_size=batch_size, progress=host.progress_fn())
        reach.sort(key=lambda r: r.mean_far, reverse=True)
        z1 = z[index:index + 1]
        base = decode(z1)  # once more, for the difference picture (the engine keeps its own)
        h, w = z.shape[-2:]
        cell = base.shape[-2] // h
        grid = influence.reach_to_map(reach, h, w, "mean_far")
        picture = _drawn_map(grid, cell, colormap, "mean far change")
        worst = (reach[0].y, reach[0].x)
        difference = _difference(decode, z1, base, worst, mode, factor, cell, colormap)
        report = {"mode": mode, "factor": factor if mode == "scale" else None, "window": window, "index": index,
                  "latent_size": [h, w], "downscale": cell, "units": "0..1 image units",
                  "cells": [r.to_dict() for r in reach]}
        out = wire.engine_to_image(picture)
        return io.NodeOutput(out, wire.engine_to_image(difference), json.dumps(json_safe(report), indent=2),
                             ui=ui.PreviewImage(out, cls=cls))


def _difference(decode, z1: torch.Tensor, base: torch.Tensor, cell, mode: str, factor: float, size: int,
                cmap: str) -> torch.Tensor:
    """|change| `[3, H, W']` of the picture VAE Decode would show (clamped) when only `cell` gets the
    engine's perturbation."""
    y, x = cell
    changed = z1.clone()
    changed[:, :, y, x] += influence.perturbation(z1, mode, factor)[:, :, y, x].to(z1.dtype)
    shown = [img.clamp(-1, 1) for img in (decode(changed), base)]
    delta = ((shown[0] - shown[1]).abs() / 2).mean(1)[0].cpu()  # /2: -1..1 → 0..1 units
    vmin, vmax = viz.value_range(delta, vmin=0.0, percentiles=(0.0, 100.0))
    zoom = zoom_for(*delta.shape)
    pic = viz.mark_cells(viz.heatmap(delta, cmap, vmin, vmax, scale=zoom), [cell], size, zoom=zoom)
    return viz.with_colorbar(pic, cmap, vmin, vmax, "|change|")


NODES = [LatentReachMap, LatentCellReach]
