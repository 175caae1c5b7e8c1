"""Reach of latent cells, the two features: `reach_map` (every cell at once, fast first-order map)
and `cell_reach` (chosen cells, exact: one decode per cell). Each returns a `Result` that knows its
JSON (the node reports' keys), its summary and its pictures; the measures are in `reach_measure.py`.

A video latent `[B, C, T, h, w]` is folded into frames (`frames.fold`): `index` then counts frames
item by item, the chosen frame is decoded alone, and the report names its item and frame.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import viz
from .codec import Codec
from .errors import InputError
from .frames import fold
from .progress import ProgressFn, Steps
from .reach_measure import (MODES, CellReach, check_mode, exact_inputs, exact_reach, fast_reach_map, fit_window, fitted_from,  # noqa: F401
                            measure_cells, near_box, neighbour_median, perturbation, reach_to_map, summarize_map,
                            top_cells)  # the measures too, for the features that use them (repair, compare)
from .result import Result

FAST_METHOD = "first-order change of the far regions' mean colour (RMS, 0..1 image units)"


# ---------------------------------------------------------------- cells as text, rank agreement

_CELL_PAIR = re.compile(r"\(?\s*(-?\d+)\s*,\s*(-?\d+)\s*\)?")
CELLS_EXAMPLE = "'9,21' or '9,21; 3,4' (y,x latent cells, 0-based)"


def parse_cells(text: str | None, name: str = "cells") -> list[tuple[int, int]]:
    """'9,21; 3,4' (also '(9, 21) (3, 4)' or one pair per line) → [(9, 21), (3, 4)]; empty → []."""
    text = (text or "").strip()
    pairs = _CELL_PAIR.findall(text)
    if _CELL_PAIR.sub("", text).strip(" \t\r\n;,"):
        raise InputError(name, f"cannot read {text!r} as y,x pairs", CELLS_EXAMPLE)
    return [(int(y), int(x)) for y, x in pairs]


def read_cells(text: str | None, name: str = "cells", empty=None):
    """The `cells` of `cell_reach` as a user types them: 'all' → "all", blank → `empty`, else pairs."""
    if (text or "").strip().lower() == "all":
        return "all"
    return parse_cells(text, name) or empty


def format_cells(cells) -> str:
    return "; ".join(f"{y},{x}" for y, x in cells)


def agreement(reach: list[CellReach], fast_map: torch.Tensor) -> dict:
    """How the fast map ranks exactly measured cells (sorted by mean_far, largest first): same order?
    Spearman rank correlation."""
    exact_order = [(r.y, r.x) for r in reach]
    fast_order = sorted(exact_order, key=lambda c: -float(fast_map[c]))
    rank_fast = torch.tensor([fast_order.index(c) for c in exact_order], dtype=torch.float64)
    rho = torch.corrcoef(torch.stack([torch.arange(len(exact_order), dtype=torch.float64), rank_fast]))[0, 1]
    return {"same_order": exact_order == fast_order, "spearman": float(rho),
            "exact_order": exact_order, "fast_order": fast_order}


# ---------------------------------------------------------------- pictures

def _pixels(image: torch.Tensor) -> torch.Tensor:
    """Decoder output `[3, H, W]` in -1..1 → 0..1 (as VAE Decode shows it)."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)


def _drawn_map(values: torch.Tensor, cell: int, cmap: str, label: str) -> torch.Tensor:
    """`[h, w]` map → `[3, H, W']`: one cell per `cell` px block (small pictures enlarged), a colour bar.
    The scale runs from 0 (no change) to the largest value, so a standout cell shows as one. No boxes:
    on small cells they would hide the values."""
    vmin, vmax = viz.value_range(values, vmin=0.0, percentiles=(0.0, 100.0))
    zoom = viz.zoom_for(values.shape[0] * cell, values.shape[1] * cell)
    return viz.with_colorbar(viz.heatmap(values, cmap, vmin, vmax, scale=cell * zoom), cmap, vmin, vmax, label)


def _difference(change: torch.Tensor, cell: tuple[int, int], size: int, cmap: str) -> torch.Tensor:
    """`[H, W]` |change| (0..1) → `[3, H', W']` heatmap with `cell` boxed and a colour bar."""
    vmin, vmax = viz.value_range(change, vmin=0.0, percentiles=(0.0, 100.0))
    zoom = viz.zoom_for(*change.shape)
    pic = viz.mark_cells(viz.heatmap(change, cmap, vmin, vmax, scale=zoom), [cell], size, zoom=zoom)
    return viz.with_colorbar(pic, cmap, vmin, vmax, "|change|")


# ---------------------------------------------------------------- results

@dataclass
class ReachMapResult(Result):
    reach: torch.Tensor    # [h, w] fast reach of every cell (0..1 image units)
    image: torch.Tensor    # [3, H, W] the decoded latent in 0..1, as VAE Decode shows it
    settings: dict         # mode, factor (scale only), window, blocks, index
    passes: int            # backward passes run
    downscale: int
    top: int = 5
    cmap: str = "inferno"
    values_in_json: bool = False  # also list every cell's value (`map`): the CLI does, the node not
    vae: dict = field(default_factory=dict)
    json_name = "reach_map"

    @property
    def top_cells(self) -> list[tuple[int, int]]:
        return top_cells(self.reach, self.top)

    @property
    def top_cells_text(self) -> str:
        """The top cells as 'y,x; y,x', what Latent Cell Reach's `top_cells` and `--cells` read."""
        return format_cells(self.top_cells)

    def to_json(self) -> dict:
        data = dict(summarize_map(self.reach, self.top), method=FAST_METHOD, **self.settings,
                    backward_passes=self.passes, latent_size=list(self.reach.shape), downscale=self.downscale,
                    vae=self.vae)
        return dict(data, map=self.reach) if self.values_in_json else data

    def headline(self) -> str:
        s = summarize_map(self.reach, 1)
        ratio = f" ({s['max_over_median']:.0f}x)" if s["max_over_median"] else ""
        (y, x), (h, w) = self.top_cells[0], self.reach.shape
        where = (f" (item {self.settings['item']}, frame {self.settings['frame']} of a video latent, decoded alone)"
                 if "video" in self.settings else "")
        fitted = self.settings.get("fitted_from")
        note = (f"; window {fitted['window']} and {fitted['blocks']}x{fitted['blocks']} regions do not fit, used "
                f"window {self.settings['window']}, {self.settings['blocks']}x{self.settings['blocks']}") if fitted else ""
        return (f"reach map of a {h}x{w} latent{where} ({self.passes} backward passes): strongest cell {y},{x} = "
                f"{s['max']:.3g}, median {s['median']:.3g}{ratio}{note}")

    def summary(self) -> str:
        median = summarize_map(self.reach, 1)["median"]
        rows = [f"  cell {y},{x}: {float(self.reach[y, x]):.4g}"
                + (f" ({float(self.reach[y, x]) / median:.1f}x the median)" if median > 0 else "")
                for y, x in self.top_cells]
        return "\n".join([self.headline(), *rows])

    def pictures(self) -> dict:
        over = viz.overlay(self.image, self.reach, 0.5, self.cmap, self.top_cells, self.downscale, vmin=0.0,
                           percentiles=(0.0, 100.0), zoom=viz.zoom_for(*self.image.shape[1:]))
        return {"map": _drawn_map(self.reach, self.downscale, self.cmap, "far change (RMS)"), "overlay": over}


@dataclass
class CellReachResult(Result):
    cells: list[CellReach]    # largest mean far change first
    change: torch.Tensor      # [H, W] |change| of the shown picture (clamped, 0..1) when only cells[0] changes
    latent_size: tuple[int, int]
    downscale: int
    settings: dict            # mode, factor (scale only), window, index
    selection: str            # "given", "all" or "reach map top N"
    cmap: str = "inferno"
    fast: Optional[ReachMapResult] = None  # the reach map the cells came from, if any
    vae: dict = field(default_factory=dict)
    json_name = "cell_reach"

    def agreement(self) -> Optional[dict]:
        return agreement(self.cells, self.fast.reach) if self.fast is not None and len(self.cells) > 1 else None

    def to_json(self) -> dict:
        data = dict(self.settings, latent_size=list(self.latent_size), downscale=self.downscale,
                    units="0..1 image units", selection=self.selection, decodes=len(self.cells) + 1,
                    cells=[r.to_dict() for r in self.cells], vae=self.vae)
        if self.fast is not None:
            data.update(reach_map=self.fast.to_json(), agreement=self.agreement())
        return data

    def summary(self) -> str:
        h, w = self.latent_size
        lines = [self.fast.headline()] if self.fast is not None else []
        where = (f" (item {self.settings['item']}, frame {self.settings['frame']} of a video latent, decoded alone)"
                 if "video" in self.settings else "")
        lines.append(f"exact reach of {len(self.cells)} cells ({self.selection}) of a {h}x{w} latent{where}, "
                     f"{len(self.cells) + 1} decodes; largest far change first:")
        lines += [f"  cell ({r.y:3d},{r.x:3d}): mean |change| far {r.mean_far:.4f}, near {r.mean_near:.4f}, "
                  f"ratio {r.ratio:.3f}, max far {r.max_far:.4f}" for r in self.cells[:8]]
        if (a := self.agreement()) is not None:
            lines.append(f"fast map vs exact on these cells: rank correlation {a['spearman']:.2f}"
                         + (", same order" if a["same_order"] else ""))
        return "\n".join(lines)

    def pictures(self) -> dict:
        grid = reach_to_map(self.cells, *self.latent_size, "mean_far")
        worst = (self.cells[0].y, self.cells[0].x)
        return {"map": _drawn_map(grid, self.downscale, self.cmap, "mean far change"),
                "difference": _difference(self.change, worst, self.downscale, self.cmap)}


# ---------------------------------------------------------------- the features

def _check_top(top) -> None:
    if not isinstance(top, int) or top < 1:
        raise InputError("top", f"{top!r}", "a number of cells >= 1")


def reach_map(codec: Codec, z: torch.Tensor, *, mode: str = "median", factor: float = 2.0, window: int = 3,
              blocks: int = 3, top: int = 5, index: int = 0, cmap: str = "inferno", values_in_json: bool = False,
              progress: Optional[ProgressFn] = None) -> ReachMapResult:
    """Fast reach of every cell of latent `index` of `z [B, C, h, w]` (a video latent: of frame
    `index`, counted item by item): one decode and blocks² backward passes through the codec's
    decoder (`fast_reach_map`); the `top` strongest cells are boxed and listed."""
    _check_top(top)
    viz.colormap_lut(cmap)  # an unknown colormap is refused before the work, not after
    frames, layout = fold(z)
    video = layout.decoded_settings(layout.frame_index(index)) if layout.video else {}
    fast = fast_reach_map(codec.need_decoder(grad=True), frames, mode=mode, factor=factor, window=window,
                          blocks=blocks, index=index, fit=True, progress=progress)
    settings = {"mode": mode, "factor": factor if mode == "scale" else None, "window": fast.window,
                "blocks": fast.blocks, "index": index, **fitted_from(fast, window, blocks), **video}  # says what it shrank
    return ReachMapResult(fast.reach, _pixels(fast.image[0]), settings, fast.passes, fast.downscale, top, cmap,
                          values_in_json, dict(codec.info))


@torch.no_grad()
def cost_text(z: torch.Tensor, cells=None, *, top: int = 8, blocks: int = 3) -> str:
    """What `cell_reach` will cost, said before it starts: decodes (and the reach map's backward passes)."""
    h, w = fold(z)[0].shape[-2:]
    if cells is None:
        n = min(top, h * w)
        return (f"the reach map's {n} strongest cells: 1 decode and {blocks * blocks} backward passes for the map, "
                f"then {n + 1} decodes")
    n = h * w if cells == "all" else len(cells)
    what = f"all {n} cells of the {h}x{w} latent" if cells == "all" else f"{n} chosen cells"
    return f"{what}: {n + 1} decodes (one per cell, one of the latent itself)"


def cell_reach(codec: Codec, z: torch.Tensor, cells=None, *, mode: str = "median", factor: float = 2.0,
               window: int = 3, blocks: int = 3, index: int = 0, batch_size: int = 4, top: int = 8,
               cmap: str = "inferno", progress: Optional[ProgressFn] = None) -> CellReachResult:
    """Exact reach of chosen cells of latent `index` of `z [B, C, h, w]` (a video latent: of frame
    `index`, counted item by item, decoded alone), one decode per cell (plus one).

    `cells`: a list of (y, x); "all": every cell (h·w decodes); None: the `top` cells of the reach map
    (blocks² backward passes first, then `top` decodes). `blocks` sets the regions of `region_far`.
    """
    check_mode(mode, factor)
    viz.colormap_lut(cmap)
    frames, layout = fold(z)
    video = layout.decoded_settings(layout.frame_index(index)) if layout.video else {}
    asked, window = window, fit_window(window, *frames.shape[-2:])  # a small latent shrinks it, and says so
    fast, selection = None, "all" if isinstance(cells, str) and cells == "all" else "given"
    if cells is None:  # progress: the reach map's backward passes, then one step per measured cell
        _check_top(top)
        passes, count = blocks * blocks, min(top, frames[0, 0].numel())
        steps = Steps(progress, passes + count)
        fast = reach_map(codec, z, mode=mode, factor=factor, window=window, blocks=blocks, top=top, index=index,
                         cmap=cmap, progress=steps.sub(passes))
        steps.step(passes)
        cells, selection, progress = fast.top_cells, f"reach map top {count}", steps.sub(count)
    z1, cells, delta = exact_inputs(frames, None if selection == "all" else cells, mode, factor, window, index,
                                    batch_size, None)
    if not cells:
        raise InputError("cells", "no cell given", f"{CELLS_EXAMPLE}, 'all', or none for the reach map's top cells")
    reach, base, changed = measure_cells(codec.need_decoder(), z1, cells, delta, None, window, blocks,
                                         batch_size, progress)
    reach.sort(key=lambda r: r.mean_far, reverse=True)
    change = ((changed.clamp(-1, 1) - base[0].clamp(-1, 1)).abs() / 2).mean(0).cpu()  # as VAE Decode shows it
    settings = {"mode": mode, "factor": factor if mode == "scale" else None, "window": window, "index": index, **video}
    if window != asked:
        settings["window_fitted_from"] = asked
    return CellReachResult(reach, change, tuple(z1.shape[-2:]), base.shape[-2] // z1.shape[-2], settings,
                           selection, cmap, fast, dict(codec.info))
