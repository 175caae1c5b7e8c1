"""Latent Statistics: per-channel numbers of a LATENT, the scale/shift they imply next to the known
families' values, and a histogram picture per channel."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..vae_fix import stats
from ..vae_fix.jsonsafe import json_safe
from . import wire


def summary_text(s: dict) -> str:
    """A few readable lines from `stats.latent_stats` output: each channel, then the family fit."""
    lines = [f"latent {s['shape']} (B, C, h, w), {s['values_per_channel']} values per channel"]
    for row in s["channels"]:
        if row["mean"] is None:
            lines.append(f"ch {row['channel']}: no finite values")
            continue
        bad = f", {row['nonfinite']} non-finite" if row["nonfinite"] else ""
        lines.append(f"ch {row['channel']}: mean {row['mean']:.4g}  std {row['std']:.4g}  "
                     f"min {row['min']:.4g}  max {row['max']:.4g}{bad}")
    overall = s["overall"]
    if overall["implied_scale"]:
        lines.append(f"implied scale 1/std = {overall['implied_scale']:.5g}, implied shift (mean) = {overall['implied_shift']:.4g}")
    for fam in s["families"]:
        if fam["channels_match"] and "scale_ratio" in fam:
            lines.append(f"{fam['label']}: scale {fam['scale']:g}, shift {fam['shift']:g} -> model-space mean "
                         f"{fam['model_space_mean']:.3g}, std {fam['model_space_std']:.3g} (ideal 0 and 1)")
    return "\n".join(lines)


class LatentStatistics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentStatistics",
            display_name="Latent Statistics",
            category="VAE Fix/latent",
            description=("Measures a latent per channel (mean, std, min, max, percentiles, non-finite values) over the "
                         "whole batch, the scale factor and shift it implies (1/std and mean: SD1.x uses 0.18215, SDXL "
                         "0.13025, SD3 1.5305/0.0609, Flux 0.3611/0.1159) and draws one histogram per channel."),
            inputs=[
                io.Latent.Input("latent", tooltip="Any latent (raw VAE space, as VAE Encode and samplers output it); any channel count."),
                io.Int.Input("bins", default=64, min=4, max=512, tooltip="Bars per histogram."),
                io.Float.Input("clip_percentile", default=0.5, min=0.0, max=10.0, step=0.1,
                               tooltip="The shared x range runs from this percentile to 100 minus it, so rare spikes do not "
                                       "squash the picture; values outside are piled into the end bars and counted in each title."),
                io.Int.Input("columns", default=4, min=1, max=16, tooltip="Histograms per row in the picture."),
            ],
            outputs=[
                io.String.Output("stats", display_name="stats",
                                 tooltip="JSON: shape, per channel mean/std/min/max/percentiles/implied scale and shift, the same "
                                         "over all channels, and per known family the model-space mean/std and scale ratio."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="The same in a few readable lines: one per channel, then how the known families with "
                                         "this channel count would see the latent."),
                io.Image.Output("histogram", display_name="histogram",
                                tooltip="One histogram per channel on a shared x range; the orange line is the channel's mean."),
            ],
        )

    @classmethod
    def execute(cls, latent, bins, clip_percentile, columns) -> io.NodeOutput:
        z = wire.latent_samples(latent)
        numbers = stats.latent_stats(z)
        picture = wire.engine_to_image(stats.histogram_image(z, bins, clip_percentile, columns))
        return io.NodeOutput(json.dumps(json_safe(numbers), indent=2), summary_text(numbers), picture,
                             ui=ui.PreviewImage(picture, cls=cls))


NODES = [LatentStatistics]
