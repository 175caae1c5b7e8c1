"""The study's reach measure on every held-out photo, for each run's final model.

During training the study measures reach on one held-out photo (`chelsea`, 256 px): the fast reach
map's worst cell over its median cell. One photo proved too few: the same model's worst cell can
reach 6x further on another. This measures each finished run's final model (`RUN/vae.safetensors`)
on all five held-out photos, 256 px centre squares, and merges the numbers into
docs/study/final_reach.json, which `bench/study_tables.py` tables.

    python bench/study_reach.py --runs runs [NAME ...] [--model NAME=FILE ...]
    python bench/study_reach.py --picture docs/images/chelsea_worst_cells.jpg

--picture draws, on the photo the training evaluations measure (`chelsea`, 256 px), the worst cell of
every evaluation of every run in docs/study, and prints how many lie by each of the cells marked most.

--model measures a run whose folder is gone from its final model kept elsewhere (the shipped ones:
sd-s0=vae_fix/models/sd_recipe_small.safetensors).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae_fix.loader import load_vae  # noqa: E402
from vae_fix.train_data import load_images  # noqa: E402
from vae_fix.train_eval import reach_metrics  # noqa: E402

RECORD = ROOT / "docs" / "study" / "final_reach.json"


def measure(path: Path, images) -> dict:
    vae = load_vae(path)
    step = int(vae.file.metadata.get("vae_fix.train_step", 0))
    model = vae.model.float().eval()
    reach = {n: round(reach_metrics(model, im, 256)["worst_over_median"], 2) for n, im in zip(images.held_names, images.held)}
    return {"step": step, "model": path.name, "worst_over_median": reach}


def worst_cells_picture(out: Path) -> None:
    """Every evaluation's worst cell on the evaluated photo, each a red square (8 px a cell, shown 2x)."""
    from collections import Counter

    from PIL import Image, ImageDraw

    from vae_fix.train_data import HELD_OUT, centre_square

    images = load_images()
    photo = centre_square(images.held[images.held_names.index(HELD_OUT[0])], 256)[0]  # [3, 256, 256] 0..1
    im = Image.fromarray((photo.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()).resize((512, 512))
    draw, cells = ImageDraw.Draw(im), Counter()
    for record in sorted(RECORD.parent.glob("*.train.json")):
        for e in json.loads(record.read_text())["evals"]:
            y, x = e["reach"]["worst_cell"]["y"], e["reach"]["worst_cell"]["x"]
            cells[(y, x)] += 1
            draw.rectangle([x * 16, y * 16, x * 16 + 15, y * 16 + 15], outline=(255, 0, 0), width=2)
    im.save(out, quality=90)
    total = sum(cells.values())
    for (y, x), _ in cells.most_common(2):
        near = sum(n for (cy, cx), n in cells.items() if abs(cy - y) <= 1 and abs(cx - x) <= 1)
        print(f"within one cell of ({y}, {x}): {near} of {total} evaluations")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, help="folder of the run folders")
    p.add_argument("--picture", type=Path, help="draw every evaluation's worst cell into this picture instead")
    p.add_argument("names", nargs="*", help="runs to measure (default: every run folder with a vae.safetensors)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FILE", help="a run's final model kept elsewhere")
    a = p.parse_args(argv)
    if a.picture:
        worst_cells_picture(a.picture)
        return 0
    if a.runs is None:
        p.error("--runs is needed to measure")
    todo = {n: a.runs / n / "vae.safetensors" for n in a.names} if a.names else \
        {f.parent.name: f for f in sorted(a.runs.glob("*/vae.safetensors"))}
    todo.update(dict((n, Path(f)) for n, f in (m.split("=", 1) for m in a.model)))
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    images = load_images()
    for name, path in todo.items():
        started = time.monotonic()
        record[name] = measure(path, images)
        print(f"{name} (step {record[name]['step']}): {record[name]['worst_over_median']} "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    RECORD.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
