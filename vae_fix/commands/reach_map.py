"""`python -m vae_fix reach-map`: the fast reach of every latent cell (as the Latent Reach Map node)."""
from __future__ import annotations

from ..reach import MODES, reach_map
from ..viz import CMAPS
from ._common import (add_latent_source, add_output_arguments, add_vae_arguments, finish, latent_and_image,
                      load_codec, progress)

NAME = "reach-map"
HELP = ("Reach of every latent cell at once: how much of the decoded image outside a cell's neighbourhood "
        "changes when the cell changes, to first order (one decode and blocks² backward passes). Writes "
        "reach_map.json (top cells, median, every cell's value), summary.txt, map.png and overlay.png.")


def add_reach_arguments(p, cmap_default: str = "magma") -> None:
    """The options both reach commands share with their nodes."""
    add_vae_arguments(p)
    add_latent_source(p)
    p.add_argument("--index", type=int, default=0, help="which latent of a batch (default 0); a video latent: which "
                   "latent frame, counted item by item (b*T + t), decoded alone")
    p.add_argument("--window", type=int, default=3, help="near field: cells around the cell (default 3)")
    p.add_argument("--mode", choices=MODES, default="median",
                   help="perturbation: neighbours' median (default), zero, or scale by --factor")
    p.add_argument("--factor", type=float, default=2.0, help="factor for --mode scale (default 2)")
    p.add_argument("--blocks", type=int, default=3, help="far-field regions per side of the fast map (default 3)")
    p.add_argument("--cmap", choices=CMAPS, default=cmap_default, help=f"colormap (default {cmap_default})")


def add_arguments(p) -> None:
    add_reach_arguments(p)
    p.add_argument("--top", type=int, default=5, metavar="N", help="strongest cells to box and list (default 5)")
    add_output_arguments(p)


def run(args) -> int:
    codec = load_codec(args)
    z, _ = latent_and_image(args, codec)
    result = reach_map(codec, z, mode=args.mode, factor=args.factor, window=args.window, blocks=args.blocks,
                       top=args.top, index=args.index, cmap=args.cmap, values_in_json=True,
                       progress=progress(args, "reach map"))
    return finish(result, args)
