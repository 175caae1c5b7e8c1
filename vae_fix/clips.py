"""A batch of images as the frames of one clip, for video VAEs (Wan, HunyuanVideo, Mochi, LTXV).

A causal video VAE encodes its first frame alone and every later group of `per` frames into one
latent frame (Wan and HunyuanVideo 4, Mochi 6, LTXV 8). `read_clip` runs the codec's whole-clip
encoder once and returns one posterior per latent frame with the input frames it covers, so the
inspection judges latent frames as it judges images, and the verdict counts what recurs over time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .codec import Codec
from .errors import InputError
from .posterior import Posterior, posterior_from_moments, prepare_images


@dataclass(frozen=True)
class LatentFrame:
    index: int        # latent frame t
    first: int        # first input frame it covers
    last: int         # last input frame it covers

    def name(self) -> str:
        frames = f"frame {self.first}" if self.first == self.last else f"frames {self.first}-{self.last}"
        return f"latent frame {self.index} (input {frames})"

    def to_dict(self) -> dict:
        return {"latent_frame": self.index, "input_frames": [self.first, self.last]}


def frame_ranges(n_frames: int, step: tuple, latent_frames: int) -> list[LatentFrame]:
    """Which input frames each latent frame covers: the first `step[0]`, then `step[1]` each."""
    first, per = step
    out, start = [], 0
    for t in range(latent_frames):
        size = first if t == 0 else per
        out.append(LatentFrame(t, start, min(start + size, n_frames) - 1))
        start += size
    return out


def dropped_frames(n_frames: int, frames: list[LatentFrame]) -> list[int]:
    """Input frames no latent frame covers (a causal VAE encodes 1 + k * per frames)."""
    return list(range(frames[-1].last + 1, n_frames)) if frames else list(range(n_frames))


def read_clip(codec: Codec, frames: torch.Tensor, size_policy: str = "crop"):
    """`frames [N, 3, H, W]` (0..1) encoded as one clip → (its posterior, whose batch is the latent
    frames, their `LatentFrame`s, the image shown under each latent frame: its last input frame)."""
    if codec.clip_moments is None:
        raise InputError(codec.input_name, "it is not a video VAE, so a batch of images is not a clip",
                         "a video VAE (Wan, HunyuanVideo 1.0, Mochi, LTXV), or each image inspected on its own")
    x, size = prepare_images(frames, codec.downscale, size_policy)
    with torch.no_grad():
        m = codec.clip_moments((x * 2.0 - 1.0).to(device=codec.device, dtype=codec.dtype)).float()
    want = (x.shape[2] // codec.downscale, x.shape[3] // codec.downscale)
    if m.dim() != 4 or m.shape[1] % 2 or tuple(m.shape[2:]) != want:
        raise InputError("clip moments", f"got {tuple(m.shape)} for {x.shape[0]} frames {tuple(x.shape[2:])}",
                         f"[T, 2C, {want[0]}, {want[1]}] (latent frames, mean then log-variance)")
    ranges = frame_ranges(x.shape[0], codec.frame_step or (1, 1), m.shape[0])
    return posterior_from_moments(m, size), ranges, [x[r.last] for r in ranges]


def clip_summary(n_frames: int, frames: list[LatentFrame], step) -> dict:
    """The report's `clip` entry: input frames, what each latent frame covers, what was not encoded."""
    return {"frames": n_frames, "latent_frames": [f.to_dict() for f in frames],
            "not_encoded": dropped_frames(n_frames, frames), "frame_step": list(step or (1, 1))}


def per_frame(post: Posterior) -> list[Posterior]:
    """A posterior whose batch is latent frames → one posterior of batch one per latent frame."""
    return [frame_of(post, t) for t in range(post.batch)]


def frame_of(post: Posterior, t: int) -> Posterior:
    """Latent frame `t` of a posterior whose batch is latent frames, as a posterior of batch one."""
    pick = slice(t, t + 1)
    return replace(post, mean=post.mean[pick], logvar_raw=post.logvar_raw[pick], logvar=post.logvar[pick],
                   std=post.std[pick], kl=post.kl[pick], kl_total=post.kl_total[pick], notes=list(post.notes))
