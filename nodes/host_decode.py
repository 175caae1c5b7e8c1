"""Decoding with a host VAE as a plain `decode_fn`, with gradients when asked for.

An extension of `host.py` (to be merged into it): it touches host models only through `host` (its
model management) and the `comfy.sd.VAE` object itself, and never moves a host model.

`decode_fn(vae)(z [B, C, h, w] raw latent) -> [B, 3, H, W]` float32, nominally -1..1, unclamped,
exactly what the host's own decoder computes before VAE Decode maps it to 0..1.

Gradients: ComfyUI runs every node inside `torch.inference_mode()`, so the host model's weights are
inference tensors, which autograd refuses to save for backward. The differentiable decode therefore
runs the host's own module with fresh copies of the decoder's weights (`torch.func.functional_call`),
made in normal mode on the device the host placed them on. The host model is not changed.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..vae_fix.errors import InputError
from . import host

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
_DECODES_TO_MINUS_ONE_ONE = ("AutoencodingEngine", "TAESD")  # KL VAEs (SD1.x..Flux) and TAESD
GRAD_MEMORY_FACTOR = 3  # a decode that keeps its activations for backward needs about this much more
_ENCODER_PARTS = ("fsm.encoder.", "fsm.quant_conv.", "fsm.taesd_encoder.")  # not run by decode


class _Decode(torch.nn.Module):
    """The host model's `decode` as a module's forward, so `functional_call` can swap its weights."""

    def __init__(self, first_stage_model: torch.nn.Module):
        super().__init__()
        self.fsm = first_stage_model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fsm.decode(z)


def image_decoder(vae) -> torch.nn.Module:
    """The host model of a VAE that decodes 2-D latents to RGB in -1..1; InputError naming its kind otherwise."""
    fsm = getattr(vae, "first_stage_model", None)
    kinds = {c.__name__ for c in type(fsm).__mro__}
    image_vae = getattr(vae, "latent_dim", 2) == 2 and getattr(vae, "output_channels", 3) == 3
    if fsm is None or not image_vae or not kinds & set(_DECODES_TO_MINUS_ONE_ONE) or not hasattr(fsm, "decode"):
        raise InputError("vae", f"it is a {host.vae_kind(vae)}, which does not decode image latents here",
                         "an image VAE: a KL VAE (SD1.x/2.x, SDXL, SD3, Flux, retrained) or TAESD")
    return fsm


def _normal_copies(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the decoding weights and buffers, made outside inference mode, without gradients."""
    with torch.inference_mode(False), torch.no_grad():
        tensors = dict(module.named_parameters())
        tensors.update(module.named_buffers())
        return {k: v.clone() for k, v in tensors.items() if not k.startswith(_ENCODER_PARTS)}


def decode_fn(vae, differentiable: bool = False) -> DecodeFn:
    """A `decode_fn` running the host's decoder. Each call asks the host's model management to place
    the model (as core's VAE Decode does). With `differentiable=True` gradients flow back to `z`
    (call it inside `torch.inference_mode(False)` and `torch.enable_grad()`, as the engine does)."""
    fsm = image_decoder(vae)
    wrapper = _Decode(fsm)

    def decode(z: torch.Tensor) -> torch.Tensor:
        grads = differentiable and torch.is_grad_enabled()
        memory = vae.memory_used_decode(z.shape, vae.vae_dtype) * (GRAD_MEMORY_FACTOR if grads else 1)
        host.mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
        x = z.to(vae.device).to(vae.vae_dtype)
        if grads:
            out = torch.func.functional_call(wrapper, _normal_copies(wrapper), (x,))
        else:
            with torch.no_grad():
                out = fsm.decode(x)
        return out.to(vae.output_device).float()

    return decode

