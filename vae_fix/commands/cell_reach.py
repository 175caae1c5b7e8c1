"""`python -m vae_fix cell-reach`: the exact reach of chosen latent cells (as the Latent Cell Reach node);
by default of the fast reach map's strongest cells."""
from __future__ import annotations

import sys

from ..errors import InputError
from ..reach import cell_reach, cost_text, read_cells
from ._common import add_output_arguments, finish, latent_and_image, load_codec, progress
from .reach_map import add_reach_arguments

NAME = "cell-reach"
HELP = ("Exact reach of latent cells: each cell is changed on its own and decoded (one decode per cell), "
        "and the change outside its neighbourhood is measured against the change inside. By default the "
        "cells the fast reach map ranks highest (and how well it ranked them); writes cell_reach.json, "
        "summary.txt, map.png and difference.png.")


def add_arguments(p) -> None:
    add_reach_arguments(p)
    p.add_argument("--cells", metavar="Y,X;Y,X", help="measure these cells, e.g. '9,21; 0,0', or 'all' "
                   "(default: the fast reach map's --top cells)")
    p.add_argument("--exact-all", dest="cells", action="store_const", const="all",
                   help="measure every cell (the same as --cells all: one decode per cell, slow)")
    p.add_argument("--top", "--exact", type=int, default=8, metavar="N",
                   help="without --cells: measure the fast map's N strongest cells (default 8)")
    p.add_argument("--no-fast", action="store_true", help="refuse to run the fast map (then give --cells)")
    p.add_argument("--batch-size", type=int, default=4, help="changed latents decoded together (default 4)")
    add_output_arguments(p)


def run(args) -> int:
    if args.no_fast and not args.cells:
        raise InputError("--no-fast", "nothing left to measure", "--cells or --exact-all with --no-fast")
    cells = read_cells(args.cells, "--cells")
    codec = load_codec(args)
    z, _ = latent_and_image(args, codec)
    if not (args.quiet or args.json):
        print(f"measuring {cost_text(z, cells, top=args.top, blocks=args.blocks)} (Ctrl-C stops)", file=sys.stderr)
    result = cell_reach(codec, z, cells, mode=args.mode, factor=args.factor, window=args.window, blocks=args.blocks,
                        index=args.index, batch_size=args.batch_size, top=args.top, cmap=args.cmap,
                        progress=progress(args, "cell reach"))
    return finish(result, args)
