"""`python -m vae_fix preview`: latents shown as RGB without decoding (the Latent Preview (RGB) node)."""
from __future__ import annotations

from ._common import add_latent_source, add_output_arguments, add_vae_arguments, finish, latent_and_image, load_codec

NAME = "preview"
HELP = ("Latents as RGB pictures without decoding: one linear colour map per latent cell, the published "
        "factors of SD1.x/SDXL/SD3/Flux/Hunyuan Image 2.1 and of the video families Wan 2.1/2.2, HunyuanVideo, "
        "Mochi and LTXV, or a map fitted from one decode with --vae. A video latent gives one picture per frame.")


def add_arguments(p) -> None:
    add_vae_arguments(p, required=False)
    add_latent_source(p)
    p.add_argument("--family", default="auto",
                   help="whose colour factors: sd1, sdxl, sd3, flux, hunyuan_image21, wan21, wan22, hunyuan_video, "
                        "mochi, ltxv, fit (always fit a map with --vae) or auto (default: the only family of the "
                        "latent's kind, image or video, with this channel count, else a fit with --vae, else the "
                        "family whose scale fits the latent's spread, named in info.json)")
    p.add_argument("--scale", type=int, default=8, help="pixels per latent cell (default 8)")
    add_output_arguments(p, "info.json, summary.txt and one preview PNG per latent (video: "
                            "preview_item<b>_frame<t>.png per frame)")


def run(args) -> int:
    from ..latent_preview import latent_preview

    codec = load_codec(args)
    z, _ = latent_and_image(args, codec)
    return finish(latent_preview(z, args.family, codec, args.scale), args)
