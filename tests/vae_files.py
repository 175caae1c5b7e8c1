"""Build real VAE files with seeded random weights, in every layout and container the loader reads.

Shared by the test modules (tests/ is on sys.path: `from vae_files import write_vae`). Needs only
torch and safetensors (no diffusers), so any test can use it.

    write_vae(tmp_path, family="sd", layout="diffusers", container="folder") -> Path

families: sd, sdxl, sd3, flux, retrained8 (KL decoders) and svd (sgm temporal video decoder, which
the loader reads encoder-only). layouts: compvis, diffusers, diffusers_old (query/key/value/
proj_attn names), diffusers_conv (1×1 conv attention weights), checkpoint (whole SD checkpoint,
`first_stage_model.` prefix plus UNet/text-encoder keys), vae_prefix (`vae.` prefix).
containers: safetensors, folder (diffusers: config.json + diffusion_pytorch_model.safetensors),
folder_bin (… + diffusion_pytorch_model.bin), pipeline (a pipeline folder with vae/), ckpt
(torch.save of {"state_dict": ...}), pt (torch.save of the bare dict).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from vae_fix import layouts
from vae_fix.model import AutoencoderKL, VAEConfig, infer_config, preset_config, random_vae

FAMILIES = ("sd", "sdxl", "sd3", "flux", "retrained8", "svd")
LAYOUTS = ("compvis", "diffusers", "diffusers_old", "diffusers_conv", "checkpoint", "vae_prefix")
CONTAINERS = ("safetensors", "folder", "folder_bin", "pipeline", "ckpt", "pt")
NON_VAE_KEYS = (  # stand-ins for the rest of a whole SD checkpoint
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.out.2.bias",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
)
METADATA = {"modelspec.title": "vae_fix test VAE", "format": "pt"}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random values for every parameter, GroupNorm affine and biases included.

    1-D `weight`s (GroupNorm scales) ~ 1 + 0.2·N, biases ~ 0.1·N, other tensors ~ N / sqrt(fan_in).
    Default inits leave norms at (1, 0) and some biases tiny, which would hide layout mistakes.
    """
    params = list(module.named_parameters())
    noise = torch.randn(sum(p.numel() for _, p in params), generator=torch.Generator().manual_seed(seed))
    offset = 0
    with torch.no_grad():
        for name, p in params:
            value = noise[offset: offset + p.numel()].reshape(p.shape)
            offset += p.numel()
            if name.endswith("bias"):
                value = 0.1 * value
            elif p.dim() == 1 and name.endswith("weight"):
                value = 1.0 + 0.2 * value
            else:
                value = value / math.sqrt(math.prod(p.shape[1:]) if p.dim() > 1 else 1)
            p.copy_(value.to(p.dtype))
    return module


def family_config(family: str, small: bool = True, **overrides) -> VAEConfig:
    return preset_config("sd" if family == "svd" else family, small=small, **overrides)


def random_compvis(family: str = "sd", small: bool = True, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """A CompVis-layout state dict (sgm video-decoder names for svd) with randomised weights (fresh copies)."""
    cached = _random_compvis(family, small, seed, tuple(sorted(overrides.items())))
    return {k: v.clone() for k, v in cached.items()}


@functools.lru_cache(maxsize=32)
def _random_compvis(family: str, small: bool, seed: int, overrides: tuple) -> dict[str, torch.Tensor]:
    cfg = family_config(family, small, **dict(overrides))
    sd = {k: v.clone() for k, v in randomize_(random_vae(cfg, seed), seed).state_dict().items()}
    if family == "svd":
        sd = _with_temporal_decoder(sd, seed)
    return sd


def _with_temporal_decoder(sd: dict, seed: int) -> dict:
    """Turn a KL decoder into sgm's VideoDecoder layout (as in ComfyUI temporal_ae.VideoDecoder).

    Every decoder ResnetBlock gains `time_stack` (GroupNorm, Conv3d 3×1×1, GroupNorm, Conv3d) and a
    `mix_factor`; conv_out gains `time_mix_conv`; SVD has no post_quant_conv.
    """
    g = torch.Generator().manual_seed(seed + 1)
    out = {k: v for k, v in sd.items() if not k.startswith("post_quant_conv.")}
    resnets = sorted({k.rsplit(".", 2)[0] for k in sd if k.startswith("decoder.") and k.endswith(".conv2.weight")})
    for block in resnets:
        c = sd[f"{block}.conv2.weight"].shape[0]
        for name, shape in (("in_layers.0.weight", (c,)), ("in_layers.0.bias", (c,)),
                            ("in_layers.2.weight", (c, c, 3, 1, 1)), ("in_layers.2.bias", (c,)),
                            ("out_layers.0.weight", (c,)), ("out_layers.0.bias", (c,)),
                            ("out_layers.3.weight", (c, c, 3, 1, 1)), ("out_layers.3.bias", (c,))):
            out[f"{block}.time_stack.{name}"] = 0.1 * torch.randn(shape, generator=g)
        out[f"{block}.mix_factor"] = torch.zeros(1)
    c_out = sd["decoder.conv_out.weight"].shape[0]
    out["decoder.conv_out.time_mix_conv.weight"] = 0.1 * torch.randn((c_out, c_out, 3, 1, 1), generator=g)
    out["decoder.conv_out.time_mix_conv.bias"] = torch.zeros(c_out)
    return out


def in_layout(sd: dict, layout: str, config: VAEConfig) -> dict[str, torch.Tensor]:
    """A CompVis state dict rewritten in one of LAYOUTS."""
    if layout == "compvis":
        return dict(sd)
    if layout == "checkpoint":
        whole = {f"first_stage_model.{k}": v for k, v in sd.items()}
        whole.update({k: torch.ones(2, 2) for k in NON_VAE_KEYS})
        return whole
    if layout == "vae_prefix":
        return {f"vae.{k}": v for k, v in sd.items()}
    diffusers = layouts.compvis_to_diffusers(sd, config)
    if layout == "diffusers":
        return diffusers
    if layout == "diffusers_old":
        names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        return {_rename(k, names): v for k, v in diffusers.items()}
    if layout == "diffusers_conv":
        return {k: (v.reshape(*v.shape, 1, 1) if ".attentions." in k and v.dim() == 2 else v)
                for k, v in diffusers.items()}
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def _rename(key: str, names: dict) -> str:
    for old, new in names.items():
        key = key.replace(f".{old}", f".{new}")
    return key


def diffusers_config_json(family: str, config: VAEConfig) -> dict:
    if family != "svd":
        return layouts.diffusers_config(config, {"scaling_factor": 0.18215})
    return {
        "_class_name": "AutoencoderKLTemporalDecoder",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(config.channel_mult),
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks, "latent_channels": config.latent_channels,
        "scaling_factor": 0.18215,
    }


def write_state_dict(sd: dict, path: Path, container: str, metadata: dict | None = None) -> Path:
    """Write tensors as safetensors (with metadata) or with torch.save (ckpt wraps in 'state_dict')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if container in ("safetensors", "folder", "pipeline"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or METADATA)
    elif container == "ckpt":
        torch.save({"state_dict": sd, "global_step": 1000}, path)
    else:
        torch.save(sd, path)
    return path


def write_vae(directory, family: str = "sd", layout: str = "compvis", container: str = "safetensors",
              small: bool = True, seed: int = 0, name: str | None = None, metadata: dict | None = None,
              **overrides) -> Path:
    """Write one VAE and return the path to give the loader (a file, or the folder for folders)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    config = family_config(family, small, **overrides)
    sd = in_layout(random_compvis(family, small, seed, **overrides), layout, config)
    stem = name or f"{family}_{layout}_{container}"
    directory = Path(directory)
    if container in ("folder", "folder_bin", "pipeline"):
        root = directory / stem
        folder = root / "vae" if container == "pipeline" else root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(diffusers_config_json(family, config), indent=2))
        weights = "diffusion_pytorch_model.bin" if container == "folder_bin" else "diffusion_pytorch_model.safetensors"
        write_state_dict(sd, folder / weights, "pt" if container == "folder_bin" else container, metadata)
        if container == "pipeline":
            (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
        return root
    suffix = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}.get(container)
    if suffix is None:
        raise ValueError(f"unknown container {container!r}; known: {CONTAINERS}")
    return write_state_dict(sd, directory / f"{stem}{suffix}", container, metadata)


def reference_model(family: str = "sd", small: bool = True, seed: int = 0, **overrides) -> AutoencoderKL:
    """Our model holding exactly the weights `write_vae(..., family, seed=seed)` writes (KL families)."""
    sd = random_compvis(family, small, seed, **overrides)
    sd = {k: v for k, v in sd.items() if not (family == "svd" and k.startswith(("decoder.", "post_quant_conv.")))}
    model = AutoencoderKL(infer_config(sd)).eval()
    model.load_state_dict(sd)
    return model


class RunsShell:
    """Pickles into a call of os.system that touches `marker`: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class OpensFile:
    """Pickles into `open(marker, "w")`: a builtin call, not an import, that must be refused too."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
