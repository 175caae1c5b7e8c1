"""Benchmark: our AutoencoderKL vs diffusers' on identical weights (CPU, full SD layout, 512×512).

    python bench/bench_model.py [--size 512] [--runs 5] [--parts encoder decoder]

The parent writes one set of random SD-layout weights twice (a CompVis .safetensors for ours, a
diffusers folder for theirs) plus the inputs. Timing: one subprocess per part holds both models
and alternates their calls (ABBA), so load from other processes on a shared machine hits both
alike; one warm-up each, then `--runs` timed calls under torch.inference_mode(); medians of wall
time and of process CPU time are reported. Memory: one subprocess per (implementation, part),
one call: peak RSS (/proc/self/status VmHWM, the process high-water mark; getrusage's ru_maxrss
would start at the parent's RSS) and the working memory (that peak minus the RSS just before the
call: activations and scratch buffers; workers run with MALLOC_MMAP_THRESHOLD_=1 MiB so RSS
follows live memory). The parent checks the outputs agree (max|a-b|/max|b|).
Threads: torch's default (torch.get_num_threads()). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "diffusers")
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak RSS of this process: VmHWM, like getrusage's ru_maxrss, but not inherited from the
    parent across fork/exec (ru_maxrss starts at the parent's RSS, which would hide ours)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(impl: str, work: Path):
    if impl == "ours":
        from vae_fix.loader import load_vae
        model = load_vae(work / "sd_compvis.safetensors").model
        return model.moments, model.decode
    import diffusers
    model = diffusers.AutoencoderKL.from_pretrained(work / "sd_diffusers").eval()
    with torch.no_grad():  # from_pretrained may leave weights memory-mapped and paged in lazily; make
        for p in model.parameters():  # them resident, as ours are, so memory compares like with like
            p.data = p.data.clone()
    return (lambda x: model.encode(x).latent_dist.parameters), (lambda z: model.decode(z).sample)


def load_inputs(work: Path, part: str) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(str(work / "inputs.safetensors"))["image" if part == "encoder" else "latent"]


def time_worker(part: str, runs: int, work: Path) -> dict:
    """Both models in one process, calls alternated (ABBA order) so that load on a shared machine
    hits both alike; wall time and process CPU time per call."""
    from safetensors.torch import save_file
    x = load_inputs(work, part)
    fns = {impl: build_model(impl, work)[0 if part == "encoder" else 1] for impl in IMPLS}
    wall, cpu = {i: [] for i in IMPLS}, {i: [] for i in IMPLS}
    with torch.inference_mode():
        outs = {impl: fn(x) for impl, fn in fns.items()}  # warm-up
        for r in range(runs):
            for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                w, c = time.perf_counter(), time.process_time()
                fns[impl](x)
                wall[impl].append(time.perf_counter() - w)
                cpu[impl].append(time.process_time() - c)
    for impl, out in outs.items():
        save_file({"out": out.contiguous()}, str(work / f"out_{impl}_{part}.safetensors"))
    return {"wall": wall, "cpu": cpu, "threads": torch.get_num_threads()}


def memory_worker(impl: str, part: str, work: Path) -> dict:
    """One model, one call: peak RSS and the working memory the call needed on top of the model."""
    x = load_inputs(work, part)
    fn = build_model(impl, work)[0 if part == "encoder" else 1]
    gc.collect()
    before = rss_mib()
    with torch.inference_mode():
        fn(x)
    return {"peak_rss_mib": peak_rss_mib(), "working_mib": peak_rss_mib() - before}


def prepare(work: Path, size: int, seed: int) -> None:
    """Random full-SD weights in both layouts (GroupNorm affine and biases randomised too) and inputs."""
    import diffusers
    from safetensors.torch import save_file
    from vae_fix import layouts
    from vae_fix.loader import read_vae
    torch.manual_seed(seed)
    reference = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    reference.save_pretrained(work / "sd_diffusers")
    compvis, *_ = layouts.to_compvis(reference.state_dict())
    save_file({k: v.contiguous() for k, v in compvis.items()}, str(work / "sd_compvis.safetensors"))
    assert read_vae(work / "sd_compvis.safetensors").config.channel_mult == (1, 2, 4, 4)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1   # [1, 3, H, W] in -1..1
    latent = torch.randn(1, 4, size // 8, size // 8, generator=g)  # [1, 4, h, w]
    save_file({"image": image, "latent": latent}, str(work / "inputs.safetensors"))


def run_worker(*worker_args, runs: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", *worker_args, "--runs", str(runs), "--work", str(work)]
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once, so RSS
    # follows live memory instead of what the allocator happened to keep from loading the model.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {worker_args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(part: str, timing: dict, memory: dict, err: float) -> None:
    med = {k: {i: statistics.median(v[i]) for i in IMPLS} for k, v in timing.items() if k in ("wall", "cpu")}
    for impl in IMPLS:
        print(f"{part:8} {impl:9} {med['wall'][impl]:9.2f} {min(timing['wall'][impl]):7.2f} {med['cpu'][impl]:8.2f} "
              f"{memory[impl]['peak_rss_mib']:13.0f} {memory[impl]['working_mib']:12.0f}")
    ratio = {k: med[k]["ours"] / med[k]["diffusers"] for k in med}
    mem = memory["ours"]["working_mib"] / max(memory["diffusers"]["working_mib"], 1e-9)
    print(f"{part:8} ours/diffusers: wall time {ratio['wall']:.3f}, CPU time {ratio['cpu']:.3f}, "
          f"working memory {mem:.3f}; outputs' relative error {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        result = time_worker(*rest, args.runs, args.work) if kind == "time" else memory_worker(*rest, args.work)
        print(json.dumps(result))
        return
    from safetensors.torch import load_file
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.size, args.seed)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
              f"SD layout (128,256,512,512), image {args.size}x{args.size}, median of {args.runs} after 1 warm-up")
        print(f"{'part':8} {'impl':9} {'wall s':>9} {'min s':>7} {'CPU s':>8} {'peak RSS MiB':>13} {'working MiB':>12}")
        for part in args.parts:
            timing = run_worker("time", part, runs=args.runs, work=work)
            memory = {impl: run_worker("memory", impl, part, runs=1, work=work) for impl in IMPLS}
            a, b = (load_file(str(work / f"out_{i}_{part}.safetensors"))["out"] for i in IMPLS)
            report(part, timing, memory, ((a - b).abs().max() / b.abs().max()).item())


if __name__ == "__main__":
    main()
