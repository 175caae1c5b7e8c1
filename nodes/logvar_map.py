"""Log-Variance Map: the raw or clamped posterior log-variance, or the KL per cell, of any KL VAE
the host loaded, for any channel choice (engine: `vae_fix.logvar_map`).
"""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import posterior, viz
from ..vae_fix.logvar_map import RANGE_MODES, logvar_map
from . import host, wire
from .tooltips import COLORMAP_TIP, SIZE_POLICY_TIP

# the node's combo labels → the engine's values
SHOW = {"lowest over channels": "min", "mean over channels": "mean", "every channel (grid)": "grid", "one channel": "one"}
CLIP = {"every latent frame": "every", "lowest over time": "lowest", "first latent frame": "0", "each image alone": None}
VALUES = {"log-variance (raw)": "raw", "log-variance (clamped to -30..20)": "clamped", "KL per cell (nats)": "kl"}


class LogVarianceMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLogVarianceMap",
            display_name="Log-Variance Map",
            category="VAE Fix/inspect",
            is_output_node=True,  # shows its preview even when nothing is connected to it
            description=("Encodes the image with the VAE and draws its raw posterior log-variance (what core's VAE "
                         "Encode throws away), the clamped one, or the KL per latent cell, for the lowest/mean "
                         "channel, one channel or every channel. Works with any KL VAE (SD1.x/2.x, SDXL, SD3, Flux, "
                         "retrained)."),
            inputs=[
                io.Vae.Input("vae", tooltip="A KL VAE from Load VAE, Load VAE (strict) or a checkpoint loader."),
                io.Image.Input("image", tooltip="The image(s) to encode; every image of a batch gets its own map."),
                io.Combo.Input("value", options=list(VALUES), default="log-variance (raw)",
                               tooltip="Raw log-variance as the encoder outputs it (black holes go below -30), the "
                                       "clamped one the reference sampler uses, or the KL divergence per latent cell."),
                io.Combo.Input("show", options=list(SHOW), default="lowest over channels",
                               tooltip="Which channels: the lowest value over channels (shows black holes), the mean, "
                                       "every channel side by side, or the one chosen by 'channel'."),
                io.Int.Input("channel", default=0, min=0, max=255,
                             tooltip="Latent channel drawn when 'show' is 'one channel' (0-based; SD has 4, SD3/Flux 16)."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="magma", tooltip=COLORMAP_TIP),
                io.Combo.Input("range_mode", options=list(RANGE_MODES), default="percentile",
                               tooltip="'percentile': low/high are percentiles of the batch's values (robust to outliers); "
                                       "'fixed': low/high are the values at the ends of the colour scale."),
                io.Float.Input("low", default=1.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="Bottom of the colour scale: a percentile (0..100) or a value, per 'range_mode'."),
                io.Float.Input("high", default=99.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="Top of the colour scale: a percentile (0..100) or a value, per 'range_mode'."),
                io.Boolean.Input("colorbar", default=True, tooltip="Add a labelled colour bar on the right."),
                io.Combo.Input("size_policy", options=list(posterior.SIZE_POLICIES), default="crop", tooltip=SIZE_POLICY_TIP),
                io.Combo.Input("frames", options=list(CLIP), default="every latent frame", optional=True,
                               tooltip="For a video VAE (Wan, HunyuanVideo, Mochi, LTXV) the image batch is one clip, as "
                                       "core's VAE Encode takes it: a map per latent frame, the lowest log-variance over "
                                       "time, or only the first latent frame; or each image alone as a one-frame clip. "
                                       "Image VAEs always map each image alone."),
            ],
            outputs=[
                io.Image.Output("map", display_name="map",
                                tooltip="The map, one latent cell per downscale×downscale block (lines up with the processed image)."),
                io.String.Output("stats", display_name="stats",
                                 tooltip="JSON: colour range, per-image minimum/median/maximum, cells below the -30 clamp, "
                                         "size handling and tiling notes."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, value, show, channel, colormap, range_mode, low, high, colorbar, size_policy,
                frames="every latent frame") -> io.NodeOutput:
        codec = host.codec(vae)
        result = logvar_map(codec, wire.image_to_engine(image), value=VALUES[value], show=SHOW[show],
                            channel=channel, cmap=colormap, range_mode=range_mode, low=low, high=high,
                            colorbar=colorbar, size_policy=size_policy, progress=host.progress_fn(),
                            clip=CLIP[frames] if codec.clip_moments is not None else None)
        out = wire.images_to_batch(result.maps)
        return io.NodeOutput(out, result.json_text(), ui=ui.PreviewImage(out, cls=cls))


NODES = [LogVarianceMap]
