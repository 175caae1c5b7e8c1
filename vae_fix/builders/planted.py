"""Real KL VAEs with a known log-variance "black hole", for tests, the demo and host tests.

`planted_vae` returns an ordinary `AutoencoderKL` (any layout: small test sizes, full SD, 16-channel
SD3/Flux) whose raw log-variance sits around `typical` with a robust spread of `spread` nats
everywhere except at one latent cell, where it drops `depth` nats (far below the -30 clamp).
Saved with `loader.save_vae` it is a plain CompVis `.safetensors` that ComfyUI loads too.

How (no wrapper, only weights): channel group 0 of every encoder layer is turned into a private
"carrier" path that nothing else reads. `conv_in` writes the marker feature u = R - (G + B) / 2
(pixels in -1..1) into it, the blocks pass it on unchanged (their residual branches write zero there,
shortcuts copy it), each downsample averages it 2x2, so at the end it is u averaged over each 8x8
cell. `norm_out` normalises that group over the image: a single cell with a high u becomes a spike
of about sqrt(cells) while every other cell is ~0. `conv_out` subtracts `gain` x spike from the
log-variance channels at the same cell only (centre tap). The rest of the network is the seeded
random VAE, with its log-variance rows rescaled so the map looks like SD's (median -20, spread ~1.5).

The rest of the encoder is made blind to the marker's colour direction (1, -1/2, -1/2) (projected
out of `conv_in`), so painting the marker changes nothing but the carrier, and its `conv_in` kernels
are made zero-sum (high-pass), so its map follows texture rather than flat colour and has no
outliers of its own. Each log-variance channel's long tail is pointed upwards, as in SD's maps.

The marker: `demo_image` is a pastel picture with R = (G + B) / 2 everywhere (u = 0) and one cell
pushed towards red along that direction. Another image works when that cell stands out in u;
`paint_marker` paints the marker into a copy of any image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..model import AutoencoderKL, AttnBlock, Downsample, ResnetBlock, VAEConfig, random_vae

TYPICAL_LOGVAR = -20.0  # SD-VAE maps sit around -17..-23 (see docs)
TYPICAL_SPREAD = 1.5    # robust sigma (1.4826 x MAD) of the planted map, nats
HOLE_DEPTH = 30.0       # the hole sits this far below typical: -50, far under the -30 clamp
MARKER_DIRECTION = (1.0, -0.5, -0.5)  # the colour direction the marker feature u reads
MARKER_STEP = 0.5


@dataclass
class PlantedVAE:
    model: AutoencoderKL
    cell: tuple[int, int] | None   # (y, x) latent cell of the hole, None for a smooth VAE
    image: torch.Tensor            # [1, 3, H, W] 0..1, the image it was calibrated on
    logvar_raw: torch.Tensor       # [C, h, w] the raw log-variance it gives on that image

    @property
    def codec(self):
        """The model as the engine's `Codec`."""
        from ..codec import model_codec
        return model_codec(self.model, "planted" if self.cell else "smooth")


# ---------------------------------------------------------------- images

def demo_image(height: int = 256, width: int = 256, cell: tuple[int, int] | None = (9, 21),
               downscale: int = 8) -> torch.Tensor:
    """`[1, 3, H, W]` 0..1: gradients, discs and a fine texture, all with R = (G + B) / 2, plus,
    when `cell` is given, the red marker (`paint_marker`) in that latent cell."""
    ys = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    g = 0.25 + 0.5 * xs
    b = 0.7 - 0.4 * ys
    for cy, cx, r, dg, db in ((0.3, 0.3, 0.18, 0.2, -0.15), (0.7, 0.65, 0.22, -0.2, 0.2), (0.25, 0.8, 0.12, 0.1, 0.1)):
        disc = ((r - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()) / 0.05).clamp(0, 1)  # soft edge
        g, b = g + dg * disc, b + db * disc
    noise = torch.randn(2, height, width, generator=torch.Generator().manual_seed(0))
    g, b = (g + 0.04 * noise[0]).clamp(0.25, 1), (b + 0.04 * noise[1]).clamp(0.25, 1)
    img = torch.stack([(g + b) / 2, g, b])[None]
    return paint_marker(img, cell, downscale) if cell is not None else img


def paint_marker(image: torch.Tensor, cell: tuple[int, int], downscale: int = 8) -> torch.Tensor:
    """A copy of `image [1, 3, H, W]` with the marker in latent cell `cell` (y, x): each pixel moves
    along MARKER_DIRECTION only (redder), as far as 0..1 allows, up to MARKER_STEP."""
    y, x = _check_cell(cell, image.shape[2] // downscale, image.shape[3] // downscale)
    out = image.clone()
    patch = out[:, :, y * downscale:(y + 1) * downscale, x * downscale:(x + 1) * downscale]
    r, g, b = patch[:, 0], patch[:, 1], patch[:, 2]
    step = torch.minimum(torch.minimum(1 - r, 2 * g), 2 * b).clamp(0, MARKER_STEP)
    patch += step[:, None] * torch.tensor(MARKER_DIRECTION).view(1, 3, 1, 1)
    return out


def _check_cell(cell, h: int, w: int) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in cell)
    except (TypeError, ValueError):
        raise InputError("cell", f"{cell!r}", "a (y, x) pair of latent cell indices") from None
    if not (0 <= y < h and 0 <= x < w):
        raise InputError("cell", f"({y}, {x}) is outside the {h}x{w} latent grid", f"0 <= y < {h}, 0 <= x < {w}")
    return y, x


# ---------------------------------------------------------------- weight surgery

def _carriers(channels: int, cfg: VAEConfig) -> int:
    return channels // cfg.norm_groups  # exactly GroupNorm group 0


def _hide_inputs(conv, k_in: int) -> None:
    conv.weight[:, :k_in] = 0


def _silence_outputs(conv, k_out: int) -> None:
    conv.weight[:k_out] = 0
    conv.bias[:k_out] = 0


def _isolate_block(block: ResnetBlock, cfg: VAEConfig) -> None:
    k_in, k_out = _carriers(block.conv1.in_channels, cfg), _carriers(block.conv2.out_channels, cfg)
    _hide_inputs(block.conv1, k_in)
    _silence_outputs(block.conv2, k_out)
    if block.nin_shortcut is not None:  # carriers copied across the width change, others blind to them
        _hide_inputs(block.nin_shortcut, k_in)
        _silence_outputs(block.nin_shortcut, k_out)
        for j in range(k_out):
            block.nin_shortcut.weight[j, j % k_in] = 1.0


def _isolate_attention(attn: AttnBlock, cfg: VAEConfig) -> None:
    k = _carriers(attn.q.in_channels, cfg)
    for conv in (attn.q, attn.k, attn.v):
        _hide_inputs(conv, k)
    _silence_outputs(attn.proj_out, k)


def _isolate_downsample(down: Downsample, cfg: VAEConfig) -> None:
    k = _carriers(down.conv.in_channels, cfg)
    _hide_inputs(down.conv, k)
    _silence_outputs(down.conv, k)
    for j in range(k):  # stride 2, padded right/bottom: taps (0..1, 0..1) are one aligned 2x2 block
        down.conv.weight[j, j, 0:2, 0:2] = 0.25


def _build_carrier_path(model: AutoencoderKL) -> int:
    """Wire the private marker path through the encoder; returns its channel count at the end."""
    cfg, enc = model.config, model.encoder
    k0 = _carriers(enc.conv_in.out_channels, cfg)
    _silence_outputs(enc.conv_in, k0)
    n = torch.tensor(MARKER_DIRECTION)
    w = enc.conv_in.weight  # the rest of the network is blind to the marker direction:
    w -= torch.einsum("oikl,i,j->ojkl", w, n / n.norm(), n / n.norm())  # a marker changes nothing else
    w -= w.mean(dim=(2, 3), keepdim=True)  # high-pass: flat colour areas look alike to the random part
    enc.conv_in.weight[:k0, :, 1, 1] = n  # u = R - (G + B) / 2
    for level in enc.down:
        for i, block in enumerate(level.block):
            _isolate_block(block, cfg)
            if len(level.attn):
                _isolate_attention(level.attn[i], cfg)
        if getattr(level, "downsample", None) is not None:
            _isolate_downsample(level.downsample, cfg)
    _isolate_block(enc.mid.block_1, cfg)
    if enc.mid.attn_1 is not None:
        _isolate_attention(enc.mid.attn_1, cfg)
    _isolate_block(enc.mid.block_2, cfg)
    k = _carriers(enc.norm_out.num_channels, cfg)
    enc.norm_out.weight[:k], enc.norm_out.bias[:k] = 1.0, 0.0
    _hide_inputs(enc.conv_out, k)
    _untangle_quant_conv(model)
    return k


def _untangle_quant_conv(model: AutoencoderKL) -> None:
    """quant_conv: mean rows read only the mean half, log-variance rows copy the log-variance half,
    so the conv_out log-variance rows alone decide the log-variance."""
    q = model.quant_conv
    if q is None:
        return
    c, z = model.config.latent_channels, model.config.z_channels
    q.weight[:c, z:] = 0
    q.weight[c:] = 0
    q.bias[c:] = 0
    for i in range(c):
        q.weight[c + i, z + i % z] = 1.0


def _logvar_rows(model: AutoencoderKL) -> slice:
    z = model.config.z_channels
    return slice(z, 2 * z)


def _carrier_signal(model: AutoencoderKL, x: torch.Tensor, k: int) -> torch.Tensor:
    """`[h, w]`: the SiLU'd, normalised carrier that conv_out sees (mean over carrier channels)."""
    seen = {}
    handle = model.encoder.norm_out.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        moments = model.moments(x)
    finally:
        handle.remove()
    return F.silu(seen["out"][0, :k]).mean(0), moments[0]


# ---------------------------------------------------------------- public builders

def planted_vae(cfg: VAEConfig, image: torch.Tensor | None = None, cell: tuple[int, int] | None = (9, 21),
                seed: int = 0, typical: float = TYPICAL_LOGVAR, spread: float = TYPICAL_SPREAD,
                depth: float = HOLE_DEPTH) -> PlantedVAE:
    """A VAE whose raw log-variance on `image` (default `demo_image` with the marker at `cell`)
    has median `typical`, robust spread `spread` and, at `cell`, a hole `depth` nats deeper.
    `cell=None` gives the smooth variant: same map without a hole."""
    ds = cfg.downscale
    if image is None:
        image = demo_image(32 * ds, 32 * ds, cell, ds)
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
        raise InputError("image", f"got {getattr(image, 'shape', type(image).__name__)}", "a [1, 3, H, W] tensor in 0..1")
    h, w = image.shape[2] // ds, image.shape[3] // ds
    if cell is not None:
        cell = _check_cell(cell, h, w)
    model = random_vae(cfg, seed)
    x = image[:, :, :h * ds, :w * ds].float() * 2 - 1
    with torch.no_grad():
        k = _build_carrier_path(model)
        signal, moments = _carrier_signal(model, x, k)
        _calibrate_logvar(model, moments[cfg.latent_channels:], typical, spread)
        if cell is not None:
            _dig_hole(model, signal, cell, depth, k)
        logvar = model.moments(x)[0, cfg.latent_channels:]
    planted = PlantedVAE(model, cell, image[:, :, :h * ds, :w * ds].clone(), logvar)
    if cell is not None:
        _verify(planted, typical, depth)
    return planted


def smooth_vae(cfg: VAEConfig, image: torch.Tensor | None = None, seed: int = 0,
               typical: float = TYPICAL_LOGVAR, spread: float = 0.05) -> PlantedVAE:
    """The same construction without a hole and with a nearly constant map (spread 0.05 nats)."""
    return planted_vae(cfg, image, cell=None, seed=seed, typical=typical, spread=spread)


def _calibrate_logvar(model: AutoencoderKL, logvar: torch.Tensor, typical: float, spread: float) -> None:
    """Rescale the conv_out log-variance rows so each channel has median `typical`, robust spread `spread`."""
    conv, rows = model.encoder.conv_out, _logvar_rows(model)
    flat = logvar.flatten(1)
    med = flat.median(dim=1).values
    sigma = 1.4826 * (flat - med[:, None]).abs().median(dim=1).values
    gain = spread / sigma.clamp_min(1e-6)
    # Random networks give skewed maps; point each channel's long tail upwards (SD's maps reach
    # ~7 nats above their median but few below), so only the planted hole stands out below.
    low_tail = med - flat.amin(dim=1)
    high_tail = flat.amax(dim=1) - med
    gain = torch.where(low_tail > high_tail, -gain, gain)
    conv.weight[rows] *= gain.view(-1, 1, 1, 1)
    conv.bias[rows] = (conv.bias[rows] - med) * gain + typical


def _dig_hole(model: AutoencoderKL, signal: torch.Tensor, cell, depth: float, k: int) -> None:
    y, x = cell
    others = torch.cat([signal.flatten()[: y * signal.shape[1] + x], signal.flatten()[y * signal.shape[1] + x + 1:]])
    peak = float(signal[y, x])
    if others.numel() and peak < 3 * float(others.max()) or peak <= 0.5:
        raise InputError("image", f"latent cell {cell} does not stand out in redness u = R - (G + B) / 2 "
                         f"(marker signal {peak:.3g}, strongest elsewhere {float(others.max()):.3g})",
                         "an image with the marker painted at that cell (see paint_marker) and no other red area")
    model.encoder.conv_out.weight[_logvar_rows(model), :k, 1, 1] = -depth / peak / k


def _verify(planted: PlantedVAE, typical: float, depth: float) -> None:
    lv = planted.logvar_raw.amin(0)
    y, x = planted.cell
    flat = int(lv.argmin())
    where = divmod(flat, lv.shape[1])
    if where != (y, x) or float(lv[y, x]) > typical - depth / 2:
        raise RuntimeError(f"planting failed: lowest cell {where} at {float(lv.min()):.3g}, wanted {planted.cell}")


def corner_hole_vae(cfg: VAEConfig, seed: int = 0, typical: float = TYPICAL_LOGVAR, spread: float = 0.05,
                    depth: float = HOLE_DEPTH, mean_spike: float = 0.0) -> PlantedVAE:
    """A smooth VAE with a hole at latent cell (0, 0) on every image, whatever its content (the
    recurring kind the health check looks for), `depth` nats deep, and a mean `mean_spike` higher there.

    How: the carrier reads nothing (its marker weights are zeroed) and `norm_out` gives it a constant
    silu(1); `conv_out` reads it with taps that cancel wherever the 3x3 window lies inside the map
    (centre and up-left -a, up and left +a) and only at the top-left corner, where zero padding hides
    three of them, leave -a. Weights only, so it saves and loads as any VAE."""
    smooth = smooth_vae(cfg, seed=seed, typical=typical, spread=spread)
    model, k = smooth.model, _carriers(smooth.model.encoder.norm_out.num_channels, cfg)
    enc, z = model.encoder, cfg.z_channels
    with torch.no_grad():
        enc.conv_in.weight[:_carriers(enc.conv_in.out_channels, cfg)] = 0
        enc.norm_out.bias[:k] = 1.0
        level = float(F.silu(torch.tensor(1.0)))
        for rows, amount in ((slice(z, 2 * z), -depth), (slice(0, z), mean_spike)):
            taps = enc.conv_out.weight[rows, :k]
            a = amount / level / k
            taps[..., 1, 1], taps[..., 0, 0], taps[..., 0, 1], taps[..., 1, 0] = a, a, -a, -a
        logvar = model.moments(smooth.image * 2 - 1)[0, cfg.latent_channels:]
    return PlantedVAE(model, (0, 0), smooth.image, logvar)


def tamed_vae(cfg: VAEConfig, seed: int = 0, typical: float = TYPICAL_LOGVAR, spread: float = 0.05) -> PlantedVAE:
    """A plain seeded random VAE (no carrier path, no high-pass) whose log-variance rows are
    rescaled on the demo image to median about `typical` and robust spread `spread`: smooth, no hole."""
    model = random_vae(cfg, seed)
    image = demo_image(32 * cfg.downscale, 32 * cfg.downscale, None, cfg.downscale)
    with torch.no_grad():
        _calibrate_logvar(model, model.moments(image * 2 - 1)[0, cfg.latent_channels:], typical, spread)
        logvar = model.moments(image * 2 - 1)[0, cfg.latent_channels:]
    return PlantedVAE(model, None, image, logvar)
