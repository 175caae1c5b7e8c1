"""`python -m vae_fix logvar-map`: the Log-Variance Map node on the command line."""
from __future__ import annotations

import argparse

from ..errors import InputError
from ..images import load_image
from ..logvar_map import RANGE_MODES, SHOWS, VALUES, logvar_map
from ..posterior import SIZE_POLICIES
from ..viz import CMAPS
from ._common import add_output_arguments, add_vae_arguments, finish, load_codec, progress

NAME = "logvar-map"
HELP = ("Draw a VAE's raw (or clamped) posterior log-variance, or the KL per latent cell, on images: "
        "lowest or mean over channels, one channel or every channel; writes the map PNGs and stats.json.")
FLAGS = {"channel": "--channel", "low/high": "--low/--high", "images": "--image"}  # the engine names its inputs as the node does


def add_arguments(p) -> None:
    add_vae_arguments(p)
    p.add_argument("--image", required=True, action="append", metavar="PATH",
                   help="image file; repeat for a batch (all of one size), each image gets its own map")
    add_output_arguments(p, "stats.json, summary.txt and the map PNGs")
    p.add_argument("--value", choices=VALUES, default="raw",
                   help="raw log-variance (default; black holes go below -30), clamped to -30..20, or kl per cell")
    p.add_argument("--show", choices=SHOWS, default="min",
                   help="lowest over channels (default), mean, every channel as a grid, or one --channel")
    p.add_argument("--channel", type=int, default=0, help="latent channel for --show one (0-based, default 0)")
    p.add_argument("--cmap", choices=CMAPS, default="magma", help="colormap (default magma)")
    p.add_argument("--range-mode", choices=RANGE_MODES, default="percentile",
                   help="percentile: --low/--high are percentiles of the batch's values (default); "
                        "fixed: they are the values at the ends of the colour scale")
    p.add_argument("--low", type=float, default=1.0, help="bottom of the colour scale (default 1)")
    p.add_argument("--high", type=float, default=99.0, help="top of the colour scale (default 99)")
    p.add_argument("--colorbar", action=argparse.BooleanOptionalAction, default=True,
                   help="a labelled colour bar on the right (default on)")
    p.add_argument("--size-policy", choices=SIZE_POLICIES, default="crop",
                   help="sizes not a multiple of the downscale: centre-crop (default) or pad by repeating the edge")


def run(args) -> int:
    images = [load_image(p) for p in args.image]  # every image is checked before the model is loaded
    try:
        result = logvar_map(load_codec(args), images, value=args.value, show=args.show, channel=args.channel,
                            cmap=args.cmap, range_mode=args.range_mode, low=args.low, high=args.high,
                            colorbar=args.colorbar, size_policy=args.size_policy,
                            progress=progress(args, "logvar-map"))
    except InputError as e:
        raise InputError(FLAGS.get(e.name, e.name), e.problem, e.expected) from None
    return finish(result, args)
