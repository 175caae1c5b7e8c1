"""`python -m vae_fix influence`: how far each latent cell reaches into the decoded image."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..images import save_png
from ..influence import MODES, exact_reach, fast_reach_map, parse_cells, reach_to_map, summarize_map, top_cells
from ..viz import CMAPS
from ._common import add_source_arguments, decoder_fn, latent_from_args, load_model, out_dir, write_json

NAME = "influence"
HELP = ("Reach of latent cells: how much of the decoded image outside a cell's neighbourhood changes "
        "when the cell changes. A fast map of every cell (a few backward passes) plus the exact "
        "perturbation measure on the top cells; writes influence.json and PNG maps.")


def add_arguments(p) -> None:
    add_source_arguments(p, vae_required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for influence.json and the PNGs")
    p.add_argument("--index", type=int, default=0, help="which latent of a batch (default 0)")
    p.add_argument("--window", type=int, default=3, help="near field: cells around the cell (default 3)")
    p.add_argument("--mode", choices=MODES, default="median",
                   help="perturbation: neighbours' median (default), zero, or scale by --factor")
    p.add_argument("--factor", type=float, default=2.0, help="factor for --mode scale (default 2)")
    p.add_argument("--exact", type=int, default=8, metavar="N",
                   help="run the exact measure on the N cells with the highest fast reach (default 8, 0: none)")
    p.add_argument("--cells", metavar="Y,X;Y,X", help="also measure these cells exactly, e.g. '9,21;0,0'")
    p.add_argument("--exact-all", action="store_true", help="exact measure on every cell (one decode per cell: slow)")
    p.add_argument("--no-fast", action="store_true", help="skip the fast map (then give --cells or --exact-all)")
    p.add_argument("--cmap", choices=CMAPS, default="magma", help="colormap (default magma)")


def _check(args) -> None:
    if args.exact < 0:
        raise InputError("--exact", f"{args.exact}", "a number of cells >= 0")
    if args.no_fast and not (args.cells or args.exact_all):
        raise InputError("--no-fast", "nothing left to measure", "--cells or --exact-all with --no-fast")


def run(args) -> int:
    _check(args)
    cells = parse_cells(args.cells, "--cells")
    out = out_dir(args.out)
    vae = load_model(args, need_decoder=True)
    z, _, _ = latent_from_args(args, vae)
    decode = decoder_fn(vae)
    h, w = z.shape[-2:]
    for y, x in cells:
        if not (0 <= y < h and 0 <= x < w):
            raise InputError("--cells", f"cell {y},{x} is outside the {h}x{w} latent", f"y in 0..{h - 1}, x in 0..{w - 1}")
    if not 0 <= args.index < z.shape[0]:
        raise InputError("--index", f"{args.index}", f"0..{z.shape[0] - 1} (the latent holds {z.shape[0]})")
    data = {"vae": vae.info(), "source": {"image": args.image, "latent": args.latent, "index": args.index},
            "latent_shape": list(z.shape), "settings": {"window": args.window, "mode": args.mode,
                                                        "factor": args.factor}, "files": {}}
    fast = None
    if not args.no_fast:
        print(f"fast reach map of a {h}x{w} latent ...")
        fast = fast_reach_map(decode, z, mode=args.mode, factor=args.factor, window=args.window,
                              index=args.index, progress=_printer("backward pass"))
        data["fast"] = {**summarize_map(fast.reach, 8), "passes": fast.passes,
                        "quantity": "first-order RMS change of far regions' mean colour (0..1 units)",
                        "map": fast.reach.tolist()}
        cells += [c for c in top_cells(fast.reach, args.exact) if c not in cells]
    if args.exact_all:
        cells = None
    if cells is None or cells:
        count = h * w if cells is None else len(cells)
        print(f"exact measure on {count} cells ...")
        reach = exact_reach(decode, z, cells, mode=args.mode, factor=args.factor, window=args.window,
                            index=args.index, progress=_printer("cell"))
        reach.sort(key=lambda r: -r.mean_far)
        data["exact"] = [r.to_dict() for r in reach]
        if fast is not None and len(reach) > 1:
            data["agreement"] = agreement(reach, fast.reach)
        if args.exact_all:
            exact_map = reach_to_map(reach, h, w, "mean_far")
            data["exact_map"] = exact_map.tolist()
            data["files"]["exact_map"] = _map_picture(exact_map, args.cmap, "mean |change| far (exact)", out / "exact_map.png")
    if fast is not None:
        data["files"]["reach_map"] = _map_picture(fast.reach, args.cmap, "fast reach", out / "reach_map.png")
        data["files"]["reach_overlay"] = _overlay(fast, args.cmap, top_cells(fast.reach, 5), out / "reach_overlay.png")
    write_json(data, out / "influence.json")
    _print_summary(data)
    print(f"wrote {out / 'influence.json'} and {len(data['files'])} PNGs in {out}")
    return 0


def agreement(reach, fast_map: torch.Tensor) -> dict:
    """How the fast map ranks the exactly measured cells: same order? Spearman rank correlation."""
    exact_order = [(r.y, r.x) for r in reach]          # sorted by mean |change| far, largest first
    fast_order = sorted(exact_order, key=lambda c: -float(fast_map[c]))
    rank_fast = torch.tensor([fast_order.index(c) for c in exact_order], dtype=torch.float64)
    rank_exact = torch.arange(len(exact_order), dtype=torch.float64)
    rho = torch.corrcoef(torch.stack([rank_exact, rank_fast]))[0, 1]
    return {"same_order": exact_order == fast_order, "spearman": float(rho),
            "exact_order": exact_order, "fast_order": fast_order}


def _printer(what: str):
    def show(done, total):
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {what} {done}/{total}", flush=True)
    return show


def _map_picture(values: torch.Tensor, cmap: str, label: str, path: Path) -> str:
    from .. import viz

    lo, hi = viz.value_range(values, percentiles=(0.0, 100.0))
    pic = viz.heatmap(values, cmap, lo, hi, viz.zoom_for(*values.shape, 384))
    return str(save_png(viz.with_colorbar(pic, cmap, lo, hi, label), path))


def _overlay(fast, cmap: str, marks, path: Path) -> str:
    from .. import viz

    image = ((fast.image[0].float().cpu() + 1) / 2).clamp(0, 1)
    lo, hi = viz.value_range(fast.reach, percentiles=(0.0, 100.0))
    zoom = max(1, min(4, round(512 / max(image.shape[1:]))))
    pic = viz.overlay(image, fast.reach, 0.6, cmap, marks, fast.downscale, lo, hi, zoom=zoom)
    return str(save_png(viz.with_colorbar(pic, cmap, lo, hi, "fast reach"), path))


def _print_summary(data: dict) -> None:
    fast = data.get("fast")
    if fast:
        ratio = fast["max_over_median"]
        print(f"fast map: strongest cell {fast['top_cells'][0]['y']},{fast['top_cells'][0]['x']} = {fast['max']:.3g}, "
              f"median {fast['median']:.3g}" + (f" ({ratio:.0f}x)" if ratio else ""))
    for r in data.get("exact", [])[:8]:
        print(f"  exact cell ({r['y']:3d},{r['x']:3d}): mean |change| far {r['mean_far']:.4f}, near "
              f"{r['mean_near']:.4f}, ratio {r['ratio']:.3f}, max far {r['max_far']:.4f}")
    if "agreement" in data:
        a = data["agreement"]
        print(f"fast map vs exact on these cells: rank correlation {a['spearman']:.2f}"
              + (", same order" if a["same_order"] else ""))
