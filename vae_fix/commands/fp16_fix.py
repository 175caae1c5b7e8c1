"""`python -m vae_fix fp16-fix`: rescale a KL VAE's weights so half precision cannot overflow, with
its fp32 outputs unchanged; prove it and write the fixed file in the input's layout."""
from __future__ import annotations


from ..errors import InputError
from ..fp16_fix import DEFAULT_HEADROOM, FP16_MAX, fix_file
from ..fp16_tune import TuneSettings
from ..images import load_image
from ..model import PADDING_MODES
from ..probes import SIZES, check_sizes
from ..result import check_out_dir, write_file_atomically
from ._common import finish, new_safetensors_file, progress, say

NAME = "fp16-fix"
HELP = ("Rescale a KL VAE's weights (exactly: every GroupNorm ignores the scale of its input) so no activation "
        "on the probe images exceeds fp16's range over --headroom, check that fp32 outputs are unchanged and fp16 "
        "outputs are finite and close, and write the fixed VAE (in the input's layout) only when they are. "
        "KL VAE files (SD1.x/2.x, SDXL, SD3, Flux, retrained); the VAE fp16 Fix node also fixes HunyuanVideo 1.0 "
        "and Wan 2.1 / Qwen-Image / 2.2, through ComfyUI's own model classes.")


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument("--padding", choices=PADDING_MODES, default="zeros",
                   help="how the VAE's convolutions pad the border while activations are measured: zeros (default) "
                        "or reflect (VAEs retrained with reflection padding)")
    p.add_argument("--out", required=True, metavar="FILE", help="the fixed VAE, a .safetensors file (not overwritten)")
    p.add_argument("--images", metavar="DIR", help="more calibration images (PNG/JPEG/WebP in DIR), beside the probes")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"activations are kept under {FP16_MAX:g} / HEADROOM (default {DEFAULT_HEADROOM:g})")
    p.add_argument("--check-sizes", type=int, nargs="+", default=[512, 1024], metavar="PX",
                   help="held-out demo pictures the proof also runs on (default 512 1024)")
    p.add_argument("--probe-sizes", type=int, nargs="+", default=list(SIZES), metavar="PX",
                   help=f"sizes of the built-in probes (default {' '.join(map(str, SIZES))}; on a CPU without native "
                        "fp16, smaller sizes make the fp16 proof much quicker)")
    p.add_argument("--finetune", action="store_true",
                   help="where a layer stays over the bound (a norm whose own output is too large: no exact rescaling "
                        "reaches it), fine-tune that layer and the ones reading it with the outputs held to the "
                        "original's fp32 outputs, then prove the result the same way (not exact: the report gives the "
                        "fp32 differences)")
    p.add_argument("--finetune-steps", type=int, default=TuneSettings.steps, metavar="N",
                   help=f"optimiser steps of --finetune (default {TuneSettings.steps}, batches of "
                        f"{TuneSettings.batch} crops of {TuneSettings.crop} px from the calibration images)")
    p.add_argument("--report", metavar="DIR", help="folder for fp16_fix.json, summary.txt and activations.png "
                   "(default: beside --out, named <out>_fp16_report)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def run(args) -> int:
    from ..loader import read_vae, save_vae

    out = new_safetensors_file(args.out)
    report = check_out_dir(args.report or out.with_name(out.stem + "_fp16_report"), "--report")
    probes, checks = check_sizes(args.probe_sizes, "--probe-sizes"), check_sizes(args.check_sizes, "--check-sizes")
    extra, source = _user_images(args.images), read_vae(args.vae)
    if not 1 <= args.finetune_steps <= 100_000:
        raise InputError("--finetune-steps", str(args.finetune_steps), "1 to 100000")
    tune = TuneSettings(steps=args.finetune_steps) if args.finetune else None
    result = fix_file(source, probes, checks, extra, headroom=args.headroom, padding=args.padding,
                      progress=progress(args, "fp16-fix"), finetune=tune, log=None if args.quiet or args.json else say)
    written = result.safe and result.changed
    if written:
        write_file_atomically(out, lambda path: save_vae(result.file, path, layout=source.layout))
    finish(result, args, out=report, note=f"{'wrote' if written else 'did not write'} {out}; the report is in {report}")
    return 0 if result.safe else 1


def _user_images(folder) -> list:
    if not folder:
        return []
    from ..train_data import folder_files

    files = folder_files(folder)  # InputError "images" (the CLI says --images) when not a folder
    if not files:
        raise InputError("--images", f"'{folder}' holds no PNG/JPEG/WebP image", "a folder with at least one image")
    return [(load_image(p), str(p)) for p in files]
