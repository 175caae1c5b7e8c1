"""`python -m vae_fix repair`: neutralise anomalous latent cells before decoding, with before/after
(the Repair Latent node)."""
from __future__ import annotations

from ..anomaly import DEFAULT_MEAN_THRESHOLD, DEFAULT_THRESHOLD
from ._common import (add_latent_source, add_output_arguments, add_vae_arguments, finish, latent_and_image,
                      load_codec, progress)

NAME = "repair"
HELP = ("Replace anomalous latent cells by the median of their neighbours before decoding and report "
        "what changed: reach of the cells, the fast reach map's worst cell and the image, before and "
        "after. Cells come from the posterior (with --image) or from latent outliers (with --latent). A video "
        "latent [B, C, T, h, w] is repaired frame by frame from its outliers, each frame decoded alone.")


def add_arguments(p) -> None:
    from ..repair import SOURCES

    add_vae_arguments(p)
    add_latent_source(p)
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="which cells: posterior anomalies (needs --image), latent outliers, or auto (default: "
                        "posterior with --image, latent with --latent)")
    p.add_argument("--threshold", type=float,
                   help=f"robust z threshold (default {DEFAULT_THRESHOLD:g} for the posterior's log-variance, "
                        f"{DEFAULT_MEAN_THRESHOLD:g} for latent outliers)")
    p.add_argument("--window", type=int, default=3, help="near field around each cell, in cells (default 3)")
    p.add_argument("--measure-cells", type=int, default=8, help="cells per image given the exact reach measure (default 8)")
    p.add_argument("--no-fast-map", action="store_true", help="skip the before/after fast reach maps")
    add_output_arguments(p, "repair.json, summary.txt, repair_<i>.png and repaired.latent")


def run(args) -> int:
    from ..latent_io import write_latent
    from ..repair import repair

    codec = load_codec(args)
    z, image = latent_and_image(args, codec)
    result = repair(codec, z, source=args.source, image=image, posterior_threshold=args.threshold,
                    latent_threshold=args.threshold, window=args.window, measure_cells=args.measure_cells,
                    fast_map=not args.no_fast_map, inputs={"image": args.image, "latent": args.latent},
                    progress=progress(args, "repair"))
    return finish(result, args, extra_files={"repaired.latent": lambda path: write_latent(result.latent.cpu(), path)})
