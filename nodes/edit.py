"""Latent Channel Edit: one operation on chosen channels of a LATENT (image or video), any channel
count, optionally through a mask, on chosen batch items and (video) chosen frames. The input LATENT is never modified; every other key of it
(noise_mask, batch_index, type, ...) is kept."""

from comfy_api.v0_0_2 import io

from ..vae_fix import edit
from . import wire

OPERATIONS = {
    "scale (x factor)": "scale",
    "offset (+ offset)": "offset",
    "clamp (low..high)": "clamp",
    "soft clamp (limit x tanh)": "soft_clamp",
    "normalize (to mean/std)": "normalize",
    "zero": "zero",
    "invert (x -> -x)": "invert",
    "swap with target": "swap",
    "copy to target": "copy",
}
SELECTION_TIP = "'all', a list '0,2', a range '1-3' or both '0,4-7' (0-based, ranges inclusive)."


class LatentChannelEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentChannelEdit",
            display_name="Latent Channel Edit",
            category="VAE Fix/latent",
            description=("Edits chosen channels of a latent in raw VAE space: scale, offset, clamp, soft clamp, "
                         "normalise to a mean/std, zero, invert, swap or copy channels. Works with any channel count "
                         "(SD1.x/SDXL 4, SD3/Flux 16, Wan 16/48, retrained VAEs), only inside an optional mask and only on "
                         "the chosen batch items and, for a video latent [B, C, T, h, w], the chosen frames. Put it "
                         "between a sampler (or VAE Encode) and VAE Decode."),
            inputs=[
                io.Latent.Input("latent", tooltip="The latent to edit (from a sampler, VAE Encode, Load Latent, ...). It is not changed; a copy is."),
                io.Combo.Input("operation", options=list(OPERATIONS), default="scale (x factor)",
                               tooltip="What to do to the chosen channels. 'normalize' sets each chosen channel's mean and std "
                                       "(measured inside the mask, per batch item); swap/copy need 'target'."),
                io.String.Input("channels", default="all", tooltip="Which latent channels to edit: " + SELECTION_TIP),
                io.Float.Input("factor", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="scale: multiply the channels by this."),
                io.Float.Input("offset", default=0.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="offset: add this to the channels (raw VAE units; SD1.x latents have std ~5)."),
                io.Float.Input("low", default=-4.0, min=-1000.0, max=1000.0, step=0.1,
                               tooltip="clamp: lowest value kept (raw VAE units)."),
                io.Float.Input("high", default=4.0, min=-1000.0, max=1000.0, step=0.1,
                               tooltip="clamp: highest value kept (raw VAE units)."),
                io.Float.Input("limit", default=3.0, min=0.01, max=1000.0, step=0.1,
                               tooltip="soft clamp: values become limit x tanh(value / limit), so they stay inside +-limit "
                                       "and small values barely change (TAESD's decoder bounds its latents with limit 3)."),
                io.Float.Input("mean", default=0.0, min=-1000.0, max=1000.0, step=0.01,
                               tooltip="normalize: the mean each chosen channel gets."),
                io.Float.Input("std", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="normalize: the standard deviation each chosen channel gets."),
                io.String.Input("target", default="",
                                tooltip="swap/copy: the channels that receive the chosen ones, one per chosen channel, "
                                        "in the same order (e.g. channels '0,1' and target '2,3')."),
                io.String.Input("batch", default="all",
                                tooltip="Which latents of the batch to edit: " + SELECTION_TIP + " Empty means all."),
                io.String.Input("frames", default="all", optional=True,
                                tooltip="Video latents [B, C, T, h, w] only: which latent frames to edit, " + SELECTION_TIP
                                        + " Empty means all; frames not chosen stay exactly as they are. An image "
                                          "latent has no frames: leave it at 'all'."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: edit only where the mask is (soft: 0.5 = half way). A mask in image pixels "
                                      "(e.g. from Load Image's alpha) or on the latent grid; it is resized to the latent grid. "
                                      "One mask for all latents or one per latent; for a video latent one for every frame, one "
                                      "per item or one per latent frame (item by item)."),
            ],
            outputs=[
                io.Latent.Output("edited", display_name="LATENT",
                                 tooltip="A copy of the latent with the edit applied; noise_mask, batch_index and other keys kept."),
                io.String.Output("info", display_name="info",
                                 tooltip="JSON: the operation, the channels and batch items it touched, whether a mask was used, "
                                         "and per edited channel the mean/std before and after."),
            ],
        )

    @classmethod
    def execute(cls, latent, operation, channels, factor, offset, low, high, limit, mean, std, target, batch,
                frames="all", mask=None) -> io.NodeOutput:
        result = edit.edit_channels(wire.latent_samples(latent, video=True), OPERATIONS.get(operation, operation),
                                    channels, factor=factor, offset=offset, low=low, high=high, limit=limit, mean=mean,
                                    std=std, target=target, mask=mask, batch=batch, frames=frames)
        return io.NodeOutput(wire.with_samples(latent, result.latent), result.json_text())


NODES = [LatentChannelEdit]
