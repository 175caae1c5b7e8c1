"""Load VAE (strict): a drop-in replacement for core's Load VAE that refuses broken files."""
from __future__ import annotations

import json

from comfy_api.v0_0_2 import io

from ..vae_fix import loader
from . import host


class LoadVAEStrict(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLoadVAE",
            display_name="Load VAE (strict)",
            category="VAE Fix/loaders",
            description=("Loads a VAE from models/vae (a single file or a diffusers folder), checks every weight "
                         "against its layout and outputs a standard VAE for VAE Encode/Decode and any other node. "
                         "A broken or incomplete file stops with a clear error instead of running half-loaded."),
            inputs=[
                io.Combo.Input("vae_name", options=host.vae_choices(),
                               tooltip="A VAE in models/vae: .safetensors/.ckpt/.pt/.pth/.bin (CompVis or diffusers "
                                       "keys, with or without a 'first_stage_model.'/'vae.' prefix) or a diffusers "
                                       "folder (shown with a trailing '/')."),
                io.Combo.Input("dtype", options=list(host.DTYPES), default="auto",
                               tooltip="Precision the VAE runs in. 'auto' lets ComfyUI choose for your device "
                                       "(as core's loader does); fp32 avoids black/NaN images from fp16-unsafe VAEs."),
            ],
            outputs=[
                io.Vae.Output("vae", display_name="VAE",
                              tooltip="A standard ComfyUI VAE, managed by ComfyUI (device placement, offloading)."),
                io.String.Output("info", display_name="info",
                                 tooltip="JSON: the file's layout, latent channels, downscale, dtype and any notes "
                                         "the loader made (prefix stripped, keys converted, ...)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name, dtype):
        try:  # a file replaced under the same name is loaded again
            return (vae_name, dtype, host.path_fingerprint(host.vae_path(vae_name)))
        except Exception:
            return (vae_name, dtype)

    @classmethod
    def execute(cls, vae_name, dtype) -> io.NodeOutput:
        path = host.vae_path(vae_name)
        vae_file = loader.read_vae(path)
        vae = host.to_host_vae(vae_file, dtype, path=vae_name)
        info = dict(vae_file.info(), name=vae_name, comfyui=host.vae_summary(vae))
        return io.NodeOutput(vae, json.dumps(info, indent=2, default=str))


NODES = [LoadVAEStrict]
