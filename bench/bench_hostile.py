"""How fast hostile VAE files are refused, against loading a valid full SD VAE in the same run.

    python bench/bench_hostile.py [--runs 5]

The files are the host suite's (tests/hostile_inputs.py): a 100,000-deep header, Infinity offsets,
20,001 zero-size tensors, 5,000 res-blocks, a stray SVD key, stride-0 / sparse `.pt` tensors and a
pickle that would run code. Each is refused by `load_vae` with VAELoadError; the table gives the
median refusal time over --runs, the message length (the issue's bound: under 1 KB) and the ratio
to loading the valid file. The tests only guard against hangs (a 10 s deadline per case): timing
targets live here, not in timed tests.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hostile_inputs import SENTINEL, write_hostile_vaes  # noqa: E402
from vae_files import random_compvis, write_state_dict  # noqa: E402
from vae_fix import VAELoadError, load_vae  # noqa: E402


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def refusal(path: Path) -> str:
    try:
        load_vae(path)
    except VAELoadError as e:
        return str(e)
    raise AssertionError(f"{path.name} loaded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vae"
        names = write_hostile_vaes(folder)
        valid = write_state_dict(random_compvis("sd", small=False), folder / "valid_sd.safetensors", "safetensors")
        baseline = median_seconds(lambda: load_vae(valid), runs)
        print(f"{'file':40} {'refused in':>11} {'message':>8} {'/ valid load':>12}")
        print(f"{'valid_sd.safetensors (loaded)':40} {baseline * 1e3:9.1f} ms {'':>8} {1.0:11.2f}x")
        worst = 0.0
        for name in names:
            seconds = median_seconds(lambda: refusal(folder / name), runs)
            worst = max(worst, seconds)
            print(f"{name:40} {seconds * 1e3:9.1f} ms {len(refusal(folder / name)):6d} ch {seconds / baseline:11.3f}x")
        assert not (Path(tmp) / SENTINEL).exists(), "a pickle ran code"
    print(f"summary: {len(names)} hostile files refused, slowest {worst * 1e3:.1f} ms (target: well under 1 s; "
          f"{worst / baseline:.2f}x loading a valid full SD VAE, {baseline * 1e3:.0f} ms), no pickle ran")


if __name__ == "__main__":
    main()
