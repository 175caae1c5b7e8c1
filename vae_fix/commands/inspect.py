"""`python -m vae_fix inspect`: read a VAE's raw posterior on images, find anomalies, write a report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from ..anomaly import DEFAULT_MEAN_THRESHOLD, DEFAULT_MIN_DROP, DEFAULT_THRESHOLD, find_anomalies
from ..errors import InputError
from ..images import load_image, save_png
from ..posterior import SIZE_POLICIES, prepare_images, read_posterior
from ..report import build_report, image_entry, report_pictures, summary_text, write_report
from ..viz import CMAPS

NAME = "inspect"
HELP = ("Read a VAE's raw posterior (mean and unclamped log-variance) on images, find anomalous "
        "latent cells (the SD 'black hole') and write report.json, a summary and heatmap PNGs.")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANGES = {"percentile": (1.0, 99.0), "minmax": (0.0, 100.0)}


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument("--image", required=True, action="append", metavar="PATH",
                   help="image file (PNG/JPEG/WebP; alpha is dropped); repeat for several, sizes may differ")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, summary.txt and the PNGs")
    p.add_argument("--save-moments", metavar="FILE",
                   help="also write the raw posterior as safetensors (tensors 'mean' and 'logvar', raw, "
                        "[B, C, h, w] float32). If the images give different latent sizes, one file per "
                        "image is written instead: FILE's name with -1, -2, ... before .safetensors")
    p.add_argument("--size-policy", choices=SIZE_POLICIES, default="crop",
                   help="sizes not a multiple of the downscale: centre-crop (default) or pad by repeating the edge")
    p.add_argument("--cmap", choices=CMAPS, default="magma", help="colormap of the heatmaps (default magma)")
    p.add_argument("--range", choices=list(RANGES), default="percentile", dest="value_range",
                   help="heatmap value range: 1st..99th percentile (default) or min..max")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"robust z a cell's log-variance must fall below the image's median by (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--min-drop", type=float, default=DEFAULT_MIN_DROP,
                   help=f"and at least this many nats (default {DEFAULT_MIN_DROP:g})")
    p.add_argument("--mean-threshold", type=float, default=DEFAULT_MEAN_THRESHOLD,
                   help=f"robust z for mean-magnitude outliers (default {DEFAULT_MEAN_THRESHOLD:g})")
    p.add_argument("--tile", type=int, metavar="PX", help="encode in tiles of PX pixels (a multiple of the "
                   "downscale); without it tiles are used only after an out-of-memory error")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="model dtype (default float32; statistics are always float32)")


def run(args) -> int:
    report = run_inspect(
        args.vae, args.image, args.out, save_moments=args.save_moments, size_policy=args.size_policy,
        cmap=args.cmap, value_range=args.value_range, threshold=args.threshold, min_drop=args.min_drop,
        mean_threshold=args.mean_threshold, tile=args.tile, device=args.device, dtype=DTYPES[args.dtype])
    print(summary_text(report))
    print(f"wrote {Path(args.out) / 'report.json'} and {len(_written(report))} more files in {args.out}")
    return 0


def _written(report: dict) -> list[str]:
    files = [f for e in report["images"] for f in e["files"].values()]
    return files + report.get("moments_files", [])


def _check_options(out: Path, save_moments, value_range: str, threshold, min_drop, mean_threshold) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"'{out}' is an existing file", "a folder (created when missing)")
    if save_moments is not None and Path(save_moments).suffix != ".safetensors":
        raise InputError("--save-moments", f"'{save_moments}' does not end in .safetensors", "a path like moments.safetensors")
    if value_range not in RANGES:
        raise InputError("--range", f"{value_range!r}", f"one of {', '.join(RANGES)}")
    for name, v in (("--threshold", threshold), ("--min-drop", min_drop), ("--mean-threshold", mean_threshold)):
        if not v >= 0:
            raise InputError(name, f"{v!r}", "a number >= 0")


def _prefixes(paths: list[Path]) -> list[str]:
    """File-name prefixes per image: its stem, numbered when two images share one."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{i + 1:02d}_{s}" for i, s in enumerate(stems)]


def run_inspect(vae_path, image_paths, out_dir, *, save_moments=None, size_policy: str = "crop",
                cmap: str = "magma", value_range: str = "percentile", threshold: float = DEFAULT_THRESHOLD,
                min_drop: float = DEFAULT_MIN_DROP, mean_threshold: float = DEFAULT_MEAN_THRESHOLD,
                tile: Optional[int] = None, device="cpu", dtype=torch.float32,
                log: Callable[[str], None] = print) -> dict:
    """Everything `inspect` does; returns the report dict (also written to `out_dir/report.json`)."""
    from ..loader import load_vae

    out = Path(out_dir)
    _check_options(out, save_moments, value_range, threshold, min_drop, mean_threshold)
    if cmap not in CMAPS:
        raise InputError("--cmap", f"{cmap!r}", f"one of {', '.join(CMAPS)}")
    paths = [Path(p) for p in image_paths]
    images = [load_image(p) for p in paths]  # every image is checked before the model is loaded
    vae = load_vae(vae_path, device=device, dtype=dtype)
    ds = vae.config.downscale
    out.mkdir(parents=True, exist_ok=True)
    entries, posteriors = [], []
    for i, (path, img, prefix) in enumerate(zip(paths, images, _prefixes(paths))):
        log(f"[{i + 1}/{len(paths)}] {path}: {img.shape[3]}x{img.shape[2]}")
        post = read_posterior(vae.codec(), img, size_policy=size_policy, tile=tile)
        found = find_anomalies(post, 0, threshold=threshold, min_drop=min_drop, mean_threshold=mean_threshold)
        shown, _ = prepare_images(img, ds, size_policy)
        files = {}
        for name, pic in report_pictures(shown[0], post, 0, found, cmap, RANGES[value_range]).items():
            files[name] = str(save_png(pic, out / f"{prefix}_{name}.png"))
        entries.append({**image_entry(path, post, 0, found, files), "index": i})
        posteriors.append(post)
    settings = {"size_policy": size_policy, "cmap": cmap, "value_range": value_range, "tile": tile,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threshold": threshold,
                "min_drop": min_drop, "mean_threshold": mean_threshold}
    report = build_report(vae.info(), entries, settings)
    if save_moments is not None:
        report["moments_files"] = [str(p) for p in save_posteriors(posteriors, paths, save_moments)]
    write_report(report, out / "report.json")
    (out / "summary.txt").write_text(summary_text(report) + "\n")
    return report


def save_posteriors(posteriors, paths, target) -> list[Path]:
    """Write raw `mean` and `logvar` `[B, C, h, w]` float32: one file when every latent has the same
    size, otherwise one file per image (`name-1.safetensors`, `name-2.safetensors`, ...)."""
    from safetensors.torch import save_file

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(posts, names, where):
        meta = {"images": json.dumps([str(n) for n in names]),
                "size_handling": json.dumps([p.size.to_dict() for p in posts]),
                "logvar": "raw (unclamped) log-variance; the reference clamps to [-30, 20]"}
        save_file({"mean": torch.cat([p.mean for p in posts]).contiguous().cpu(),
                   "logvar": torch.cat([p.logvar_raw for p in posts]).contiguous().cpu()}, str(where), meta)
        return where

    if len({(p.latent_channels, *p.latent_size) for p in posteriors}) == 1:
        return [write(posteriors, paths, target)]
    return [write([p], [n], target.with_name(f"{target.stem}-{i + 1}{target.suffix}"))
            for i, (p, n) in enumerate(zip(posteriors, paths))]
