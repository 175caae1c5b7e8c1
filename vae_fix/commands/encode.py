"""`python -m vae_fix encode`: an image encoded in the VAE's dtype, redone in float32 when half
precision overflows (the Safe VAE Encode node). Writes encoded.latent and safe_run.json."""
from __future__ import annotations

from ._common import add_output_arguments, add_vae_arguments, finish, load_codec

NAME = "encode"
HELP = ("Encode an image with --dtype fp16/bf16 and no NaN latents: whatever comes out non-finite is "
        "encoded again in float32. Writes encoded.latent (the posterior mean, as core's VAE Encode) and safe_run.json.")


def add_arguments(p) -> None:
    add_vae_arguments(p)
    p.add_argument("--image", required=True, metavar="PATH", help="image to encode")
    add_output_arguments(p, "encoded.latent, safe_run.json and summary.txt")


def run(args) -> int:
    from ..images import load_image
    from ..latent_io import write_latent
    from ..safe import safe_encode

    result = safe_encode(load_codec(args), load_image(args.image))
    return finish(result, args, extra_files={"encoded.latent": lambda path: write_latent(result.output, path)})
