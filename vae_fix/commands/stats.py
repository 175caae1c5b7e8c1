"""`python -m vae_fix stats`: per-channel latent statistics, the scale/shift they imply, histograms
and latent → RGB previews.

Also home of the latent-source helpers the influence and repair commands share (a command module
is the only place the CLI registry allows them): latents come from a latent file or from encoding
images with a VAE (the posterior mean, which is what ComfyUI's VAE Encode returns).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from ..images import load_image, save_png

NAME = "stats"
HELP = ("Per-channel statistics of latents (mean, std, min, max, percentiles), the scale factor and "
        "shift they imply next to the known families' values, histograms and latent-to-RGB previews.")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LATENT_KEYS = ("latent_tensor", "samples", "mean", "latent")
SD1_SCALE = 0.18215  # ComfyUI's LoadLatent: files without a version key hold SD1 model-space latents


# ---------------------------------------------------------------- shared helpers

def read_latent(path) -> torch.Tensor:
    """A latent file → raw latent `[B, C, h, w]` float32.

    Reads safetensors files: ComfyUI `.latent` (`latent_tensor`; files without
    `latent_format_version_0` are old SD1 model-space ones and are divided by 0.18215, as ComfyUI
    does), `samples`, `mean` (inspect --save-moments), `latent`, or a file with a single tensor.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    expected = "a .latent/.safetensors file with a 'latent_tensor', 'samples' or 'mean' tensor [B, C, h, w]"
    if not path.is_file():
        raise InputError(f"latent '{path}'", "no such file", expected)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"latent '{path}'", f"not a readable safetensors file ({e})", expected) from None
    key = next((k for k in LATENT_KEYS if k in tensors), None)
    if key is None:
        candidates = [k for k, v in tensors.items() if v.dim() in (3, 4) and v.is_floating_point()]
        if len(candidates) != 1:
            raise InputError(f"latent '{path}'", f"cannot tell which tensor is the latent (keys: "
                             f"{', '.join(sorted(tensors)) or 'none'})", expected)
        key = candidates[0]
    z = tensors[key].float()
    if key == "latent_tensor" and "latent_format_version_0" not in tensors:
        z = z / SD1_SCALE
    if z.dim() == 3:
        z = z[None]
    if z.dim() != 4 or not torch.isfinite(z).any():
        raise InputError(f"latent '{path}'", f"tensor '{key}' has shape {list(z.shape)}", expected)
    return z


def write_latent(z: torch.Tensor, path) -> Path:
    """Write a raw latent as a ComfyUI `.latent` file (Load Latent reads it unchanged)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": z.detach().float().contiguous().cpu(), "latent_format_version_0": torch.tensor([])},
              str(path), {"vae_fix": "raw VAE latent [B, C, h, w]"})
    return path


def out_dir(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"'{out}' is an existing file", "a folder (created when missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(data: dict, path) -> Path:
    from ..report import json_safe

    path = Path(path)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def add_source_arguments(p, vae_required: bool) -> None:
    p.add_argument("--vae", required=vae_required, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="PATH", help="image to encode (the latent is the posterior mean)")
    src.add_argument("--latent", metavar="FILE", help="latent file (ComfyUI .latent or safetensors)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")


def load_model(args, need_decoder: bool):
    """The VAE named by --vae, or None; a decoder is checked for when `need_decoder`."""
    from ..loader import load_vae

    if not args.vae:
        return None
    vae = load_vae(args.vae, device=args.device, dtype=DTYPES[args.dtype])
    if need_decoder and not vae.model.has_decoder:
        raise InputError("--vae", f"'{args.vae}' has no KL decoder (only its encoder was loaded)",
                         "a VAE with a decoder")
    return vae


def latent_from_args(args, vae):
    """(latent `[B, C, h, w]` float32 on CPU, posterior or None, encoded image or None)."""
    from ..posterior import prepare_images, read_posterior

    if args.latent:
        z = read_latent(args.latent)
        if vae is not None and z.shape[1] != vae.config.latent_channels:
            raise InputError("--latent", f"{z.shape[1]} channels, but the VAE's latents have "
                             f"{vae.config.latent_channels}", "a latent made by this VAE")
        return z, None, None
    if vae is None:
        raise InputError("--vae", "an image needs a VAE to encode it", "--vae with --image, or --latent")
    image = load_image(args.image)
    post = read_posterior(vae.model.moments, image, downscale=vae.config.downscale)
    shown, _ = prepare_images(image, vae.config.downscale, "crop")
    return post.mean, post, shown


def decoder_fn(vae):
    """The model's decode, taking CPU float32 latents and returning float32 on CPU."""
    p = next(vae.model.parameters())

    def decode(z):
        return vae.model.decode(z.to(device=p.device, dtype=p.dtype)).float().cpu()
    return decode


# ---------------------------------------------------------------- the command

def add_arguments(p) -> None:
    add_source_arguments(p, vae_required=False)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for stats.json, histogram.png and previews")
    p.add_argument("--family", default="auto",
                   help="latent family for the RGB preview: sd1, sdxl, sd3, flux, or auto (default: the only "
                        "family with this channel count; otherwise a map fitted with --vae)")
    p.add_argument("--bins", type=int, default=64, help="histogram bins (default 64)")


def run(args) -> int:
    from ..latent_preview import preview_for
    from ..stats import histogram_image, latent_stats

    if args.bins < 2:
        raise InputError("--bins", f"{args.bins}", "at least 2")
    out = out_dir(args.out)
    vae = load_model(args, need_decoder=False)
    z, _, _ = latent_from_args(args, vae)
    stats = latent_stats(z)
    files = {"histogram": str(save_png(histogram_image(z, bins=args.bins), out / "histogram.png"))}
    decode = decoder_fn(vae) if vae is not None and vae.model.has_decoder else None
    try:
        prev = preview_for(z, args.family, decode if args.family == "auto" else None)
        for i in range(min(z.shape[0], 8)):
            files[f"preview_{i}"] = str(save_png(prev.image(z[i:i + 1], scale=8)[0], out / f"preview_{i}.png"))
        stats["preview"] = prev.to_dict()
    except InputError as e:
        if args.family != "auto":
            raise InputError("--family", e.problem, e.expected) from None
        stats["preview"] = {"skipped": str(e)}
    stats["source"] = {"latent": args.latent, "image": args.image, "vae": args.vae}
    stats["files"] = files
    write_json(stats, out / "stats.json")
    _print_summary(stats)
    print(f"wrote {out / 'stats.json'} and {len(files)} PNGs in {out}")
    return 0


def _print_summary(stats: dict) -> None:
    b, c, h, w = stats["shape"]
    print(f"latent {b}x{c}x{h}x{w}, {stats['values_per_channel']} values per channel")
    for ch in stats["channels"]:
        print(f"  ch {ch['channel']:2d}: mean {ch['mean']:9.4f}  std {ch['std']:9.4f}  "
              f"min {ch['min']:9.4f}  max {ch['max']:9.4f}")
    o = stats["overall"]
    print(f"implied scale 1/std = {o['implied_scale']:.5g}, shift = mean = {o['implied_shift']:.5g}"
          if o["implied_scale"] else "implied scale: undefined (zero spread)")
    for f in stats["families"]:
        if f["channels_match"]:
            print(f"  {f['label']}: scale {f['scale']}, shift {f['shift']}; this data in its model space: "
                  f"mean {f.get('model_space_mean', float('nan')):.3f}, std {f.get('model_space_std', float('nan')):.3f}")
    prev = stats.get("preview", {})
    if "skipped" in prev:
        print(f"preview skipped: {prev['skipped']}")
