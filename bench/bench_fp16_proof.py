"""Benchmark: the fp16 fix's proof with same-size images batched (`fp16_fix._batches`) against one
image at a time, on the SD-recipe VAE trained here scaled to overflow fp16 (a real fix: the fixed
and the original VAE both run in fp16 and fp32).

    python bench/bench_fp16_proof.py [--sizes 128] [--runs 3] [--device auto]

Interleaved in one process, median wall time of `--runs`; the rows of the two proofs are compared
(fp16 kernels may round differently by batch size: the largest PSNR difference is printed).
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    from bench_fp16 import overflowing
    from vae_fix.probes import probe_images

    fix = importlib.import_module("vae_fix.fp16_fix")  # the module: BATCH_PIXELS is switched per run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    original = overflowing("trained").to(device)
    images, names = probe_images(tuple(a.sizes))
    images = [x.to(device) for x in images]
    result = fix.fp16_fix(original, images[:2], names[:2])
    print(f"VAE scaled to overflow fp16, fixed: {result.changed}; {len(images)} probes at {a.sizes} px; "
          f"device {device}, {torch.get_num_threads()} threads")
    batched = fix.BATCH_PIXELS
    times, rows = {"batched": [], "one at a time": []}, {}
    for _ in range(a.runs):
        for name, budget in (("batched", batched), ("one at a time", 1)):
            fix.BATCH_PIXELS = budget
            start = time.perf_counter()
            rows[name] = fix.prove(original, copy.deepcopy(result.model), fix.KL, images, names)
            times[name].append(time.perf_counter() - start)
    fix.BATCH_PIXELS = batched
    worst = max(abs(r["fp16_psnr_db"] - s["fp16_psnr_db"]) for r, s in zip(rows["batched"], rows["one at a time"]))
    fixed_fp16 = all(r["fp16_decode_finite"] for r in rows["batched"])
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in median.items():
        print(f"| {k} | {v:.1f} s |")
    print(f"proof batched vs one at a time: {median['batched'] / median['one at a time']:.2f}x time, fixed VAE finite "
          f"in fp16 on every probe: {fixed_fp16}, largest fp16 PSNR difference {worst:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
