"""`python -m vae_fix demo` (the README's main job) against its budget: under a minute on a 2-core CPU,
no file over 50 MB. Each run is a fresh process (imports, model loading and pictures included), as a
user runs it; the machine should be otherwise idle (a training run or CI beside it doubles the time).

    python bench/bench_demo.py [--runs 3]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S, FILE_LIMIT_MB = 60.0, 50.0


def one_run(out: Path) -> tuple[float, float, float]:
    """(wall seconds, the demo's own "done in" seconds, largest file written in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vae_fix", "demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the demo failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    done = float(proc.stdout.rsplit("done in ", 1)[1].split()[0])
    largest = max(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    return wall, done, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    walls, dones, largest = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            wall, done, big = one_run(Path(tmp) / f"demo{i}")
            walls.append(wall), dones.append(done)
            largest = max(largest, big)
            print(f"run {i + 1}: {wall:.1f} s wall (the demo says done in {done:.1f} s), largest file {big:.2f} MB")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    wall = statistics.median(walls)
    print(f"demo: median {wall:.1f} s wall ({wall / BUDGET_S:.2f}x the {BUDGET_S:.0f} s budget), "
          f"peak {peak:.0f} MiB, largest file {largest:.2f} MB (limit {FILE_LIMIT_MB:.0f})")


if __name__ == "__main__":
    main()
