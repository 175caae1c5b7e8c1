"""A KL autoencoder in the CompVis layout, its whole configuration read off the state dict.

Covers SD1.x/2.x and SDXL (4 latent channels, quant_conv), SD3/Flux style (16 channels, no
quant_conv), retrained 8/16-channel VAEs and other widths and depths. Parameter names are the
CompVis ones (`encoder.down.0.block.0.conv1.weight`, ...), so a CompVis state dict loads as is.

Layouts: images `[B, 3, H, W]` in -1..1; moments `[B, 2C, h, w]` (mean then raw log-variance);
latents `[B, C, h, w]` in raw VAE space (no family scale or shift).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .variants import NORM_EPS, PixelNorm, bound_means  # noqa: F401  (PixelNorm: part of this module's API)

NORM_GROUPS = 32  # every KL-F8 family uses GroupNorm(32, eps=1e-6)
MAX_LEVELS = 8    # downscale 128: beyond any family (SD 8x, Hunyuan Image 32x)
MAX_BLOCKS = 16   # res blocks per level (SD: 2)
PADDING_MODES = ("zeros", "reflect")  # "reflect": VAEs retrained with reflection padding (EQ-VAE style)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2          # encoder blocks per level; the decoder has one more
    z_channels: int = 4              # channels between encoder/decoder and the 1×1 quant convs
    latent_channels: int = 4         # C of the latent (embed_dim when quant_conv exists)
    double_z: bool = True            # encoder outputs mean and log-variance
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    attn_levels: tuple[int, ...] = ()  # levels with attention inside the down/up blocks (rare)
    decoder_kind: str = "kl"         # "kl", or "none" when the file's decoder is of another kind
    norm_groups: int = NORM_GROUPS
    decoder_norm: str = "group"      # "pixel": the decoder's last level and norm_out normalise each pixel alone
    latent_bound: float = 0.0        # > 0: the mean is bound * tanh(mean / bound), as TAESD bounds its latents

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


DECODER_NORMS = ("group", "pixel")


def _norm(c: int, groups: int, pixel: bool = False) -> nn.Module:
    return PixelNorm(c) if pixel else nn.GroupNorm(groups, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, pixel: bool = False):
        super().__init__()
        self.norm1 = _norm(c_in, groups, pixel)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups, pixel)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        # One step per line: rebinding `h` frees each intermediate before the next conv allocates
        # (nested calls would keep conv1's output alive through conv2: one more activation at peak).
        h = _silu(self.norm1(x))
        h = self.conv1(h)
        h = _silu(self.norm2(h))
        h = self.conv2(h)
        return _add(h, self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions; 1×1 convs as in CompVis."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=NORM_EPS)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, hw, C]
        # The 1×1 convs run as matrix products (as diffusers' Linear layers do): on CPU a 1×1 conv
        # falls back to a slow im2col path, and [B, 1, hw, C] contiguous inputs get the fused SDPA kernel.
        q, k, v = (_linear(n, m).unsqueeze(1) for m in (self.q, self.k, self.v))  # [B, 1, hw, C]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)                # [B, hw, C]
        out = _linear(a, self.proj_out).transpose(1, 2).reshape(b, c, h, w)
        return _add(out, x)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), optional `attn`, optional resampler."""

    def __init__(self, blocks, attns, resample_name: str | None, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample_name:
            setattr(self, resample_name, resample)
        self._resample = resample_name

    def layers(self):
        """The modules in call order. Encoder/Decoder loop over these rather than call the level, so no
        frame keeps the level's input alive after its first block (one activation less at peak)."""
        for i, blk in enumerate(self.block):
            yield blk
            if len(self.attn):
                yield self.attn[i]
        if self._resample:
            yield getattr(self, self._resample)

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


class Mid(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups) if attention else None
        self.block_2 = ResnetBlock(c, c, groups)

    def layers(self):
        yield self.block_1
        if self.attn_1 is not None:
            yield self.attn_1
        yield self.block_2

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.base_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        levels, c_in = [], ch
        for i, m in enumerate(mult):
            c_out = ch * m
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out, g) for _ in blocks] if i in cfg.attn_levels else []
            last = i == len(mult) - 1
            levels.append(Level(blocks, attns, None if last else "downsample", None if last else Downsample(c_out)))
            c_in = c_out
        self.down = nn.ModuleList(levels)
        self.mid = Mid(c_in, g, cfg.mid_attention)
        self.norm_out = nn.GroupNorm(g, c_in, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels * (2 if cfg.double_z else 1), 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for layer in [m for level in self.down for m in level.layers()] + list(self.mid.layers()):
            x = layer(x)
        x = _silu(self.norm_out(x))
        return self.conv_out(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch, mult = cfg.norm_groups, cfg.base_channels, cfg.channel_mult
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c, g, cfg.mid_attention)
        levels = [None] * len(mult)
        for i in reversed(range(len(mult))):  # built deepest first, stored by level index
            c_out = ch * mult[i]
            pixel = i == 0 and cfg.decoder_norm == "pixel"  # level 0 runs last, at full resolution
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, g, pixel) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out, g) for _ in blocks] if i in cfg.attn_levels else []
            levels[i] = Level(blocks, attns, "upsample" if i else None, Upsample(c_out) if i else None)
            c = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g, cfg.decoder_norm == "pixel")
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for layer in list(self.mid.layers()) + [m for level in reversed(self.up) for m in level.layers()]:
            x = layer(x)
        x = _silu(self.norm_out(x))
        return self.conv_out(x)


class AutoencoderKL(nn.Module):
    """Encoder → quant_conv → moments; latent → post_quant_conv → decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        z, c = cfg.z_channels, cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * z, 2 * c, 1) if cfg.use_quant_conv else None
        has_decoder = cfg.decoder_kind == "kl"
        self.post_quant_conv = nn.Conv2d(c, z, 1) if cfg.use_post_quant_conv and has_decoder else None
        self.decoder = Decoder(cfg) if has_decoder else None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in -1..1 → `[B, 2C, h, w]`: mean, then raw (unclamped) log-variance."""
        h = self.encoder(x)
        m = self.quant_conv(h) if self.quant_conv is not None else h
        bound = self.config.latent_bound  # a study variant: no weight expresses it, the file declares it
        return bound_means(m, self.config.latent_channels, bound) if bound > 0 else m

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean `[B, C, h, w]` (what ComfyUI's VAE Encode returns)."""
        return self.moments(x)[:, : self.config.latent_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` raw latent → `[B, 3, H, W]`, nominally -1..1 (not clamped)."""
        if self.decoder is None:
            raise RuntimeError("this VAE's decoder is not a KL decoder; only its encoder was loaded")
        z = z.contiguous()  # a channel slice of `moments` is strided; torch 2.13's CPU conv backward crashes on it
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _silu(x):
    # In place when no graph is recorded: saves one activation-sized allocation per call.
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _add(fresh, other):
    """`fresh + other`, in place into `fresh` (a tensor this module just made) when no graph is recorded."""
    return fresh.add_(other) if not torch.is_grad_enabled() else fresh + other


def _linear(x, conv: nn.Conv2d):
    """A 1×1 conv applied to `[B, N, C]` as a matrix product."""
    return F.linear(x, conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias)


def set_padding(model: nn.Module, mode: str = "zeros") -> int:
    """Set how every padded 2-D convolution of `model` pads its border ('zeros', as trained by
    CompVis, or 'reflect'); any torch module, the engine's or a host's. Returns how many convolutions
    pad (the asymmetric zero pad before a strided downsample is not a convolution's and stays)."""
    check_padding(mode)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and _pads(m)]
    for conv in convs:
        conv.padding_mode = mode
    return len(convs)


def check_padding(mode: str) -> str:
    """`mode` when it is one of PADDING_MODES; InputError naming them otherwise."""
    if mode not in PADDING_MODES:
        raise InputError("padding", f"{mode!r} is not a padding mode", " or ".join(repr(m) for m in PADDING_MODES))
    return mode


def _pads(conv: nn.Conv2d) -> bool:
    return conv.padding == "same" if isinstance(conv.padding, str) else any(p > 0 for p in conv.padding)


# ---------------------------------------------------------------- configuration from shapes

def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def is_foreign_decoder(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for SVD's temporal decoder: every decoder block has its `mix_factor` (and time_stack). A
    stray `time_*` key alone is damage, left for the key check to name, not a family."""
    if not any(k.startswith("decoder.") and ("time_" in k or "mix_factor" in k) for k in sd):
        return False
    blocks = {k[:-len(".conv1.weight")] for k in sd if k.startswith("decoder.") and k.endswith(".conv1.weight")}
    return bool(blocks) and all(f"{b}.mix_factor" in sd and any(k.startswith(f"{b}.time_stack.") for k in sd)
                                for b in blocks)


def infer_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Read the whole configuration off a CompVis-layout state dict (no prefix).

    Raises KeyError naming the first missing key that the shapes are read from; the loader turns
    that into a VAELoadError.
    """
    def shape(key):
        if key not in sd:
            raise KeyError(key)
        return tuple(sd[key].shape)

    keys = list(sd)
    ch, c_img = shape("encoder.conv_in.weight")[:2]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise KeyError("encoder.down.0.block.0.conv1.weight")
    n_res = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    if len(levels) > MAX_LEVELS or n_res > MAX_BLOCKS or levels != list(range(len(levels))):
        raise ValueError(f"{len(levels)} encoder levels (numbered {levels[0]}..{levels[-1]}) of {n_res} blocks; "
                         f"a KL VAE has 1..{MAX_LEVELS} levels numbered from 0 and at most {MAX_BLOCKS} blocks each")
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels)
    attn_levels = tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
    enc_out = shape("encoder.conv_out.weight")[0]
    foreign = is_foreign_decoder(sd)
    has_decoder = any(k.startswith("decoder.") for k in keys) and not foreign
    if has_decoder:
        z = shape("decoder.conv_in.weight")[1]
        out_ch = shape("decoder.conv_out.weight")[0]
    else:
        z, out_ch = enc_out // 2, c_img
    double_z = enc_out == 2 * z
    quant = "quant_conv.weight" in sd
    latent = shape("quant_conv.weight")[0] // 2 if quant else z
    return VAEConfig(
        in_channels=c_img, out_channels=out_ch, base_channels=ch, channel_mult=mult,
        num_res_blocks=n_res, z_channels=z, latent_channels=latent, double_z=double_z,
        use_quant_conv=quant, use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_attention="encoder.mid.attn_1.q.weight" in sd, attn_levels=attn_levels,
        decoder_kind="kl" if has_decoder else "none",
    )


# ---------------------------------------------------------------- presets for tests and benchmarks

FAMILY_PRESETS: dict[str, dict] = {
    # Full-size layouts of the published VAEs (random weights are built from these in tests).
    "sd": dict(channel_mult=(1, 2, 4, 4), z_channels=4, latent_channels=4),
    "sdxl": dict(channel_mult=(1, 2, 4, 4), z_channels=4, latent_channels=4),
    "sd3": dict(channel_mult=(1, 2, 4, 4), z_channels=16, latent_channels=16,
                use_quant_conv=False, use_post_quant_conv=False),
    "flux": dict(channel_mult=(1, 2, 4, 4), z_channels=16, latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False),
    "retrained8": dict(channel_mult=(1, 2, 4, 4), z_channels=8, latent_channels=8),
}


def preset_config(family: str, small: bool = False, **overrides) -> VAEConfig:
    """A config in a family's real layout; `small=True` shrinks widths and depth for fast tests."""
    if family not in FAMILY_PRESETS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_PRESETS)}")
    kw = dict(FAMILY_PRESETS[family])
    if small:
        kw.update(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
    kw.update(overrides)
    return VAEConfig(**kw)


def random_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """A VAE with seeded random weights (PyTorch's default init), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(cfg).eval()
