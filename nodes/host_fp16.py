"""VAE fp16 Fix for the families the host builds (part of the host adapter, beside host.py): which
families the exact rescaling covers, and how the fix runs the host's own model.

KL image VAEs (SD1.x/2.x, SDXL, SD3, Flux, retrained) go through the engine's model, as the CLI
does. HunyuanVideo 1.0 (the CompVis blocks with 3-D convolutions) and Wan 2.1 / Qwen-Image and 2.2
(RMS norms, which are scale-invariant too) are fixed on a float32 CPU copy of the host's model, one-frame
clips in and out; their fp16 proof is emulated on a CPU (`fp16_fix.half_copy`), where fp16 3-D
convolutions are hundreds of times slower. Every other family is refused by name, saying why.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..vae_fix import loader
from ..vae_fix.builders.planted import demo_image
from ..vae_fix.containers import RawWeights
from ..vae_fix.errors import InputError
from ..vae_fix.fp16_fix import DEFAULT_HEADROOM, Fp16FixResult, Runner, fix_file, fp16_fix
from ..vae_fix.fp16_scales import PLANS
from ..vae_fix.probes import probe_images
from . import host, host_loading
from .host_codec import place_model
from .host_families import FAMILIES, family_id, family_of

ENGINE = ("kl", "kl_engine")                                   # the engine's own model and loader
ON_HOST = {"hunyuan_video": "CompVis", "wan21": "Wan", "wan22": "Wan"}  # family -> structure of its residual streams
_PARAMETER_FREE = ("its resampling layers and its encoder's output add parameter-free shortcuts of the residual "
                   "stream (channel means and repeats), which tie the stream's scale to the image's and the latent's: "
                   "no exact rescaling exists")
WHY_NOT = {
    "hunyuan_image": _PARAMETER_FREE, "hunyuan_video15": _PARAMETER_FREE, "hunyuan_image_refiner": _PARAMETER_FREE,
    "svd": "its temporal decoder blends frames with learned factors outside the norms: not covered yet",
    "mochi": "not covered yet", "ltxv": "not covered yet", "taesd": "it has no normalisation layers to absorb a scale",
}
COVERED = ("KL autoencoders (SD1.x/2.x, SDXL, SD3, Flux, retrained), HunyuanVideo 1.0, Wan 2.1 / Qwen-Image, Wan 2.2")


def engine_family(vae) -> bool:
    """True for a KL image VAE (the engine's path); InputError naming the family when the fix does not
    cover it, and why."""
    key = family_id(vae.first_stage_model)
    if key in ENGINE:
        return True
    if key in ON_HOST:
        return False
    name = family_of(vae.first_stage_model).name
    raise InputError("vae", f"it is a {name}: {WHY_NOT.get(key, 'not covered')}", f"a VAE this fix covers: {COVERED}")


def _means(model, x: torch.Tensor) -> torch.Tensor:
    return model.encode(x.unsqueeze(2))[:, :, 0]  # one-frame clip [1, 3, 1, H, W] -> means [1, C, h, w]


def _decode(model, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z.unsqueeze(2))[:, :, 0]


def fix_host_vae(vae, probes, checks, headroom: float = DEFAULT_HEADROOM, progress=None, finetune=None) -> Fp16FixResult:
    """The fp16 fix of a covered video family's host model (a float32 CPU copy; the VAE is untouched)."""
    key = family_id(vae.first_stage_model)
    place_model(vae)
    model = copy.deepcopy(vae.first_stage_model).to("cpu", torch.float32).eval()
    runner = Runner(FAMILIES[key].name, _means, _decode, PLANS[ON_HOST[key]], emulate_half=True)
    images, names = probe_images(probes)
    return fp16_fix(model, images, names, held_out=[demo_image(s, s, None) for s in checks],
                    held_out_names=[f"demo@{s}" for s in checks], headroom=headroom, progress=progress, runner=runner,
                    finetune=finetune)


def fix_vae(vae, probes, checks, headroom: float = DEFAULT_HEADROOM, dtype: str = "auto", finetune=None) -> tuple:
    """(the result, the fixed VAE as a standard host VAE, a writer of its file for `save_as`) for any
    covered family; InputError naming the family otherwise, or naming the layers when the fix is not
    safe. The input VAE is not changed."""
    if engine_family(vae):  # KL: the engine's model and loader, as the CLI
        source = loader.vae_from_state_dict(host.kl_state_dict(vae), "the VAE input")
        result = fix_file(source, probes, checks, headroom=headroom, progress=host.progress_fn(), finetune=finetune)
        fixed = result.require_safe()
        return result, host.to_host_vae(fixed, dtype), lambda path: loader.save_vae(fixed, path)
    result = fix_host_vae(vae, probes, checks, headroom, host.progress_fn(), finetune)
    result.require_safe()
    raw = fixed_weights(result, vae)
    return (result, host_loading.load_weights(raw, "the fixed VAE", dtype),
            lambda path: save_file(raw.tensors, str(path), metadata=raw.metadata))


def fixed_weights(result: Fp16FixResult, vae) -> RawWeights:
    """The fixed model's weights under the host's own names, in the dtype the VAE's weights were in."""
    dtype = next(vae.first_stage_model.parameters()).dtype
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in result.model.state_dict().items()}
    return RawWeights(sd, Path("the fixed VAE"), "state-dict",
                      {"vae_fix_fp16_fix": f"weights rescaled, activations under {result.bound:g}"})
