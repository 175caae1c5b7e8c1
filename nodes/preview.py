"""Latent Preview (RGB): a latent shown as colours without decoding, for any family or VAE."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..vae_fix import latent_preview
from ..vae_fix.errors import InputError
from ..vae_fix.families import FAMILIES
from . import host, wire

FIT = "fit from the VAE"
FAMILY_CHOICES = {"auto": "auto", **{f.label: f.name for f in FAMILIES.values()}, FIT: None}


class LatentPreviewRGB(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentPreviewRGB",
            display_name="Latent Preview (RGB)",
            category="VAE Fix/latent",
            description=("Shows a latent as an RGB picture without decoding: one linear colour map per latent cell. "
                         "SD1.x/2.x, SDXL, SD3 and Flux use their published factors; any other VAE (retrained, 8 or 12 "
                         "channels) gets a map fitted from one decode of this latent. Cheap enough for every step of "
                         "a batch; shows where a latent is off (spikes, wrong family) before you decode it."),
            inputs=[
                io.Latent.Input("latent", tooltip="Any latent in raw VAE space (VAE Encode, a sampler, Load Latent, ...)."),
                io.Combo.Input("family", options=list(FAMILY_CHOICES), default="auto",
                               tooltip="Whose colour factors to use. 'auto' takes the only known family with this channel "
                                       "count (16: SD3 and Flux differ, pick one), or fits from the VAE when one is connected "
                                       "and the count is ambiguous or unknown. 'fit from the VAE' always fits (needs 'vae')."),
                io.Int.Input("scale", default=8, min=1, max=64,
                             tooltip="Pixels per latent cell in the picture (8: the size SD would decode to)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the VAE of this latent, used to fit a colour map (one decode of the first "
                                     "latent) when no published one fits."),
            ],
            outputs=[
                io.Image.Output("preview", display_name="preview",
                                tooltip="One picture per latent of the batch, each latent cell a scale x scale block."),
                io.String.Output("info", display_name="info",
                                 tooltip="JSON: which map was used (family or fit), its weights [C, 3] and bias on raw "
                                         "latents, and for a fit how well it explains the decoded colours (R² per channel)."),
            ],
        )

    @classmethod
    def execute(cls, latent, family, scale, vae=None) -> io.NodeOutput:
        z = wire.latent_samples(latent)
        name = FAMILY_CHOICES.get(family, family)
        decode = host.decode_fn(vae) if vae is not None else None
        if name is None and decode is None:
            raise InputError("vae", f"'{FIT}' needs a VAE", "a VAE connected to 'vae', or a family")
        preview = latent_preview.preview_for(z, name, decode)
        picture = wire.engine_to_image(preview.image(z, scale))
        return io.NodeOutput(picture, json.dumps(preview.to_dict(), indent=2), ui=ui.PreviewImage(picture, cls=cls))


NODES = [LatentPreviewRGB]
