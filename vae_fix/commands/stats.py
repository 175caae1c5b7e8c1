"""`python -m vae_fix stats`: per-channel latent statistics, the scale/shift they imply and a
histogram per channel (the Latent Statistics node)."""
from __future__ import annotations

from ._common import add_latent_source, add_output_arguments, add_vae_arguments, finish, latent_and_image, load_codec

NAME = "stats"
HELP = ("Per-channel statistics of latents (mean, std, min, max, percentiles), the scale factor and "
        "shift they imply next to the known families' values, and a histogram per channel. A video latent "
        "[B, C, T, h, w] is measured over all frames and per frame.")


def add_arguments(p) -> None:
    add_vae_arguments(p, required=False)
    add_latent_source(p)
    p.add_argument("--bins", type=int, default=64, help="bars per histogram (default 64)")
    p.add_argument("--clip-percentile", type=float, default=0.5,
                   help="the shared x range runs from this percentile to 100 minus it (default 0.5)")
    p.add_argument("--columns", type=int, default=4, help="histograms per row (default 4)")
    add_output_arguments(p, "stats.json, summary.txt and histogram.png")


def run(args) -> int:
    from ..stats import latent_statistics

    z, _ = latent_and_image(args, load_codec(args), allow_nonfinite=True)  # non-finite values are counted
    result = latent_statistics(z, bins=args.bins, clip_percentile=args.clip_percentile, columns=args.columns)
    return finish(result, args)
