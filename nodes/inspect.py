"""Inspect VAE (black holes): the raw posterior of any KL VAE the host loaded, its anomalous cells
boxed on the image, per-channel maps, the schema-1 report and its summary (engine: `vae_fix.inspect`).
"""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import anomaly, posterior, viz
from ..vae_fix.inspect import inspect_vae
from . import host, wire
from .tooltips import COLORMAP_TIP, SIZE_POLICY_TIP

CLIP = "one clip (video VAEs)"
FRAMES = {CLIP: True, "each image alone": False}


class InspectVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixInspectVAE",
            display_name="Inspect VAE (black holes)",
            category="VAE Fix/inspect",
            is_output_node=True,
            description=("Reads the VAE's full raw posterior on the image (mean and unclamped log-variance), finds the "
                         "cells where the log-variance collapses far below the VAE's typical range (the SD-VAE 'black "
                         "hole', often under the -30 clamp) and gives a verdict on the VAE. A large mean alone is image "
                         "content, never an anomaly. Outputs the image with the map overlaid and collapsed cells boxed, "
                         "per-channel maps, a JSON report, a readable summary and the verdict."),
            inputs=[
                io.Vae.Input("vae", tooltip="A KL VAE from Load VAE, Load VAE (strict) or a checkpoint loader."),
                io.Image.Input("image", tooltip="The image(s) to encode; each image of a batch is inspected on its own."),
                io.Float.Input("threshold", default=anomaly.DEFAULT_THRESHOLD, min=0.0, max=100.0, step=0.5,
                               tooltip="How far below the VAE's typical log-variance a cell must be, in the VAE's robust "
                                       "spreads (1.4826 x MAD over every cell of every image, at least 1 nat)."),
                io.Float.Input("min_drop", default=anomaly.DEFAULT_MIN_DROP, min=0.0, max=100.0, step=0.5,
                               tooltip="...and at least this many nats below it (8 nats = a variance 3000x smaller); "
                                       "smooth VAEs stay under 2 nats on any content."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="magma", tooltip=COLORMAP_TIP),
                io.Combo.Input("size_policy", options=list(posterior.SIZE_POLICIES), default="crop", tooltip=SIZE_POLICY_TIP),
                io.Combo.Input("frames", options=list(FRAMES), default=CLIP, optional=True,
                               tooltip="For a video VAE (Wan, HunyuanVideo, Mochi, LTXV): the image batch is the frames "
                                       "of one clip, as core's VAE Encode takes it, and each latent frame is judged (the "
                                       "report says which input frames it covers); or each image is encoded alone as a "
                                       "one-frame clip. Image VAEs always take each image alone."),
            ],
            outputs=[
                io.Image.Output("overlay", display_name="overlay",
                                tooltip="The image (as encoded, enlarged when small) with the lowest raw log-variance "
                                        "per cell overlaid, anomalous cells boxed, and a colour bar."),
                io.Image.Output("channel_maps", display_name="channel maps",
                                tooltip="Raw log-variance of every latent channel side by side, one shared colour range."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON report (schema 2, as the CLI's report.json): the verdict, then: per image the log-variance, "
                                         "mean and KL statistics, every anomalous cell with its score, clamp-floor hits, "
                                         "size handling and tiling notes."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="The verdict, then the report as a few readable lines per image."),
                io.String.Output("verdict", display_name="verdict",
                                 tooltip="One line: is there a black hole, where, in how many of the images. One image "
                                         "cannot confirm recurrence: VAE Health Check runs the built-in probes."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, threshold, min_drop, colormap, size_policy, frames=CLIP) -> io.NodeOutput:
        codec = host.codec(vae)
        result = inspect_vae(codec, wire.image_to_engine(image), threshold=threshold, min_drop=min_drop,
                             cmap=colormap, size_policy=size_policy, progress=host.progress_fn(),
                             as_clip=FRAMES[frames] and codec.clip_moments is not None)
        overlay = wire.images_to_batch(result.each("overlay"))
        return io.NodeOutput(overlay, wire.images_to_batch(result.each("logvar_grid")), result.json_text(),
                             result.summary(), result.verdict.line(), ui=ui.PreviewImage(overlay, cls=cls))


NODES = [InspectVAE]
