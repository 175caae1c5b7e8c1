"""The black-hole study's trend with training: every run's held-out log-variance median and PSNR at
256 px against the training step, from the records kept in docs/study, as one picture.

    python bench/study_trend.py --out docs/images/study_trend.png [--records docs/study]

The SD recipe's runs (base 32, its longer schedules, SD's layout, base 64) are drawn in colour, the
fixes in grey; the band on the left panel is the SD VAE's log-variance median, -17 to -23 nats.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.study_tables import RECORDS, load, recipe  # noqa: E402
from vae_fix.viz import font, format_ticks, nice_ticks  # noqa: E402

SD_RANGE = (-23.0, -17.0)  # the SD VAE's log-variance median, nats
COLOURS = {"sd": (31, 119, 180), "sd4800": (255, 127, 14), "sd12k": (214, 39, 40), "sdshape": (44, 160, 44),
           "sd64": (148, 103, 189)}
FIX_GREY = (190, 190, 190)
LEGEND = {"sd": "SD recipe, 2400 steps", "sd4800": "SD, 4800 steps", "sd12k": "SD, 12000 steps",
          "sdshape": "SD's layout, 5.25 M", "sd64": "SD at base 64, 11.9 M", "fix": "the fixes (6 recipes)"}
PANEL_W, PANEL_H, LEFT, RIGHT, TOP, BOTTOM = 520, 340, 58, 14, 30, 42


def series(runs: dict[str, dict], value) -> list[tuple[str, list[tuple[int, float]]]]:
    """(recipe, [(step, value)]) per run, the fixes first so the SD runs are drawn over them."""
    out = [(recipe(name), [(e["step"], value(e)) for e in run["evals"]]) for name, run in runs.items()]
    return sorted(out, key=lambda s: s[0] in COLOURS)


def panel(lines, title: str, y_label: str, max_step: int, band=None) -> Image.Image:
    """One line chart [PANEL_H, PANEL_W]: step on x, the value on y, a shaded band if given."""
    values = [v for _, pts in lines for _, v in pts] + (list(band) if band else [])
    lo, hi = min(values), max(values)
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    im = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw, small = ImageDraw.Draw(im), font(11)
    x0, x1, y0, y1 = LEFT, PANEL_W - RIGHT, PANEL_H - BOTTOM, TOP

    def at(step: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * step / max_step, y0 + (y1 - y0) * (v - lo) / (hi - lo)

    if band:
        (_, top), (_, bottom) = at(0, band[1]), at(0, band[0])
        draw.rectangle([x0, top, x1, bottom], fill=(250, 222, 222))
        draw.text((x0 + 6, bottom - 4), "the SD VAE's median", fill=(170, 60, 60), font=small, anchor="ld")
    xticks, yticks = nice_ticks(0, max_step, 7), nice_ticks(lo, hi, 6)
    for t, label in zip(yticks, format_ticks(yticks)):
        y = at(0, t)[1]
        draw.line([x0, y, x1, y], fill=(235, 235, 235))
        draw.text((x0 - 5, y), label, fill="black", font=small, anchor="rm")
    for t in xticks:
        x = at(t, lo)[0]
        draw.line([x, y0, x, y0 + 4], fill="black")
        draw.text((x, y0 + 6), f"{t / 1000:g}k" if t else "0", fill="black", font=small, anchor="ma")
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for name, pts in lines:
        colour, width = COLOURS.get(name, FIX_GREY), 3 if name == "sd12k" else 2 if name in COLOURS else 1
        xy = [at(s, v) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=width)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.text((PANEL_W / 2, 8), title, fill="black", font=font(13), anchor="ma")
    draw.text((x0 + (x1 - x0) / 2, PANEL_H - 16), "training step (batches of 8)", fill="black", font=small, anchor="ma")
    draw.text((4, TOP - 16), y_label, fill="black", font=small)
    return im


def legend(width: int) -> Image.Image:
    im = Image.new("RGB", (width, 26), "white")
    draw, x = ImageDraw.Draw(im), 12
    for key, text in LEGEND.items():
        colour = COLOURS.get(key, FIX_GREY)
        draw.line([x, 13, x + 22, 13], fill=colour, width=3)
        draw.text((x + 28, 13), text, fill="black", font=font(12), anchor="lm")
        x += 40 + int(draw.textlength(text, font=font(12)))
    return im


def trend_picture(runs: dict[str, dict]) -> Image.Image:
    """Both panels side by side under one legend [26 + PANEL_H, 2 * PANEL_W]."""
    max_step = max(e["step"] for run in runs.values() for e in run["evals"])
    left = panel(series(runs, lambda e: e["logvar_median"]), "held-out log-variance median", "nats",
                 max_step, band=SD_RANGE)
    right = panel(series(runs, lambda e: e["psnr"]["256"]["mean"]), "held-out PSNR at 256 px", "dB", max_step)
    im = Image.new("RGB", (2 * PANEL_W, 26 + PANEL_H), "white")
    im.paste(legend(2 * PANEL_W), (0, 0))
    im.paste(left, (0, 26))
    im.paste(right, (PANEL_W, 26))
    return im


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, default=RECORDS, help="folder of NAME.train.json files")
    p.add_argument("--out", type=Path, required=True, help="the picture to write (.png)")
    args = p.parse_args(argv)
    runs = load(args.records)
    if not runs:
        print(f"--records {args.records}: no training records (NAME.train.json with evaluations) there", file=sys.stderr)
        return 2
    trend_picture(runs).save(args.out)
    print(f"wrote {args.out}: {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
