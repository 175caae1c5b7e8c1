"""`python -m vae_fix compare`: two VAEs on the same images, side by side (the Compare VAEs node)."""
from __future__ import annotations

from pathlib import Path

from ..images import load_image
from ..posterior import SIZE_POLICIES
from ..viz import CMAPS
from ._common import add_output_arguments, add_vae_arguments, finish, load_codec, progress

NAME = "compare"
HELP = ("Compare two VAEs on the same images: anomalies, KL, worst reach of a latent cell, "
        "reconstruction PSNR; writes compare.json and one picture per image (originals, "
        "reconstructions and log-variance maps side by side).")


def add_arguments(p) -> None:
    add_vae_arguments(p, "--vae-a", what="first VAE")
    add_vae_arguments(p, "--vae-b", what="second VAE")
    p.add_argument("--image", required=True, action="append", metavar="PATH", help="image file; repeat for several")
    p.add_argument("--name-a", help="label of the first VAE (default: its file name)")
    p.add_argument("--name-b", help="label of the second VAE (default: its file name)")
    p.add_argument("--window", type=int, default=3, help="near field of the reach map, in cells (default 3)")
    p.add_argument("--no-reach", action="store_true", help="skip the reach maps (faster)")
    p.add_argument("--size-policy", choices=SIZE_POLICIES, default="crop",
                   help="sizes not a multiple of the downscale: centre-crop (default) or pad")
    p.add_argument("--cmap", choices=CMAPS, default="magma", help="colormap of the log-variance maps")
    add_output_arguments(p, "compare.json, summary.txt and one compare_<i>.png per image")


def _names(args) -> tuple[str, str]:
    a = args.name_a or Path(args.vae_a).name
    b = args.name_b or Path(args.vae_b).name
    return (f"A {a}", f"B {b}") if a == b else (a, b)


def run(args) -> int:
    from ..compare import compare_vaes

    if args.window < 0:  # refused before any model is loaded
        from ..errors import InputError
        raise InputError("--window", f"{args.window}", "a whole number of cells >= 0")
    images = [load_image(p) for p in args.image]  # every image is checked before the models load
    name_a, name_b = _names(args)
    codecs = load_codec(args, "--vae-a", name_a), load_codec(args, "--vae-b", name_b)
    result = compare_vaes(*codecs, images, window=args.window, reach=not args.no_reach, size_policy=args.size_policy,
                          cmap=args.cmap, paths=args.image, progress=progress(args, "compare"))
    return finish(result, args)
