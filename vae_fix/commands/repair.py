"""`python -m vae_fix repair`: neutralise anomalous latent cells before decoding, with before/after."""
from __future__ import annotations

from ..anomaly import DEFAULT_MEAN_THRESHOLD, DEFAULT_THRESHOLD, find_anomalies
from ..errors import InputError
from ..images import save_png
from ..latent_io import write_latent
from ._common import add_source_arguments, decoder_fn, latent_from_args, load_model, out_dir, write_json

NAME = "repair"
HELP = ("Replace anomalous latent cells by the median of their neighbours before decoding and report "
        "what changed: reach of the cells, the fast reach map's worst cell and the image, before and "
        "after. Cells come from the posterior (with --image) or from latent outliers (with --latent).")
SOURCES = ("auto", "posterior", "latent")


def add_arguments(p) -> None:
    add_source_arguments(p, vae_required=True)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for repair.json, repair_<i>.png and repaired.latent")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="which cells: posterior anomalies (needs --image), latent outliers, or auto (default: "
                        "posterior with --image, latent with --latent)")
    p.add_argument("--threshold", type=float,
                   help=f"robust z threshold (default {DEFAULT_THRESHOLD:g} for the posterior's log-variance, "
                        f"{DEFAULT_MEAN_THRESHOLD:g} for latent outliers)")
    p.add_argument("--window", type=int, default=3, help="near field around each cell, in cells (default 3)")
    p.add_argument("--measure-cells", type=int, default=8, help="cells per image given the exact reach measure (default 8)")
    p.add_argument("--no-fast-map", action="store_true", help="skip the before/after fast reach maps")


def _source(args, post) -> str:
    source = args.source
    if source == "auto":
        source = "posterior" if post is not None else "latent"
    if source == "posterior" and post is None:
        raise InputError("--source", "'posterior' needs the image", "--image, or --source latent")
    return source


def run(args) -> int:
    from ..repair import anomaly_mask, latent_outliers, repair_latent, repair_picture

    if args.threshold is not None and not args.threshold >= 0:
        raise InputError("--threshold", f"{args.threshold}", "a number >= 0")
    if args.measure_cells < 0:
        raise InputError("--measure-cells", f"{args.measure_cells}", "a number >= 0")
    out = out_dir(args.out)
    vae = load_model(args, need_decoder=True)
    z, post, _ = latent_from_args(args, vae)
    source = _source(args, post)
    if source == "posterior":
        kw = {} if args.threshold is None else {"threshold": args.threshold}
        found = [find_anomalies(post, i, **kw) for i in range(post.batch)]
        mask = anomaly_mask(found, post.batch, *post.latent_size)
        scores = None
    else:
        kw = {} if args.threshold is None else {"threshold": args.threshold}
        mask, scores = latent_outliers(z, **kw)
    print(f"{int(mask.sum())} cells to repair ({source})")
    result = repair_latent(decoder_fn(vae), z, mask, scores=scores, window=args.window,
                           measure_cells=args.measure_cells, fast_map=not args.no_fast_map, source=source)
    report = {**result.report, "vae": vae.info(), "input": {"image": args.image, "latent": args.latent}}
    files = [str(save_png(repair_picture(result, i), out / f"repair_{i}.png")) for i in range(z.shape[0])]
    report["files"] = files + [str(write_latent(result.latent, out / "repaired.latent"))]
    write_json(report, out / "repair.json")
    for e in report["images"]:
        change = e["image_change"]
        far = change["far_mean_abs"]
        line = (f"image {e['index']}: {e['repaired_cells']} cells repaired; mean |image change| "
                f"{change['mean_abs']:.4f}, away from the cells {'n/a' if far is None else f'{far:.4f}'}")
        before, after = e.get("fast_reach_before", {}), e.get("fast_reach_after", {})
        if "max" in before and "max" in after:
            line += f"; worst fast reach {before['max']:.3g} -> {after['max']:.3g}"
        print(line)
    print(f"wrote {out / 'repair.json'}, {len(files)} PNGs and {out / 'repaired.latent'}")
    return 0
