"""Repair Latent: neutralise anomalous latent cells before decoding, with a before/after report."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import anomaly, repair
from . import host, wire

SOURCES = {
    "auto": "auto",
    "posterior anomalies (needs image)": "posterior",
    "latent outliers": "latent",
}


class RepairLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixRepairLatent",
            display_name="Repair Latent",
            category="VAE Fix/repair",
            description=("Before decoding, replaces anomalous latent cells (the SD-VAE 'black holes' that smuggle global "
                         "information) by the median of their healthy neighbours, and reports what that changed: the "
                         "reach of each repaired cell, the reach map's worst cell before and after, and the change of "
                         "the decoded image. Cells come from the encoder's posterior (connect the image) or from outliers "
                         "of the latent alone (e.g. after a sampler). A video latent [B, C, T, h, w] is repaired frame by "
                         "frame from its own outliers, each frame decoded alone."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that decodes the latent (and encoded it, for posterior anomalies)."),
                io.Latent.Input("latent", tooltip="The latent to repair: from VAE Encode, a sampler, Load Latent, ...; image or "
                                                  "video [B, C, T, h, w]."),
                io.Combo.Input("source", options=list(SOURCES), default="auto",
                               tooltip="Which cells: where the encoder's log-variance collapses, as in Inspect VAE's verdict "
                                       "(needs 'image'), outliers of the latent alone (robust z per channel), or 'auto' "
                                       "(posterior when an image is connected, else latent outliers)."),
                io.Float.Input("posterior_threshold", default=anomaly.DEFAULT_THRESHOLD, min=0.0, max=100.0, step=0.5,
                               tooltip="Posterior anomalies: how many of the VAE's robust spreads (at least 1 nat) a cell's "
                                       "log-variance must fall below the VAE's typical level, and at least 8 nats (as in Inspect VAE)."),
                io.Float.Input("latent_threshold", default=anomaly.DEFAULT_MEAN_THRESHOLD, min=0.0, max=100.0, step=0.5,
                               tooltip="Latent outliers: how many robust standard deviations a value must sit from its "
                                       "channel's median (edges reach 3-6, so only far larger ones count)."),
                io.Int.Input("window", default=3, min=0, max=64,
                             tooltip="Near field around each cell, in cells, for the reach and far-change numbers."),
                io.Int.Input("measure_cells", default=8, min=0, max=256,
                             tooltip="Per latent, how many repaired cells get the exact reach measure (one decode each)."),
                io.Boolean.Input("fast_map", default=True,
                                 tooltip="Also compare the reach maps before and after (two backward-pass maps per latent)."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional: the image the latent was encoded from, to find cells from the posterior "
                                       "(image latents only)."),
            ],
            outputs=[
                io.Latent.Output("repaired", display_name="LATENT",
                                 tooltip="A copy of the latent with the flagged cells replaced; noise_mask and other keys kept."),
                io.Image.Output("picture", display_name="picture",
                                tooltip="Per latent (video: per frame, item by item): decoded before (repaired cells boxed) | "
                                        "after | |after - before|."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON: the cells repaired, the image change (everywhere and away from the cells), "
                                         "each cell's exact reach before, and the reach map's worst cells before and after."),
            ],
        )

    @classmethod
    def execute(cls, vae, latent, source, posterior_threshold, latent_threshold, window, measure_cells, fast_map,
                image=None) -> io.NodeOutput:
        z = wire.latent_samples(latent, video=True)
        image = wire.image_to_engine(image) if image is not None else None
        result = repair.repair(host.codec(vae), z, source=SOURCES.get(source, source), image=image,
                               posterior_threshold=posterior_threshold, latent_threshold=latent_threshold,
                               window=window, measure_cells=measure_cells, fast_map=fast_map,
                               progress=host.progress_fn())
        pictures = wire.images_to_batch(list(result.pictures().values()))
        out = wire.with_samples(latent, result.latent.to(z.device))
        return io.NodeOutput(out, pictures, result.json_text(), ui=ui.PreviewImage(pictures, cls=cls))


NODES = [RepairLatent]
