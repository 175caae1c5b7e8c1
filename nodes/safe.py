"""Safe VAE Decode / Safe VAE Encode: core's VAE Decode and Encode, with half precision that cannot
give black or NaN images. Whatever comes out non-finite (an fp16 overflow inside the VAE) is done
again by a float32 copy of the VAE; the report says which dtype gave the result."""

from comfy_api.v0_0_2 import io

from ..vae_fix.safe import first_finite
from . import host, wire
from .tooltips import REPORT_TIP, VAE_TIP



class SafeVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixSafeVAEDecode",
            display_name="Safe VAE Decode",
            category="VAE Fix/latent",
            description=("VAE Decode that never gives black or NaN images: decodes exactly as core's VAE Decode (in the "
                         "VAE's dtype, tiles on out-of-memory) and, when anything comes out non-finite, decodes again "
                         "in float32. Use it with fp16/bf16 VAEs."),
            inputs=[io.Latent.Input("samples", tooltip="The latent to decode."),
                    io.Vae.Input("vae", tooltip=VAE_TIP)],
            outputs=[io.Image.Output("image", display_name="IMAGE", tooltip="The decoded images, as VAE Decode gives them."),
                     io.String.Output("report", display_name="report", tooltip=REPORT_TIP)],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        z = wire.latent_samples(samples, "samples", any_family=True)
        result = first_finite("decode", host.core_attempts(vae, "decode", z), "vae")
        return io.NodeOutput(wire.frames_as_images(result.output), result.json_text())


class SafeVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixSafeVAEEncode",
            display_name="Safe VAE Encode",
            category="VAE Fix/latent",
            description=("VAE Encode that never gives NaN latents: encodes exactly as core's VAE Encode and, when "
                         "anything comes out non-finite, encodes again in float32. Use it with fp16/bf16 VAEs."),
            inputs=[io.Image.Input("pixels", tooltip="The images to encode."),
                    io.Vae.Input("vae", tooltip=VAE_TIP)],
            outputs=[io.Latent.Output("latent", display_name="LATENT", tooltip="The latent, as VAE Encode gives it."),
                     io.String.Output("report", display_name="report", tooltip=REPORT_TIP)],
        )

    @classmethod
    def execute(cls, pixels, vae) -> io.NodeOutput:
        rgb = wire.image_rgb(pixels, "pixels")
        result = first_finite("encode", host.core_attempts(vae, "encode", rgb), "vae")
        return io.NodeOutput({"samples": result.output}, result.json_text())


NODES = [SafeVAEDecode, SafeVAEEncode]
