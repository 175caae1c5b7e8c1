"""Everything that touches ComfyUI internals (comfy.*, folder_paths) lives here, and only here.

The host owns its models: we build `comfy.sd.VAE` objects, ask `load_models_gpu` to place them,
and run the host's own encoder to read raw moments. We never move a host model ourselves.

Layouts: images `[B, 3, H, W]` in -1..1 for `moments_fn`; moments `[B, 2C, h, w]`.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths

from ..vae_fix.codec import DTYPES, Codec, dtype_name, parse_dtype, with_fp32_retry  # noqa: F401  (DTYPES: re-exported for the nodes)
from ..vae_fix.demo import shipped_models
from ..vae_fix.errors import InputError, VAELoadError
from ..vae_fix.progress import ProgressFn
from .host_families import FAMILIES, family_id, family_of, posterior_family

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


def kl_state_dict(vae) -> dict:
    """The CompVis-layout weights of a host KL image VAE (CPU copies): what the engine's strict
    loader validates. InputError naming the family for any other VAE."""
    family = family_of(vae.first_stage_model)
    if family not in (FAMILIES["kl"], FAMILIES["kl_engine"]):
        raise InputError("vae", f"it is a {family.name}, not a KL image VAE in the CompVis layout",
                         "a KL VAE (SD1.x/2.x, SDXL, SD3, Flux or a retrained KL-F8)")
    _place(vae)
    return {k: v.detach().to("cpu", copy=True) for k, v in vae.first_stage_model.state_dict().items()}


def _place(vae) -> None:
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
    return _in_latent_space(fsm, family, caught[-1]).to(vae.output_device).float()


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

