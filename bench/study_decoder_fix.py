"""Decoder-side fixes for a trained VAE, the encoder frozen so its latents stay bit for bit: does the
far reach of its collapsed cells go? The study's two prototypes, measured on `sd64-s1`:

    python bench/study_decoder_fix.py --vae runs/sd64-s1/vae.safetensors --recipe pixel --steps 200 --lr 1e-4
    python bench/study_decoder_fix.py --vae runs/sd64-s1/vae.safetensors --recipe local --steps 40 --lr 3e-4

`pixel`: the decoder gets per-pixel norms in its last level and `norm_out` (the pack's pixel-norm
variant, same parameters) and is distilled to the original decoder's pictures (L1 + L2).
`local`: the decoder keeps its pictures and, with each crop's deepest cell set to its neighbours'
median, the pixels away from that cell (the far term weighted by --far-weight).
Every --report-every steps (and before the first) it prints, on the 128 px probes, the far change of
the cells below when each is set to its neighbours' median, the pictures' PSNR against the original
decoder's, and the held-out photos' PSNR (256 px centre squares). Random crops of the training photos,
8 a step, seed 0. Not part of the pack: no file is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae_fix.loader import load_vae  # noqa: E402
from vae_fix.model import AutoencoderKL  # noqa: E402
from vae_fix.probes import probe_images  # noqa: E402
from vae_fix.reach_measure import measure_cells, neighbour_median, perturbation  # noqa: E402
from vae_fix.train_data import centre_square, load_images, random_crops  # noqa: E402
from vae_fix.train_eval import psnr  # noqa: E402

CELLS = [("noise", (7, 6)), ("chelsea", (6, 5)), ("checkerboard", (1, 14)), ("noise", (3, 12))]
WINDOW = 3  # cells around the changed one that count as near, as the reach measure's default


def student_of(teacher: AutoencoderKL, recipe: str) -> tuple[AutoencoderKL, list]:
    """A copy (per-pixel norms at the end for `pixel`) whose decoder and post_quant_conv train."""
    config = dataclasses.replace(teacher.config, decoder_norm="pixel") if recipe == "pixel" else teacher.config
    student = AutoencoderKL(config)
    student.load_state_dict(teacher.state_dict())
    student.eval().requires_grad_(False)
    trained = [*student.decoder.parameters(), *student.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    return student, trained


def deepest_to_median(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`mu` `[B, C, h, w]` with each latent's lowest-log-variance cell set to its neighbours' median,
    `[B, 1, 8h, 8w]` mask of the pixels more than WINDOW cells away from that cell)."""
    b, _, h, w = mu.shape
    moved, median, far = mu.clone(), neighbour_median(mu), torch.ones(b, 1, h * 8, w * 8)
    for i, flat in enumerate(logvar.min(1).values.flatten(1).argmin(1).tolist()):
        y, x = divmod(flat, w)
        moved[i, :, y, x] = median[i, :, y, x]
        far[i, :, max(0, y - WINDOW) * 8:(y + WINDOW + 1) * 8, max(0, x - WINDOW) * 8:(x + WINDOW + 1) * 8] = 0
    return moved, far


def loss_of(teacher, student, x: torch.Tensor, recipe: str, far_weight: float) -> torch.Tensor:
    c = teacher.config.latent_channels
    with torch.no_grad():
        m = teacher.moments(x)
        mu = m[:, :c].contiguous()
        target = teacher.decode(mu)
    y = student.decode(mu)
    loss = (y - target).abs().mean() + (y - target).pow(2).mean()
    if recipe == "local":
        moved, far = deepest_to_median(mu, m[:, c:])
        loss = loss + far_weight * ((student.decode(moved) - target).abs() * far).sum() / (far.sum() * 3)
    return loss


@torch.no_grad()
def report(tag: str, teacher, student, probes: dict, held) -> None:
    words = []
    for probe, cell in CELLS:
        z = teacher.encode(probes[f"probe:{probe}@128"] * 2 - 1)
        r = measure_cells(student.decode, z, [cell], perturbation(z), None, WINDOW, 3, 1, None)[0][0]
        words.append(f"{probe} {cell} far {r.mean_far:.4f}")
    drift, photos = [], []
    for image in held:
        x = centre_square(image, 256)
        mu = teacher.encode(x * 2 - 1)
        old, new = (m.decode(mu).clamp(-1, 1).add(1).div(2) for m in (teacher, student))
        drift.append(psnr(new, old))
        photos.append(psnr(new, x))
    print(f"[{tag}] " + "; ".join(words) + f" | pictures {sum(drift) / len(drift):.1f} dB from the original's"
          f" | held-out photos {sum(photos) / len(photos):.2f} dB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", type=Path, required=True)
    ap.add_argument("--recipe", choices=("pixel", "local"), required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--far-weight", type=float, default=4.0)
    ap.add_argument("--report-every", type=int, default=50)
    args = ap.parse_args()
    teacher = load_vae(args.vae).model.float().eval().requires_grad_(False)
    student, trained = student_of(teacher, args.recipe)
    images, gen = load_images(), torch.Generator().manual_seed(0)
    probes = dict(zip(*reversed(probe_images((128,)))))
    opt, started = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0), time.monotonic()
    report("before training", teacher, student, probes, images.held)
    for step in range(1, args.steps + 1):
        loss = loss_of(teacher, student, random_crops(images.train, 8, 128, gen), args.recipe, args.far_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"step {step}/{args.steps}  loss {float(loss):.5f}  {time.monotonic() - started:.0f} s", flush=True)
        if step % args.report_every == 0 or step == args.steps:
            report(f"step {step}", teacher, student, probes, images.held)


if __name__ == "__main__":
    main()
