"""`python -m vae_fix compare`: two VAEs on the same images, side by side."""
from __future__ import annotations

from pathlib import Path

from ..images import load_image, save_png
from ..posterior import SIZE_POLICIES
from ..viz import CMAPS
from ._common import DTYPES, out_dir, write_json

NAME = "compare"
HELP = ("Compare two VAEs on the same images: anomalies, KL, worst reach of a latent cell, "
        "reconstruction PSNR; writes compare.json and one picture per image (originals, "
        "reconstructions and log-variance maps side by side).")


def add_arguments(p) -> None:
    p.add_argument("--vae-a", required=True, help="first VAE file or diffusers folder")
    p.add_argument("--vae-b", required=True, help="second VAE file or diffusers folder")
    p.add_argument("--image", required=True, action="append", metavar="PATH", help="image file; repeat for several")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for compare.json and the PNGs")
    p.add_argument("--name-a", help="label of the first VAE (default: its file name)")
    p.add_argument("--name-b", help="label of the second VAE (default: its file name)")
    p.add_argument("--window", type=int, default=3, help="near field of the reach map, in cells (default 3)")
    p.add_argument("--no-reach", action="store_true", help="skip the reach maps (faster)")
    p.add_argument("--size-policy", choices=SIZE_POLICIES, default="crop",
                   help="sizes not a multiple of the downscale: centre-crop (default) or pad")
    p.add_argument("--cmap", choices=CMAPS, default="magma", help="colormap of the log-variance maps")
    p.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")


def _names(args) -> tuple[str, str]:
    a = args.name_a or Path(args.vae_a).name
    b = args.name_b or Path(args.vae_b).name
    if a == b:
        a, b = f"A {a}", f"B {b}"
    return a, b


def run(args) -> int:
    from ..compare import VAESide, compare_vaes, merge_reports
    from ..loader import load_vae

    out = out_dir(args.out)
    images = [load_image(p) for p in args.image]  # check every image before loading models
    vaes = [load_vae(p, device=args.device, dtype=DTYPES[args.dtype]) for p in (args.vae_a, args.vae_b)]
    sides = [VAESide(n, v.model.moments, v.model.decode if v.model.has_decoder else None, v.config.downscale)
             for n, v in zip(_names(args), vaes)]
    reports, files = [], []
    for i, (path, image) in enumerate(zip(args.image, images)):
        print(f"[{i + 1}/{len(images)}] {path}")
        result = compare_vaes(sides[0], sides[1], image, window=args.window, reach=not args.no_reach,
                              size_policy=args.size_policy, cmap=args.cmap)
        result.report["images"][0]["path"] = str(path)
        reports.append(result.report)
        files.append(str(save_png(result.picture, out / f"compare_{i:02d}.png")))
    report = merge_reports(reports)
    report["vae_files"] = {sides[0].name: vaes[0].info(), sides[1].name: vaes[1].info()}
    report["files"] = files
    write_json(report, out / "compare.json")
    for name, s in report["summary"].items():
        psnr = f"{s['psnr_db_mean']:.2f} dB" if s["psnr_db_mean"] is not None else "n/a"
        reach = f"{s['worst_reach_over_median_max']:.0f}x median" if s.get("worst_reach_over_median_max") else "n/a"
        print(f"{name}: {s['anomalies']} anomalies, mean KL {s['kl_total_mean']:.1f} nats, PSNR {psnr}, worst reach {reach}")
    print(f"wrote {out / 'compare.json'} and {len(files)} PNGs in {out}")
    return 0
