"""`python -m vae_fix finetune`: retrain a KL VAE's encoder so no latent cell's log-variance collapses,
with the decoder frozen and the latent means held; report before and after, write the fixed VAE.
Under `torchrun --nproc_per_node N` the batch is split over N processes (rank 0 reports and writes)."""
from __future__ import annotations

import json

from ..distributed import leave, world_from_env
from ..finetune import FinetuneSettings, finetune_vae
from ..result import check_out_dir, write_file_atomically
from ._common import finish, flag_values, new_safetensors_file, pick_device, progress, say

NAME = "finetune"
HELP = ("Fine-tune a KL VAE's encoder on --images so its log-variance no longer collapses at any cell (the "
        "'black hole'), with the decoder frozen and the latent means held where they were (diffusion models "
        "trained on them keep working). Reports verdict, deepest log-variance, reach at the worst cell and mean "
        "drift before and after, and writes the fixed VAE in the input's layout and dtype. Runs data-parallel "
        "under torchrun (NCCL on GPUs, gloo on CPUs).")
DEFAULTS = FinetuneSettings()
# flag → (FinetuneSettings field, type, help)
FLAGS = {
    "--steps": ("steps", int, f"optimiser steps (default {DEFAULTS.steps})"),
    "--batch": ("batch", int, f"crops per step, split over the processes (default {DEFAULTS.batch})"),
    "--crop": ("crop", int, f"crop side in pixels (default {DEFAULTS.crop}; train at the sizes you will encode)"),
    "--lr": ("lr", float, f"learning rate of the encoder (default {DEFAULTS.lr:g})"),
    "--mean-weight": ("mean_weight", float, f"how hard the latent means are held (default {DEFAULTS.mean_weight:g})"),
    "--floor": ("floor", float, "log-variance collapsed cells are lifted to (default: typical log-variance - margin)"),
    "--margin": ("margin", float, f"nats under the typical log-variance for the default floor (default {DEFAULTS.margin:g})"),
    "--seed": ("seed", int, f"seed of the crops (default {DEFAULTS.seed})"),
    "--eval-size": ("eval_size", int, f"side of the before/after evaluation squares (default {DEFAULTS.eval_size})"),
    "--eval-images": ("eval_images", int, f"how many of the images evaluate before/after (default {DEFAULTS.eval_images})"),
}


def add_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VAE file (.safetensors/.ckpt/.pt/.pth/.bin) or diffusers folder")
    p.add_argument("--out", required=True, metavar="FILE", help="the fixed VAE, a new .safetensors file (not overwritten)")
    p.add_argument("--images", metavar="DIR", help="folder of images to fine-tune on (default: scikit-image's photos "
                   "and Debian's wallpapers)")
    for flag, (_, kind, text) in FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--report", metavar="DIR", help="folder for finetune.json, summary.txt and the before/after verdict "
                   "pictures (default: beside --out, named <out>_finetune_report)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for scripts)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")


def run(args) -> int:
    from ..loader import load_vae
    from ..train_data import folder_files, load_images

    out, settings = new_safetensors_file(args.out), FinetuneSettings(**flag_values(args, FLAGS)).check()
    report = check_out_dir(args.report or out.with_name(out.stem + "_finetune_report"), "--report")
    images = load_images(folder_files(args.images) if args.images else None, held_out=())
    world, device = world_from_env(pick_device(args.device))
    try:
        vae, main = load_vae(args.vae, device=device), world.is_main
        result = finetune_vae(vae.model, images.train, images.train_names, settings, world=world,
                              progress=progress(args, "finetune") if main else None,
                              log=say if main and not (args.quiet or args.json) else None)
        if main:  # one process writes
            write_file_atomically(out, lambda path: _save(result, vae, args.vae, path))
            finish(result, args, out=report, note=f"wrote {out}; the report is in {report}")
        world.barrier()
    finally:
        leave(world)
    return 0


def _save(result, vae, source: str, path) -> None:
    """The fine-tuned model in the source file's dtype, its metadata kept, with a note of the fix."""
    from ..loader import LoadedVAE, save_vae

    stored = next(v.dtype for v in vae.file.state_dict.values() if v.is_floating_point())
    note = {"from": source, "floor": result.floor, "before": result.before["line"], "after": result.after["line"],
            "drift": result.drift}
    save_vae(LoadedVAE(result.model.to(stored), vae.file), path, layout="compvis",
             metadata={"vae_fix.finetune": json.dumps(note)})
