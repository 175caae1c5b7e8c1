"""ComfyUI wire types ↔ engine tensors. Pure torch: no host imports, never modifies its inputs.

IMAGE (ComfyUI): `[B, H, W, C]` float 0..1. Engine images: `[B, 3, H, W]` float 0..1.
LATENT (ComfyUI): a dict whose `samples` is `[B, C, h, w]` (video: `[B, C, T, h, w]`) in raw VAE space; other keys
(`noise_mask`, `batch_index`, `type`, ...) must survive every edit.
"""

import torch

from ..vae_fix.errors import InputError

IMAGE_EXPECTED = "a ComfyUI IMAGE: float tensor [B, H, W, 3] in 0..1 (e.g. from Load Image)"


def image_to_engine(image, name: str = "image") -> torch.Tensor:
    """IMAGE `[B, H, W, C]` → engine `[B, 3, H, W]` float32 (a new tensor). Alpha is dropped,
    one-channel images are repeated to RGB."""
    if not isinstance(image, torch.Tensor):
        raise InputError(name, f"got {type(image).__name__}", IMAGE_EXPECTED)
    if image.dim() == 3:  # a single image without its batch dimension
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        raise InputError(name, f"has shape {tuple(image.shape)}", IMAGE_EXPECTED)
    x = image[..., :3] if image.shape[-1] != 1 else image.expand(*image.shape[:-1], 3)
    return x.movedim(-1, 1).float().contiguous()


def image_rgb(image, name: str = "image") -> torch.Tensor:
    """The RGB channels of an IMAGE `[B, H, W, C]` (a view, as core's VAE Encode takes them)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] < 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(name, f"got {got}", IMAGE_EXPECTED)
    return image[..., :3]


def engine_to_image(x: torch.Tensor) -> torch.Tensor:
    """Engine `[3, H, W]` or `[B, 3, H, W]` 0..1 → IMAGE `[B, H, W, 3]` float32 on the CPU."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    return x.movedim(1, -1).float().clamp(0.0, 1.0).cpu().contiguous()


def pictures(result) -> dict[str, torch.Tensor]:
    """A result's pictures (engine `[3, H, W]` or `[B, 3, H, W]`), each as an IMAGE, by name."""
    return {name: engine_to_image(picture) for name, picture in result.pictures().items()}


def frames_as_images(images: torch.Tensor) -> torch.Tensor:
    """A host decode's pixels as one IMAGE batch: video `[B, T, H, W, 3]` → every frame of every
    item in order, as core's VAE Decode gives them; images `[B, H, W, 3]` unchanged."""
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images


def images_to_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """A list of engine `[3, H, W]` images of possibly different sizes → one IMAGE batch.

    ComfyUI batches need one size: smaller images are padded with black at the bottom/right.
    """
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)
    out = torch.zeros(len(images), h, w, 3)
    for n, img in enumerate(images):
        out[n, : img.shape[-2], : img.shape[-1]] = engine_to_image(img)[0]
    return out


def latent_samples(latent, name: str = "latent", any_family: bool = False, video: bool = False) -> torch.Tensor:
    """The `[B, C, h, w]` samples of a LATENT dict (not a copy: callers must not modify it).
    `video`: also video latents `[B, C, T, h, w]`, for features that fold frames (`vae_fix.frames`);
    `any_family`: also 1-D latents `[B, C, L]` and video latents, for nodes that hand the latent to
    the host's own VAE."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    dims, shapes = (((3, 4, 5), "[B, C, h, w] or [B, C, T, h, w]") if any_family else
                    ((4, 5), "[B, C, h, w] or [B, C, T, h, w]") if video else ((4,), "[B, C, h, w]"))
    if not isinstance(samples, torch.Tensor) or samples.dim() not in dims:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
        raise InputError(name, f"got {got}", f"a ComfyUI LATENT with 'samples' of shape {shapes}")
    return samples


def with_samples(latent: dict, samples: torch.Tensor) -> dict:
    """A copy of a LATENT dict with new samples; every other key (noise_mask, batch_index, ...) kept."""
    out = dict(latent)
    out["samples"] = samples
    return out
