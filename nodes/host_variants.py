"""The training study's variants in the host's own KL model (part of the host adapter, beside host.py).

A pixel-norm decoder and tanh-bounded latents have the plain KL layout's weights and compute
something else (`vae_fix/variants.py`); the file declares which in its metadata. The host builds its
plain KL model from those weights, and this makes it compute what the file declares: the norms the
engine's model makes per-pixel become per-pixel in the host's model (the same functions, on the
host's own cast weights), and the means are bounded on their way into the host's posterior, where
VAE Encode, the pack's moments and every other reader take them.
"""
from __future__ import annotations

import functools

import torch

import comfy.ops

from ..vae_fix.model import AutoencoderKL
from ..vae_fix.variants import PixelNorm, bound_means, pixel_norm

_PIXEL_CLASSES: dict[type, type] = {}  # host norm class -> its per-pixel subclass (kept by deepcopy)


def adapt_to_variant(vae, cfg) -> list[str]:
    """Make `vae` (a `comfy.sd.VAE` built from the file) compute the variant `cfg` declares; what was done."""
    fsm, done = vae.first_stage_model, []
    if cfg.decoder_norm == "pixel":
        modules = dict(fsm.named_modules())
        names = pixel_norm_names(cfg)
        for name in names:
            norm = modules[name]
            base = type(norm)
            norm.__class__ = _PIXEL_CLASSES.setdefault(base, type(f"Pixel{base.__name__}", (base,), {"forward": _pixel_forward}))
        done.append(f"pixel-norm decoder: {len(names)} norms of its last level normalise each pixel alone")
    if cfg.latent_bound:
        fsm.regularization.register_forward_pre_hook(functools.partial(_bound, cfg.latent_channels, cfg.latent_bound))
        done.append(f"latent means bounded by {cfg.latent_bound:g} tanh(mean / {cfg.latent_bound:g})")
    return done


def pixel_norm_names(cfg) -> list[str]:
    """The modules the engine's model of `cfg` normalises per pixel (its layout's names, the host's too)."""
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return [name for name, m in model.named_modules() if isinstance(m, PixelNorm)]


def _pixel_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight, bias = comfy.ops.cast_bias_weight(self, x)  # the host's dtype, device and weight patches
    return pixel_norm(x, weight, bias)


def _bound(channels: int, bound: float, _module, args: tuple) -> tuple:
    """Forward pre-hook of the host's regularizer: its input is the raw moments `[B, 2C, h, w]`."""
    return (bound_means(args[0], channels, bound),) + args[1:]
