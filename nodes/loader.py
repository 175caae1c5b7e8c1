"""Load VAE (strict): a drop-in replacement for core's Load VAE that refuses broken files."""

import json

from comfy_api.v0_0_2 import io

from ..vae_fix.model import PADDING_MODES
from . import host, host_loading


class LoadVAEStrict(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLoadVAE",
            display_name="Load VAE (strict)",
            category="VAE Fix/loaders",
            description=("Loads a VAE from models/vae (a single file or a diffusers folder) of any family ComfyUI "
                         "builds (SD/SDXL/SD3/Flux KL VAEs, Wan, HunyuanVideo, Hunyuan Image, Mochi, LTXV, SVD, "
                         "Cosmos, ...), checks every weight and outputs a standard VAE for VAE Encode/Decode and any "
                         "other node. A broken or incomplete file stops with a clear error instead of running "
                         "half-loaded."),
            inputs=[
                io.Combo.Input("vae_name", options=host.vae_choices(),
                               tooltip="A VAE in models/vae: .safetensors/.ckpt/.pt/.pth/.bin (KL VAEs in CompVis or "
                                       "diffusers keys, with or without a 'first_stage_model.'/'vae.' prefix; other "
                                       "families as ComfyUI's Load VAE reads them) or a diffusers folder (shown with "
                                       "a trailing '/')."),
                io.Combo.Input("dtype", options=list(host.DTYPES), default="auto",
                               tooltip="Precision the VAE runs in. 'auto' lets ComfyUI choose for your device "
                                       "(as core's loader does); fp32 avoids black/NaN images from fp16-unsafe VAEs."),
                io.Combo.Input("padding", options=list(PADDING_MODES), default="zeros", optional=True,
                               tooltip="How the VAE's convolutions pad the image border. 'zeros' leaves the model as "
                                       "ComfyUI builds it (zero padding for KL VAEs, as trained by CompVis); 'reflect' "
                                       "is for VAEs retrained with reflection padding (EQ-VAE style), which give "
                                       "border artefacts with zeros."),
            ],
            outputs=[
                io.Vae.Output("vae", display_name="VAE",
                              tooltip="A standard ComfyUI VAE, managed by ComfyUI (device placement, offloading)."),
                io.String.Output("info", display_name="info",
                                 tooltip="JSON: the VAE's family, the file's layout, latent channels, dtype, padding "
                                         "and any notes the loader made (prefix stripped, keys converted, ...)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name, dtype, padding="zeros"):  # a file replaced under its name is reloaded
        return (vae_name, dtype, padding, host.vae_fingerprint(vae_name))

    @classmethod
    def execute(cls, vae_name, dtype, padding="zeros") -> io.NodeOutput:
        vae, info = host_loading.load_strict(host.vae_path(vae_name), vae_name, dtype, padding)
        return io.NodeOutput(vae, json.dumps(info, indent=2, default=str))


NODES = [LoadVAEStrict]
