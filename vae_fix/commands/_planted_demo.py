"""`python -m vae_fix demo --planted`: build a VAE with a planted log-variance hole and inspect it (no
downloads): the detector shown finding a hole where one is known to be. Not a command of its own."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..builders.planted import HOLE_DEPTH, TYPICAL_LOGVAR, demo_image, planted_vae
from ..errors import InputError
from ..images import load_image, save_png
from ..inspect import inspect_vae
from ..model import preset_config
from ..result import check_out_dir, write_result

DEFAULT_CELL = (9, 21)


def add_arguments(p) -> None:
    p.add_argument("--small", action="store_true", help="with --planted: a tiny VAE in the SD layout (fast, small "
                   "file) instead of full size (335 MB)")
    p.add_argument("--size", type=int, default=256, metavar="PX", help="with --planted: demo image side (default 256)")
    p.add_argument("--cell", type=int, nargs=2, default=list(DEFAULT_CELL), metavar=("Y", "X"),
                   help=f"with --planted: latent cell of the hole (default {DEFAULT_CELL[0]} {DEFAULT_CELL[1]})")
    p.add_argument("--seed", type=int, default=0, help="with --planted: seed of the random weights (default 0)")


def run(args) -> int:
    from ..loader import load_vae

    start, out, cfg, cell = time.perf_counter(), check_out_dir(args.out), preset_config("sd", small=args.small), tuple(args.cell)
    _check_size_and_cell(args.size, cell, cfg.downscale)
    vae_path, image_path = _build(out, cfg, args.size, cell, args.seed, "small" if args.small else "full")
    result = inspect_vae(load_vae(vae_path).codec(), [load_image(image_path)], names=[image_path])
    files = write_result(result, out / "inspect", result.files_in(out / "inspect"))
    print(result.summary())
    found = result.found[0].marks()
    verdict = "found exactly there" if found[:1] == [cell] else f"NOT found there (found {found})"
    print(f"planted hole at (y={cell[0]}, x={cell[1]}): {verdict}")
    print(f"results in {out / 'inspect'}: report.json, summary.txt, " + ", ".join(Path(f).name for f in files.values()))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if found[:1] == [cell] else 1


def _check_size_and_cell(size: int, cell: tuple[int, int], ds: int) -> None:
    if size < 4 * ds or size % ds:
        raise InputError("--size", f"{size}", f"a multiple of {ds} of at least {4 * ds} pixels")
    side = size // ds
    if not all(0 <= c < side for c in cell):
        raise InputError("--cell", f"{cell} is outside the {side}x{side} latent grid", f"two numbers in 0..{side - 1}")


def _build(out: Path, cfg, size: int, cell: tuple[int, int], seed: int, which: str) -> tuple[Path, Path]:
    """Save the planted VAE and its demo image in `out`; returns their paths."""
    from ..loader import save_vae

    print(f"building a {which} SD-layout VAE with a planted hole at latent cell (y={cell[0]}, x={cell[1]}) ...")
    image = demo_image(size, size, cell, cfg.downscale)
    planted = planted_vae(cfg, image=image, cell=cell, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    about = {"cell": list(cell), "typical_logvar": TYPICAL_LOGVAR, "depth": HOLE_DEPTH, "seed": seed}
    vae_path = save_vae(planted.model, out / "demo_vae.safetensors", metadata={"vae_fix.builders.planted": json.dumps(about)})
    image_path = save_png(image[0], out / "demo.png")
    print(f"saved {vae_path} ({vae_path.stat().st_size / 1e6:.1f} MB) and {image_path}")
    return vae_path, image_path
