"""`python -m vae_fix inspect`: read a VAE's raw posterior on images (the built-in probes when none
are given: the health check), find log-variance collapses, give the verdict, write a report."""
from __future__ import annotations

import argparse

from ..anomaly import DEFAULT_MEAN_THRESHOLD, DEFAULT_MIN_DROP, DEFAULT_THRESHOLD
from ..images import load_image
from ..inspect import RANGES, inspect_vae
from ..posterior import SIZE_POLICIES
from ..viz import CMAPS
from ._common import add_output_arguments, add_vae_arguments, finish, load_codec, progress

NAME = "inspect"
HELP = ("Read a VAE's raw posterior (mean and unclamped log-variance) on images, or on the built-in probe "
        "set when no --image is given (the health check), find the cells where its log-variance collapses, "
        "say whether the VAE has a black hole, and write report.json, a summary and heatmap PNGs.")


def add_arguments(p) -> None:
    add_vae_arguments(p)
    p.add_argument("--image", action="append", metavar="PATH",
                   help="image file (PNG/JPEG/WebP; alpha is dropped); repeat for several, sizes may differ. "
                        "Without it: the built-in probe set (7 drawn images and 3 photos at 128 and 256 px)")
    add_output_arguments(p, "report.json, summary.txt and the PNGs")
    p.add_argument("--save-moments", metavar="FILE", type=_safetensors_path,
                   help="also write the raw posterior as safetensors (tensors 'mean' and 'logvar', raw, "
                        "[B, C, h, w] float32). If the images give different latent sizes, one file per "
                        "image is written instead: FILE's name with -1, -2, ... before .safetensors")
    p.add_argument("--size-policy", choices=SIZE_POLICIES, default="crop",
                   help="sizes not a multiple of the downscale: centre-crop (default) or pad by repeating the edge")
    p.add_argument("--cmap", choices=CMAPS, default="magma", help="colormap of the heatmaps (default magma)")
    p.add_argument("--range", choices=list(RANGES), default="percentile", dest="value_range",
                   help="heatmap value range: 1st..99th percentile (default) or min..max")
    p.add_argument("--threshold", type=_at_least_zero, default=DEFAULT_THRESHOLD,
                   help="a cell collapses when its lowest raw log-variance lies this many of the VAE's robust "
                        f"spreads (at least 1 nat) under the VAE's typical level (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--min-drop", type=_at_least_zero, default=DEFAULT_MIN_DROP,
                   help=f"and at least this many nats under it (default {DEFAULT_MIN_DROP:g})")
    p.add_argument("--mean-threshold", type=_at_least_zero, default=DEFAULT_MEAN_THRESHOLD,
                   help="robust z of a large mean: supporting evidence at a collapsed cell, image content "
                        f"elsewhere (default {DEFAULT_MEAN_THRESHOLD:g})")
    p.add_argument("--no-reach", action="store_true",
                   help="skip the fast reach map of the verdict's first cell (one backward pass per region)")
    p.add_argument("--tile", type=int, metavar="PX", help="encode in tiles of PX pixels (a multiple of the "
                   "downscale); without it tiles are used only after an out-of-memory error")


def run(args) -> int:
    images = [load_image(p) for p in args.image] if args.image else None  # checked before the model loads
    result = inspect_vae(load_codec(args), images, names=args.image, threshold=args.threshold, check_reach=not args.no_reach,
                         min_drop=args.min_drop, mean_threshold=args.mean_threshold, size_policy=args.size_policy,
                         cmap=args.cmap, value_range=args.value_range, tile=args.tile,
                         progress=progress(args, "inspect"))
    return finish(result, args, result.files_in(args.out, args.save_moments))


def _safetensors_path(text: str) -> str:
    if not text.endswith(".safetensors"):
        raise argparse.ArgumentTypeError(f"'{text}' does not end in .safetensors (a path like moments.safetensors)")
    return text


def _at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value
