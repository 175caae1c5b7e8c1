"""Latent Statistics: per-channel numbers of a LATENT (image or video), the scale/shift they imply
next to the known families' values, and a histogram picture per channel."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import stats
from . import wire


class LatentStatistics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentStatistics",
            display_name="Latent Statistics",
            category="VAE Fix/latent",
            description=("Measures a latent per channel (mean, std, min, max, percentiles, non-finite values) over the "
                         "whole batch, the scale factor and shift it implies (1/std and mean: SD1.x uses 0.18215, SDXL "
                         "0.13025, SD3 1.5305/0.0609, Flux 0.3611/0.1159) and draws one histogram per channel. A video latent "
                         "[B, C, T, h, w] is measured over all its frames, next to the video families (Wan, "
                         "HunyuanVideo, Mochi, LTXV), and each frame again on its own."),
            inputs=[
                io.Latent.Input("latent", tooltip="Any latent (raw VAE space, as VAE Encode and samplers output it); any channel "
                                                  "count; image [B, C, h, w] or video [B, C, T, h, w]."),
                io.Int.Input("bins", default=64, min=4, max=512, tooltip="Bars per histogram."),
                io.Float.Input("clip_percentile", default=0.5, min=0.0, max=10.0, step=0.1,
                               tooltip="The shared x range runs from this percentile to 100 minus it, so rare spikes do not "
                                       "squash the picture; values outside are piled into the end bars and counted in each title."),
                io.Int.Input("columns", default=4, min=1, max=16, tooltip="Histograms per row in the picture."),
            ],
            outputs=[
                io.String.Output("stats", display_name="stats",
                                 tooltip="JSON: shape, per channel mean/std/min/max/percentiles/implied scale and shift, the same "
                                         "over all channels, and per known family the model-space mean/std and scale ratio; "
                                         "for a video latent also per_frame: each frame's numbers on their own."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="The same in a few readable lines: one per channel, then how the known families with "
                                         "this channel count would see the latent; for a video latent, one line per frame."),
                io.Image.Output("histogram", display_name="histogram",
                                tooltip="One histogram per channel on a shared x range; the orange line is the channel's mean."),
            ],
        )

    @classmethod
    def execute(cls, latent, bins, clip_percentile, columns) -> io.NodeOutput:
        result = stats.latent_statistics(wire.latent_samples(latent, video=True), bins=bins, clip_percentile=clip_percentile,
                                         columns=columns)
        picture = wire.engine_to_image(result.histogram)
        return io.NodeOutput(result.json_text(), result.summary(), picture, ui=ui.PreviewImage(picture, cls=cls))


NODES = [LatentStatistics]
