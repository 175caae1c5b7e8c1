"""`python -m vae_fix edit`: one operation on chosen channels of a latent file, image or video (the
Latent Channel Edit node). Writes `edited.latent` (ComfyUI's Load Latent reads it) and `info.json`."""
from __future__ import annotations

from ._common import add_output_arguments, finish

NAME = "edit"
HELP = ("Edit chosen channels of a latent: scale, offset, clamp, soft clamp, normalize, zero, invert, swap or "
        "copy, optionally inside a mask, on chosen batch items and (video latents) chosen frames. Writes "
        "edited.latent and info.json.")
SELECTION = "'all', a list '0,2', a range '1-3' or both '0,4-7' (0-based, ranges inclusive)"


def add_arguments(p) -> None:
    from ..edit import OPS

    p.add_argument("--latent", required=True, metavar="FILE", help="latent file (ComfyUI .latent or safetensors)")
    p.add_argument("--operation", required=True, choices=OPS, help="what to do to the chosen channels")
    p.add_argument("--channels", default="all", help=f"channels to edit: {SELECTION} (default all)")
    p.add_argument("--factor", type=float, default=1.0, help="scale: multiply by this")
    p.add_argument("--offset", type=float, default=0.0, help="offset: add this (raw VAE units)")
    p.add_argument("--low", type=float, help="clamp: lowest value kept")
    p.add_argument("--high", type=float, help="clamp: highest value kept")
    p.add_argument("--limit", type=float, default=3.0, help="soft_clamp: values become limit x tanh(value / limit)")
    p.add_argument("--mean", type=float, default=0.0, help="normalize: the mean each channel gets")
    p.add_argument("--std", type=float, default=1.0, help="normalize: the std each channel gets")
    p.add_argument("--target", help="swap/copy: the receiving channels, one per chosen channel, in order")
    p.add_argument("--batch", default="all", help=f"latents of the batch to edit: {SELECTION} (default all)")
    p.add_argument("--frames", default="all", help=f"video latents [B, C, T, h, w]: frames to edit: {SELECTION} "
                   "(default all; an image latent takes only all)")
    p.add_argument("--mask", metavar="IMAGE", help="edit only where this image is white (grey: part way); "
                   "image pixels or the latent grid, resized to the latent grid")
    add_output_arguments(p, "edited.latent, info.json and summary.txt")


def run(args) -> int:
    from ..edit import edit_channels
    from ..images import load_image
    from ..latent_io import read_latent, write_latent

    mask = load_image(args.mask).mean(1) if args.mask else None  # [1, H, W]: grey level as the blend weight
    result = edit_channels(read_latent(args.latent), args.operation, args.channels, factor=args.factor,
                           offset=args.offset, low=args.low, high=args.high, limit=args.limit, mean=args.mean,
                           std=args.std, target=args.target, mask=mask, batch=args.batch, frames=args.frames)
    return finish(result, args, extra_files={"edited.latent": lambda path: write_latent(result.latent, path)})
