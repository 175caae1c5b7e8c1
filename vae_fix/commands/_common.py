"""What every command shares, so a command's `run` only converts arguments, calls its engine
feature and hands the result to `finish`: the VAE as a `Codec` (--vae, --padding, --device, --dtype), the
output options (--out, --json, --quiet), terminal progress, and where a latent comes from (a latent
file, or encoding an image with a VAE: the posterior mean, which is what ComfyUI's VAE Encode
returns). Not a command: the CLI registry skips `_` modules.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..codec import DTYPE_CHOICES, parse_dtype
from ..errors import InputError
from ..images import load_image
from ..latent_io import read_latent
from ..model import PADDING_MODES
from ..progress import terminal_progress
from ..result import Result, check_out_dir, write_result


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


def padding_flag(flag: str) -> str:
    """The padding option of a VAE flag: --vae → --padding, --vae-a → --padding-a."""
    return "--padding" + flag[len("--vae"):]


def add_vae_arguments(p, flag: str = "--vae", required: bool = True, what: str = "VAE") -> None:
    p.add_argument(flag, required=required, help=f"{what} file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument(padding_flag(flag), choices=PADDING_MODES, default="zeros",
                   help=f"how the {what}'s convolutions pad the image border: zeros (as trained by CompVis, the "
                        "default) or reflect (for VAEs retrained with reflection padding, EQ-VAE style)")
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
    padding = getattr(args, padding_flag(flag)[2:].replace("-", "_"))
    return load_vae(path, device=args.device, dtype=dtype, padding=padding).codec(name, input_name=flag)


def progress(args, label: str):
    """A terminal progress bar for the command's long work (none when piped, --quiet or --json)."""
    return terminal_progress(label, quiet=args.quiet or args.json)


def finish(result: Result, args, extra_files: dict | None = None, out=None, note: str | None = None) -> int:
    """Write the result into `out` (default --out; atomically) and print its summary and `note`
    (default: what was written), or its JSON with --json."""
    out = args.out if out is None else out
    files = write_result(result, out, extra_files)
    if args.json:
        print(result.json_text())
    elif not args.quiet:
        print(result.summary())
        print(note or f"wrote {len(files)} files in {out}")
    return 0


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


def flag_values(args, flags: dict) -> dict:
    """{settings field: value} of the flags given (a table flag → (field, type, help)); unset flags left out."""
    values = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, *_) in flags.items()}
    return {k: v for k, v in values.items() if v is not None}


def new_safetensors_file(text: str, flag: str = "--out") -> Path:
    """An output VAE path: a .safetensors file that does not exist yet (commands never overwrite)."""
    out = Path(text)
    if out.suffix != ".safetensors":
        raise InputError(flag, f"'{out}' does not end in .safetensors", "a new .safetensors file")
    if out.exists():
        raise InputError(flag, f"'{out}' exists", "a new file (nothing is overwritten)")
    return out


def pick_device(name: str) -> str:
    """`auto` is cuda when present, else cpu; anything else must be a torch device name."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise InputError("--device", f"'{name}'", "auto, cpu, cuda or cuda:N") from None
    return name


def say(text: str) -> None:
    """A log line of a long command, on stderr (stdout stays for the result and --json)."""
    print(text, file=sys.stderr, flush=True)
