"""What every command shares, so a command's `run` only converts arguments, calls its engine
feature and hands the result to `finish`: the VAE as a `Codec` (--vae, --device, --dtype), the
output options (--out, --json, --quiet), terminal progress, and where a latent comes from (a latent
file, or encoding an image with a VAE: the posterior mean, which is what ComfyUI's VAE Encode
returns). Not a command: the CLI registry skips `_` modules.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from ..images import load_image
from ..latent_io import read_latent

from ..codec import DTYPE_CHOICES, parse_dtype
from ..progress import terminal_progress
from ..result import Result, check_out_dir, write_result

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # TODO(redesign): drop


def add_output_arguments(p, what: str = "the JSON result, summary.txt and the PNGs") -> None:
    p.add_argument("--out", required=True, metavar="DIR", type=_out_folder, help=f"folder for {what}")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def add_latent_source(p) -> None:
    """--image or --latent: where the latent comes from (an image is encoded to its posterior mean)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="PATH", help="image to encode (the latent is the posterior mean)")
    src.add_argument("--latent", metavar="FILE", help="latent file (ComfyUI .latent or safetensors)")


def _out_folder(text: str):
    import argparse
    try:
        return check_out_dir(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_vae_arguments(p, flag: str = "--vae", required: bool = True, what: str = "VAE") -> None:
    p.add_argument(flag, required=required, help=f"{what} file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="model dtype (default fp32)")


def load_codec(args, flag: str = "--vae", name: str | None = None):
    """The VAE named by `flag` as an engine `Codec`, or None when the flag was not given."""
    from ..loader import load_vae

    path = getattr(args, flag.lstrip("-").replace("-", "_"))
    if not path:
        return None
    dtype = parse_dtype(args.dtype, "--dtype") or torch.float32
    return load_vae(path, device=args.device, dtype=dtype).codec(name, input_name=flag)


def progress(args, label: str):
    """A terminal progress bar for the command's long work (none when piped, --quiet or --json)."""
    return terminal_progress(label, quiet=args.quiet or args.json)


def finish(result: Result, args, extra_files: dict | None = None) -> int:
    """Write the result into --out (atomically) and print its summary, or its JSON with --json."""
    files = write_result(result, args.out, extra_files)
    if args.json:
        print(result.json_text())
    elif not args.quiet:
        print(result.summary())
        print(f"wrote {len(files)} files in {args.out}")
    return 0


def out_dir(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"'{out}' is an existing file", "a folder (created when missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(data: dict, path) -> Path:
    from ..jsonsafe import json_safe

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


def latent_from_args(args, vae, allow_nonfinite: bool = False):
    """(latent `[B, C, h, w]` float32 on CPU, posterior or None, encoded image or None)."""
    from ..posterior import prepare_images, read_posterior

    if args.latent:
        z = read_latent(args.latent, allow_nonfinite)
        if vae is not None and z.shape[1] != vae.config.latent_channels:
            raise InputError("--latent", f"{z.shape[1]} channels, but the VAE's latents have "
                             f"{vae.config.latent_channels}", "a latent made by this VAE")
        return z, None, None
    if vae is None:
        raise InputError("--vae", "an image needs a VAE to encode it", "--vae with --image, or --latent")
    image = load_image(args.image)
    post = read_posterior(vae.codec(), image)
    shown, _ = prepare_images(image, vae.config.downscale, "crop")
    return post.mean, post, shown


def latent_and_image(args, codec, allow_nonfinite: bool = False):
    """(latent `[B, C, h, w]` float32 on the CPU, the image it was encoded from `[1, 3, H, W]` or None)
    from --latent, or from --image encoded by `codec` (the posterior mean, as ComfyUI's VAE Encode)."""
    from ..posterior import read_posterior

    if args.latent:
        z = read_latent(args.latent, allow_nonfinite)
        if codec is not None and z.shape[1] != codec.latent_channels:
            raise InputError("--latent", f"{z.shape[1]} channels, but the VAE's latents have "
                             f"{codec.latent_channels}", "a latent made by this VAE")
        return z, None
    if codec is None:
        raise InputError("--vae", "an image needs a VAE to encode it", "--vae with --image, or --latent")
    image = load_image(args.image)
    return read_posterior(codec, image).mean.cpu(), image


def decoder_fn(vae):
    """The model's decode, taking CPU float32 latents and returning float32 on CPU."""
    p = next(vae.model.parameters())

    def decode(z):
        return vae.model.decode(z.to(device=p.device, dtype=p.dtype)).float().cpu()
    return decode
