"""Latent Preview (RGB): a latent shown as colours without decoding, for any family or VAE; a video
latent as one picture per frame."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix.families import FAMILIES
from ..vae_fix.latent_preview import latent_preview
from . import host, wire

# combo label -> the engine's family argument
FAMILY_CHOICES = {"auto": "auto", **{f.label: f.name for f in FAMILIES.values()}, "fit from the VAE": "fit"}


class LatentPreviewRGB(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentPreviewRGB",
            display_name="Latent Preview (RGB)",
            category="VAE Fix/latent",
            description=("Shows a latent as an RGB picture without decoding: one linear colour map per latent cell. "
                         "SD1.x/2.x, SDXL, SD3, Flux, Hunyuan Image 2.1 and the video families Wan 2.1/2.2, "
                         "HunyuanVideo, Mochi and LTXV use their published factors; any other VAE (retrained, 8 or 12 "
                         "channels) gets a map fitted from one decode of this latent. A video latent [B, C, T, h, w] "
                         "gives one picture per frame, as an image batch (item by item). Cheap enough for every step "
                         "of a batch; shows where a latent is off (spikes, wrong family) before you decode it."),
            inputs=[
                io.Latent.Input("latent", tooltip="Any latent in raw VAE space (VAE Encode, a sampler, Load Latent, ...)."),
                io.Combo.Input("family", options=list(FAMILY_CHOICES), default="auto",
                               tooltip="Whose colour factors to use. 'auto' takes the only known family with this channel "
                                       "count (video families for a video latent); when two share it (4: SD1.x/SDXL, 16: SD3/Flux, "
                                       "16 video: Wan 2.1/HunyuanVideo) it fits from the VAE if one is "
                                       "connected, else takes the family whose scale fits the latent's spread and says which "
                                       "in 'info'. 'fit from the VAE' always fits (needs 'vae')."),
                io.Int.Input("scale", default=8, min=1, max=64,
                             tooltip="Pixels per latent cell in the picture (8: the size SD would decode to)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the VAE of this latent, used to fit a colour map (one decode of the first "
                                     "latent) when no published one fits."),
            ],
            outputs=[
                io.Image.Output("preview", display_name="preview",
                                tooltip="One picture per latent of the batch, each latent cell a scale x scale block; a "
                                        "video latent gives one per frame (B*T pictures, item by item)."),
                io.String.Output("info", display_name="info",
                                 tooltip="JSON: which map was used (family or fit), its weights [C, 3] and bias on raw "
                                         "latents, and for a fit how well it explains the decoded colours (R² per channel); "
                                         "for a video latent, its items and frames."),
            ],
        )

    @classmethod
    def execute(cls, latent, family, scale, vae=None) -> io.NodeOutput:
        codec = host.codec(vae) if vae is not None else None
        result = latent_preview(wire.latent_samples(latent, video=True), FAMILY_CHOICES.get(family, family), codec, scale)
        picture = wire.engine_to_image(result.images)
        return io.NodeOutput(picture, result.json_text(), ui=ui.PreviewImage(picture, cls=cls))


NODES = [LatentPreviewRGB]
