"""Latent files ↔ raw latents `[B, C, h, w]` or video latents `[B, C, T, h, w]` float32 (ComfyUI
`.latent`, inspect's moments, safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError

LATENT_KEYS = ("latent_tensor", "samples", "mean", "latent")
SD1_SCALE = 0.18215  # ComfyUI's LoadLatent: files without a version key hold SD1 model-space latents


def read_latent(path, allow_nonfinite: bool = False) -> torch.Tensor:
    """A latent file → raw latent `[B, C, h, w]` (or a video latent `[B, C, T, h, w]`) float32.

    Reads safetensors files: ComfyUI `.latent` (`latent_tensor`; files without
    `latent_format_version_0` are old SD1 model-space ones and are divided by 0.18215, as ComfyUI
    does), `samples`, `mean` (inspect --save-moments), `latent`, or a file with a single tensor.
    """
    from safetensors import SafetensorError

    from .containers import safetensors_header
    from .frames import MAX_LATENT_CHANNELS
    from .errors import VAELoadError
    from safetensors.torch import load_file

    path = Path(path)
    expected = ("a .latent/.safetensors file with a 'latent_tensor', 'samples' or 'mean' tensor [B, C, h, w] "
                "(video: [B, C, T, h, w])")
    if not path.is_file():
        raise InputError(f"latent '{path}'", "no such file", expected)
    try:
        safetensors_header(path, expected)  # bounded and coherent before safetensors reads anything
        tensors = load_file(str(path))
    except VAELoadError as e:
        raise InputError(f"latent '{path}'", f"not a readable safetensors file ({e.problem})", expected) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"latent '{path}'", f"not a readable safetensors file ({str(e)[:200]})", expected) from None
    key = next((k for k in LATENT_KEYS if k in tensors), None)
    if key is None:
        candidates = [k for k, v in tensors.items() if v.dim() in (3, 4, 5) and v.is_floating_point()]
        if len(candidates) != 1:
            raise InputError(f"latent '{path}'", f"cannot tell which tensor is the latent (keys: "
                             f"{', '.join(sorted(tensors)) or 'none'})", expected)
        key = candidates[0]
    z = tensors[key].float()
    if key == "latent_tensor" and "latent_format_version_0" not in tensors:
        z = z / SD1_SCALE
    if z.dim() == 3:
        z = z[None]
    if z.dim() not in (4, 5):
        raise InputError(f"latent '{path}'", f"tensor '{key}' has shape {list(z.shape)}", expected)
    if 0 in z.shape or z.shape[1] > MAX_LATENT_CHANNELS:
        raise InputError(f"latent '{path}'", f"tensor '{key}' has shape {list(z.shape)}",
                         f"a latent [B, C, h, w] or [B, C, T, h, w] with no empty dimension and at most "
                         f"{MAX_LATENT_CHANNELS} channels")
    bad = int((~torch.isfinite(z)).sum())
    if bad and not (allow_nonfinite and bad < z.numel()):
        raise InputError(f"latent '{path}'", f"tensor '{key}' holds {bad} non-finite values (NaN/Inf) of {z.numel()}",
                         "finite numbers")
    return z


def write_latent(z: torch.Tensor, path) -> Path:
    """Write a raw latent `[B, C, h, w]` or `[B, C, T, h, w]` as a ComfyUI `.latent` file (Load Latent
    reads it unchanged)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": z.detach().float().contiguous().cpu(), "latent_format_version_0": torch.tensor([])},
              str(path), {"vae_fix": "raw VAE latent " + ("[B, C, T, h, w]" if z.dim() == 5 else "[B, C, h, w]")})
    return path
