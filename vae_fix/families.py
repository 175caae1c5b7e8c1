"""Known latent families: channel count, the sampler's scale and shift, and latent → RGB factors.

A raw VAE latent z becomes the diffusion model's latent as `(z - shift) * scale`; Wan 2.1/2.2 and
Mochi shift and scale each channel, `(z - mean_c) * scale / std_c`. The RGB factors (`[C, 3]`, rows
= latent channels) and bias map that model-space latent to an image nominally in -1..1. Numbers are
the published ones (ComfyUI `comfy/latent_formats.py`, Stability/BFL configs; the video families'
in `family_factors.py`); the SD1.x scale 0.18215 and SDXL 0.13025 are 1/std of their latents.
Video families' latents are `[B, C, T, h, w]`; their factors act on each frame alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import family_factors as ff
from .errors import InputError


@dataclass(frozen=True)
class LatentFamily:
    name: str                                   # short id: "sd1", "sdxl", "sd3", "flux"
    label: str                                  # for people: "SD1.x / SD2.x"
    channels: int
    scale: float
    shift: float
    rgb_factors: tuple[tuple[float, float, float], ...]  # [C, 3]
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    video: bool = False                         # latents [B, C, T, h, w]
    channel_mean: tuple[float, ...] | None = None  # per-channel shift (Wan, Mochi), applied before `shift`
    channel_std: tuple[float, ...] | None = None   # per-channel divisor (Wan, Mochi)

    @property
    def per_channel(self) -> bool:
        return self.channel_mean is not None

    def channel_shift_scale(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift `[C]`, scale `[C]`) with model = (raw - shift) * scale, per channel."""
        if not self.per_channel:
            return (torch.full((self.channels,), self.shift, dtype=dtype),
                    torch.full((self.channels,), self.scale, dtype=dtype))
        mean, std = torch.tensor(self.channel_mean, dtype=dtype), torch.tensor(self.channel_std, dtype=dtype)
        return mean + self.shift, self.scale / std

    def _per_channel_view(self, z: torch.Tensor):
        shift, scale = self.channel_shift_scale(torch.float64)
        view = (1, self.channels) + (1,) * (z.dim() - 2)
        return shift.to(z.dtype).view(view).to(z.device), scale.to(z.dtype).view(view).to(z.device)

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent `[B, C, h, w]` (or `[B, C, T, h, w]`) → what the diffusion model sees."""
        if not self.per_channel:
            return (z - self.shift) * self.scale
        shift, scale = self._per_channel_view(z)
        return (z - shift) * scale

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latent `[B, C, h, w]` (or `[B, C, T, h, w]`) → raw VAE latent."""
        if not self.per_channel:
            return x / self.scale + self.shift
        shift, scale = self._per_channel_view(x)
        return x / scale + shift

    def rgb_matrix(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """The factors as a `[C, 3]` tensor."""
        return torch.tensor(self.rgb_factors, dtype=dtype, device=device)

    def rgb_bias_vector(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.tensor(self.rgb_bias, dtype=dtype, device=device)

    def to_dict(self) -> dict:
        data = {"name": self.name, "label": self.label, "channels": self.channels,
                "scale": self.scale, "shift": self.shift}
        if self.video:
            data["video"] = True
        if self.per_channel:
            data.update(channel_mean=list(self.channel_mean), channel_std=list(self.channel_std))
        return data


_SD1_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))

_SDXL_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
             (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))

_SD3_RGB = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)

_FLUX_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)

FAMILIES: dict[str, LatentFamily] = {
    f.name: f for f in (
        LatentFamily("sd1", "SD1.x / SD2.x", 4, 0.18215, 0.0, _SD1_RGB),
        LatentFamily("sdxl", "SDXL", 4, 0.13025, 0.0, _SDXL_RGB, (0.1084, -0.0175, -0.0011)),
        LatentFamily("sd3", "SD3", 16, 1.5305, 0.0609, _SD3_RGB, (0.2394, 0.2135, 0.1925)),
        LatentFamily("flux", "Flux", 16, 0.3611, 0.1159, _FLUX_RGB, (-0.0329, -0.0718, -0.0851)),
        LatentFamily("hunyuan_image21", "Hunyuan Image 2.1", 64, 0.75289, 0.0, ff.HUNYUAN_IMAGE21_RGB,
                     ff.HUNYUAN_IMAGE21_RGB_BIAS),
        LatentFamily("wan21", "Wan 2.1 / Qwen-Image (video)", 16, 1.0, 0.0, ff.WAN21_RGB, ff.WAN21_RGB_BIAS, True,
                     ff.WAN21_MEAN, ff.WAN21_STD),
        LatentFamily("wan22", "Wan 2.2 (video)", 48, 1.0, 0.0, ff.WAN22_RGB, ff.WAN22_RGB_BIAS, True,
                     ff.WAN22_MEAN, ff.WAN22_STD),
        LatentFamily("hunyuan_video", "HunyuanVideo (video)", 16, 0.476986, 0.0, ff.HUNYUAN_VIDEO_RGB,
                     ff.HUNYUAN_VIDEO_RGB_BIAS, True),
        LatentFamily("mochi", "Mochi (video)", 12, 1.0, 0.0, ff.MOCHI_RGB, ff.MOCHI_RGB_BIAS, True,
                     ff.MOCHI_MEAN, ff.MOCHI_STD),
        LatentFamily("ltxv", "LTXV (video)", 128, 1.0, 0.0, ff.LTXV_RGB, ff.LTXV_RGB_BIAS, True),
    )
}

ALIASES = {"sd": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd2": "sd1", "sd1x": "sd1",
           "xl": "sdxl", "sd35": "sd3", "sd3.5": "sd3", "flux1": "flux", "flux.1": "flux",
           "wan": "wan21", "wan2.1": "wan21", "qwen": "wan21", "qwen-image": "wan21", "wan2.2": "wan22",
           "hunyuanvideo": "hunyuan_video", "ltx": "ltxv", "ltxvideo": "ltxv", "hunyuan_image": "hunyuan_image21",
           "hunyuanimage2.1": "hunyuan_image21"}


def get_family(name: str, input_name: str = "family") -> LatentFamily:
    """Look a family up by name or alias (case-insensitive)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FAMILIES:
        raise InputError(input_name, f"unknown latent family {name!r}",
                         f"one of {', '.join(FAMILIES)} (aliases: {', '.join(ALIASES)})")
    return FAMILIES[key]


def families_with_channels(channels: int, video: bool = False) -> list[LatentFamily]:
    """Every known image family (`video`: video family) whose latents have this many channels
    (4 → SD1.x and SDXL; 16 and video → Wan 2.1 and HunyuanVideo)."""
    return [f for f in FAMILIES.values() if f.channels == channels and f.video == video]


def families_of_kind(video: bool) -> list[LatentFamily]:
    """Every known image family, or every known video family."""
    return [f for f in FAMILIES.values() if f.video == video]
