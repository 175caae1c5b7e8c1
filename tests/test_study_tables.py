"""The black-hole study's tables are regenerated from the training records kept in docs/study
(bench/study_tables.py): the numbers the study page shows are the records' numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "study_tables.py"


def tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_the_study_page_shows_exactly_the_tables_its_records_give():
    out = tables()
    assert out.returncode == 0, out.stderr
    page = (ROOT / "docs" / "black-hole-study.md").read_text()
    assert out.stdout.strip() in page, "docs/black-hole-study.md: rerun bench/study_tables.py and paste its tables"
    runs = sorted(p.name.removesuffix(".train.json") for p in (ROOT / "docs" / "study").glob("*.train.json"))
    assert all(f"| {name} |" in out.stdout for name in runs)  # every kept record has its row
    finals = json.loads((ROOT / "docs" / "study" / "final_reach.json").read_text())
    for name, final in finals.items():  # a final model's reach belongs to its run's last evaluation
        assert json.loads((ROOT / "docs" / "study" / f"{name}.train.json").read_text())["evals"][-1]["step"] == final["step"]
        assert f"| {name} | " + " | ".join(f"{v:.0f}" for v in final["worst_over_median"].values()) in out.stdout
    recipes = out.stdout.strip().split("\n\n")[1]
    assert recipes.startswith("| recipe |") and recipes in (ROOT / "README.md").read_text(), "README: paste the recipes table"


def test_a_run_step_by_step_and_clear_refusals(tmp_path):
    record = {"evals": [{"step": s, "psnr": {"128": {"mean": 15.0 + s / 400}, "256": {"mean": 16.0 + s / 400,
                                                "per_image": {"chelsea": 17.0}}},
                         "logvar_median": -2.0, "logvar_min": -31.0 + s / 100, "clamp_floor_hits": int(s == 400),
                         "kl_per_element": 4.0, "implied_scale_factor": 0.4,
                         "reach": {"worst_over_median": 10.0 * s / 400, "worst_cell": {"y": 1, "x": 2}},
                         "verdict": {"black_hole": s == 400, "images_with_collapse": 6 if s == 400 else 0, "images": 10}}
                        for s in (400, 800)], "seconds": 60}
    (tmp_path / "kl-s3.train.json").write_text(json.dumps(record))
    steps = tables("--records", str(tmp_path), "--steps", "kl-s3")
    assert steps.returncode == 0, steps.stderr
    assert "| 400 | 16.00 | 17.00 | -2.00 | -27.00 | 1 | 4.00 | 0.400 | 10 (1, 2) | **black hole in 6/10 probes** |" in steps.stdout
    summary = tables("--records", str(tmp_path)).stdout
    assert "| kl-s3 | 800 | 17.00 | 18.00 | -2.00 | -23.00 | -27.00 (400) | 1 | 20 (20) | 1 | no black hole found |" in summary
    for e in record["evals"]:  # a newer record: reach on every held-out photo too
        e["reach_photos"] = {"chelsea": e["reach"]["worst_over_median"], "coffee": 3.0, "rocket": 100.0}
    (tmp_path / "kl-s3.train.json").write_text(json.dumps(record))
    steps = tables("--records", str(tmp_path), "--steps", "kl-s3").stdout
    assert "| 10 (1, 2) | 10 (100) | **black hole in 6/10 probes** |" in steps and "20 (100)" in steps
    missing = tables("--records", str(tmp_path), "--steps", "sd-s9")
    assert missing.returncode == 2 and "sd-s9" in missing.stderr and "kl-s3" in missing.stderr
    empty = tables("--records", str(tmp_path / "none"))
    assert empty.returncode == 2 and "no training records" in empty.stderr


def test_a_run_past_sds_level_is_given_where_it_crossed_not_a_forecast(tmp_path):
    medians = {2000: -2.0, 4000: -18.0, 8000: -24.0}  # crosses -17 at 3875; its last rate would say about 6k
    record = {"evals": [{"step": s, "psnr": {"128": {"mean": 20.0}, "256": {"mean": 21.0}}, "logvar_median": m,
                         "logvar_min": m - 5, "clamp_floor_hits": 0, "kl_per_element": 4.0, "implied_scale_factor": 0.4,
                         "reach": {"worst_over_median": 10.0, "worst_cell": {"y": 1, "x": 2}},
                         "verdict": {"black_hole": False, "images_with_collapse": 0, "images": 10}}
                        for s, m in medians.items()], "seconds": 60}
    (tmp_path / "sd12k-s9.train.json").write_text(json.dumps(record))
    out = tables("--records", str(tmp_path))
    assert out.returncode == 0, out.stderr
    trend = next(line for line in out.stdout.strip().split("\n\n")[2].splitlines() if line.startswith("| sd12k |"))
    assert trend.endswith("| 4k | 4k |"), trend


def test_the_trend_picture_draws_every_run_from_its_records(tmp_path):
    script = ROOT / "bench" / "study_trend.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "trend.png")], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    runs = list((ROOT / "docs" / "study").glob("*.train.json"))
    assert f"{len(runs)} runs" in out.stdout
    with Image.open(tmp_path / "trend.png") as im:
        assert im.size == (1040, 366)
        red = int((np.asarray(im.convert("RGB")) == (214, 39, 40)).all(axis=-1).sum())  # the 12k-step run
        assert red > 500 if (ROOT / "docs" / "study" / "sd12k-s0.train.json").exists() else red == 0
    empty = subprocess.run([sys.executable, str(script), "--records", str(tmp_path), "--out", str(tmp_path / "x.png")],
                           capture_output=True, text=True, cwd=ROOT)
    assert empty.returncode == 2 and "no training records" in empty.stderr and not (tmp_path / "x.png").exists()


def test_the_study_script_trains_its_recipes_in_parallel_processes_and_tables_them(tmp_path):
    script = ROOT / "bench" / "black_hole_study.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--recipes", "sd", "tanh", "--seeds", "3",
                          "--steps", "2", "--eval-every", "1000", "--jobs", "2", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "== sd-s3: done" in out.stderr and "== tanh-s3: done" in out.stderr
    assert "| sd-s3 | 2 |" in out.stdout and "| tanh-s3 | 2 |" in out.stdout
    records = json.loads((tmp_path / "study.json").read_text())
    assert records["tanh-s3"]["settings"]["latent_bound"] == 3.0 and records["sd-s3"]["settings"]["latent_bound"] == 0
    assert all(r["settings"]["seed"] == 3 and r["step"] == 2 for r in records.values())
    assert "training" in (tmp_path / "tanh-s3.log").read_text()  # each process's own progress
