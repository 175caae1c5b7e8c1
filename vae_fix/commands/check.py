"""`python -m vae_fix check`: read and validate a VAE file exactly as Load VAE (strict) does."""
from __future__ import annotations

from ..loader import read_vae

NAME = "check"
HELP = ("Read and validate a VAE file or diffusers folder as the Load VAE (strict) node does and print what it "
        "holds (layout, latent channels, downscale, notes); exit 2 with the reason when it is broken.")


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument("--json", action="store_true", help="print the node's info JSON instead of a summary")


def run(args) -> int:
    vae = read_vae(args.vae)
    print(vae.json_text() if args.json else vae.summary())
    return 0
