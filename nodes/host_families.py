"""Where each VAE family the host builds keeps its posterior: one explicit table (part of the host
adapter, beside `host.py`).

ComfyUI's `encode()` keeps only the mean. The raw moments (mean then log-variance, before any clamp)
pass through one layer of the host's own model on their way; a forward hook on that layer catches
them while the host's own `encode` runs, so the host's chunking (causal video VAEs encode frame 1,
then 4 at a time) and its model management stay exactly as in core's VAE Encode.

Layouts: moments `[B, 2C, h, w]` (image VAEs) or `[B, 2C, T, h, w]` (video VAEs) at the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..vae_fix.errors import InputError

EXPECTED = ("a VAE with a Gaussian posterior: SD1.x/2.x, SDXL, SD3, Flux, SVD, Wan 2.1/2.2, Qwen-Image, "
            "HunyuanVideo 1.0/1.5, Hunyuan Image 2.1 (and refiner), Mochi or LTXV")


@dataclass(frozen=True)
class Family:
    name: str                      # what users call it
    layer: Optional[str] = None    # under first_stage_model, where the raw moments pass; None: no posterior
    take: str = "output"           # that layer's "output", or its first "input"
    video: bool = False            # latents [B, C, T, h, w]: an image is encoded as a one-frame clip
    channels_per_latent: int = 1   # the host's latent packs this many posterior frames (the refiner: 2)
    decodes: bool = True           # its decoder gives RGB in -1..1 from the posterior's mean
    latent_statistics: Optional[str] = None  # a module whose normalize() maps means into the host's latent space
    frame_step: Optional[tuple] = None  # a clip: input frames in latent frame 0, then in each later one
    whole_steps: bool = False      # the host refuses clips that are not first + k * per frames (LTXV)
    note: str = ""                 # said in every report on this VAE
    why_not: str = ""              # families without a posterior: what they are instead


_REGULARIZER = "regularization"  # the host's DiagonalGaussianRegularizer: its input is the raw moments
FAMILIES = {
    "kl": Family("KL autoencoder (SD1.x/2.x, SDXL, retrained KL-F8)", _REGULARIZER, "input"),
    "kl_engine": Family("KL autoencoder without quant_conv (SD3, Flux)", _REGULARIZER, "input"),
    "svd": Family("SVD (KL-F8 encoder, temporal decoder)", _REGULARIZER, "input", decodes=False,
                  note="SVD's decoder is temporal: only its encoder's posterior is read here"),
    "hunyuan_image": Family("Hunyuan Image 2.1 (64 channels, 32x)", _REGULARIZER, "input"),
    "hunyuan_video": Family("HunyuanVideo 1.0 (3-D KL)", _REGULARIZER, "input", video=True, frame_step=(1, 4)),
    "hunyuan_video15": Family("HunyuanVideo 1.5-style (32 channels, 16x)", _REGULARIZER, "input", video=True),
    "hunyuan_image_refiner": Family(
        "Hunyuan Image 2.1 refiner (32 channels, two frames packed to 64)", "encoder.regul", "input", video=True,
        channels_per_latent=2, decodes=False,
        note="the refiner packs two posterior frames into one 64-channel latent: its 32-channel posterior is read, "
             "and its decoder (which takes the packed latent) is not used here"),
    "wan21": Family("Wan 2.1 / Qwen-Image (16 channels)", "conv1", video=True, frame_step=(1, 4)),
    "wan22": Family("Wan 2.2 (48 channels, 16x)", "conv1", video=True, frame_step=(1, 4)),
    "mochi": Family("Mochi (12 channels)", "encoder.output_proj", video=True, frame_step=(1, 6),
                    note="Mochi's log-variance is not clamped by the host (no -30..20 range)"),
    "ltxv": Family("LTXV (128 channels, 32x)", "encoder", video=True, latent_statistics="per_channel_statistics",
                   frame_step=(1, 8), whole_steps=True,
                   note="LTXV's encoder outputs one log-variance channel, broadcast to all 128 (its 'uniform' "
                        "log-variance): before its per-channel normalisation every channel has the same log-variance; "
                        "means and log-variance are given in the normalised latent space its encode gives"),
    "taesd": Family("TAESD (tiny autoencoder)", why_not="a deterministic encoder"),
    "cosmos": Family("Cosmos video tokenizer", why_not="an identity distribution (a deterministic encoder)", decodes=False),
    "stage_a": Family("Stable Cascade stage A", why_not="a VQ codebook, no variance", decodes=False),
    "stage_c": Family("Stable Cascade EfficientNet coder", why_not="a deterministic encoder", decodes=False),
    "pixel_space": Family("pixel-space VAE", why_not="no autoencoder at all", decodes=False),
    "ace": Family("ACE-Step music autoencoder", why_not="an audio autoencoder without a posterior", decodes=False),
    "stable_audio": Family("Stable Audio VAE", why_not="an audio VAE (1-D latents; images only here)", decodes=False),
    "mmaudio": Family("MMAudio VAE", why_not="an audio VAE (1-D latents; images only here)", decodes=False),
    "hunyuan3d": Family("Hunyuan3D shape VAE", why_not="a 3-D shape VAE (point clouds, not images)", decodes=False),
}

# the host model's class (module under comfy., class) -> family; AutoencodingEngine needs its encoder too
_BY_CLASS = {
    "ldm.models.autoencoder.AutoencoderKL": "kl",
    "ldm.wan.vae.WanVAE": "wan21",
    "ldm.wan.vae2_2.WanVAE": "wan22",
    "ldm.genmo.vae.model.VideoVAE": "mochi",
    "ldm.lightricks.vae.causal_video_autoencoder.VideoVAE": "ltxv",
    "taesd.taesd.TAESD": "taesd",
    "ldm.cosmos.vae.CausalContinuousVideoTokenizer": "cosmos",
    "ldm.cascade.stage_a.StageA": "stage_a",
    "ldm.cascade.stage_c_coder.StageC_coder": "stage_c",
    "pixel_space_convert.PixelspaceConversionVAE": "pixel_space",
    "ldm.ace.vae.music_dcae_pipeline.MusicDCAE": "ace",
    "ldm.audio.autoencoder.AudioOobleckVAE": "stable_audio",
    "ldm.mmaudio.vae.autoencoder.AudioAutoencoder": "mmaudio",
    "ldm.hunyuan3d.vae.ShapeVAE": "hunyuan3d",
}
_ENGINE_BY_ENCODER = {
    "ldm.modules.diffusionmodules.model.Encoder": "kl_engine",
    "ldm.hunyuan_video.vae.Encoder": "hunyuan_image",
    "ldm.hunyuan_video.vae_refiner.Encoder": "hunyuan_video15",
}


def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__.removeprefix('comfy.')}.{cls.__name__}"


def family_id(first_stage_model) -> Optional[str]:
    """The table's key for a host model, or None when the table does not know it."""
    path = _class_path(first_stage_model)
    if path == "ldm.models.autoencoder.AutoencoderKL":
        return "hunyuan_video" if first_stage_model.quant_conv.weight.dim() == 5 else "kl"
    if path != "ldm.models.autoencoder.AutoencodingEngine":
        return _BY_CLASS.get(path)
    key = _ENGINE_BY_ENCODER.get(_class_path(getattr(first_stage_model, "encoder", None)))
    if key == "kl_engine" and type(first_stage_model.decoder).__name__ == "VideoDecoder":
        return "svd"
    if key == "hunyuan_video15" and getattr(first_stage_model.encoder, "refiner_vae", False):
        return "hunyuan_image_refiner"
    return key


def family_of(first_stage_model, input_name: str = "vae") -> Family:
    """The family of a host model; InputError naming the model class when the table does not know it."""
    key = family_id(first_stage_model) if first_stage_model is not None else None
    if key is None:
        what = _class_path(first_stage_model) if first_stage_model is not None else "an empty VAE (no weights recognised)"
        raise InputError(input_name, f"it is {what}, a VAE family this pack does not know", EXPECTED)
    return FAMILIES[key]


def posterior_family(first_stage_model, input_name: str = "vae") -> Family:
    """As `family_of`, but InputError naming the family when it has no posterior to read."""
    family = family_of(first_stage_model, input_name)
    if family.layer is None:
        raise InputError(input_name, f"it is a {family.name}: {family.why_not}, so it has no posterior variance to read",
                         EXPECTED)
    return family
