"""Cost of reading the full raw posterior against a plain encode.

    python bench/bench_moments.py [--runs 5] [--size 512] [--small]

Full SD layout (random weights), one 512x512 image, CPU. Times, interleaved to share any drift:
`model.encode(x * 2 - 1)` (what ComfyUI's VAE Encode computes: the posterior mean) and
`read_posterior(codec, x)` followed by `find_anomalies` (input checks, moments, clamp, std,
KL per cell and in total, robust outlier search). Prints the medians and their ratio; the target is
at most 1.05. Exit status 1 when over. Because whole-encode timings drift with machine load, it also
times everything except the encoder (read_posterior on precomputed moments + find_anomalies), which
is the part the ratio is about.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_fix.anomaly import find_anomalies  # noqa: E402
from vae_fix.codec import model_codec  # noqa: E402
from vae_fix.model import preset_config, random_vae  # noqa: E402
from vae_fix.posterior import read_posterior  # noqa: E402

TARGET = 1.05


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs of each (median reported; at least 5)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--small", action="store_true", help="small SD layout (a quick check, not the benchmark)")
    args = p.parse_args(argv)
    runs = max(5, args.runs)
    model = random_vae(preset_config("sd", small=args.small))
    codec = model_codec(model)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def encode():
        with torch.no_grad():
            return model.encode(image * 2 - 1)

    def read():
        post = read_posterior(codec, image)
        return find_anomalies(post)

    with torch.no_grad():
        cached = model.moments(image * 2 - 1)

    def overhead():  # everything but the encoder itself: checks, copies, statistics, anomaly search
        return find_anomalies(read_posterior(replace(codec, moments=lambda x: cached), image))

    encode(), read()  # warm-up: allocator, kernels
    t_over = [timed(overhead) for _ in range(max(runs, 20))]
    t_encode, t_read = [], []
    for i in range(runs):
        pair = [(encode, t_encode), (read, t_read)]
        for fn, times in pair if i % 2 == 0 else reversed(pair):
            times.append(timed(fn))
    enc, rd = statistics.median(t_encode), statistics.median(t_read)
    ratio = rd / enc
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'small' if args.small else 'full'} SD layout, {args.size}x{args.size}, {runs} runs each")
    print("encode        s: " + " ".join(f"{t:.3f}" for t in t_encode) + f"  median {enc:.3f}")
    print("read+analyse  s: " + " ".join(f"{t:.3f}" for t in t_read) + f"  median {rd:.3f}")
    over = statistics.median(t_over)
    print(f"overhead beyond the encoder (precomputed moments, {len(t_over)} runs): median {over * 1000:.1f} ms "
          f"= {over / enc * 100:.2f} % of an encode")
    print(f"ratio {ratio:.3f} (target <= {TARGET}) -> {'OK' if ratio <= TARGET else 'OVER'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
