"""VAE Health Check: the verdict on a VAE from the built-in probe images, with nothing to connect
but the VAE (engine: `vae_fix.inspect.inspect_vae` with no images, `vae_fix.probes`)."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix.inspect import inspect_vae
from . import host, wire


class VAEHealthCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixHealthCheck",
            display_name="VAE Health Check",
            category="VAE Fix/inspect",
            is_output_node=True,
            description=("Does this VAE have a black hole? Runs it on the built-in probe set (7 drawn images: flat, "
                         "a lone square, shapes, lines, a checkerboard, noise, text; and 3 public-domain photos; each "
                         "at 128 and 256 px) and answers 'black hole at (y, x) in N/N probes' or 'no black hole found'. "
                         "A black hole collapses the log-variance far below the VAE's typical range whatever the content; "
                         "a collapse in a few images only is content-triggered and said so."),
            inputs=[io.Vae.Input("vae", tooltip="Any KL VAE: Load VAE, Load VAE (strict) or a checkpoint's VAE.")],
            outputs=[
                io.String.Output("verdict", display_name="verdict",
                                 tooltip="One line: what was found, where and in how many probes."),
                io.Image.Output("probes", display_name="probes",
                                tooltip="Every probe with its lowest raw log-variance per cell overlaid and the collapsed "
                                        "cells boxed, the verdict written above."),
                io.String.Output("report", display_name="report",
                                 tooltip="The JSON report (schema 2) of the probe run: the verdict and every probe's entry."),
            ],
        )

    @classmethod
    def execute(cls, vae) -> io.NodeOutput:
        result = inspect_vae(host.codec(vae), progress=host.progress_fn())
        picture = wire.images_to_batch([result.verdict_picture()])
        return io.NodeOutput(result.verdict.line(), picture, result.json_text(), ui=ui.PreviewImage(picture, cls=cls))


NODES = [VAEHealthCheck]
