"""The training study's two variants of the KL autoencoder that compute something else with the same
weights, so the file declares them in its metadata (the loader reads them back):

- a pixel-norm decoder (`decoder_norm="pixel"`): its last level and `norm_out` normalise each pixel
  over its own channels, with GroupNorm's parameters; no statistic is shared between cells there, so
  one latent cell cannot steer the normalisation of the whole image;
- tanh-bounded latents (`latent_bound=B`): the posterior mean is B tanh(mean / B), as TAESD bounds
  its latents; the log-variance is left raw.

Pure functions, shared by the engine's model and the host adapter, so both compute the same thing.
"""
from __future__ import annotations

import torch
from torch import nn

NORM_EPS = 1e-6  # GroupNorm's eps in every KL-F8 family


def pixel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]`, each pixel normalised over its channels, then GroupNorm's affine (`[C]` each)."""
    x = (x - x.mean(1, keepdim=True)) * torch.rsqrt(x.var(1, keepdim=True, unbiased=False) + NORM_EPS)
    return x * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


class PixelNorm(nn.Module):
    """`pixel_norm` with GroupNorm's parameter names (`weight`, `bias` [C]): a drop-in for its state dict."""

    def __init__(self, c: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):  # [B, C, H, W]
        return pixel_norm(x, self.weight, self.bias)


def bound_means(moments: torch.Tensor, channels: int, bound: float) -> torch.Tensor:
    """`[B, 2C, ...]` moments with the means (the first `channels`) bounded to +-bound by bound tanh(x / bound)."""
    means = bound * torch.tanh(moments[:, :channels] / bound)
    return torch.cat([means, moments[:, channels:]], 1)
