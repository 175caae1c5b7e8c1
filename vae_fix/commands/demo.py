"""`python -m vae_fix demo`: build a VAE with a planted log-variance hole and inspect it (no downloads)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import InputError
from ..images import save_png
from ..model import preset_config
from ..builders.planted import HOLE_DEPTH, TYPICAL_LOGVAR, demo_image, planted_vae
from ..report import summary_text

NAME = "demo"
HELP = ("Build a VAE in the full SD layout whose raw log-variance has a planted 'black hole' at a known "
        "latent cell, save it with a demo image, and run inspect on them: the whole tool on a fresh "
        "machine, no downloaded weights.")
DEFAULT_CELL = (9, 21)


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the demo VAE, image and inspect results")
    p.add_argument("--small", action="store_true", help="a tiny VAE in the SD layout (fast, small file) instead of full size")
    p.add_argument("--size", type=int, default=256, metavar="PX", help="demo image side in pixels (default 256)")
    p.add_argument("--cell", type=int, nargs=2, default=list(DEFAULT_CELL), metavar=("Y", "X"),
                   help=f"latent cell of the planted hole (default {DEFAULT_CELL[0]} {DEFAULT_CELL[1]})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")


def run(args) -> int:
    from ..loader import save_vae
    from .inspect import run_inspect

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"'{out}' is an existing file", "a folder (created when missing)")
    cfg = preset_config("sd", small=args.small)
    ds = cfg.downscale
    if args.size < 4 * ds or args.size % ds:
        raise InputError("--size", f"{args.size}", f"a multiple of {ds} of at least {4 * ds} pixels")
    cell = tuple(args.cell)
    side = args.size // ds
    if not all(0 <= c < side for c in cell):
        raise InputError("--cell", f"{cell} is outside the {side}x{side} latent grid", f"two numbers in 0..{side - 1}")
    start = time.perf_counter()
    layout = "small SD-layout" if args.small else "full SD-layout"
    print(f"building a {layout} VAE with a planted hole at latent cell (y={cell[0]}, x={cell[1]}) ...")
    image = demo_image(args.size, args.size, cell, ds)
    planted = planted_vae(cfg, image=image, cell=cell, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    about = {"cell": list(cell), "typical_logvar": TYPICAL_LOGVAR, "depth": HOLE_DEPTH, "seed": args.seed}
    vae_path = save_vae(planted.model, out / "demo_vae.safetensors",
                        metadata={"vae_fix.builders.planted": json.dumps(about)})
    image_path = save_png(image[0], out / "demo.png")
    print(f"saved {vae_path} ({vae_path.stat().st_size / 1e6:.1f} MB) and {image_path}")
    report = run_inspect(vae_path, [image_path], out / "inspect")
    print(summary_text(report))
    found = [(a["y"], a["x"]) for a in report["images"][0]["anomalies"]]
    verdict = "found exactly there" if found[:1] == [cell] else f"NOT found there (found {found})"
    print(f"planted hole at (y={cell[0]}, x={cell[1]}): {verdict}")
    print(f"results in {out / 'inspect'}: report.json, summary.txt, "
          + ", ".join(Path(f).name for f in report["images"][0]["files"].values()))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if found[:1] == [cell] else 1
