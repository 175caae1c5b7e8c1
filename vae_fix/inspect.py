"""Inspect VAE: read a VAE's raw posterior on images (the built-in probe set when none are given),
find the cells where its log-variance collapses and give the verdict on the VAE (the SD "black
hole"): report.json (schema 2), a summary and pictures per image.

One call for the node, the health check and the CLI: `inspect_vae(codec, images, ...) -> InspectResult`.
The VAE's typical range is pooled over every image, then each image's cells are judged against it
(`anomaly`), the verdict counts recurrence (`verdict`), and the verdict's first cell gets the fast
reach map when the codec has a differentiable decoder (a black hole reaches the whole image).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import report, viz
from .reach_measure import fast_reach_map
from .clips import clip_summary, per_frame, read_clip
from .anomaly import (DEFAULT_MEAN_THRESHOLD, DEFAULT_MIN_DROP, DEFAULT_THRESHOLD, AnomalyReport,
                      find_pooled, min_map)
from .codec import Codec
from .errors import InputError
from .posterior import Posterior, prepare_images, read_posterior
from .probes import probe_images
from .progress import ProgressFn, Steps
from .result import Picture, Result
from .verdict import Verdict, verdict

REACH_WINDOW = 3
# heatmap colour ranges: percentiles of the values drawn
RANGES = {"percentile": (1.0, 99.0), "minmax": (0.0, 100.0)}


@dataclass
class InspectResult(Result):
    """Per image (in order): its name (a path, or None in memory), the image as encoded
    `[3, H, W]`, its posterior (batch of one) and its anomalies."""
    json_name = "report"

    vae: dict
    settings: dict
    names: list
    encoded: list
    posteriors: list
    found: list
    verdict: Verdict
    files_dir: Optional[Path] = None   # where the CLI writes the pictures: the report then names them
    moments_files: list = field(default_factory=list)
    _drawn: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        entries = [{**report.image_entry(name, post, 0, found, self._files(i)), "index": i}
                   for i, (name, post, found) in enumerate(zip(self.names, self.posteriors, self.found))]
        data = report.build_report(self.vae, entries, self.settings, self.verdict.to_dict())
        if self.moments_files:
            data["moments_files"] = list(self.moments_files)
        return data

    def summary(self) -> str:
        return report.summary_text(self.to_json())

    def pictures(self) -> dict[str, Picture]:
        """`verdict` (every image's overlay, collapsed cells boxed) and `<image prefix>_<picture>`
        for every picture of every image (the CLI's file names)."""
        return {"verdict": self.verdict_picture(), **{f"{prefix}_{name}": pic for i, prefix in enumerate(self._prefixes())
                                                      for name, pic in self.drawn(i).items()}}

    def verdict_picture(self) -> Picture:
        """`[3, H, W]`: the verdict's line over a strip of every image's overlay (at most 24, 128 px)."""
        tiles = []
        for i in range(min(24, len(self.posteriors))):
            lv_min, post = min_map(self.posteriors[i], 0), self.posteriors[i]
            ov = viz.overlay(self.encoded[i], lv_min, 0.6, self.settings["cmap"], self.found[i].marks(),
                             post.size.downscale, *viz.value_range(lv_min, percentiles=(1.0, 99.0)))
            tiles.append(viz.caption(_fit(ov, 192) if max(ov.shape[1:]) > 192 else ov, _short(self.names[i], i)))
        return viz.caption(viz.tile_grid(tiles, per_row=10), "Verdict: " + self.verdict.line(), size=13)

    def each(self, name: str) -> list[Picture]:
        """One picture (`overlay`, `logvar_grid`, `kl`, `logvar_c0`...) of every image, in order."""
        return [self.drawn(i)[name] for i in range(len(self.posteriors))]

    def drawn(self, i: int) -> dict[str, Picture]:
        if i not in self._drawn:
            self._drawn[i] = image_pictures(self.encoded[i], self.posteriors[i], self.found[i],
                                            self.settings["cmap"], RANGES[self.settings["value_range"]])
        return self._drawn[i]

    def files_in(self, out_dir, moments=None) -> dict:
        """Name the files the CLI writes in `out_dir` (and the raw posterior at `moments`, when
        given) so the report lists them; returns the moments writers for `write_result`."""
        self.files_dir = Path(out_dir)
        self.vae = {**self.vae}
        if moments is None:
            return {}
        writers = moments_writers(self.posteriors, self.names, moments)
        self.moments_files = [str(p) for p in writers]
        # absolute names: write_result writes them where they are, not into out_dir
        return {str(p.absolute()): w for p, w in writers.items()}

    def _prefixes(self) -> list[str]:
        """File-name prefixes per image: its stem, numbered when two images share one."""
        stems = [Path(n).stem if n is not None else f"image_{i}" for i, n in enumerate(self.names)]
        return [s if stems.count(s) == 1 else f"{i + 1:02d}_{s}" for i, s in enumerate(stems)]

    def _files(self, i: int) -> dict:
        if self.files_dir is None:
            return {}
        prefix = self._prefixes()[i]
        return {name: str(self.files_dir / f"{prefix}_{name}.png") for name in self.drawn(i)}


def inspect_vae(codec: Codec, images=None, *, names: Optional[Sequence] = None, threshold: float = DEFAULT_THRESHOLD,
                min_drop: float = DEFAULT_MIN_DROP, mean_threshold: float = DEFAULT_MEAN_THRESHOLD,
                size_policy: str = "crop", cmap: str = "magma", value_range: str = "percentile",
                tile: Optional[int] = None, check_reach: bool = True, as_clip: bool = False,
                progress: Optional[ProgressFn] = None) -> InspectResult:
    """Inspect every image: `images` is a list of `[1, 3, H, W]` (sizes may differ) or one
    `[B, 3, H, W]` batch, 0..1; None runs the built-in probe set (`probes`). Each image is encoded
    on its own (one progress step each, which may cancel). `names` (paths) name the images in the
    report and the CLI's file names. `check_reach`: measure the verdict's first cell's reach.
    `as_clip`: the images are the frames of one clip for a video VAE (`clips.read_clip`): each latent
    frame is judged as an image is, named by the input frames it covers."""
    if images is None:
        images, names = probe_images()
    batch = _one_by_one(images)
    names = [None if n is None else str(n) for n in names] if names is not None else [None] * len(batch)
    _check_options(cmap, value_range, len(names), len(batch))
    steps = Steps(progress, len(batch) + 1)
    clip = None
    if as_clip:
        whole, frames, encoded = read_clip(codec, torch.cat(batch), size_policy)
        posteriors, clip = per_frame(whole), clip_summary(len(batch), frames, codec.frame_step)
        names = [f.name() for f in frames]
        steps.step(len(batch))
    else:
        encoded, posteriors = [], []
        for x in batch:
            posteriors.append(read_posterior(codec, x, size_policy=size_policy, tile=tile, progress=steps.sub(1)))
            encoded.append(prepare_images(x, codec.downscale, size_policy)[0][0])
            steps.step()
    found = find_pooled(posteriors, threshold=threshold, min_drop=min_drop, mean_threshold=mean_threshold)
    judged = verdict(found, [n if n is not None else f"image {i}" for i, n in enumerate(names)],
                     unit="latent frame" if clip else "image")
    if check_reach and judged.cells:  # in a clip only latent frame 0 decodes alone as it was encoded
        judged.reach = measure_reach(codec, judged, posteriors[:1] if clip else posteriors, found[:1] if clip else found)
    steps.step()
    settings = {"clip": clip} if clip else {}
    settings.update({"size_policy": size_policy, "cmap": cmap, "value_range": value_range, "tile": tile,
                "device": str(codec.device), "dtype": str(codec.dtype).replace("torch.", ""),
                "threshold": threshold, "min_drop": min_drop, "mean_threshold": mean_threshold,
                "probes": names[0] is not None and str(names[0]).startswith("probe:")})
    return InspectResult(dict(codec.info), settings, names, encoded, posteriors, found, judged)


def measure_reach(codec: Codec, judged: Verdict, posteriors: list[Posterior], found: list[AnomalyReport]) -> dict:
    """The fast reach map of the verdict's first cell on the smallest image it collapsed in:
    {"y", "x", "image", "reach_ratio" (cell over the map's median), "rank"} or {"skipped": why}."""
    if codec.decode_grad is None:
        return {"skipped": codec.no_decoder or "the VAE has no differentiable decoder"}
    top = judged.cells[0]
    seen = [i for i, rep in enumerate(found) if (top["y"], top["x"]) in rep.marks()]
    if not seen:
        return {"skipped": f"cell ({top['y']}, {top['x']}) did not collapse in the first latent frame of the clip, "
                           "the only one decoded alone as it was encoded"}
    i = min(seen, key=lambda j: posteriors[j].latent_size[0] * posteriors[j].latent_size[1])
    try:  # fitted: an 8x VAE's 128 px probes give 16x16 latents, too small for window 3 and 3x3 regions
        fast = fast_reach_map(codec.decode_grad, posteriors[i].mean, window=REACH_WINDOW, fit=True)
    except InputError as e:  # latent too small for any reach regions
        return {"skipped": str(e)}
    reach, cell, window, blocks = fast.reach, fast.reach[top["y"], top["x"]], fast.window, fast.blocks
    if not torch.isfinite(cell):
        return {"skipped": f"cell ({top['y']}, {top['x']}) has no far field with window {window} and "
                           f"{blocks}x{blocks} regions on this {reach.shape[0]}x{reach.shape[1]} latent"}
    ratio = float(cell / reach.nanmedian().clamp_min(1e-12))
    rank = int((reach > cell).sum()) + 1
    top["reach_ratio"] = ratio
    return {"y": top["y"], "x": top["x"], "image": judged.names[i], "reach_ratio": ratio, "rank": rank,
            "window": window, "blocks": blocks, "method": "fast reach map (first-order far-field change)"}


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """`[3, H, W]` scaled down (area) so its longer side is `size`."""
    scale = size / max(img.shape[1:])
    hw = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[2] * scale)))
    return torch.nn.functional.interpolate(img[None], size=hw, mode="area")[0]


def _short(name, i: int) -> str:
    return (Path(str(name)).stem if not str(name).startswith("probe:") else str(name)[6:]) if name else f"image {i}"


def _one_by_one(images) -> list[torch.Tensor]:
    """A `[B, 3, H, W]` batch or a list of `[1, 3, H, W]` → a list of `[1, 3, H, W]` (views, no copy)."""
    batch = list(images.split(1)) if isinstance(images, torch.Tensor) and images.dim() == 4 else list(images)
    if not batch:
        raise InputError("images", "there are none", "at least one image")
    return batch


def _check_options(cmap: str, value_range: str, n_names: int, n_images: int) -> None:
    if cmap not in viz.CMAPS:
        raise InputError("cmap", f"{cmap!r}", f"one of {', '.join(viz.CMAPS)}")
    if value_range not in RANGES:
        raise InputError("value_range", f"{value_range!r}", f"one of {', '.join(RANGES)}")
    if n_names != n_images:
        raise InputError("names", f"{n_names} names for {n_images} images", "one name per image")


def image_pictures(image: torch.Tensor, post: Posterior, found: AnomalyReport, cmap: str = "magma",
                   percentiles=(1.0, 99.0)) -> dict[str, Picture]:
    """The pictures of one image's report (posterior of batch one), each `[3, H, W]` 0..1:
    `logvar_grid` (every channel, shared range, colour bar), `logvar_c{k}` (one per channel, same
    range), `overlay` (per-cell minimum over channels on the image as encoded `[3, H, W]`,
    anomalies boxed) and `kl`."""
    lv = post.logvar_raw[0]                      # [C, h, w]
    vmin, vmax = viz.value_range(lv, percentiles=percentiles)
    h, w = post.latent_size
    scale = viz.zoom_for(h, w, 192)
    label = "raw log-variance (nats)"
    pics = {"logvar_grid": viz.channel_grid(lv, cmap, vmin, vmax, scale=viz.zoom_for(h, w), label=label)}
    for c in range(lv.shape[0]):
        tile = viz.caption(viz.heatmap(lv[c], cmap, vmin, vmax, scale), f"channel {c}")
        pics[f"logvar_c{c}"] = viz.with_colorbar(tile, cmap, vmin, vmax, label)
    lv_min = lv.amin(dim=0)                      # [h, w]
    lo, hi = viz.value_range(lv_min, percentiles=percentiles)
    zoom = min(8, viz.zoom_for(*image.shape[1:], 384))
    ov = viz.overlay(image, lv_min, 0.6, cmap, found.marks(), post.size.downscale, lo, hi, zoom=zoom)
    pics["overlay"] = viz.with_colorbar(ov, cmap, lo, hi, "min raw log-variance (nats)")
    kl = post.kl[0]                              # [h, w]
    k_lo, k_hi = viz.value_range(kl, percentiles=percentiles)
    pics["kl"] = viz.with_colorbar(viz.heatmap(kl, "inferno", k_lo, k_hi, scale), "inferno", k_lo, k_hi, "KL per cell (nats)")
    return pics


# ---------------------------------------------------------------- the raw posterior as safetensors

def moments_targets(posteriors: list[Posterior], target) -> list[Path]:
    """One file when every latent has the same size, otherwise one per image (`name-1.safetensors`, ...)."""
    target = Path(target)
    if len({(p.latent_channels, *p.latent_size) for p in posteriors}) == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{i + 1}{target.suffix}") for i in range(len(posteriors))]


def moments_writers(posteriors: list[Posterior], names: list, target) -> dict:
    """{path: writer(path)} writing raw `mean` and `logvar` `[B, C, h, w]` float32 (see `moments_targets`)."""
    paths = moments_targets(posteriors, target)
    groups = [(posteriors, names)] if len(paths) == 1 else [([p], [n]) for p, n in zip(posteriors, names)]
    return {path: _writer(posts, group_names) for path, (posts, group_names) in zip(paths, groups)}


def _writer(posts: list[Posterior], names: list):
    def write(where) -> None:
        from safetensors.torch import save_file

        Path(where).parent.mkdir(parents=True, exist_ok=True)
        meta = {"images": json.dumps([str(n) for n in names]),
                "size_handling": json.dumps([p.size.to_dict() for p in posts]),
                "logvar": "raw (unclamped) log-variance; the reference clamps to [-30, 20]"}
        save_file({"mean": torch.cat([p.mean for p in posts]).contiguous().cpu(),
                   "logvar": torch.cat([p.logvar_raw for p in posts]).contiguous().cpu()}, str(where), meta)
    return write
