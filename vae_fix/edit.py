"""Per-channel edits of latents `[B, C, h, w]` or video latents `[B, C, T, h, w]`, any channel
count, optionally masked, per item and (video) per frame.

Every edit returns a new tensor (inputs are never modified). A mask (`[H, W]`, `[B, H, W]` or
`[B, 1, H, W]`, 0..1, in image pixels or on the latent grid) is resized to the latent grid and used
as a soft blend weight: `out = z + mask * (edited - z)`. Items not chosen by `batch` stay as they are.
A video latent's mask applies per frame (`frames.fold`): one mask for every frame, one per item, or
one per frame (item by item); frames not chosen by `frames` stay as they are, bit for bit.

Selections are strings: channels `"all"`, `"0,2"`, `"1-3"`, `"0,4-7"`; batch and frames the same
(`"all"` or empty = every item or frame). Ranges are inclusive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InputError
from .frames import MAX_LATENT_CHANNELS, FrameLayout, check_latent, fold  # noqa: F401  (re-exported)
from .result import Result

OPS = ("scale", "offset", "clamp", "soft_clamp", "normalize", "zero", "invert", "swap", "copy")
_ALL = ("all", "*")


def parse_indices(spec, count: int, name: str, what: str, empty_means_all: bool = False) -> list[int]:
    """`"all"`, `"0,2"`, `"1-3"`, ints or lists of ints → sorted-as-written unique indices < count."""
    example = "'all', '0,2' or '1-3'"
    if isinstance(spec, int) and not isinstance(spec, bool):
        parts = [str(spec)]
    elif isinstance(spec, (list, tuple)):
        parts = [str(int(s)) for s in spec]
    else:
        text = str(spec if spec is not None else "").strip().lower()
        if text in _ALL or (not text and empty_means_all):
            return list(range(count))
        if not text:
            raise InputError(name, f"no {what} selected", f"{what} indices such as {example}")
        parts = [p.strip() for p in text.split(",") if p.strip()]
    out: list[int] = []
    for part in parts:
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise InputError(name, f"cannot read {part!r}", f"{what} indices such as {example}") from None
        if first > last:
            raise InputError(name, f"range {part!r} runs backwards", "low-high with low <= high, e.g. '1-3'")
        for i in range(first, last + 1):
            if i >= count:
                raise InputError(name, f"{what} {i} is out of range for {count} {what}s",
                                 f"indices 0-{count - 1}, e.g. {example}")
            if i not in out:
                out.append(i)
    return out


def parse_channels(spec, channels: int, name: str = "channels") -> list[int]:
    return parse_indices(spec, channels, name, "channel")


def parse_batch(spec, batch: int, name: str = "batch") -> list[int]:
    return parse_indices(spec, batch, name, "batch item", empty_means_all=True)


def parse_frames(spec, layout: FrameLayout, name: str = "frames") -> list[int]:
    """The chosen frames of a video latent (`"all"` or empty: every frame). An image latent has no
    frames: only `"all"` or nothing is taken (as its one frame, [0])."""
    if layout.video:
        return parse_indices(spec, layout.frames, name, "frame", empty_means_all=True)
    text = str(spec if spec is not None else "").strip().lower()
    if text and text not in _ALL:
        raise InputError(name, f"{text!r} chosen on an image latent [B, C, h, w], which has no frames",
                         "'all' (or empty) for an image latent; frame numbers only for a video latent [B, C, T, h, w]")
    return [0]


def mask_to_grid(mask, batch: int, h: int, w: int, name: str = "mask") -> torch.Tensor:
    """A mask in image pixels or on the latent grid → blend weights `[B, 1, h, w]` in 0..1."""
    m = torch.as_tensor(mask).detach().float()
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    elif not (m.dim() == 4 and m.shape[1] == 1):
        raise InputError(name, f"shape {list(m.shape)}", "[H, W], [B, H, W] or [B, 1, H, W]")
    if m.shape[0] not in (1, batch):
        raise InputError(name, f"{m.shape[0]} masks for {batch} latents", f"1 mask or {batch}")
    mh, mw = m.shape[-2:]
    if (mh, mw) != (h, w):
        if abs(mh / h - mw / w) > 0.1 * max(mh / h, mw / w):
            raise InputError(name, f"size {mh}x{mw} does not match the latent's aspect ({h}x{w} cells)",
                             f"the image size ({h}x{w} times the VAE's downscale) or {h}x{w}")
        # Shrinking: each cell takes the mean of its pixel block (soft only where the mask is).
        m = F.adaptive_avg_pool2d(m, (h, w)) if mh >= h and mw >= w else \
            F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return m.clamp(0, 1).expand(batch, 1, h, w)


def frame_masks(mask, layout: FrameLayout, h: int, w: int, name: str = "mask") -> torch.Tensor:
    """A mask for a folded latent (`frames.fold`) → blend weights per frame `[B*T, 1, h, w]`.
    A video latent takes 1 mask (every frame), B (one per item, on each of its frames) or B*T (one
    per frame, item by item); an image latent 1 or B (`mask_to_grid`)."""
    m = torch.as_tensor(mask).detach().float()
    count = m.shape[0] if m.dim() >= 3 else 1
    if layout.video and count == layout.items and count not in (1, layout.count):
        m = m.repeat_interleave(layout.frames, 0)
    elif layout.video and count not in (1, layout.count):
        raise InputError(name, f"{count} masks for {layout.items} video latent(s) of {layout.frames} frames",
                         f"1 mask, {layout.items} (one per item) or {layout.count} (one per frame, item by item)")
    return mask_to_grid(m, layout.count, h, w, name)


def _weighted_moments(x: torch.Tensor, weight: torch.Tensor):
    """Per item and channel mean and std of `x [B, C, h, w]` (or `[B, C, T, h, w]`: over the
    item's frames) under `weight [B, 1, ...]`."""
    dims = tuple(range(2, x.dim()))
    total = weight.sum(dim=dims, keepdim=True).clamp_min(1e-8)
    mean = (x * weight).sum(dim=dims, keepdim=True) / total
    var = ((x - mean) ** 2 * weight).sum(dim=dims, keepdim=True) / total
    return mean, var.sqrt()


def _target_channels(target, count: int, sources: list[int], op: str) -> list[int]:
    if target is None or str(target).strip() == "":
        raise InputError("target", f"'{op}' needs target channels", "channel indices, as many as the source channels")
    dst = parse_channels(target, count, "target")
    if len(dst) != len(sources):
        raise InputError("target", f"{len(dst)} target channels for {len(sources)} source channels",
                         "one target channel per source channel")
    if op == "swap" and set(dst) & set(sources):
        raise InputError("target", "swap source and target channels overlap", "disjoint channel sets")
    return dst


def _edited(op: str, z: torch.Tensor, ch: list[int], weight: torch.Tensor, p: dict) -> torch.Tensor:
    out = z.clone()
    sel = z[:, ch]
    if op == "scale":
        out[:, ch] = sel * p["factor"]
    elif op == "offset":
        out[:, ch] = sel + p["offset"]
    elif op == "clamp":
        out[:, ch] = sel.clamp(p["low"], p["high"])
    elif op == "soft_clamp":
        out[:, ch] = p["limit"] * torch.tanh(sel / p["limit"])
    elif op == "normalize":
        mean, std = _weighted_moments(sel, weight)
        out[:, ch] = (sel - mean) / std.clamp_min(1e-8) * p["std"] + p["mean"]
    elif op == "zero":
        out[:, ch] = 0.0
    elif op == "invert":
        out[:, ch] = -sel
    elif op == "swap":
        out[:, ch], out[:, p["target"]] = z[:, p["target"]], sel
    elif op == "copy":
        out[:, p["target"]] = sel
    return out


def _check_params(op: str, factor, offset, low, high, limit, mean, std) -> None:
    if op not in OPS:
        raise InputError("op", f"unknown operation {op!r}", f"one of {', '.join(OPS)}")
    numbers = (("factor", factor), ("offset", offset), ("limit", limit), ("mean", mean), ("std", std))
    for name, value in numbers:
        if not torch.isfinite(torch.tensor(float(value))):
            raise InputError(name, f"{value} is not a finite number", "a finite number")
    if op == "clamp":
        if low is None and high is None:
            raise InputError("low/high", "clamp needs at least one bound", "a number for low, high or both")
        if low is not None and high is not None and low > high:
            raise InputError("low/high", f"low {low} is above high {high}", "low <= high")
    if op == "soft_clamp" and limit <= 0:
        raise InputError("limit", f"{limit} is not positive", "a limit > 0 (output stays inside ±limit)")
    if op == "normalize" and std < 0:
        raise InputError("std", f"{std} is negative", "a target std >= 0")


@dataclass
class EditResult(Result):
    """The edited latent (the input's shape and dtype) and how each touched channel moved."""
    latent: torch.Tensor
    operation: str
    latent_shape: list[int]
    batch_items: list[int]
    masked: bool
    channels: list[dict]              # per touched channel: mean/std before and after, values changed
    frames: Optional[list[int]] = None  # the chosen frames of a video latent; None for an image latent

    json_name = "info"

    def to_json(self) -> dict:
        data = {"operation": self.operation, "latent_shape": self.latent_shape, "batch_items": self.batch_items,
                "masked": self.masked, "channels": self.channels}
        return data if self.frames is None else {**data, "frames": self.frames}

    def summary(self) -> str:
        where = " inside the mask" if self.masked else ""
        what = (f"latent {self.latent_shape} (B, C, h, w), batch items {self.batch_items}" if self.frames is None else
                f"video latent {self.latent_shape} (B, C, T, h, w), batch items {self.batch_items}, frames {self.frames}")
        lines = [f"{self.operation} on {what}{where}"]
        lines += [f"ch {r['channel']}: mean {r['mean_before']:.4g} -> {r['mean_after']:.4g}, std {r['std_before']:.4g} "
                  f"-> {r['std_after']:.4g}, {r['values_changed']} values changed" for r in self.channels]
        return "\n".join(lines)


def _channel_rows(z: torch.Tensor, edited: torch.Tensor, channels: list[int], picked: list[int]) -> list[dict]:
    """Mean/std before and after over the chosen frames of the fold (`picked`: for an image latent,
    the chosen batch items), per touched channel."""
    (zf, _), (ef, _) = fold(z), fold(edited)
    rows = []
    for ch in channels:
        before, after = zf[picked, ch].float(), ef[picked, ch].float()
        rows.append({"channel": ch, "mean_before": float(before.mean()), "std_before": float(before.std(unbiased=False)),
                     "mean_after": float(after.mean()), "std_after": float(after.std(unbiased=False)),
                     "values_changed": int((before != after).sum())})
    return rows


def _weights(mask, layout: FrameLayout, h: int, w: int, picked: list[int], device) -> torch.Tensor:
    """Blend weights `[B, 1, h, w]` (video: `[B, 1, T, h, w]`): the mask on the picked frames, 0 elsewhere."""
    n = layout.count
    weight = torch.ones(n, 1, h, w, device=device) if mask is None else frame_masks(mask, layout, h, w).to(device)
    chosen = torch.zeros(n, 1, 1, 1, device=device)
    chosen[picked] = 1.0
    return layout.unfold(weight * chosen)


def edit_channels(z: torch.Tensor, op: str, channels="all", *, factor: float = 1.0, offset: float = 0.0,
                  low: float | None = None, high: float | None = None, limit: float = 3.0,
                  mean: float = 0.0, std: float = 1.0, target=None, mask=None, batch="all",
                  frames="all") -> EditResult:
    """Apply one channel operation to `z [B, C, h, w]` or a video latent `[B, C, T, h, w]`; the
    result holds a new tensor of the same shape and dtype.

    op: scale (× factor), offset (+ offset), clamp (to low..high), soft_clamp (limit·tanh(x/limit)),
    normalize (to mean/std per item and channel, statistics taken under the mask, over the item's
    chosen frames), zero, invert (x → -x), swap (channels ↔ target), copy (channels → target).
    `frames`: which frames of a video latent (an image latent takes only "all").
    """
    _, layout = fold(z)
    _check_params(op, factor, offset, low, high, limit, mean, std)
    c, (h, w) = z.shape[1], z.shape[-2:]
    ch = parse_channels(channels, c)
    items, chosen_frames = parse_batch(batch, layout.items), parse_frames(frames, layout)
    picked = [layout.index(i, t) for i in items for t in chosen_frames]
    weight = _weights(mask, layout, h, w, picked, z.device)
    params = dict(factor=factor, offset=offset, low=low, high=high, limit=limit, mean=mean, std=std)
    touched = ch
    if op in ("swap", "copy"):
        params["target"] = _target_channels(target, c, ch, op)
        touched = ch + [t for t in params["target"] if t not in ch]
    zf = z.detach().float()
    edited = _edited(op, zf, ch, weight, params)
    blended = torch.where(weight > 0, torch.lerp(zf, edited, weight), zf).to(z.dtype)  # no NaN from 0·inf outside
    return EditResult(blended, op, list(z.shape), items, mask is not None, _channel_rows(z, blended, touched, picked),
                      chosen_frames if layout.video else None)
