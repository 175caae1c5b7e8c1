"""`python -m vae_fix demo`: the VAEs trained here, inspected and measured (the README's main job);
`--planted` builds a VAE with a known hole and shows the detector finding it."""
from __future__ import annotations

import time

from ..demo import run_demo
from ..progress import terminal_progress
from ..result import check_out_dir, write_result
from . import _planted_demo

NAME = "demo"
HELP = ("Inspect the small VAEs trained by this project and shipped with it (vae_fix/models): the Health Check "
        "on the built-in probes, reconstruction of photos they never saw, and a side-by-side comparison; writes "
        "the reports and pictures into --out. No downloads. --planted instead builds a VAE in the SD layout whose "
        "log-variance has a planted 'black hole' at a known cell and inspects it.")


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the reports and pictures")
    p.add_argument("--planted", action="store_true", help="the planted-hole demo (random weights, hole at --cell)")
    _planted_demo.add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.planted:
        return _planted_demo.run(args)
    start, out = time.perf_counter(), check_out_dir(args.out)
    result = run_demo(progress=terminal_progress("demo", quiet=args.quiet))
    for name, inspection in result.inspections.items():
        write_result(inspection, out / name, inspection.files_in(out / name))
    files = write_result(result, out)
    print(result.summary())
    reports = ", ".join(str(out / name / "report.json") for name in result.inspections)
    print(f"\nHealth Check reports: {reports}\npictures: {', '.join(sorted(files.values()))}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
