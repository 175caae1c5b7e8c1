"""The pack against the host's own nodes, side by side in one ComfyUI process.

    COMFYUI_PATH=../shared/comfyui $COMFYUI_PYTHON bench/bench_host.py [--runs 5] [--sizes 512 1024]

Runs with the host's Python (ComfyUI importable), on one full SD-layout VAE file (seeded random
weights) and one image, pack and host interleaved (A B, B A, ...), median of >= 5 timed runs each
(no memory sampling while timed), and the peak memory above the idle process of one more run each:
- Load VAE (strict) against core *Load VAE* on the same file (target <= 1.1x);
- raw moments plus the anomaly verdict (what Inspect VAE computes before drawing) against core
  *VAE Encode* on the same image, at each size (target <= 1.05x: the encoder computes the variance
  anyway, so reading it must not cost a second encode).
The last line sums it up; exit status 1 when a ratio is over its target. On a GPU the host places
the models as it always does and memory is the accelerator's peak allocation.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"load": 1.1, "inspect": 1.05}


def import_host_and_pack():
    """ComfyUI's modules from COMFYUI_PATH, and this repository as the custom node package it is."""
    comfy_path = os.environ.get("COMFYUI_PATH", str(ROOT.parent / "shared" / "comfyui"))
    if not Path(comfy_path, "comfy", "sd.py").is_file():
        sys.exit(f"COMFYUI_PATH={comfy_path} is not a ComfyUI checkout (no comfy/sd.py)")
    sys.path.insert(0, comfy_path)
    sys.path.insert(1, str(ROOT))
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()  # as `main.py --cpu`: the host would look for a driver
    import folder_paths
    import nodes as core_nodes
    spec = importlib.util.spec_from_file_location("vae_fix_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["vae_fix_pack"] = pack
    spec.loader.exec_module(pack)
    return folder_paths, core_nodes


def _return_free_memory() -> None:
    """Hand freed heap back to the system (glibc), so resident memory measures what a call allocates
    rather than what earlier calls left in the allocator."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the process above its level at the start: the accelerator's allocator when
    the host computes there, else resident memory sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil
        _return_free_memory()
        self.proc, self.base, self.stop = psutil.Process(), psutil.Process().memory_info().rss, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()


def timed(fn, device) -> float:
    """Seconds for one call, nothing else running in the process (the memory sampler's thread would
    compete with the call for the GIL and a core)."""
    _return_free_memory()  # each call starts from the same allocator state, as a fresh load would
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_of(fn, device) -> int:
    with PeakMemory(device) as mem:
        fn()
    return mem.peak


def interleaved(pack_fn, host_fn, runs: int, device) -> dict:
    """{name: ([seconds of each timed run], peak bytes of one more, sampled, run)}."""
    pack_fn(), host_fn()  # warm-up: file cache, allocator, kernels
    times = {"pack": [], "host": []}
    for i in range(runs):
        pair = [("pack", pack_fn), ("host", host_fn)]
        for name, fn in pair if i % 2 == 0 else reversed(pair):
            times[name].append(timed(fn, device))
    return {"pack": (times["pack"], peak_of(pack_fn, device)), "host": (times["host"], peak_of(host_fn, device))}


def row(label: str, results: dict, target: float) -> tuple[str, float]:
    t = {k: statistics.median(seconds) for k, (seconds, _) in results.items()}
    m = {k: peak for k, (_, peak) in results.items()}
    ratio = t["pack"] / t["host"]
    verdict = "OK" if ratio <= target else "OVER"
    return (f"| {label} | {t['pack']:.3f} s | {t['host']:.3f} s | {ratio:.2f}x (<= {target}) {verdict} | "
            f"{m['pack'] / 2**20:.0f} MiB | {m['host'] / 2**20:.0f} MiB |"), ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs of each (median reported; at least 5)")
    p.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="image sides for the encode rows")
    args = p.parse_args(argv)
    runs = max(5, args.runs)
    folder_paths, core_nodes = import_host_and_pack()
    from vae_fix_pack.nodes import host
    from vae_fix_pack.nodes.loader import LoadVAEStrict
    from vae_fix_pack.vae_fix.anomaly import find_pooled
    from vae_fix_pack.vae_fix.loader import save_vae
    from vae_fix_pack.vae_fix.model import preset_config, random_vae
    from vae_fix_pack.vae_fix.posterior import read_posterior
    from vae_fix_pack.vae_fix.verdict import verdict

    with tempfile.TemporaryDirectory() as tmp:
        name = "bench_sd.safetensors"
        save_vae(random_vae(preset_config("sd")), Path(tmp) / name)
        folder_paths.add_model_folder_path("vae", tmp, is_default=True)
        core_loader = core_nodes.VAELoader()
        vae = core_loader.load_vae(name)[0]
        device = torch.device(vae.device)
        lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
                 f"full SD layout ({os.path.getsize(Path(tmp) / name) / 2**20:.0f} MiB file), "
                 f"{runs} runs each, interleaved", "",
                 "| what | pack | host | ratio | pack peak | host peak |", "|---|---|---|---|---|---|"]
        ratios = {}
        load = interleaved(lambda: LoadVAEStrict.execute(name, "auto"), lambda: core_loader.load_vae(name), runs, device)
        line, ratios["load"] = row("Load VAE (strict) vs core Load VAE", load, TARGETS["load"])
        lines.append(line)
        print(line, flush=True)
        codec, encoder = host.codec(vae), core_nodes.VAEEncode()
        for size in args.sizes:
            image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(size))  # [B, H, W, C]
            pixels = image.movedim(-1, 1)                                                      # [B, C, H, W]

            def inspect(pixels=pixels):
                return verdict(find_pooled([read_posterior(codec, pixels)]))

            enc = interleaved(inspect, lambda image=image: encoder.encode(vae, image), runs, device)
            line, ratios[f"inspect {size}"] = row(f"moments + verdict vs core VAE Encode, {size}²", enc, TARGETS["inspect"])
            lines.append(line)
            print(line, flush=True)
    over = [k for k, r in ratios.items() if r > TARGETS[k.split()[0]]]
    print("\n".join(lines))
    print("summary: " + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items())
          + (f" -> over target: {', '.join(over)}" if over else " -> all within target"))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
