"""A host VAE as the engine's `Codec` (part of the host adapter, beside host.py): raw moments caught
in the host's own `encode`, decoding through the host's own model (with gradients when asked), and
the float32 twin that redoes what half precision could not. The host owns its models: each call asks
`load_models_gpu` to place them, as core's VAE Encode / Decode do; we never move a host model.

Layouts: images `[B, 3, H, W]` in -1..1; moments `[B, 2C, h, w]`; a video family's clips `[B, 3, T, H, W]`.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..vae_fix.codec import Codec, dtype_name, with_fp32_retry
from ..vae_fix.errors import InputError
from .host_families import FAMILIES, family_id, family_of, posterior_family


# ---------------------------------------------------------------- raw moments from a host VAE
# Which layer holds a family's raw moments is the table in host_families.py; here they are caught.

def vae_kind(vae) -> str:
    """A readable name for the family of the model inside a `comfy.sd.VAE`."""
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None:
        return "empty VAE (no weights were recognised)"
    key = family_id(fsm)
    return FAMILIES[key].name if key else f"{type(fsm).__name__} (a family this pack does not know)"


def vae_summary(vae) -> dict:
    """What ComfyUI made of a VAE: family, latent channels, downscale, dtype and devices."""
    fsm = getattr(vae, "first_stage_model", None)
    family = FAMILIES.get(family_id(fsm)) if fsm is not None else None
    if fsm is None:
        return {"kind": vae_kind(vae)}
    out = {"kind": vae_kind(vae), "latent_channels": int(vae.latent_channels),
           "downscale": downscale(vae), "dtype": str(vae.vae_dtype).replace("torch.", ""),
           "device": str(vae.device), "offload_device": str(vae.patcher.offload_device)}
    if family is not None and family.video:
        out["video"] = "latents [B, C, T, h, w]; each image is encoded as a one-frame clip"
    if family is not None and family.note:
        out["note"] = family.note
    return out


def place_model(vae) -> None:
    """Have the host load the model before its weights are read (newer hosts load them lazily)."""
    mm.load_models_gpu([vae.patcher], force_full_load=vae.disable_offload)


def _as_clips(x: torch.Tensor, family) -> torch.Tensor:
    """Images `[B, C, H, W]` -> one-frame clips `[B, C, 1, H, W]` for a video family."""
    return x.unsqueeze(2) if family.video else x


def _in_latent_space(fsm, family, m: torch.Tensor) -> torch.Tensor:
    """Moments whose mean is in the host's latent space: LTXV normalises its means per channel
    ((mean - mu) / sigma), so the log-variance moves by -2 log sigma; other families are as caught."""
    if family.latent_statistics is None:
        return m
    stats = fsm.get_submodule(family.latent_statistics)
    mean, logvar = m.float().chunk(2, dim=1)
    sigma = stats.get_buffer("std-of-means").float().to(m.device).view(1, -1, *([1] * (m.dim() - 2)))
    return torch.cat([stats.normalize(mean), logvar - 2 * torch.log(sigma)], dim=1)


def _encode_caught(vae, family, layer, clips: torch.Tensor) -> torch.Tensor:
    """The raw moments passing `layer` while the host's own `encode` runs on `clips` (placed by the
    host's model management first, as core's VAE Encode does), in the host's latent space."""
    fsm = vae.first_stage_model
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(clips.shape, vae.vae_dtype),
                       force_full_load=vae.disable_offload)
    caught = []
    if family.take == "input":
        hook = layer.register_forward_hook(lambda _m, args, _out: caught.append(args[0]))
    else:
        hook = layer.register_forward_hook(lambda _m, _args, out: caught.append(out))
    try:
        fsm.encode(clips.to(vae.vae_dtype).to(vae.device))
    finally:
        hook.remove()
    if len(caught) != 1:  # a host whose encode no longer passes the table's layer exactly once
        raise InputError("vae", f"its {family.name} encode passed '{family.layer}' {len(caught)} times, not once, "
                         "so the raw moments cannot be read there", "a ComfyUI version whose model matches the "
                         "pack's family table (nodes/host_families.py)")
    return _in_latent_space(fsm, family, caught[0]).to(vae.output_device).float()


def moments_fn(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x [B, 3, H, W]` in -1..1 → raw moments `[B, 2C, h, w]` float32, caught in the host's own
    `encode`; a video VAE encodes each image as a one-frame clip."""
    family = posterior_family(vae.first_stage_model)
    layer = vae.first_stage_model.get_submodule(family.layer)

    def moments(x: torch.Tensor) -> torch.Tensor:
        m = _encode_caught(vae, family, layer, _as_clips(x, family))
        return m[:, :, 0] if family.video else m  # one frame in, one latent frame out

    return moments


def clip_moments_fn(vae) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Frames `[N, 3, H, W]` in -1..1 of one clip → its latent frames' raw moments `[T, 2C, h, w]`
    (as core's VAE Encode takes an image batch for a video VAE); None for families without clips."""
    family = posterior_family(vae.first_stage_model)
    if family.frame_step is None:
        return None
    layer = vae.first_stage_model.get_submodule(family.layer)

    def clip_moments(x: torch.Tensor) -> torch.Tensor:
        first, per = family.frame_step
        if family.whole_steps and (x.shape[0] - first) % per:
            raise InputError("image", f"{x.shape[0]} frames: {family.name} encodes {first} + {per}k frames",
                             f"a batch of {first} + {per}k images ({first}, {first + per}, {first + 2 * per}, ...)")
        return _encode_caught(vae, family, layer, x.movedim(0, 1).unsqueeze(0))[0].movedim(1, 0)

    return clip_moments


def downscale(vae) -> int:
    return int(vae.spacial_compression_encode())


def codec(vae, name: str = "vae", input_name: str = "vae") -> Codec:
    """The engine's view of a host VAE: the host's own encoder and decoder, under its model management.
    What the VAE cannot do (no posterior, no image decoder) is kept as the reason, raised when asked."""
    family_of(getattr(vae, "first_stage_model", None), input_name)  # an empty or unknown VAE is refused by name
    parts = {}
    try:
        parts["moments"], parts["clip_moments"] = moments_fn(vae), clip_moments_fn(vae)
    except InputError as e:
        parts["no_moments"] = e.problem
    try:
        parts["decode"], parts["decode_grad"] = decode_fn(vae), decode_fn(vae, differentiable=True)
    except InputError as e:
        parts["no_decoder"] = e.problem
    info = {"path": "from ComfyUI", "layout": type(vae.first_stage_model).__name__, **vae_summary(vae)}
    family = FAMILIES.get(family_id(vae.first_stage_model)) or FAMILIES["kl"]
    clip_shape = (lambda shape: (*shape[:2], 1, *shape[2:])) if family.video else tuple
    return with_fp32_retry(Codec(name, int(vae.latent_channels) // family.channels_per_latent, downscale(vae),
                                 torch.device(vae.output_device), vae.vae_dtype, info=info, input_name=input_name,
                                 frame_step=family.frame_step,
                                 encode_bytes=lambda shape: int(vae.memory_used_encode(clip_shape(shape), vae.vae_dtype)),
                                 fp32=lambda: codec(fp32_twin(vae), name, input_name), **parts))


def fp32_twin(vae) -> "comfy.sd.VAE":
    """The same host VAE computing in float32, for redoing what half precision could not: a copy of
    its model (the input VAE is not touched) under its own ModelPatcher, so ComfyUI's model
    management places, offloads and frees it like any other model."""
    if vae.vae_dtype == torch.float32:
        return vae
    place_model(vae)
    twin = copy.copy(vae)
    twin.first_stage_model = copy.deepcopy(vae.first_stage_model).to(device=vae.patcher.offload_device,
                                                                         dtype=torch.float32)
    twin.vae_dtype = torch.float32
    twin.patcher = comfy.model_patcher.ModelPatcher(twin.first_stage_model, load_device=vae.device,
                                                    offload_device=vae.patcher.offload_device)
    return twin


def core_attempts(vae, call: str, x: torch.Tensor) -> list:
    """Core's own `vae.decode` / `vae.encode` (its batching, its tiles on out-of-memory) in the VAE's
    dtype, then on its float32 twin: the attempts of `safe.first_finite`."""
    attempts = [(dtype_name(vae.vae_dtype), lambda: getattr(vae, call)(x))]
    if vae.vae_dtype != torch.float32:
        attempts.append(("float32", lambda: getattr(fp32_twin(vae), call)(x)))
    return attempts


# ---------------------------------------------------------------- decoding (with gradients when asked)
# ComfyUI runs every node inside `torch.inference_mode()`, so the host model's weights are inference
# tensors, which autograd refuses to save for backward. The differentiable decode therefore runs the
# host's own module with fresh copies of the decoder's weights (`torch.func.functional_call`), made in
# normal mode on the device the host placed them on. The host model is not changed.

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
GRAD_MEMORY_FACTOR = 3  # a decode that keeps its activations for backward needs about this much more
_ENCODER_PARTS = ("fsm.encoder.", "fsm.quant_conv.", "fsm.taesd_encoder.")  # not run by decode


class _Decode(torch.nn.Module):
    """The host model's `decode` as a module's forward, so `functional_call` can swap its weights.
    Latents `[B, C, h, w]`; a video family decodes each as a one-frame clip and gives its frame."""

    def __init__(self, first_stage_model: torch.nn.Module, video: bool):
        super().__init__()
        self.fsm, self.video = first_stage_model, video

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fsm.decode(z.unsqueeze(2))[:, :, 0] if self.video else self.fsm.decode(z)


def image_decoder(vae):
    """(host model, family) of a VAE whose decoder gives RGB in -1..1; InputError naming its family otherwise."""
    fsm = getattr(vae, "first_stage_model", None)
    family = family_of(fsm)
    if not family.decodes or getattr(vae, "output_channels", 3) != 3:
        why = family.note or family.why_not or "its decoder does not give RGB images"
        raise InputError("vae", f"it is a {family.name}, which does not decode image latents here ({why})",
                         "an image or video VAE whose decoder gives RGB: KL VAEs, Wan, Hunyuan, Mochi, LTXV, or TAESD")
    return fsm, family


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
    fsm, family = image_decoder(vae)
    wrapper = _Decode(fsm, family.video)

    def decode(z: torch.Tensor) -> torch.Tensor:
        grads = differentiable and torch.is_grad_enabled()
        shape = _as_clips(z, family).shape
        memory = vae.memory_used_decode(shape, vae.vae_dtype) * (GRAD_MEMORY_FACTOR if grads else 1)
        mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
        x = z.to(vae.device).to(vae.vae_dtype)
        if grads:
            out = torch.func.functional_call(wrapper, _normal_copies(wrapper), (x,))
        else:
            with torch.no_grad():
                out = wrapper(x)
        return out.to(vae.output_device).float()

    return decode
