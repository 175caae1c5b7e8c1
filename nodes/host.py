"""The host adapter: everything that touches ComfyUI internals (comfy.*, folder_paths) lives here
and in the modules beside it (`host_codec`: a host VAE as the engine's Codec; `host_families`:
where each family keeps its posterior; `host_loading`: Load VAE (strict) for every family).

This module: the models/vae folder, engine `VAEFile` -> `comfy.sd.VAE`, the KL weights of a host
VAE, and ComfyUI's progress bar and cancel. The nodes reach the codec through it (`host.codec`).
"""
from __future__ import annotations

import json
import os

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths

from ..vae_fix.codec import DTYPES, parse_dtype  # noqa: F401  (DTYPES: re-exported for the nodes)
from ..vae_fix.demo import shipped_models
from ..vae_fix.errors import InputError, VAELoadError
from ..vae_fix.progress import ProgressFn
from .host_codec import place_model, codec, core_attempts, downscale, vae_kind, vae_summary  # noqa: F401  (for the nodes)
from .host_families import FAMILIES, family_of
from .host_variants import adapt_to_variant

VAE_FOLDER = "vae"
SHIPPED = "vae_fix_trained/"  # the VAEs trained by this project (vae_fix/models), listed beside models/vae
DIFFUSERS_CONFIG = "config.json"

# Core builds an SD-shaped KL VAE from the weights alone when the layout is exactly this.
_CORE_WIDTHS = dict(in_channels=3, out_channels=3, base_channels=128, channel_mult=(1, 2, 4, 4),
                    num_res_blocks=2, attn_levels=(), double_z=True, mid_attention=True, norm_groups=32)
_NOMINAL_RESOLUTION = 256  # ComfyUI places attention by resolution; any fixed value works


# ---------------------------------------------------------------- the models/vae folder

def _is_diffusers_vae(config_path: str) -> bool:
    """config.json of an autoencoder (not of a UNet or text encoder that shares a pipeline folder)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return True  # listed, so that loading it explains what is wrong
    name = config.get("_class_name", "") if isinstance(config, dict) else ""
    return name.startswith("Autoencoder") or (not name and "latent_channels" in config)


def _diffusers_folders() -> list[str]:
    """Sub-folders of models/vae holding a diffusers VAE (config.json + weights), as 'name/'."""
    found = []
    for root in folder_paths.get_folder_paths(VAE_FOLDER):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if dirpath != root and DIFFUSERS_CONFIG in filenames and _is_diffusers_vae(os.path.join(dirpath, DIFFUSERS_CONFIG)):
                found.append(os.path.relpath(dirpath, root).replace(os.sep, "/") + "/")
    return sorted(set(found))


def vae_choices() -> list[str]:
    """Files in models/vae plus diffusers folders; weight files inside those folders are listed once, as the folder."""
    folders = _diffusers_folders()
    files = [f for f in folder_paths.get_filename_list(VAE_FOLDER)
             if not any(f.replace(os.sep, "/").startswith(d) for d in folders)]
    return sorted(files + folders) + [SHIPPED + p.name for p in shipped_models()]


def vae_path(name: str) -> str:
    """The full path of a models/vae entry from `vae_choices()`; InputError when it is not there."""
    shipped = {SHIPPED + p.name: str(p) for p in shipped_models()}
    if name in shipped:
        return shipped[name]
    if name.endswith("/"):
        for root in folder_paths.get_folder_paths(VAE_FOLDER):
            root = os.path.realpath(root)
            path = os.path.realpath(os.path.join(root, name.rstrip("/")))
            inside = os.path.commonpath([root, path]) == root
            if inside and os.path.isfile(os.path.join(path, DIFFUSERS_CONFIG)):
                return path
    else:
        path = folder_paths.get_full_path(VAE_FOLDER, name)
        if path is not None:
            return path
    raise InputError(f"vae_name '{name}'", "not found in models/vae",
                     "a .safetensors/.ckpt/.pt/.pth/.bin file or a diffusers folder (config.json + weights) in models/vae")


def new_vae_path(filename: str) -> str:
    """Where a new VAE named `filename` goes in models/vae; InputError for an empty name, a name that
    leaves the folder, or one that already exists (nothing there is ever replaced)."""
    root = os.path.realpath(folder_paths.get_folder_paths(VAE_FOLDER)[0])
    name = filename.strip().rstrip("/")
    path = os.path.realpath(os.path.join(root, name))
    expected = "a new name inside models/vae, e.g. my_vae.safetensors (CompVis) or my_vae_diffusers (a folder)"
    if not name or os.path.isabs(name) or path == root or os.path.commonpath([root, path]) != root:
        raise InputError(f"filename '{filename}'", "it does not name a new file inside models/vae", expected)
    if os.path.lexists(path):
        raise InputError(f"filename '{filename}'", "it already exists in models/vae (nothing is replaced)", expected)
    return path


def vae_fingerprint(vae_name: str) -> tuple:
    """Changes when the VAE file (or any file of a folder) in models/vae is replaced, so a cached VAE
    is reloaded; () when it cannot be read (the node's own run then says why)."""
    try:
        path = vae_path(vae_name)
        paths = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
        return tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in paths if os.path.isfile(p))
    except Exception:
        return ()


# ---------------------------------------------------------------- VAEFile -> comfy.sd.VAE

def _identity_conv(c_in: int, c_out: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(c_out, c_in, 1, 1, dtype=like.dtype)
    weight[:, :, 0, 0] = torch.eye(c_out, c_in, dtype=like.dtype)
    return weight, torch.zeros(c_out, dtype=like.dtype)


def _host_config(cfg, sd: dict, path) -> tuple[dict, dict]:
    """A `config` for `comfy.sd.VAE` describing a KL VAE of any width/depth, and the state dict to load.

    ComfyUI's configurable KL model always has quant convs; a VAE without them gets exact identity
    1×1 convs, so its outputs are unchanged.
    """
    sd = dict(sd)
    embed = cfg.latent_channels
    like = sd["encoder.conv_in.weight"]
    if not cfg.use_quant_conv:
        sd["quant_conv.weight"], sd["quant_conv.bias"] = _identity_conv(2 * cfg.z_channels, 2 * embed, like)
    if not cfg.use_post_quant_conv:
        if embed != cfg.z_channels:
            raise VAELoadError(path, "it has a quant_conv but no post_quant_conv with different latent and z widths",
                               "both 1×1 quant convs, or neither")
        sd["post_quant_conv.weight"], sd["post_quant_conv.bias"] = _identity_conv(embed, cfg.z_channels, like)
    attn = [_NOMINAL_RESOLUTION // 2 ** i for i in cfg.attn_levels]
    ddconfig = dict(double_z=cfg.double_z, z_channels=cfg.z_channels, resolution=_NOMINAL_RESOLUTION,
                    in_channels=cfg.in_channels, out_ch=cfg.out_channels, ch=cfg.base_channels,
                    ch_mult=list(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=attn, dropout=0.0)
    return {"params": {"embed_dim": embed, "ddconfig": ddconfig}}, sd


def _core_builds_it(cfg) -> bool:
    same_widths = all(getattr(cfg, k) == v for k, v in _CORE_WIDTHS.items())
    quant_pair = cfg.use_quant_conv == cfg.use_post_quant_conv
    return same_widths and quant_pair and (cfg.use_quant_conv or cfg.z_channels == cfg.latent_channels)


def _check_host_support(cfg, path) -> None:
    if cfg.decoder_kind != "kl":
        raise VAELoadError(path, f"its decoder is not a KL decoder (kind '{cfg.decoder_kind}'), so ComfyUI cannot decode with it",
                           "a VAE file with both a KL encoder and a KL decoder")
    if not cfg.double_z:
        raise VAELoadError(path, "its encoder outputs a latent without a variance (a plain autoencoder), which ComfyUI's KL model cannot hold",
                           "a KL VAE whose encoder outputs mean and log-variance")
    if not cfg.mid_attention or cfg.norm_groups != 32:
        raise VAELoadError(path, "ComfyUI's KL model always has mid-block attention and GroupNorm(32); this VAE differs",
                           "a KL-F8 style VAE (mid attention, 32 norm groups)")


def to_host_vae(vae_file, dtype: str = "auto", path=None) -> "comfy.sd.VAE":
    """A validated engine `VAEFile` → a standard `comfy.sd.VAE` that every core node accepts.

    SD-shaped VAEs go through exactly core's own path; other widths/depths get an explicit config.
    Afterwards every weight of the host model must have come from the file (core only warns).
    """
    torch_dtype = parse_dtype(dtype)
    cfg, path = vae_file.config, path or getattr(vae_file, "path", "VAE")
    _check_host_support(cfg, path)
    config, sd = (None, dict(vae_file.state_dict)) if _core_builds_it(cfg) else _host_config(cfg, vae_file.state_dict, path)
    try:
        vae = comfy.sd.VAE(sd=sd, config=config, dtype=torch_dtype, metadata=vae_file.metadata or None)
    except RuntimeError as e:  # shape mismatches are raised by load_state_dict even when not strict
        raise VAELoadError(path, f"ComfyUI could not build a model from its weights ({str(e).splitlines()[0]})",
                           "weights matching the layout read from the file") from None
    if vae.first_stage_model is None:
        raise VAELoadError(path, "ComfyUI did not recognise the weights as a VAE", "a KL VAE state dict")
    check_keys(path, vae_kind(vae), set(vae.first_stage_model.state_dict()), set(sd))
    vae.vae_fix_variant = adapt_to_variant(vae, cfg)  # a pixel-norm decoder, tanh-bounded latents: as the file declares
    vae.latent_channels = cfg.latent_channels  # core reads it from the decoder's z width
    vae.downscale_ratio = vae.upscale_ratio = cfg.downscale
    return vae


def check_keys(path, kind: str, model_keys: set, file_keys: set) -> None:
    """VAELoadError naming the keys unless every weight of ComfyUI's `kind` model comes from the file
    and every tensor of the file is used (core's Load VAE only warns, and runs half-loaded)."""
    missing, unused = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
    if not (missing or unused):
        return
    are = lambda items: "is" if len(items) == 1 else "are"  # noqa: E731
    parts = [f"{len(missing)} of the {len(model_keys)} weights of ComfyUI's {kind} model {are(missing)} missing "
             "from the file"] if missing else []
    parts += [f"{len(unused)} of the file's tensors {are(unused)} not used by that model"] if unused else []
    raise VAELoadError(path, " and ".join(parts), "every weight of the model in the file and every tensor of the "
                       "file used (core's Load VAE would only warn and run half-loaded)", keys=missing + unused)


# ---------------------------------------------------------------- the KL weights of a host VAE

def kl_state_dict(vae) -> dict:
    """The CompVis-layout weights of a host KL image VAE (CPU copies): what the engine's strict
    loader validates. InputError naming the family for any other VAE."""
    family = family_of(vae.first_stage_model)
    if family not in (FAMILIES["kl"], FAMILIES["kl_engine"]):
        raise InputError("vae", f"it is a {family.name}, not a KL image VAE in the CompVis layout",
                         "a KL VAE (SD1.x/2.x, SDXL, SD3, Flux or a retrained KL-F8)")
    place_model(vae)
    return {k: v.detach().to("cpu", copy=True) for k, v in vae.first_stage_model.state_dict().items()}


# ---------------------------------------------------------------- progress and cancel

def progress_fn() -> ProgressFn:
    """A `ProgressFn` driving ComfyUI's progress bar; raises the host's interrupt when the user cancels."""
    bar = comfy.utils.ProgressBar(1)

    def progress(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, max(total, 1))

    return progress


def show_text(node_id, text: str) -> None:
    """A line of text on the node in the browser (ComfyUI's progress text), e.g. a cost before long work."""
    from server import PromptServer
    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_progress_text(text, node_id)
