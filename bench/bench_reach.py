"""Fast reach map vs the exact perturbation measure on a full-size SD-layout decoder.

A 32x32 latent (256x256 image) with five spiked cells. The exact measure over all 1024 cells is
timed on a subset of cells (the five spikes plus random cells) and extrapolated per cell; the
fast map is timed in full. Both run on the same machine in the same process, alternating, so load
from other processes hits both. Also prints whether the two agree on the order of the top cells.

    python bench/bench_reach.py [--cells 16] [--repeats 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_fix.reach import exact_reach, fast_reach_map, reach_to_map, top_cells  # noqa: E402
from vae_fix.model import preset_config, random_vae  # noqa: E402

SPIKES = [((6, 6), 48.0), ((25, 25), 30.0), ((6, 25), 19.0), ((25, 6), 12.0), ((16, 16), 8.0)]


def spiked_latent(h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))
    for (y, x), s in SPIKES:
        z[0, :, y, x] = s
    return z


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=16, help="cells timed with the exact measure (default 16)")
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds; the median is used (default 2)")
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4, help="exact measure decode batch (default 4)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    vae = random_vae(preset_config("sd"), seed=0).to(args.device)
    z = spiked_latent().to(args.device)
    h, w = z.shape[-2:]
    g = torch.Generator().manual_seed(1)
    others = [(int(i) // w, int(i) % w) for i in torch.randperm(h * w, generator=g)]
    subset = [c for c, _ in SPIKES]
    subset += [c for c in others if c not in subset][: max(0, args.cells - len(subset))]
    subset = subset[: args.cells]

    with torch.no_grad():
        base = vae.decode(z)  # warm-up, and the exact measure's reference image
    exact_per_cell, fast_times = [], []
    for _ in range(args.repeats):
        reach, t_exact = timed(lambda: exact_reach(vae.decode, z, subset, window=args.window,
                                                    batch_size=args.batch_size, base=base))
        exact_per_cell.append(t_exact / len(subset))
        fast, t_fast = timed(lambda: fast_reach_map(vae.decode, z, window=args.window))
        fast_times.append(t_fast)

    per_cell, t_fast = statistics.median(exact_per_cell), statistics.median(fast_times)
    t_all = per_cell * h * w
    exact_map = reach_to_map(reach, h, w, "mean_far")
    measured = torch.isfinite(exact_map)
    fast_on_subset = fast.reach.masked_fill(~measured, float("nan"))
    exact_top, fast_top = top_cells(exact_map, 5), top_cells(fast_on_subset, 5)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, decoder: full SD layout, "
          f"latent {h}x{w} -> image {base.shape[-2]}x{base.shape[-1]}, window {args.window} cells")
    print(f"exact measure: {per_cell:.3f} s per cell (median of {args.repeats} rounds over {len(subset)} cells, "
          f"batch {args.batch_size}); extrapolated to all {h * w} cells: {t_all:.0f} s")
    print(f"fast map: {t_fast:.1f} s for all {h * w} cells ({fast.passes} backward passes + 1 forward)")
    print(f"speed-up: {t_all / t_fast:.0f}x")
    print(f"top 5 on the timed cells, exact (mean |delta| far): {exact_top}")
    print(f"top 5 on the timed cells, fast map:               {fast_top}  same order: {exact_top == fast_top}")
    finite = fast.reach[torch.isfinite(fast.reach)]
    print(f"fast map: strongest / median cell = {float(finite.max() / finite.median()):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
