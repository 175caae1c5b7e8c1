"""`python -m vae_fix decode`: a latent decoded in the VAE's dtype, redone in float32 when half
precision overflows (the Safe VAE Decode node). Writes decoded PNGs and safe_run.json."""
from __future__ import annotations

from ._common import add_output_arguments, add_vae_arguments, finish, load_codec

NAME = "decode"
HELP = ("Decode a latent file with --dtype fp16/bf16 and no black images: whatever comes out non-finite "
        "(an overflow inside the VAE) is decoded again in float32, and safe_run.json says so.")


def add_arguments(p) -> None:
    add_vae_arguments(p)
    p.add_argument("--latent", required=True, metavar="FILE", help="latent file (ComfyUI .latent or safetensors)")
    add_output_arguments(p, "one decoded PNG per latent, safe_run.json and summary.txt")


def run(args) -> int:
    from ..latent_io import read_latent
    from ..safe import safe_decode

    codec = load_codec(args)
    return finish(safe_decode(codec, read_latent(args.latent), input_name="--latent"), args)
