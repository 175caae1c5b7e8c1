"""The black-hole study's tables, from the training records kept in docs/study (`NAME.train.json`,
copied from each run's folder), so that every number in docs/black-hole-study.md can be regenerated.

    python bench/study_tables.py                     # every run at its last step, then each recipe over its seeds
    python bench/study_tables.py --steps roll-s0     # one run's evaluations, step by step

A run's name is RECIPE-sSEED (sd-s0, floor-s1, ...). "Lowest" and "peak" are over all of a run's
evaluations, not only the last: deep cells in this study came and went during training.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parents[1] / "docs" / "study"
RECIPE_ORDER = ("sd", "floor", "kl", "tanh", "noise", "pixnorm", "roll")


def load(folder: Path) -> dict[str, dict]:
    """NAME -> record, for every record with evaluations, the recipes in the study's order."""
    runs = {p.name.removesuffix(".train.json"): json.loads(p.read_text()) for p in folder.glob("*.train.json")}
    return {name: runs[name] for name in sorted(runs, key=_order) if runs[name].get("evals")}


def load_final_reach(folder: Path) -> dict[str, dict]:
    """NAME -> the final model's reach on every held-out photo (bench/study_reach.py), where measured."""
    path = folder / "final_reach.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _order(name: str) -> tuple:
    return (RECIPE_ORDER.index(recipe(name)) if recipe(name) in RECIPE_ORDER else len(RECIPE_ORDER), name)


def recipe(name: str) -> str:
    return name.rsplit("-s", 1)[0]


def verdict(e: dict) -> str:
    v = e["verdict"]
    if v.get("black_hole"):
        return f"**black hole in {v['images_with_collapse']}/{v['images']} probes**"
    if v.get("images_with_collapse"):
        return f"collapse in {v['images_with_collapse']}/{v['images']} probes only: content-triggered"
    return "no black hole found"


def lowest(evals: list[dict]) -> dict:
    return min(evals, key=lambda e: e["logvar_min"])


def peak(evals: list[dict]) -> float:
    return max(e["reach"]["worst_over_median"] for e in evals)


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def runs_table(runs: dict[str, dict]) -> str:
    rows = []
    for name, run in runs.items():
        evals, last = run["evals"], run["evals"][-1]
        low = lowest(evals)
        rows.append([name, last["step"], f"{last['psnr']['128']['mean']:.2f}", f"{last['psnr']['256']['mean']:.2f}",
                     f"{last['logvar_median']:.2f}", f"{last['logvar_min']:.2f}",
                     f"{low['logvar_min']:.2f} ({low['step']})", sum(e["clamp_floor_hits"] for e in evals),
                     f"{last['reach']['worst_over_median']:.0f} ({peak(evals):.0f})",
                     sum(bool(e["verdict"].get("black_hole")) for e in evals), verdict(last)])
    return markdown(["run", "step", "PSNR @128", "PSNR @256", "logvar median", "logvar min", "lowest (at step)",
                     "floor hits, all evals", "worst reach / median: last (peak)", "evals with a black hole",
                     "verdict at the last step"], rows)


def reach_table(runs: dict[str, dict], finals: dict[str, dict]) -> str:
    """Each run's final model on every held-out photo: the worst cell's reach over the median cell's."""
    measured = [n for n in runs if n in finals and finals[n]["step"] == runs[n]["evals"][-1]["step"]]
    if not measured:
        return ""
    photos = list(finals[measured[0]]["worst_over_median"])
    rows = []
    for name in measured:
        reach = finals[name]["worst_over_median"]
        rows.append([name, *(f"{reach[p]:.0f}" for p in photos), f"{statistics.median(reach.values()):.0f}",
                     f"{max(reach.values()):.0f}"])
    return markdown(["run (final model)", *photos, "median", "worst"], rows)


def by_recipe(runs: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """recipe -> {run name: record}, in the study's order."""
    groups: dict[str, dict[str, dict]] = {}
    for name, run in runs.items():
        groups.setdefault(recipe(name), {})[name] = run
    return groups


def recipes_table(runs: dict[str, dict], finals: dict[str, dict] | None = None) -> str:
    rows = []
    for name, named in by_recipe(runs).items():
        group = list(named.values())
        lasts = [r["evals"][-1] for r in group]
        rows.append([name, len(group), spread([e["psnr"]["256"]["mean"] for e in lasts], ".2f"),
                     spread([e["logvar_median"] for e in lasts], ".2f"),
                     spread([lowest(r["evals"])["logvar_min"] for r in group], ".1f"),
                     spread([peak(r["evals"]) for r in group], ".0f"),
                     sum(any(e["verdict"].get("black_hole") for e in r["evals"]) for r in group),
                     sum(bool(e["verdict"].get("black_hole")) for e in lasts), final_reach_cell(named, finals or {})])
    return markdown(["recipe", "seeds", "PSNR @256 at the end: mean (range)", "logvar median at the end",
                     "lowest logvar over training", "peak worst reach / median (chelsea)", "runs with a black hole at any eval",
                     "runs with one at the end", "final worst reach / median, 5 photos: median"], rows)


def final_reach_cell(named: dict[str, dict], finals: dict) -> str:
    """Over the recipe's seeds: each final model's median over the five held-out photos."""
    medians = [statistics.median(finals[n]["worst_over_median"].values()) for n, r in named.items()
               if n in finals and finals[n]["step"] == r["evals"][-1]["step"]]
    if not medians:
        return "-"
    return spread(medians, ".0f") + ("" if len(medians) == len(named) else f" ({len(medians)} of {len(named)} seeds)")


SD_UPPER = -17.0  # the SD VAE's log-variance lies at -17 to -23 nats, its hole at the -30 floor


def median_trend(run: dict) -> tuple[float, float]:
    """(nats per doubling of steps over all evaluations, nats per 1000 steps over the last three) of the
    held-out log-variance median, both by least squares."""
    evals = run["evals"]
    per_doubling = _slope([math.log2(e["step"]) for e in evals], [e["logvar_median"] for e in evals])
    tail = evals[-3:]
    return per_doubling, 1000 * _slope([e["step"] for e in tail], [e["logvar_median"] for e in tail])


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def trend_table(runs: dict[str, dict]) -> str:
    """Per recipe: how fast the posterior narrows with training, and the steps to SD's level if it kept on."""
    rows = []
    for name, named in by_recipe(runs).items():
        group = list(named.values())
        trends = [median_trend(r) for r in group]
        to_sd = [steps_to_sd_level(r, trend) for r, trend in zip(group, trends)]
        linear, doubling = ([s[k] for s in to_sd if s[k] is not None] for k in (0, 1))
        rows.append([name, len(group), spread([d for d, _ in trends], ".2f"), spread([t for _, t in trends], ".2f"),
                     step_spread(linear), step_spread(doubling)])
    return markdown(["recipe", "seeds", "logvar median: nats per doubling of steps", "nats per 1000 steps, last three evals",
                     f"steps to {SD_UPPER:g} nats, last rate kept (median)", "the same, rate per doubling kept"],
                    rows)


def steps_to_sd_level(run: dict, trend: tuple[float, float]) -> tuple[float | None, float | None]:
    """Steps until the median reaches SD_UPPER if (the last three's rate, the per-doubling rate) held; None where
    that rate does not fall. A run already past it gets where it crossed, for both: no forecast is needed."""
    crossed = crossing_step(run)
    if crossed is not None:
        return crossed, crossed
    (per_doubling, per_1000), last = trend, run["evals"][-1]
    step, gap = last["step"], SD_UPPER - last["logvar_median"]
    return (step + 1000 * gap / per_1000 if per_1000 < 0 else None,
            step * 2 ** (gap / per_doubling) if per_doubling < 0 else None)


def crossing_step(run: dict) -> float | None:
    """The step where the held-out median first fell past SD_UPPER, interpolated between evaluations; None if never."""
    points = [(e["step"], e["logvar_median"]) for e in run["evals"]]
    if points and points[0][1] <= SD_UPPER:
        return points[0][0]
    for (s0, m0), (s1, m1) in zip(points, points[1:]):
        if m1 <= SD_UPPER < m0:
            return s0 + (s1 - s0) * (m0 - SD_UPPER) / (m0 - m1)
    return None


def step_spread(steps: list[float]) -> str:
    """'median (min to max)' of step counts as 11k or 2.4M; '-' when the median does not fall."""
    def short(n: float) -> str:
        return f"{n / 1e3:.0f}k" if n < 1e6 else f"{n / 1e6:.1f}M" if n < 1e9 else "over 1G"
    if not steps:
        return "-"
    mid = short(statistics.median(steps))
    return mid if len(steps) == 1 else f"{mid} ({short(min(steps))} to {short(max(steps))})"


def spread(values: list[float], fmt: str) -> str:
    """'mean (min to max)' over seeds; the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def steps_table(run: dict) -> str:
    rows = [[e["step"], f"{e['psnr']['128']['mean']:.2f}", f"{e['psnr']['256']['mean']:.2f}", f"{e['logvar_median']:.2f}",
             f"{e['logvar_min']:.2f}", e["clamp_floor_hits"], f"{e['kl_per_element']:.2f}",
             f"{e['implied_scale_factor']:.3f}",
             f"{e['reach']['worst_over_median']:.0f} ({e['reach']['worst_cell']['y']}, {e['reach']['worst_cell']['x']})",
             verdict(e)] for e in run["evals"]]
    header = ["step", "PSNR @128", "PSNR @256", "logvar median", "logvar min", "clamp-floor hits", "KL / element",
              "scale factor", "worst reach / median (cell)", "verdict"]
    if all("reach_photos" in e for e in run["evals"]):  # runs from 2026-12-05 on: every held-out photo
        header.insert(-1, "reach, every held-out photo: median (worst)")
        for row, e in zip(rows, run["evals"]):
            values = e["reach_photos"].values()
            row.insert(-1, f"{statistics.median(values):.0f} ({max(values):.0f})")
    photos = run["evals"][-1]["psnr"]["256"]["per_image"]
    return (markdown(header, rows)
            + f"\n\nPer held-out photo at 256 px, step {run['evals'][-1]['step']}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in photos.items()) + " dB.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=Path, default=RECORDS, help="folder of NAME.train.json files")
    p.add_argument("--steps", metavar="RUN", help="print this run's evaluations step by step")
    a = p.parse_args(argv)
    runs = load(a.records)
    if not runs:
        print(f"no training records (*.train.json) in {a.records}", file=sys.stderr)
        return 2
    if a.steps:
        if a.steps not in runs:
            print(f"--steps {a.steps}: no such run in {a.records} (there: {', '.join(runs)})", file=sys.stderr)
            return 2
        print(steps_table(runs[a.steps]))
        return 0
    finals = load_final_reach(a.records)
    tables = [runs_table(runs), recipes_table(runs, finals), trend_table(runs), reach_table(runs, finals)]
    print("\n\n".join(t for t in tables if t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
