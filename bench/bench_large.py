"""Large images: inspecting a 2048x2048 photo, its peak memory, and what tiling changes.

    python bench/bench_large.py [--size 2048] [--compare 1024]
    COMFYUI_PATH=../shared/comfyui $COMFYUI_PYTHON bench/bench_large.py --host   # the nodes' path too

Full SD layout VAE with a log-variance hole at cell (0, 0) on every image (corner_hole_vae), one
photo (the astronaut probe, resized). Each case runs in its own process, so its peak resident memory
(ru_maxrss) is its own:
- `inspect SIZE`: Inspect VAE's engine call (moments, anomalies, verdict; no reach check), untiled
  unless the memory estimate says it does not fit; what the plan chose is printed;
- `tiled vs whole COMPARE`: the same image at a size where both fit, whole and in 512 px tiles:
  the largest and median |difference| of the raw log-variance, and whether the verdicts agree;
- with --host, `host SIZE`: the same through ComfyUI's own encoder (`host.codec` of a core-loaded
  VAE, exactly what the Inspect VAE node runs), which plans with the host's own memory estimate.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def photo(size: int) -> torch.Tensor:
    from vae_fix.images import load_image
    return F.interpolate(load_image(ROOT / "vae_fix" / "probe_photos" / "astronaut.jpg"), size=(size, size),
                         mode="bicubic", align_corners=False).clamp(0, 1)  # [1, 3, size, size]


def summary(result) -> dict:
    post = result.posteriors[0]
    v = result.verdict
    return {"tiling": post.tiling.describe() if post.tiling else "whole image", "notes": post.notes,
            "verdict": v.line(), "cells": [[c["y"], c["x"]] for c in v.cells]}


def child(case: str, size: int, vae_path: str, tile: int | None) -> dict:
    from vae_fix.inspect import inspect_vae
    image = photo(size)
    if case == "host":
        sys.argv = ["bench"]
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_host import import_host_and_pack
        _, core_nodes = import_host_and_pack()
        from vae_fix_pack.nodes import host
        from vae_fix_pack.vae_fix.inspect import inspect_vae as host_inspect
        folder = str(Path(vae_path).parent)
        import folder_paths
        folder_paths.add_model_folder_path("vae", folder, is_default=True)
        codec = host.codec(core_nodes.VAELoader().load_vae(Path(vae_path).name)[0])
        start = time.perf_counter()
        result = host_inspect(codec, image, check_reach=False)
    else:
        from vae_fix.loader import load_vae
        codec = load_vae(vae_path).codec()
        start = time.perf_counter()
        result = inspect_vae(codec, image, check_reach=False, tile=tile)
    out = {"seconds": round(time.perf_counter() - start, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2), **summary(result)}
    torch.save(result.posteriors[0].logvar_raw, Path(vae_path).parent / f"{case}_{size}_{tile}.pt")
    return out


def run_child(python: str, case: str, size: int, vae_path: Path, tile: int | None = None) -> dict:
    cmd = [python, __file__, "--child", case, "--size", str(size), "--vae", str(vae_path)]
    if tile:
        cmd += ["--tile", str(tile)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{case} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--compare", type=int, default=1024, help="size for tiled against whole")
    p.add_argument("--host", action="store_true", help="also run the nodes' path through ComfyUI (needs COMFYUI_PATH)")
    p.add_argument("--child")
    p.add_argument("--vae")
    p.add_argument("--tile", type=int)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.vae, args.tile)))
        return 0
    from vae_fix.builders.planted import corner_hole_vae
    from vae_fix.loader import save_vae
    from vae_fix.memory import available_memory, gib
    from vae_fix.model import preset_config
    with tempfile.TemporaryDirectory() as tmp:
        vae = Path(tmp) / "corner_sd_full.safetensors"
        save_vae(corner_hole_vae(preset_config("sd")).model, vae)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory the pack may plan for: "
              f"{gib(available_memory(torch.device('cpu')))}", flush=True)
        rows = {f"inspect {args.size}": run_child(sys.executable, "engine", args.size, vae)}
        print(json.dumps(rows, indent=1), flush=True)
        whole = run_child(sys.executable, "engine", args.compare, vae)
        tiled = run_child(sys.executable, "engine", args.compare, vae, tile=512)
        a, b = (torch.load(Path(tmp) / f"engine_{args.compare}_{t}.pt") for t in (None, 512))
        diff = (a - b).abs()
        rows[f"tiled vs whole {args.compare}"] = {
            "whole": whole, "tiled": tiled, "max_abs_logvar_difference": round(float(diff.max()), 4),
            "median_abs_logvar_difference": round(float(diff.median()), 5),
            "verdicts_agree": whole["verdict"] == tiled["verdict"] and whole["cells"] == tiled["cells"]}
        if args.host:
            rows[f"host {args.size}"] = run_child(sys.executable, "host", args.size, vae)
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
