"""Compare VAEs: two VAEs on the same images, side by side (anomalies, KL, reach, reconstruction)."""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import compare, posterior, viz
from . import host, wire


class CompareVAEs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixCompareVAEs",
            display_name="Compare VAEs",
            category="VAE Fix/compare",
            description=("Runs two VAEs on the same images and puts them side by side: reconstruction quality (PSNR), "
                         "anomalous latent cells ('black holes'), KL, the worst cell's reach, and a picture per image with "
                         "both reconstructions and both log-variance maps on one colour scale. E.g. SD1.5's VAE against "
                         "SDXL's, or a fine-tune against its original."),
            inputs=[
                io.Vae.Input("vae_a", tooltip="First VAE (any KL VAE: SD1.x/2.x, SDXL, SD3, Flux, retrained)."),
                io.Vae.Input("vae_b", tooltip="Second VAE; it may have another channel count or downscale."),
                io.Image.Input("image", tooltip="The image(s) both VAEs encode and decode."),
                io.String.Input("name_a", default="A", tooltip="Name of the first VAE in the report and picture."),
                io.String.Input("name_b", default="B", tooltip="Name of the second VAE (must differ from the first)."),
                io.Int.Input("window", default=3, min=0, max=64,
                             tooltip="Near field in cells for the reach measure (see Latent Reach Map)."),
                io.Boolean.Input("reach", default=True,
                                 tooltip="Also measure each VAE's worst-reaching cell (a reach map per image and VAE)."),
                io.Combo.Input("size_policy", options=list(posterior.SIZE_POLICIES), default="crop",
                               tooltip="Sizes that are not a multiple of a VAE's downscale: 'crop' the centre (as core's "
                                       "VAE Encode does) or 'pad' by repeating the edge."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="magma",
                               tooltip="Colour scale of the log-variance maps."),
            ],
            outputs=[
                io.Image.Output("picture", display_name="picture",
                                tooltip="Per image: the image, A's and B's reconstructions (PSNR in the captions), A's and "
                                        "B's lowest raw log-variance (anomalous cells boxed), one colour bar."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON: per VAE and image the anomalies, KL, log-variance minimum and median, PSNR, "
                                         "worst reach; B minus A; a summary per VAE."),
                io.String.Output("summary", display_name="summary", tooltip="One readable line per VAE."),
                io.Image.Output("reconstruction_a", display_name="reconstruction A",
                                tooltip="A's decoded posterior mean of each image (what VAE Encode then VAE Decode gives)."),
                io.Image.Output("reconstruction_b", display_name="reconstruction B",
                                tooltip="B's decoded posterior mean of each image."),
            ],
        )

    @classmethod
    def execute(cls, vae_a, vae_b, image, name_a, name_b, window, reach, size_policy, colormap) -> io.NodeOutput:
        codecs = (host.codec(vae_a, name_a, "vae_a"), host.codec(vae_b, name_b, "vae_b"))
        for codec in codecs:  # both reconstructions are outputs: refuse a VAE that cannot decode, by name
            codec.need_decoder()
        result = compare.compare_vaes(*codecs, wire.image_to_engine(image), window=window, reach=reach,
                                      size_policy=size_policy, cmap=colormap, progress=host.progress_fn())
        picture = wire.images_to_batch(result.rows)
        recon_a, recon_b = (wire.images_to_batch(r) for r in result.reconstructions)
        return io.NodeOutput(picture, result.json_text(), result.summary(), recon_a, recon_b,
                             ui=ui.PreviewImage(picture, cls=cls))


NODES = [CompareVAEs]
