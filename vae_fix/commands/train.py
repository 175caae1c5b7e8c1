"""`python -m vae_fix train`: train a small KL VAE of the SD family on real photographs, resumably."""
from __future__ import annotations

from ..model import DECODER_NORMS
from ..result import check_out_dir, write_result
from ._common import flag_values, pick_device, progress, say

NAME = "train"
HELP = ("Train a KL autoencoder (CompVis layout, SD recipe or one of the study's fixes) on scikit-image's photos "
        "and Debian's wallpapers (or --images DIR), holding photographs out for evaluation. Progress with loss "
        "and ETA; a checkpoint in --out every --checkpoint-every steps and on Ctrl-C; run the same command "
        "again to resume (same weights as a run that never stopped). Writes vae.safetensors (fp16, CompVis keys).")

# flag → (TrainSettings field, type, help); defaults come from TrainSettings (or the run being resumed)
FLAGS = {
    "--kl-weight": ("kl_weight", float, "weight of the KL per image over its pixels (SD: 1e-6)"),
    "--logvar-floor": ("logvar_floor", float, "log-variance the floor penalty keeps the posterior above"),
    "--logvar-penalty": ("logvar_penalty", float, "weight of the floor penalty mean(relu(floor - logvar)^2) (0: off)"),
    "--latent-noise": ("latent_noise", float, "std of extra noise added to z before decoding (0: off)"),
    "--latent-tanh": ("latent_bound", float, "bound the latent means to +-B as B*tanh(mean/B) (TAESD: 3; 0: off; the "
                                             "file declares it: in ComfyUI, load it with Load VAE (strict))"),
    "--base-channels": ("base_channels", int, "width of the first level (a multiple of 32; SD: 128)"),
    "--blocks": ("num_res_blocks", int, "res blocks per encoder level (the decoder has one more; SD: 2)"),
    "--latent-channels": ("latent_channels", int, "latent channels C (SD: 4)"),
    "--steps": ("steps", int, "total optimiser steps of the run (a resumed run may raise it)"),
    "--batch": ("batch", int, "crops per step"),
    "--crop": ("crop", int, "crop size in pixels (a multiple of the downscale)"),
    "--lr": ("lr", float, "peak learning rate (linear warm-up, cosine decay to a tenth)"),
    "--warmup": ("warmup", int, "warm-up steps"),
    "--seed": ("seed", int, "seed of the weights and of every random draw"),
    "--eval-every": ("eval_every", int, "steps between evaluations on the held-out photos"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--eval-reach-size": ("eval_reach_size", int, "size of the held-out photo whose reach map is measured"),
}


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder (created; resumed when it holds a checkpoint)")
    for flag, (_, kind, text) in FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--channel-mult", type=int, nargs="+", default=None, metavar="M",
                   help="width multipliers per level (SD: 1 2 4 4; the downscale is 2^(levels-1))")
    p.add_argument("--latent-roll", action="store_true", default=None,
                   help="roll z and the target image by the same random whole cells before decoding")
    p.add_argument("--decoder-norm", choices=DECODER_NORMS, default=None,
                   help="group: GroupNorm everywhere (SD); pixel: the decoder's last level and norm_out normalise each "
                        "pixel over its channels, so no cell can steer the whole image's normalisation (the file "
                        "declares it: in ComfyUI, load it with Load VAE (strict))")
    p.add_argument("--images", metavar="DIR", help="train on this folder's images instead of the built-in sources")
    p.add_argument("--held-out", nargs="*", default=None, metavar="NAME",
                   help="image names (file stems, wallpaper names) kept for evaluation (default: chelsea coffee "
                        "rocket Path ColorfulCups)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")


def run(args) -> int:
    from ..train import settings_for, train
    from ..train_data import HELD_OUT, folder_files, load_images

    out = check_out_dir(args.out)
    given = flag_values(args, FLAGS)
    given.update(channel_mult=tuple(args.channel_mult) if args.channel_mult else None, latent_roll=args.latent_roll,
                 decoder_norm=args.decoder_norm)
    settings = settings_for(out, **given)
    held = HELD_OUT if args.held_out is None else tuple(args.held_out)
    images = load_images(folder_files(args.images) if args.images else None, held_out=held)
    quiet = args.quiet or args.json
    result = train(out, settings, images=images, device=pick_device(args.device),
                   progress=progress(args, "train"), log=None if quiet else say,
                   max_seconds=None if args.max_minutes is None else args.max_minutes * 60)
    write_result(result, out)
    if args.json:
        print(result.json_text())
    elif not args.quiet:
        print(result.summary())
    return 0

