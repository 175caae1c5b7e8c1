"""The black-hole study: does the SD recipe grow a log-variance hole, and what do the fixes change?

Trains one small KL VAE (CompVis layout, `vae_fix.train`) per recipe and seed on the same photos,
each in its own folder under --out (resumable: run the same command again and every run goes on
where it stopped), then prints one table of the last evaluation of every run — held-out PSNR at
128/256 px, the log-variance median and minimum, clamp-floor hits, the deepest anomaly's drop,
the worst cell's reach over the median's, the verdict — plus each run's trend over its
evaluations. The table is also written to --out/study.md and study.json.

    python bench/black_hole_study.py --out runs/study [--recipes sd floor ...] [--seeds 0 1 2]
        [--steps 2400] [--jobs 4] [--device auto] [--max-minutes 170] [--table]

The defaults are the runs of docs/black-hole-study.md (same settings and seeds: the same weights on
CPU). On one H200 a 3000-step run takes about a minute, and these small models leave most of the GPU
idle, so --jobs N trains N runs at once, each in its own process (its log in --out/NAME.log); on two
CPU cores a run takes 60-110 minutes, two at a time with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_fix.train import CHECKPOINT, read_meta, settings_for, train  # noqa: E402
from vae_fix.train_data import load_images  # noqa: E402

# recipe → TrainSettings fields on top of the SD defaults (KL 1e-6 per image, log-variance clamp)
RECIPES = {
    "sd": {},
    "kl-1e-3": {"kl_weight": 1e-3},                                 # KL 1000x stronger: holes cost more
    "floor": {"logvar_floor": -20.0, "logvar_penalty": 1.0},        # penalise log-variance below -20
    "tanh": {"latent_bound": 3.0},                                  # means bounded to +-3 (TAESD's 3 tanh(x/3))
    "noise": {"latent_noise": 0.1},                                 # decoder sees z + N(0, 0.1²)
    "roll": {"latent_roll": True},                                  # no fixed position to smuggle through
    "pixel-norm": {"decoder_norm": "pixel"},                        # last decoder level: no statistic over cells
}
COLUMNS = ("run", "step", "PSNR@128", "PSNR@256", "logvar med", "logvar min", "floor hits", "deepest drop",
           "reach worst/med", "verdict")


def row(name: str, e: dict) -> list:
    v, reach = e.get("verdict") or {}, (e.get("reach") or {}).get("worst_over_median")
    deepest = v.get("deepest") or {}
    return [name, e["step"], f"{e['psnr']['128']['mean']:.2f}", f"{e['psnr']['256']['mean']:.2f}",
            f"{e['logvar_median']:.2f}", f"{e['logvar_min']:.2f}", e["clamp_floor_hits"],
            "-" if not deepest else f"{deepest['drop']:.1f}", "-" if reach is None else f"{reach:.1f}",
            v.get("status", "-")]


def markdown(rows: list[list]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def trend(name: str, evals: list[dict]) -> str:
    parts = [f"{e['step']}: {e['psnr']['256']['mean']:.1f} dB, logvar {e['logvar_median']:.1f}/{e['logvar_min']:.1f}"
             for e in evals]
    return f"{name}: " + "; ".join(parts)


def table(out: Path, names: list[str]) -> str:
    rows, trends, records = [], [], {}
    for name in names:
        meta = read_meta(out / name / CHECKPOINT) if (out / name / CHECKPOINT).exists() else None
        if not meta or not meta["evals"]:
            continue
        rows.append(row(name, meta["evals"][-1]))
        trends.append(trend(name, meta["evals"]))
        records[name] = {"settings": meta["settings"], "step": meta["step"], "evals": meta["evals"]}
    text = markdown(rows) + "\n\nTrends (step: held-out PSNR @256, log-variance median/min):\n" + "\n".join(trends)
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps(records, indent=1))
    return text


def run_in_processes(a, names: list[str]) -> None:
    """Each run by this script in a process of its own, `a.jobs` at a time; a failed run is reported."""
    a.out.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> int:
        recipe, seed = name.rsplit("-s", 1)
        cmd = [sys.executable, __file__, "--out", str(a.out), "--recipes", recipe, "--seeds", seed, "--steps",
               str(a.steps), "--eval-every", str(a.eval_every), "--device", a.device]
        cmd += [] if a.max_minutes is None else ["--max-minutes", str(a.max_minutes)]
        with open(a.out / f"{name}.log", "a") as log:
            code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=log).returncode
        print(f"== {name}: {'done' if code == 0 else f'failed (exit {code}), see its log'}", file=sys.stderr, flush=True)
        return code

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, names))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=float, default=None, help="stop every run (with checkpoints) after this long")
    p.add_argument("--table", action="store_true", help="only print the table of what is there")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    names = [f"{r}-s{seed}" for seed in a.seeds for r in a.recipes]
    if not a.table and a.jobs > 1:
        run_in_processes(a, names)
    elif not a.table:
        started, images = time.monotonic(), load_images()
        for name in names:
            recipe, seed = name.rsplit("-s", 1)
            left = None if a.max_minutes is None else a.max_minutes * 60 - (time.monotonic() - started)
            if left is not None and left <= 0:
                print(f"time is up before {name}: run again to go on", file=sys.stderr)
                break
            folder = a.out / name
            settings = settings_for(folder, **RECIPES[recipe], seed=int(seed), steps=a.steps, eval_every=a.eval_every)
            print(f"== {name}", file=sys.stderr, flush=True)
            train(folder, settings, images=images, device=device, max_seconds=left,
                  log=lambda t: print(t, file=sys.stderr, flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    print(table(a.out, names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
