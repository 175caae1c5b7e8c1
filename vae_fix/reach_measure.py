"""Reach of latent cells: how much of the decoded image *outside* a cell's own neighbourhood changes
when that cell changes: the two measures behind the features of `reach.py`.

Perturbations (per cell, all channels at once):
  median  the cell becomes the per-channel median of its 8 neighbours (removes a spike),
  zero    the cell becomes 0,
  scale   the cell is multiplied by `factor`.
Near field: the pixels within `window` cells of the cell (a box of (2·window+1)·downscale px, cut
by the image border). Far field: every other pixel. Changes are in 0..1 image units.

`exact_reach` decodes one perturbed latent per cell (batched) and reports, per cell, mean |Δ| far
and near, their ratio, the largest far change, the RMS far change, and the far *block-mean* change
that the fast map estimates.

`fast_reach_map` gives every cell's far-field change at once from one forward and `blocks²` backward
passes through the decoder, whatever the number of cells. The image is cut into blocks × blocks
regions. For each region R, one backward pass of the region's mean colour, d mean_R / dz, gives for
every cell i the first-order change of that mean, g_R,i · δ_i (δ_i: the cell's perturbation). A
cell's fast reach is the RMS of these changes over the regions its window does not touch. This is
deterministic (no random probes: random-sign Hutchinson probes, tried first, scattered by 5x between
seeds because a spike's far change concentrates in a few places, such as other spikes' halos) and
exact to first order for what it measures: the change of the far regions' mean colour, which is how
normalisation and attention carry a cell's influence across the image. Changes that average out
inside a region are not seen, and strongly non-linear cells are under- or over-estimated; the
exact measure is the reference and ranks cells the same way on the project's tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .edit import check_latent
from .errors import InputError
from .progress import ProgressFn, Steps

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
MODES = ("median", "zero", "scale")


# ---------------------------------------------------------------- perturbations

def neighbour_median(z: torch.Tensor, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per cell and channel, the median of its up-to-8 neighbours `[B, C, h, w]`.

    Cells outside the grid and cells flagged in `exclude` (`[B, h, w]` bool) are left out; a cell
    with no usable neighbour gets NaN.
    """
    b, c, h, w = z.shape
    zf = z.detach().float()
    if exclude is not None:
        zf = zf.masked_fill(exclude[:, None].to(zf.device), float("nan"))
    padded = F.pad(zf, (1, 1, 1, 1), value=float("nan"))
    patches = F.unfold(padded, 3).view(b, c, 9, h, w)
    neighbours = torch.cat([patches[:, :, :4], patches[:, :, 5:]], dim=2)
    return neighbours.nanmedian(dim=2).values


def perturbation(z: torch.Tensor, mode: str = "median", factor: float = 2.0) -> torch.Tensor:
    """δ `[B, C, h, w]`: what each cell's perturbation adds to it (float32)."""
    check_mode(mode, factor)
    zf = z.detach().float()
    if mode == "median":
        return neighbour_median(zf) - zf
    if mode == "zero":
        return -zf
    return zf * (factor - 1.0)


def check_mode(mode: str, factor: float) -> None:
    if mode not in MODES:
        raise InputError("mode", f"unknown perturbation {mode!r}", f"one of {', '.join(MODES)}")
    if mode == "scale" and factor == 1.0:
        raise InputError("factor", "scaling by 1 changes nothing", "a factor other than 1, e.g. 2 or 0.5")


def _check_window(window: int, h: int, w: int) -> None:
    if not isinstance(window, int) or window < 0:
        raise InputError("window", f"{window!r}", "a whole number of latent cells >= 0")
    if 2 * window + 1 >= max(h, w):
        expected = (f"a window of at most {(max(h, w) - 2) // 2} cells" if max(h, w) > 1
                    else "a latent of at least 2 cells (this one is a single cell: nothing is far from it)")
        raise InputError("window", f"{window} cells leaves no far field on a {h}x{w} latent", expected)


def _pick(z: torch.Tensor, index: int) -> torch.Tensor:
    check_latent(z)
    if not 0 <= index < z.shape[0]:
        raise InputError("index", f"{index} is outside the batch of {z.shape[0]}", f"0..{z.shape[0] - 1}")
    return z[index:index + 1].detach()


def near_box(y: int, x: int, window: int, downscale: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box (top, bottom, left, right; end-exclusive) of cell (y, x)'s near field."""
    H, W = size
    return (max(0, (y - window) * downscale), min(H, (y + window + 1) * downscale),
            max(0, (x - window) * downscale), min(W, (x + window + 1) * downscale))


# ---------------------------------------------------------------- exact measure

@dataclass(frozen=True)
class CellReach:
    y: int
    x: int
    mean_far: float   # mean |Δ| outside the window (0..1 image units)
    mean_near: float  # mean |Δ| inside the window
    ratio: float      # mean_far / mean_near (0 when nothing changed)
    max_far: float    # largest |Δ| outside the window
    rms_far: float    # RMS of Δ outside the window, per pixel and channel
    region_far: float  # RMS change of far regions' mean colour (what the fast map estimates)

    def to_dict(self) -> dict:
        return asdict(self)


def _cell_reach(delta: torch.Tensor, y: int, x: int, window: int, downscale: int, blocks: int,
                grid: tuple[int, int]) -> CellReach:
    """delta: `[3, H, W]` image change in 0..1 units; grid: the latent's (h, w)."""
    absd = delta.abs().mean(0)
    t, b, l, r = near_box(y, x, window, downscale, absd.shape)
    far = torch.ones_like(absd, dtype=torch.bool)
    far[t:b, l:r] = False
    near_mean = float(absd[t:b, l:r].mean())
    far_vals = absd[far]
    far_mean = float(far_vals.mean())
    rms = float(delta.pow(2).mean(0)[far].mean().sqrt())
    ratio = far_mean / near_mean if near_mean > 0 else 0.0
    region = float(far_region_means(delta, y, x, window, downscale, blocks, *grid))
    return CellReach(y, x, far_mean, near_mean, ratio, float(far_vals.max()), rms, region)


def _check_cells(cells, h: int, w: int) -> list[tuple[int, int]]:
    if cells is None:
        return [(y, x) for y in range(h) for x in range(w)]
    out = []
    for cell in cells:
        try:
            y, x = (int(v) for v in cell)
        except (TypeError, ValueError):
            raise InputError("cells", f"{cell!r} is not a (y, x) pair", "pairs of latent cell indices") from None
        if not (0 <= y < h and 0 <= x < w):
            raise InputError("cells", f"cell ({y}, {x}) is outside the {h}x{w} latent",
                             f"y in 0..{h - 1} and x in 0..{w - 1}")
        out.append((y, x))
    return out


def exact_inputs(z, cells, mode, factor, window, index, batch_size, delta):
    """Checked (latent `[1, C, h, w]`, cells, per-cell change `[1, C, h, w]`) of the exact measure."""
    check_mode(mode, factor)
    z1 = _pick(z, index)
    _check_window(window, *z1.shape[-2:])
    cells = _check_cells(cells, *z1.shape[-2:])
    if batch_size < 1:
        raise InputError("batch_size", f"{batch_size}", "at least 1")
    if delta is None:
        delta = perturbation(z1, mode, factor)
    elif tuple(delta.shape) != tuple(z1.shape):
        raise InputError("delta", f"shape {list(delta.shape)}", f"one latent's shape {list(z1.shape)}")
    return z1, cells, delta.to(device=z1.device, dtype=z1.dtype)


def measure_cells(decode_fn: DecodeFn, z1, cells, delta, base, window, blocks, batch_size, progress):
    """(reach per cell, base image `[1, 3, H, W]` -1..1, decoded image `[3, H, W]` of the cell that
    changed the far field most): the decodes themselves, so pictures need no second decode."""
    h, w = z1.shape[-2:]
    base = (decode_fn(z1) if base is None else base).float()
    downscale = base.shape[-2] // h
    out, worst = [], (-1.0, None)
    steps = Steps(progress, len(cells))
    for start in range(0, len(cells), batch_size):
        chunk = cells[start:start + batch_size]
        batch = z1.repeat(len(chunk), 1, 1, 1)
        for i, (y, x) in enumerate(chunk):
            batch[i, :, y, x] += delta[0, :, y, x]
        images = decode_fn(batch).float()
        for i, (y, x) in enumerate(chunk):
            out.append(_cell_reach((images[i] - base[0]) / 2, y, x, window, downscale, blocks, (h, w)))
            if out[-1].mean_far > worst[0]:
                worst = (out[-1].mean_far, images[i].clone())
        steps.step(len(chunk))
    return out, base, worst[1]


@torch.no_grad()
def exact_reach(decode_fn: DecodeFn, z: torch.Tensor, cells=None, *, mode: str = "median",
                factor: float = 2.0, window: int = 3, blocks: int = 3, index: int = 0, batch_size: int = 4,
                progress: Optional[ProgressFn] = None, base: Optional[torch.Tensor] = None,
                delta: Optional[torch.Tensor] = None) -> list[CellReach]:
    """Perturb each chosen cell (default: all) of latent `index` of `z [B, C, h, w]` and decode.

    `base` may pass the already decoded unperturbed image `[1, 3, H, W]` (-1..1) to save a decode.
    `delta` (`[1, C, h, w]`, optional) is added to each cell instead of the `mode`'s perturbation.
    `blocks` only sets the regions of `region_far` (as in `fast_reach_map`).
    Progress counts decoded cells; the callback may raise to cancel.
    """
    z1, cells, delta = exact_inputs(z, cells, mode, factor, window, index, batch_size, delta)
    return measure_cells(decode_fn, z1, cells, delta, base, window, blocks, batch_size, progress)[0]


def reach_to_map(reach: list[CellReach], h: int, w: int, key: str = "mean_far") -> torch.Tensor:
    """Exact results → `[h, w]` map of one field; cells not measured are NaN."""
    grid = torch.full((h, w), float("nan"))
    for r in reach:
        grid[r.y, r.x] = getattr(r, key)
    return grid


# ---------------------------------------------------------------- fast map

@dataclass
class FastReach:
    reach: torch.Tensor        # [h, w] RMS first-order change of far regions' mean colour (0..1 units)
    image: torch.Tensor        # [1, 3, H, W] the decoded latent, -1..1
    delta: torch.Tensor        # [1, C, h, w] the perturbation used
    window: int
    downscale: int
    passes: int                # backward passes run
    blocks: int = 3            # regions per side used (fewer than asked when `fit` shrank them)


def region_edges(n: int, blocks: int) -> list[tuple[int, int]]:
    """Split n cells into `blocks` nearly equal runs: [(start, end), ...]."""
    cuts = [round(i * n / blocks) for i in range(blocks + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _touches(edges: list[tuple[int, int]], n: int, window: int) -> torch.Tensor:
    """`[len(edges), n]` bool: does cell i's window (along one axis) reach run r."""
    idx = torch.arange(n)
    return torch.stack([(a <= idx + window) & (b - 1 >= idx - window) for a, b in edges])


def _check_blocks(blocks: int, window: int, h: int, w: int) -> None:
    if not isinstance(blocks, int) or blocks < 2:
        raise InputError("blocks", f"{blocks!r}", "a whole number of regions per side >= 2")
    if min(h, w) < blocks * (2 * window + 1):
        raise InputError("window", f"{window} cells with {blocks}x{blocks} regions does not fit a {h}x{w} latent "
                         "(some cells would touch every region)",
                         f"a window of at most {(min(h, w) // blocks - 1) // 2} cells, or fewer regions")


def fit_grid(window: int, blocks: int, h: int, w: int) -> tuple[int, int]:
    """(window, blocks) that fit an `h x w` latent, so that a small latent gets a map, not a refusal:
    a smaller window first (down to 1), then fewer regions (down to 2), then window 0. The 16x16
    latent of a 128 px image gets window 2 with 3x3 regions, the 8x8 of a 64 px one window 1 with 2x2,
    the 2x2 of a 32x VAE window 0 with 2x2. Values that fit come back unchanged; nonsense (negative,
    not whole) is left for the checks to refuse. With 2 regions, cells whose window touches every
    region have no far field to measure: their value is NaN (listed last, never a top cell)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (window, blocks)) or window < 0 or blocks < 2:
        return window, blocks
    fits = lambda: min(h, w) >= blocks * (2 * window + 1) and 2 * window + 1 < max(h, w)  # noqa: E731
    while window > 1 and not fits():
        window -= 1
    while blocks > 2 and not fits():
        blocks -= 1
    while window > 0 and not fits():
        window -= 1
    return window, blocks


def fit_window(window: int, h: int, w: int) -> int:
    """The near-field window, shrunk until something lies beyond it on an `h x w` latent (exact
    measures have no regions to fit); nonsense (negative, not whole) is left for the checks."""
    if isinstance(window, int) and not isinstance(window, bool) and window > 0:
        while window > 0 and 2 * window + 1 >= max(h, w):
            window -= 1
    return window


def fitted_from(fast: FastReach, window: int, blocks: int = 3) -> dict:
    """{"fitted_from": what was asked} when `fast_reach_map(fit=True)` used a smaller grid, else {}."""
    return {"fitted_from": {"window": window, "blocks": blocks}} if (fast.window, fast.blocks) != (window, blocks) else {}


def far_region_means(delta: torch.Tensor, y: int, x: int, window: int, downscale: int,
                     blocks: int, h: int, w: int) -> torch.Tensor:
    """RMS over the far regions of the mean change (over pixels and RGB) of each region.

    delta: `[3, H, W]` image change. The quantity `fast_reach_map` estimates, measured exactly.
    """
    rows, cols = region_edges(h, blocks), region_edges(w, blocks)
    near_r, near_c = _touches(rows, h, window)[:, y], _touches(cols, w, window)[:, x]
    means = [delta[:, a * downscale:b * downscale, c * downscale:d * downscale].mean()
             for i, (a, b) in enumerate(rows) for j, (c, d) in enumerate(cols) if not (near_r[i] and near_c[j])]
    return torch.stack(means).pow(2).mean().sqrt() if means else torch.tensor(float("nan"))


def fast_reach_map(decode_fn: DecodeFn, z: torch.Tensor, *, mode: str = "median", factor: float = 2.0,
                   window: int = 3, blocks: int = 3, index: int = 0, fit: bool = False,
                   progress: Optional[ProgressFn] = None) -> FastReach:
    """First-order far-field change of every cell of latent `index` (see the module notes).
    `fit`: shrink a window and grid that do not fit this latent (`fit_grid`; the result's `window`
    and `blocks` say what was used) instead of refusing them.

    `decode_fn` must let gradients flow back to `z`. Runs with gradients even inside
    `torch.inference_mode()` (on a clone of the latent); the model's parameters get no gradients.
    Progress counts backward passes; the callback may raise to cancel.
    """
    check_mode(mode, factor)
    z1 = _pick(z, index)
    _, c, h, w = z1.shape
    if fit:
        window, blocks = fit_grid(window, blocks, h, w)
    _check_window(window, h, w)
    _check_blocks(blocks, window, h, w)
    rows, cols = region_edges(h, blocks), region_edges(w, blocks)
    near_r, near_c = _touches(rows, h, window), _touches(cols, w, window)
    with torch.inference_mode(False), torch.enable_grad():
        z_in = z1.clone().requires_grad_(True)
        delta = perturbation(z_in, mode, factor)
        image = decode_fn(z_in)
        ds = image.shape[-2] // h
        energy, counted = torch.zeros(h, w), torch.zeros(h, w)
        steps = Steps(progress, len(rows) * len(cols))
        for i, (a, b) in enumerate(rows):
            for j, (cc, d) in enumerate(cols):
                probe = torch.zeros_like(image)
                region = probe[:, :, a * ds:b * ds, cc * ds:d * ds]
                region.fill_(1.0 / region.numel())
                (grad,) = torch.autograd.grad(image, z_in, probe, retain_graph=True)
                change = (grad.detach().float() * delta).sum(1)[0].cpu() / 2  # /2: -1..1 → 0..1 units
                far = ~(near_r[i][:, None] & near_c[j][None, :])
                energy += torch.where(far, change ** 2, 0.0)
                counted += far.float()
                steps.step()
    reach = (energy / counted).sqrt().masked_fill(counted == 0, float("nan"))
    return FastReach(reach, image.detach(), delta.detach(), window, ds, steps.total, blocks)


# ---------------------------------------------------------------- summaries

def top_cells(reach_map: torch.Tensor, n: int = 5) -> list[tuple[int, int]]:
    """The n cells with the largest values of an `[h, w]` map (NaN last), largest first."""
    flat = torch.nan_to_num(reach_map.flatten().float(), nan=-float("inf"))
    order = flat.argsort(descending=True)[:n]
    w = reach_map.shape[1]
    return [(int(i) // w, int(i) % w) for i in order]


def summarize_map(reach_map: torch.Tensor, n: int = 5) -> dict:
    """JSON-safe summary: worst cells, the median, and how far the worst stands above it."""
    finite = reach_map[torch.isfinite(reach_map)]
    median = float(finite.median()) if finite.numel() else float("nan")
    top = top_cells(reach_map, n)
    worst = float(reach_map[top[0]]) if top else float("nan")
    return {
        "max": worst, "median": median,
        "max_over_median": worst / median if median > 0 else None,
        "top_cells": [{"y": y, "x": x, "value": float(reach_map[y, x])} for y, x in top],
    }
