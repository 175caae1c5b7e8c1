"""Convert VAE File: a VAE in models/vae rewritten in the CompVis or diffusers layout, as
`python -m vae_fix convert` does."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix.convert import LAYOUTS, convert_vae
from . import host


class ConvertVAEFile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixConvertVAE",
            display_name="Convert VAE File",
            category="VAE Fix/loaders",
            description=("Reads a VAE from models/vae as strictly as Load VAE (strict) and writes it under a new name "
                         "in models/vae, in the CompVis layout (one .safetensors, what ComfyUI and A1111 load) or the "
                         "diffusers layout (a folder, or one .safetensors). Every tensor is copied unchanged."),
            is_output_node=True,
            inputs=[
                io.Combo.Input("vae_name", options=host.vae_choices(),
                               tooltip="The VAE to convert: a file or diffusers folder (trailing '/') in models/vae."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="compvis",
                               tooltip="compvis: one .safetensors file (the name must end in .safetensors). diffusers: "
                                       "a folder with config.json + weights, or one diffusers-named .safetensors file."),
                io.String.Input("filename", default="converted_vae.safetensors",
                                tooltip="The new name inside models/vae. An existing name, or one outside the folder, "
                                        "is refused: nothing is ever replaced."),
            ],
            outputs=[
                io.String.Output("info", display_name="info",
                                 tooltip="JSON: what was read (layout, latent channels, downscale, notes) and what was "
                                         "written (path, layout, files, size)."),
            ],
        )

    @classmethod
    def execute(cls, vae_name, layout, filename) -> io.NodeOutput:
        out = host.new_vae_path(filename)
        result = convert_vae(host.vae_path(vae_name), layout, out, out_name=f"filename '{filename}'")
        return io.NodeOutput(result.json_text(), ui=ui.PreviewText(result.summary()))


NODES = [ConvertVAEFile]
