"""Everything that touches ComfyUI internals (comfy.*, folder_paths) lives here, and only here.

The host owns its models: we build `comfy.sd.VAE` objects, ask `load_models_gpu` to place them,
and run the host's own encoder to read raw moments. We never move a host model ourselves.

Layouts: images `[B, 3, H, W]` in -1..1 for `moments_fn`; moments `[B, 2C, h, w]`.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer

from ..vae_fix.codec import DTYPES, Codec, dtype_name, parse_dtype, with_fp32_retry  # noqa: F401  (DTYPES: re-exported for the nodes)
from ..vae_fix.demo import shipped_models
from ..vae_fix.errors import InputError, VAELoadError
from ..vae_fix.progress import ProgressFn

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


def path_fingerprint(path: str) -> tuple:
    """Changes when the file (or any file of a folder) is replaced, so a cached VAE is reloaded."""
    paths = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    return tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in paths if os.path.isfile(p))


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
    host_keys = set(vae.first_stage_model.state_dict())
    missing, ignored = sorted(host_keys - set(sd)), sorted(set(sd) - host_keys)
    if missing or ignored:
        raise VAELoadError(path, f"ComfyUI's model would leave {len(missing)} weights unset and ignore {len(ignored)} of the file's",
                           "every weight of the file to be used and none missing", keys=missing + ignored)
    vae.latent_channels = cfg.latent_channels  # core reads it from the decoder's z width
    vae.downscale_ratio = vae.upscale_ratio = cfg.downscale
    return vae


# ---------------------------------------------------------------- raw moments from a host VAE

_KINDS = {
    "TAESD": "TAESD (tiny autoencoder: no posterior, a deterministic encoder)",
    "PixelspaceConversionVAE": "pixel-space VAE (no autoencoder at all)",
    "StageA": "Stable Cascade stage A (VQ-GAN: a codebook, no variance)",
    "StageC_coder": "Stable Cascade EfficientNet coder (no variance)",
}


def vae_kind(vae) -> str:
    """A readable name for the kind of model inside a `comfy.sd.VAE`."""
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None:
        return "empty VAE (no weights were recognised)"
    name = type(fsm).__name__
    if name in _KINDS:
        return _KINDS[name]
    reg = getattr(fsm, "regularization", None)
    if isinstance(reg, DiagonalGaussianRegularizer):
        quant = "with quant_conv" if getattr(fsm, "quant_conv", None) is not None else "without quant_conv"
        return f"KL autoencoder {name} ({quant}, {vae.latent_channels} latent channels)"
    return f"{name} ({type(reg).__name__ if reg is not None else 'no regularizer'})"


def vae_summary(vae) -> dict:
    """What ComfyUI made of a VAE: model kind, latent channels, downscale, dtype and devices."""
    return {"kind": vae_kind(vae), "latent_channels": int(vae.latent_channels),
            "downscale": downscale(vae), "dtype": str(vae.vae_dtype).replace("torch.", ""),
            "device": str(vae.device), "offload_device": str(vae.patcher.offload_device)}


def _moment_layers(vae):
    """(encoder, quant_conv or None) of a KL image VAE; InputError naming the VAE kind otherwise."""
    fsm = getattr(vae, "first_stage_model", None)
    encoder = getattr(fsm, "encoder", None)
    conv_out = getattr(encoder, "conv_out", None)
    quant = getattr(fsm, "quant_conv", None)
    kl = isinstance(getattr(fsm, "regularization", None), DiagonalGaussianRegularizer)
    image_vae = getattr(vae, "latent_dim", 2) == 2 and getattr(vae, "output_channels", 3) == 3
    out = getattr(quant if quant is not None else conv_out, "out_channels", None)
    if not (kl and image_vae and out == 2 * vae.latent_channels):
        raise InputError("vae", f"it is a {vae_kind(vae)}, which has no posterior variance to read",
                         "a KL VAE (SD1.x/2.x, SDXL, SD3, Flux or a retrained KL-F8), e.g. from Load VAE or Load VAE (strict)")
    return encoder, quant


def kl_state_dict(vae) -> dict:
    """The CompVis-layout weights of a host KL image VAE (CPU copies): what the engine's strict
    loader validates. InputError naming the kind for any other VAE."""
    _moment_layers(vae)
    _place(vae)
    return {k: v.detach().to("cpu", copy=True) for k, v in vae.first_stage_model.state_dict().items()}


def _place(vae) -> None:
    """Have the host load the model before its weights are read (newer hosts load them lazily)."""
    mm.load_models_gpu([vae.patcher], force_full_load=vae.disable_offload)


def moments_fn(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x [B, 3, H, W]` in -1..1 → raw moments `[B, 2C, h, w]` float32, run by the host's own encoder.

    Each call asks the host's model management to place the model (it may offload other models,
    or load it partially in low-VRAM mode), exactly as core's VAE Encode does.
    """
    encoder, quant = _moment_layers(vae)

    def moments(x: torch.Tensor) -> torch.Tensor:
        memory = vae.memory_used_encode(x.shape, vae.vae_dtype)
        mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
        h = encoder(x.to(vae.vae_dtype).to(vae.device))
        if quant is not None:
            h = quant(h)
        return h.to(vae.output_device).float()

    return moments


def downscale(vae) -> int:
    return int(vae.spacial_compression_encode())


def codec(vae, name: str = "vae", input_name: str = "vae") -> Codec:
    """The engine's view of a host VAE: the host's own encoder and decoder, under its model management.
    What the VAE cannot do (no posterior, no image decoder) is kept as the reason, raised when asked."""
    parts = {}
    try:
        parts["moments"] = moments_fn(vae)
    except InputError as e:
        parts["no_moments"] = e.problem
    try:
        parts["decode"], parts["decode_grad"] = decode_fn(vae), decode_fn(vae, differentiable=True)
    except InputError as e:
        parts["no_decoder"] = e.problem
    info = {"path": "from ComfyUI", "layout": type(vae.first_stage_model).__name__, **vae_summary(vae)}
    return with_fp32_retry(Codec(name, int(vae.latent_channels), downscale(vae), torch.device(vae.output_device),
                                 vae.vae_dtype, info=info, input_name=input_name,
                                 encode_bytes=lambda shape: int(vae.memory_used_encode(shape, vae.vae_dtype)),
                                 fp32=lambda: codec(fp32_twin(vae), name, input_name), **parts))


def fp32_twin(vae) -> "comfy.sd.VAE":
    """The same host VAE computing in float32, for redoing what half precision could not: a copy of
    its model (the input VAE is not touched) under its own ModelPatcher, so ComfyUI's model
    management places, offloads and frees it like any other model."""
    if vae.vae_dtype == torch.float32:
        return vae
    _place(vae)
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


# ---------------------------------------------------------------- decoding (with gradients when asked)
# ComfyUI runs every node inside `torch.inference_mode()`, so the host model's weights are inference
# tensors, which autograd refuses to save for backward. The differentiable decode therefore runs the
# host's own module with fresh copies of the decoder's weights (`torch.func.functional_call`), made in
# normal mode on the device the host placed them on. The host model is not changed.

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
        raise InputError("vae", f"it is a {vae_kind(vae)}, which does not decode image latents here",
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
        mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
        x = z.to(vae.device).to(vae.vae_dtype)
        if grads:
            out = torch.func.functional_call(wrapper, _normal_copies(wrapper), (x,))
        else:
            with torch.no_grad():
                out = fsm.decode(x)
        return out.to(vae.output_device).float()

    return decode

