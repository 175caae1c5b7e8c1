"""The pictures and numbers behind the study's emergent case (`sd64-s1`), from the run folders.

    python bench/study_emergent.py --runs runs --out docs/images

writes `sd64_s1_verdict.jpg` (the Health Check on the 20 probes: where each collapses) and
`sd64_s1_reach.jpg` (touch one cell: |change| of the decoded picture when a cell is set to its
neighbours' median, every panel on one colour scale), and prints each panel's exact reach. The
panels: seed 1's deepest cells on `noise` and `chelsea`, an ordinary cell, seed 0's deepest `noise`
cell, and seed 1's `noise` cell after `finetune` (RUNS/ft-sd64-s1/fixed.safetensors, when present).

Then which path of the decoder carries each far change: the changed latent is decoded again with
the GroupNorm statistics (some or all of them) and/or the attention's output held at what the
unchanged latent gave them; what is left of the far change is what does not go through them.

    python bench/study_emergent.py --runs runs --survey sd64-s2 [sd64-s0 ...]

measures any run the same way, at cells its own probes pick: on each 128 px probe its deepest cell
(the lowest raw log-variance over channels) and a cell of median depth, each set to its neighbours'
median (exact reach), then what is left of the deepest cells' far change with every GroupNorm, or
`norm_out` alone, held.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae_fix import viz  # noqa: E402
from vae_fix.codec import model_codec  # noqa: E402
from vae_fix.inspect import inspect_vae  # noqa: E402
from vae_fix.loader import load_vae  # noqa: E402
from vae_fix.model import AttnBlock  # noqa: E402
from vae_fix.probes import probe_images  # noqa: E402
from vae_fix.reach_measure import measure_cells, perturbation  # noqa: E402

# (label, run file under RUNS, probe, cell (y, x)) on the 128 px probes
PANELS = [("seed 1, noise (7, 6): collapsed", "sd64-s1/vae.safetensors", "noise", (7, 6)),
          ("seed 1, chelsea (6, 5): collapsed", "sd64-s1/vae.safetensors", "chelsea", (6, 5)),
          ("seed 1, noise (3, 12): ordinary", "sd64-s1/vae.safetensors", "noise", (3, 12)),
          ("seed 0, noise (6, 1): its deepest", "sd64-s0/vae.safetensors", "noise", (6, 1)),
          ("seed 1 after finetune, noise (7, 6)", "ft-sd64-s1/fixed.safetensors", "noise", (7, 6))]
ZOOM = 2


def load(path: Path):
    return load_vae(path).model.float().eval()


def touch(model, image01: torch.Tensor, cell) -> tuple[torch.Tensor, object]:
    """(`[H, W]` |change| in 0..1 units, averaged over RGB, exact reach) of setting `cell` of the
    posterior mean of `image01` `[1, 3, S, S]` to its neighbours' median."""
    with torch.no_grad():
        z = model.encode(image01 * 2 - 1)
        reach, base, moved = measure_cells(model.decode, z, [cell], perturbation(z), None, 3, 3, 1, None)
    return ((moved - base[0]).abs() / 2).mean(0), reach[0]


def reach_picture(runs: Path) -> torch.Tensor:
    probes = dict(zip(*reversed(probe_images((128,)))))
    changes, tiles = [], []
    for label, file, probe, cell in PANELS:
        if not (runs / file).exists():
            print(f"skipped: {label} ({runs / file} not found)")
            continue
        change, r = touch(load(runs / file), probes[f"probe:{probe}@128"], cell)
        print(f"{label}: far {r.mean_far:.4f}, near {r.mean_near:.4f}, far/near {r.ratio:.2f}, max far {r.max_far:.4f}")
        changes.append((label, cell, change))
    vmax = max(float(c.max()) for _, _, c in changes)
    for label, cell, change in changes:
        pic = viz.mark_cells(viz.heatmap(change, "magma", 0.0, vmax, scale=ZOOM), [cell], 8, zoom=ZOOM)
        tiles.append(viz.caption(pic, label))
    grid = viz.tile_grid(tiles, per_row=len(tiles), gap=6)
    return viz.with_colorbar(grid, "magma", 0.0, vmax, "|change| (0..1)")


def verdict_picture(runs: Path) -> torch.Tensor:
    result = inspect_vae(model_codec(load(runs / "sd64-s1/vae.safetensors"), "vae"), check_reach=True)
    print(f"sd64-s1: {result.verdict.line()}")
    return result.verdict_picture()


# (name, GroupNorms held: module-name prefixes or None for none, attention held)
HELD = [("as is", None, False), ("every norm held", ("",), False), ("norm_out held", ("norm_out",), False),
        ("mid-block norms held", ("mid.",), False), ("attention held", None, True), ("norms and attention held", ("",), True)]
PATHS = [("sd64-s1/vae.safetensors", "noise", (7, 6)), ("sd64-s1/vae.safetensors", "chelsea", (6, 5)),
         ("sd64-s1/vae.safetensors", "checkerboard", (1, 14)), ("sd64-s0/vae.safetensors", "noise", (6, 1))]


class Held:
    """Record every decoder GroupNorm's group statistics and every attention block's output on one
    decode; on the next, reuse them where `norms` (module-name prefixes) and `attention` say."""

    def __init__(self, decoder: nn.Module):
        self.saved, self.recording, self.norms, self.attention = {}, True, None, False
        for name, mod in decoder.named_modules():
            if isinstance(mod, nn.GroupNorm):
                mod.forward = self._norm(name, mod)
            elif isinstance(mod, AttnBlock):
                mod.forward = self._attention(name, mod, mod.forward)

    def _norm(self, name, mod):
        def forward(x):  # x [B, C, h, w]
            groups = x.reshape(x.shape[0], mod.num_groups, -1)
            if self.recording:
                self.saved[name] = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
            elif self.norms is not None and name.startswith(self.norms):
                mean, var = self.saved[name]
                y = ((groups - mean) / torch.sqrt(var + mod.eps)).reshape(x.shape)
                return y * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)
            return F.group_norm(x, mod.num_groups, mod.weight, mod.bias, mod.eps)
        return forward

    def _attention(self, name, mod, run):
        def forward(x):
            if not self.recording and self.attention:
                return x + self.saved[name]
            out = run(x)
            if self.recording:
                self.saved[name] = out - x
            return out
        return forward


@torch.no_grad()
def paths(runs: Path) -> None:
    probes = dict(zip(*reversed(probe_images((128,)))))
    for file, probe, cell in PATHS:
        if not (runs / file).exists():
            continue
        model = load(runs / file)
        held, z = Held(model.decoder), model.encode(probes[f"probe:{probe}@128"] * 2 - 1)
        held.recording, base = True, model.decode(z)
        held.recording, words = False, []
        for name, held.norms, held.attention in HELD:  # one decode of the changed latent each
            r = measure_cells(model.decode, z, [cell], perturbation(z), base, 3, 3, 1, None)[0][0]
            words.append(f"{name} {r.mean_far:.4f}")
        print(f"far change, {file.split('/')[0]} {probe} {cell}: " + "; ".join(words))


@torch.no_grad()
def survey(path: Path) -> None:
    model, rows = load(path), []
    print(f"{path}: per 128 px probe, deepest cell and a median-depth cell; far change, far/near, nats")
    for image, name in zip(*probe_images((128,))):
        x = image * 2 - 1
        z, logvar = model.moments(x).split(model.config.latent_channels, dim=1)
        low = logvar[0].min(0).values  # [h, w] lowest over channels
        deepest = divmod(int(low.argmin()), low.shape[1])
        ordinary = divmod(int((low - low.median()).abs().argmin()), low.shape[1])
        held, z = Held(model.decoder), z.contiguous()
        held.recording, base = True, model.decode(z)
        held.recording, delta = False, perturbation(z)
        (deep, plain), _, _ = measure_cells(model.decode, z, [deepest, ordinary], delta, base, 3, 3, 1, None)
        left = []
        for held.norms in (("",), ("norm_out",)):
            left.append(measure_cells(model.decode, z, [deepest], delta, base, 3, 3, 1, None)[0][0].mean_far)
        held.norms = None
        rows.append(deep.mean_far)
        print(f"  {name[6:]:<20} deepest {deepest} {float(low[deepest]):6.1f} nats (median {float(low.median()):5.1f}): "
              f"far {deep.mean_far:.4f} ({deep.ratio:.2f}); median-depth {ordinary} far {plain.mean_far:.4f} "
              f"({plain.ratio:.2f}); every norm held {left[0]:.4f}, norm_out held {left[1]:.4f}")
    print(f"  deepest cells' far change: median {sorted(rows)[len(rows) // 2]:.4f}, max {max(rows):.4f}")


def save_jpeg(img: torch.Tensor, path: Path, width: int) -> None:
    from PIL import Image

    im = Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.save(path, quality=88)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of the run folders")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the two pictures")
    ap.add_argument("--survey", nargs="+", metavar="RUN", help="measure these runs' final models instead")
    args = ap.parse_args()
    if args.survey:
        for run in args.survey:
            survey(args.runs / run / "vae.safetensors")
        return
    save_jpeg(reach_picture(args.runs), args.out / "sd64_s1_reach.jpg", 1400)
    save_jpeg(verdict_picture(args.runs), args.out / "sd64_s1_verdict.jpg", 1400)
    paths(args.runs)


if __name__ == "__main__":
    main()
