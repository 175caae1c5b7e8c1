"""Benchmark: a VAE fixed by `fp16-fix`, run in fp16, against the original in fp32 (#18).

    python bench/bench_fp16.py [--model trained|sd] [--sizes 512 1024] [--runs 3] [--device auto]
                               [--cases 'original fp32' 'fixed fp16']

The VAE is the SD-recipe VAE trained here (`vae_fix/models`, `--model trained`) or a random VAE
of SD's full widths (`--model sd`), its residual streams first multiplied by exact,
function-preserving factors until fp16 overflows (as SD's VAE does in fp16): the original in fp16
gives inf/NaN, so the comparison users make is fixed-fp16 against original-fp32. One subprocess
per (case, part, size): model loaded from its file, one warm-up, `--runs` timed calls under
inference_mode (median wall time; `--runs 0`: the warm-up call itself, for cases of many
minutes), and the peak memory of the call (CUDA: max_memory_allocated; CPU: the rise of the process's RSS high-water mark over the model alone). CPUs without native fp16
arithmetic run fp16 convolutions 30-100x slower than fp32: there the fp16 numbers say what the fix
costs on such a machine, on a GPU what it saves. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
CASES = {"original fp32": ("original", torch.float32), "original fp16": ("original", torch.float16),
         "fixed fp16": ("fixed", torch.float16)}


def overflowing(model_kind: str):
    """The benchmark's VAE, scaled exactly so that fp16 overflows."""
    from vae_fix.demo import shipped_models
    from vae_fix.fp16_scales import apply_scales, compvis_plan
    from vae_fix.loader import load_vae
    from vae_fix.model import preset_config, random_vae

    model = load_vae(shipped_models()[0]).model if model_kind == "trained" else random_vae(preset_config("sd"), 0).eval()
    plan = compvis_plan(model)
    apply_scales(plan, {key: 3e4 * (1 + key[1]) for key in plan.stream_keys})
    return model


def prepare(work: Path, model_kind: str) -> dict:
    from vae_fix.fp16_fix import fp16_fix
    from vae_fix.loader import save_vae
    from vae_fix.probes import probe_images

    model = overflowing(model_kind)
    images, names = probe_images((64,))  # fp16 is slow on CPUs: the proof runs at 64 px here
    result = fp16_fix(model, images, names)
    save_vae(model, work / "original.safetensors")
    save_vae(result.model, work / "fixed.safetensors")
    return {"safe": result.safe, "changed": result.changed, "largest_before": max(result.before.values()),
            "largest_after": max(result.after.values())}


def worker(which: str, dtype: str, part: str, size: int, runs: int, device: str, work: Path) -> dict:
    from bench_model import peak_rss_mib
    from vae_fix.loader import load_vae

    model = load_vae(work / f"{which}.safetensors", device=device, dtype=getattr(torch, dtype)).model
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1 if part == "encode"             # [1, 3, H, W]
         else torch.randn(1, model.config.latent_channels, size // 8, size // 8, generator=g))  # [1, C, h, w]
    x = x.to(device, getattr(torch, dtype))
    fn = model.moments if part == "encode" else model.decode
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        rss0 = peak_rss_mib()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn(x)  # warm-up, and the call whose memory is reported
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib() - rss0
        times = [time.perf_counter() - start]
        for _ in range(runs):
            t = time.perf_counter()
            fn(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times[1:] or times), "peak_mib": peak, "finite": bool(torch.isfinite(out).all())}


def run_case(args, which, dtype, part, size, work) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, str(dtype).replace("torch.", ""), part, str(size),
           "--runs", str(args.runs), "--device", args.device, "--work", str(work)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # RSS follows live memory (see bench_model.py)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {cmd[3:7]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("trained", "sd"), default="trained")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--runs", type=int, default=3, help="timed calls after the warm-up; 0: time the warm-up")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                   help="which to run ('original fp32' is the baseline of the ratios and always runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path)
    p.add_argument("--worker", nargs=4, metavar=("WHICH", "DTYPE", "PART", "SIZE"))
    a = p.parse_args(argv)
    a.device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.worker:
        which, dtype, part, size = a.worker
        print(json.dumps(worker(which, dtype, part, int(size), a.runs, a.device, a.work)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fix = prepare(work, a.model)
        print(f"{a.model} VAE scaled to overflow fp16; fix: safe={fix['safe']}, largest activation "
              f"{fix['largest_before']:.3g} -> {fix['largest_after']:.3g}; device {a.device}, {torch.get_num_threads()} threads")
        print("| part | size | case | median s | peak MiB | finite | time vs original fp32 | memory vs original fp32 |")
        print("|---|---|---|---|---|---|---|---|")
        for part in ("encode", "decode"):
            for size in a.sizes:
                rows = {name: run_case(a, which, dtype, part, size, work) for name, (which, dtype) in CASES.items()
                        if name in a.cases or name == "original fp32"}
                base = rows["original fp32"]
                for name, r in rows.items():
                    print(f"| {part} | {size} | {name} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['finite']} | "
                          f"{r['seconds'] / base['seconds']:.2f}x | {r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
