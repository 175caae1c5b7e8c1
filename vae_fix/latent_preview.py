"""Latent → RGB previews without decoding: one linear map per latent cell (C → 3, plus a bias).

Known families use their published factors (`families.py`), which act on model-space latents
`(raw - shift) * scale` (per channel for Wan and Mochi); folded into one map on raw latents that is
`rgb = raw @ (scale·F) + (bias - Σ_c scale_c·shift_c·F_c)`, nominally -1..1, shown as (rgb + 1) / 2
as ComfyUI's sampler previews do. For any other VAE (8 or 12 channels, retrained VAEs) `fit_preview`
decodes one latent, averages the image over each cell's pixels and fits the map by least squares.

A video latent `[B, C, T, h, w]` previews as one picture per frame, a batch of B*T pictures item by
item (`frames.fold`): the same map on every frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .codec import Codec
from .errors import InputError
from .families import LatentFamily, families_of_kind, families_with_channels, get_family
from .frames import FrameLayout, check_latent, fold
from .result import Result


@dataclass(frozen=True)
class LinearPreview:
    weight: torch.Tensor            # [C, 3] on raw latents
    bias: torch.Tensor              # [3]
    source: str                     # family name, or "fit"
    r2: Optional[tuple[float, float, float]] = None  # fit quality per RGB channel (fits only)

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def rgb(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` raw latent → `[B, 3, h, w]` nominally -1..1 (video: `[B, C, T, h, w]` →
        `[B, 3, T, h, w]`, every frame alike)."""
        frames, layout = fold(z)
        if z.shape[1] != self.channels:
            raise InputError("latent", f"{z.shape[1]} channels for a {self.source} preview of {self.channels}",
                             f"a latent with {self.channels} channels, or a preview fitted to this VAE")
        out = torch.einsum("bchw,cr->brhw", frames.detach().float().cpu(), self.weight)
        return layout.unfold(out + self.bias.view(1, 3, 1, 1))

    def image(self, z: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """`[B, 3, h*scale, w*scale]` in 0..1 (each cell a `scale`×`scale` block); a video latent
        gives one picture per frame, `[B*T, 3, h*scale, w*scale]` item by item."""
        if not isinstance(scale, int) or scale < 1:
            raise InputError("scale", f"{scale!r}", "a positive integer")
        img, _ = fold(((self.rgb(z) + 1) / 2).clamp(0, 1))
        return img.repeat_interleave(scale, 2).repeat_interleave(scale, 3) if scale > 1 else img

    def to_dict(self) -> dict:
        return {"source": self.source, "channels": self.channels, "weight": self.weight.tolist(),
                "bias": self.bias.tolist(), "r2": list(self.r2) if self.r2 is not None else None}


def family_preview(family) -> LinearPreview:
    """The published map of a family (name or LatentFamily), folded onto raw latents."""
    fam = family if isinstance(family, LatentFamily) else get_family(family)
    factors = fam.rgb_matrix().double()                      # [C, 3] on model-space latents
    if not fam.per_channel:
        weight = fam.scale * factors
        bias = fam.rgb_bias_vector().double() - fam.scale * fam.shift * factors.sum(0)
        return LinearPreview(weight.float(), bias.float(), fam.name)
    shift, scale = fam.channel_shift_scale()                 # [C] each: model = (raw - shift) * scale
    weight = scale[:, None] * factors
    bias = fam.rgb_bias_vector().double() - (shift * scale) @ factors
    return LinearPreview(weight.float(), bias.float(), fam.name)


def principal_preview(z: torch.Tensor) -> LinearPreview:
    """A map for a latent no family describes and no VAE can fit: its channels' first three principal
    components (over every cell of every frame), each scaled so two standard deviations reach +-1."""
    frames, _ = fold(z)
    x = frames.detach().float().cpu().movedim(1, -1).reshape(-1, frames.shape[1]).double()  # [N, C]
    mean = x.mean(0)
    _, sv, vt = torch.linalg.svd(x - mean, full_matrices=False)
    k = min(3, vt.shape[0])
    std = (sv[:k] / max(1, x.shape[0] - 1) ** 0.5).clamp_min(1e-12)
    weight = torch.zeros(x.shape[1], 3, dtype=torch.float64)
    weight[:, :k] = vt[:k].T / (2 * std)
    return LinearPreview(weight.float(), (-mean @ weight).float(), "principal components")


def pooled_target(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Decoded `[B, 3, H, W]` → its mean over each latent cell's pixels `[B, 3, h, w]`."""
    return F.adaptive_avg_pool2d(image.detach().float().cpu(), (h, w))


def fit_linear(z: torch.Tensor, target: torch.Tensor, ridge: float = 1e-6) -> LinearPreview:
    """Least squares `target ≈ z @ W + b` over every cell of the batch (z `[B, C, h, w]`, target
    `[B, 3, h, w]`); a tiny ridge keeps it solvable when channels are constant or collinear."""
    check_latent(z)
    b, c, h, w = z.shape
    if tuple(target.shape) != (b, 3, h, w):
        raise InputError("target", f"shape {list(target.shape)}", f"[{b}, 3, {h}, {w}]")
    x = z.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, c)
    y = target.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, 3)
    finite = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    x, y = x[finite], y[finite]
    if x.shape[0] < c + 1:
        raise InputError("latent", f"only {x.shape[0]} usable cells for {c} channels", f"at least {c + 1} finite cells")
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = design.T @ design + ridge * torch.eye(c + 1, dtype=x.dtype) * len(x)
    coef = torch.linalg.solve(gram, design.T @ y)            # [C+1, 3]
    resid = y - design @ coef
    var = (y - y.mean(0)).pow(2).sum(0)
    r2 = tuple(float(1 - r / v) if v > 0 else 1.0 for r, v in zip(resid.pow(2).sum(0), var))
    return LinearPreview(coef[:c].float(), coef[c].float(), "fit", r2)


@torch.no_grad()
def fit_preview(z: torch.Tensor, decode_fn: Callable[[torch.Tensor], torch.Tensor], index: int = 0) -> LinearPreview:
    """Fit a preview map for an unknown VAE from one decode of latent `index` of `z` (a video
    latent: of that item's first frame, decoded alone)."""
    frames, layout = fold(z)
    if not 0 <= index < layout.items:
        raise InputError("index", f"{index}", f"0..{layout.items - 1}")
    first = layout.index(index, 0)
    one = frames[first:first + 1]
    decoded = decode_fn(one)
    return fit_linear(one, pooled_target(decoded, *one.shape[-2:]))


PICTURES_OF_FRAMES = "one picture per frame, item by item (picture i: item i // T, frame i % T)"


@dataclass
class PreviewResult(Result):
    map: LinearPreview
    images: torch.Tensor             # [B, 3, h*scale, w*scale] 0..1, one per latent (video: one per frame, B*T)
    chosen: str = ""                 # how "auto" chose between families of one channel count
    layout: Optional[FrameLayout] = None  # of a video latent (None: an image latent)

    json_name = "info"

    def to_json(self) -> dict:
        data = dict(self.map.to_dict(), **({"chosen": self.chosen} if self.chosen else {}))
        if self.layout is not None:
            data["video"] = dict(self.layout.to_json(), pictures=PICTURES_OF_FRAMES)
        return data

    def summary(self) -> str:
        m = self.map
        how = (f"fitted from one decode, R² per colour {', '.join(f'{r:.3f}' for r in m.r2)}" if m.source == "fit"
               else f"the published {m.source} factors")
        what = f"{len(self.images)} latent(s)"
        if self.layout is not None:
            what = (f"a video latent ({self.layout.items} item(s) of {self.layout.frames} frames: {len(self.images)} "
                    f"pictures, a batch of {PICTURES_OF_FRAMES})")
        return f"RGB preview of {what} with {m.channels} channels: {how}" + (f"\n{self.chosen}" if self.chosen else "")

    def pictures(self) -> dict:
        if self.layout is None:
            return {"preview": list(self.images)}
        return {"preview_item{}_frame{}".format(*self.layout.where(i)): pic for i, pic in enumerate(self.images)}


def _model_spread(z: torch.Tensor, fam: LatentFamily) -> float:
    """RMS of the finite values of z in `fam`'s model space (1: the family's own latents)."""
    finite = torch.isfinite(z)
    return float(fam.to_model_space(z)[finite].pow(2).mean().sqrt()) if finite.any() else 0.0


def likelier_family(z: torch.Tensor, matches: list[LatentFamily]) -> tuple[LatentFamily, str]:
    """Of several families with z's channel count, the one whose sampler scale fits z's spread:
    `scale` is 1 / std of a family's raw latents (SD1.x 0.18215, SDXL 0.13025; SD3 1.5305, Flux
    0.3611), so the family with the least |log(std(z - shift) * scale)| wins; returns it and why.
    With a family that shifts and scales each channel (Wan) see `_likelier_in_model_space`."""
    if any(f.per_channel for f in matches):
        return _likelier_in_model_space(z, matches)
    x = z.detach().float().cpu()
    x = x[torch.isfinite(x)]
    spread = {f.name: float((x - f.shift).pow(2).mean().sqrt()) if x.numel() else 0.0 for f in matches}
    best = min(matches, key=lambda f: abs(math.log(max(spread[f.name] * f.scale, 1e-12))))
    std = spread[best.name]
    others = ", ".join(f"{f.name} {1 / f.scale:.2f}" for f in matches if f is not best)
    return best, (f"'auto' chose {best.name} of {', '.join(f.name for f in matches)}: the latent's spread "
                  f"{std:.2f} is closest to {best.name}'s {1 / best.scale:.2f} (1 / its scale; {others})")


def _likelier_in_model_space(z: torch.Tensor, matches: list[LatentFamily]) -> tuple[LatentFamily, str]:
    """The family in whose model space z's RMS is closest to 1 (its own latents'): the least
    |log(RMS((z - shift_c) * scale_c))|, for families that shift and scale each channel (Wan 2.1
    against HunyuanVideo's one scale); returns it and why."""
    x = z.detach().float().cpu()
    spread = {f.name: _model_spread(x, f) for f in matches}
    best = min(matches, key=lambda f: abs(math.log(max(spread[f.name], 1e-12))))
    others = ", ".join(f"{f.name} {spread[f.name]:.2f}" for f in matches if f is not best)
    return best, (f"'auto' chose {best.name} of {', '.join(f.name for f in matches)}: in {best.name}'s model "
                  f"space the latent's spread is {spread[best.name]:.2f}, the closest to 1 (its own latents'; "
                  f"{others})")


def choose_family(channels: int, family: str, can_fit: bool, input_name: str = "family",
                  z: Optional[torch.Tensor] = None, video: bool = False) -> tuple[Optional[LatentFamily], str]:
    """(the family whose published map to use or None for a fit, a note on how "auto" chose).
    "auto": the only known family of the latent's kind (image, or `video`) with this channel count,
    else a fit when `can_fit`, else the likelier of several by the latent's spread
    (`likelier_family`); "fit": always a fit. A named family needs only the channel count."""
    if family == "fit":
        return None, ""
    matches = families_with_channels(channels, video)
    if family == "auto":
        if len(matches) == 1 or can_fit:
            return (matches[0] if len(matches) == 1 else None), ""
        if matches and z is not None:
            return likelier_family(z, matches)
        kind = "video " if video else ""
        known = ", ".join(f"{f.name} {f.channels}" for f in families_of_kind(video))
        return None, (f"'auto' knows no {kind}family with {channels} channels (known: {known}) and no VAE was given: "
                      "red, green and blue are this latent's first three principal components; connect the VAE "
                      "for a map fitted to its decoder")
    fam = get_family(family, input_name)
    if fam.channels != channels:
        names = ", ".join(f.name for f in matches) or "no known family"
        raise InputError(input_name, f"{fam.name} latents have {fam.channels} channels, this one has {channels}",
                         f"a family with {channels} channels ({names}) or a VAE to fit a map")
    return fam, ""


def latent_preview(z: torch.Tensor, family: str = "auto", codec: Optional[Codec] = None,
                   scale: int = 8) -> PreviewResult:
    """RGB previews of `z [B, C, h, w]`, or of every frame of a video latent `[B, C, T, h, w]`: a
    family's published map (`family`: a name, "auto" or "fit"), or a map fitted from one decode of
    the first latent (first frame) by `codec`."""
    _, layout = fold(z)
    fam, note = choose_family(z.shape[1], family, codec is not None, z=z, video=layout.video)
    if fam is None and codec is None and family != "auto":
        raise InputError("vae", "a fitted preview map needs a VAE to decode with", "a VAE, or a family name")
    if fam is not None:
        linear = family_preview(fam)
    else:
        linear = fit_preview(z, codec.need_decoder()) if codec is not None else principal_preview(z)
    return PreviewResult(linear, linear.image(z, scale), note, layout if layout.video else None)
