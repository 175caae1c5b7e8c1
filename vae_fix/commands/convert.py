"""`python -m vae_fix convert`: rewrite a VAE in the CompVis or diffusers layout, tensors bit for bit."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..loader import describe, read_vae, save_vae

NAME = "convert"
HELP = ("Convert a VAE (any supported file or folder) to the CompVis layout (ComfyUI/A1111 single file) "
        "or the diffusers layout; every tensor is copied unchanged.")


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument("--to", required=True, choices=["compvis", "diffusers"], help="layout to write")
    p.add_argument("--out", required=True,
                   help="output path: a .safetensors file for compvis; a folder (config.json + "
                        "diffusion_pytorch_model.safetensors) or a .safetensors file for diffusers")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="extra safetensors metadata (repeatable); the source's metadata is kept")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args) -> int:
    source, out = Path(args.vae), Path(args.out)
    metadata = _parse_metadata(args.metadata)
    if args.to == "compvis" and out.suffix != ".safetensors":
        raise InputError("--out", f"'{out}' does not end in .safetensors", "a .safetensors path for the CompVis layout")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise InputError("--out", "it is the input itself", "a different path (the input is never modified)")
    if out.exists() and not args.overwrite:
        raise InputError("--out", f"'{out}' already exists", "a new path, or --overwrite to replace it")
    vae = read_vae(source)
    dtypes = ", ".join(vae.info()["dtypes"])
    print(f"read   {source}: {vae.layout} layout ({vae.container}), {describe(vae.config)}, "
          f"{vae.config.downscale}x downscale, {len(vae.state_dict)} tensors ({dtypes})")
    for note in vae.notes:
        print(f"  note: {note}")
    written = save_vae(vae, out, layout=args.to, metadata=metadata)
    files = sorted(written.iterdir()) if written.is_dir() else [written]
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"wrote  {written}: {args.to} layout, {len(vae.state_dict)} tensors unchanged, "
          f"{size / 1e6:.1f} MB ({', '.join(f.name for f in files)})")
    return 0


def _parse_metadata(items: list[str]) -> dict[str, str]:
    metadata = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError("--metadata", f"'{item}' is not KEY=VALUE", "entries like --metadata license=openrail")
        metadata[key.strip()] = value
    return metadata
