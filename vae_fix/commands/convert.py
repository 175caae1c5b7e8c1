"""`python -m vae_fix convert`: rewrite a VAE in the CompVis or diffusers layout, tensors bit for bit."""
from __future__ import annotations

from ..convert import LAYOUTS, convert_vae
from ..errors import InputError

NAME = "convert"
HELP = ("Convert a VAE (any supported file or folder) to the CompVis layout (ComfyUI/A1111 single file) "
        "or the diffusers layout; every tensor is copied unchanged.")


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument("--to", required=True, choices=list(LAYOUTS), help="layout to write")
    p.add_argument("--out", required=True,
                   help="output path: a .safetensors file for compvis; a folder (config.json + "
                        "diffusion_pytorch_model.safetensors) or a .safetensors file for diffusers")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="extra safetensors metadata (repeatable); the source's metadata is kept")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print what was read and written as JSON (for scripts)")


def run(args) -> int:
    # A convert writes a VAE, not a result folder: what was read is shown as soon as it is known,
    # so a refused write still shows the loader's notes.
    show_read = None if args.json else (lambda vae: print(f"read   {vae.summary()}"))
    result = convert_vae(args.vae, args.to, args.out, metadata=_parse_metadata(args.metadata),
                         overwrite=args.overwrite, on_read=show_read, out_name="--out", overwrite_name="--overwrite")
    print(result.json_text() if args.json else result.written_summary())
    return 0


def _parse_metadata(items: list[str]) -> dict[str, str]:
    metadata = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError("--metadata", f"'{item}' is not KEY=VALUE", "entries like --metadata license=openrail")
        metadata[key.strip()] = value
    return metadata
