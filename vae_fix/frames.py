"""Video latents `[B, C, T, h, w]` as a batch of frames `[B*T, C, h, w]` and back.

Every latent feature works on image latents `[B, C, h, w]`. A video latent is folded into frames,
item by item (frame `i` of the fold is item `i // T`, frame `i % T`), the feature runs on the
frames, and what comes back per frame is unfolded again. `FrameLayout` keeps (B, T) so that
results can say "item b, frame t". An image latent folds to itself (layout: T = 1, not video).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

MAX_LATENT_CHANNELS = 1024
IMAGE_SHAPE, VIDEO_SHAPE = "[B, C, h, w]", "[B, C, T, h, w]"
FRAMES_DECODED = ("frames are decoded one at a time: each latent frame alone (a video VAE decodes it as a "
                  "one-frame clip), not with its neighbours in time")


def check_latent(z, name: str = "latent") -> torch.Tensor:
    """An image latent `[B, C, h, w]`: float, no empty dimension, at most MAX_LATENT_CHANNELS channels."""
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        got = f"shape {list(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(name, f"got {got}", f"a tensor {IMAGE_SHAPE}")
    return _check_values(z, name, IMAGE_SHAPE)


def check_any_latent(z, name: str = "latent") -> torch.Tensor:
    """An image latent `[B, C, h, w]` or a video latent `[B, C, T, h, w]`, checked as `check_latent`."""
    if not isinstance(z, torch.Tensor) or z.dim() not in (4, 5):
        got = f"shape {list(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(name, f"got {got}", f"a tensor {IMAGE_SHAPE} or a video latent {VIDEO_SHAPE}")
    return _check_values(z, name, VIDEO_SHAPE if z.dim() == 5 else IMAGE_SHAPE)


def _check_values(z: torch.Tensor, name: str, shape: str) -> torch.Tensor:
    if not z.is_floating_point():
        raise InputError(name, f"dtype {z.dtype} is not floating point", "a float tensor")
    if 0 in z.shape or z.shape[1] > MAX_LATENT_CHANNELS:
        raise InputError(name, f"shape {list(z.shape)}", f"a latent {shape} with no empty dimension and at most "
                         f"{MAX_LATENT_CHANNELS} channels (the largest VAEs have 128)")
    return z


@dataclass(frozen=True)
class FrameLayout:
    """Where the frames of a fold came from: `items` (B) latents of `frames` (T) frames each."""
    items: int
    frames: int = 1
    video: bool = False

    @property
    def count(self) -> int:
        """Frames in the fold, B*T."""
        return self.items * self.frames

    @property
    def axes(self) -> str:
        return "(B, C, T, h, w)" if self.video else "(B, C, h, w)"

    def where(self, i: int) -> tuple[int, int]:
        """(item, frame) of frame `i` of the fold."""
        return divmod(i, self.frames)

    def index(self, item: int, frame: int) -> int:
        """The fold's index of `frame` of `item`."""
        return item * self.frames + frame

    def label(self, i: int) -> str:
        """'item b, frame t' for a video latent, 'latent i' for an image latent."""
        if not self.video:
            return f"latent {i}"
        item, frame = self.where(i)
        return f"item {item}, frame {frame}"

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame `[B*T, C, ...]` → `[B, C, T, ...]` (a new tensor) for a video latent; unchanged for an image latent."""
        if not self.video:
            return x
        if x.shape[0] != self.count:
            raise InputError("frames", f"{x.shape[0]} frames", f"{self.count} ({self.items} items of {self.frames} frames)")
        return x.reshape(self.items, self.frames, *x.shape[1:]).movedim(1, 2).contiguous()

    def per_frame(self, x: torch.Tensor) -> torch.Tensor:
        """Per-item `[B, ...]` → per-frame `[B*T, ...]` (each item's value repeated for its frames)."""
        return x.repeat_interleave(self.frames, 0) if self.video else x

    def to_json(self) -> dict:
        return {"items": self.items, "frames": self.frames}

    def frame_index(self, index, name: str = "index") -> int:
        """`index` of a video latent's frames, counted item by item (b*T + t), checked against B*T."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.count:
            raise InputError(name, f"{index!r} is outside the {self.count} frames of the video latent "
                             f"({self.items} item(s) of {self.frames} frames)",
                             f"0..{self.count - 1}, counted item by item (item b, frame t is b*{self.frames} + t)")
        return index

    def decoded_settings(self, index: int) -> dict:
        """What a report on frame `index` of a video latent says: item, frame, and how frames decode."""
        item, frame = self.where(index)
        return {"item": item, "frame": frame, "video": dict(self.to_json(), decoded=FRAMES_DECODED)}


def fold(z, name: str = "latent") -> tuple[torch.Tensor, FrameLayout]:
    """(frames `[B*T, C, h, w]`, layout) of an image or video latent. An image latent is returned
    as it is (not a copy: callers must not modify it); a video latent's frames are a new tensor."""
    check_any_latent(z, name)
    if z.dim() == 4:
        return z, FrameLayout(z.shape[0])
    b, c, t, h, w = z.shape
    return z.movedim(2, 1).reshape(b * t, c, h, w), FrameLayout(b, t, True)


def describe(shape) -> str:
    """'latent [1, 4, 16, 16] (B, C, h, w)' or 'video latent [1, 16, 5, 8, 8] (B, C, T, h, w), 5 frames'."""
    shape = list(shape)
    if len(shape) == 5:
        return f"video latent {shape} (B, C, T, h, w), {shape[2]} frames"
    return f"latent {shape} (B, C, h, w)"
