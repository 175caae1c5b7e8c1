"""`python -m vae_fix demo`, the README's main job: the VAEs trained here, inspected on the built-in
probes and measured on photos they never saw, no file over 50 MB (its time: bench/bench_demo.py); and the
planted demo behind --planted, where the detector must find the hole exactly where it was put."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from run_cli import run_cli, strict_json
from vae_fix.demo import shipped_models


def test_demo_inspects_the_shipped_trained_vaes(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out)
    assert proc.returncode == 0, proc.stderr
    demo = strict_json(out / "demo.json")
    assert [m["name"] for m in demo["models"]] == [p.stem for p in shipped_models()] != []
    for m in demo["models"]:
        report = strict_json(out / m["name"] / "report.json")  # the Health Check on the 20 probes
        assert len(report["images"]) == 20 and report["verdict"]["status"] == m["status"]
        assert f"health check: {m['verdict']}" in proc.stdout and m["training"] != "training not recorded"
        assert m["unseen"]["psnr"]["256"]["mean"] > 20 and m["megabytes"] < 10
        with Image.open(out / f"{m['name']}_reconstructions.png") as im:  # 3 photos + 3 reconstructions
            assert im.size == (4 * 256 + 3 * 6, 256)
    assert len(demo["models"]) < 2 or (out / "compare_0.png").is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 50e6 and not [p for p in files if p.suffix == ".safetensors"]
    assert "done in " in proc.stdout  # its time against the one-minute budget: bench/bench_demo.py
    assert json.loads((out / "demo.json").read_text())["files"]


def test_demo_help_names_both_demos():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0 and "--out" in proc.stdout and "--planted" in proc.stdout


def test_planted_demo_small_builds_inspects_and_finds_its_hole(tmp_path):
    proc = run_cli("demo", "--planted", "--out", tmp_path / "demo", "--small")
    assert proc.returncode == 0, proc.stderr
    assert "found exactly there" in proc.stdout
    report = strict_json(tmp_path / "demo" / "inspect" / "report.json")
    assert [(a["y"], a["x"]) for a in report["images"][0]["anomalies"]] == [(9, 21)]
    assert (tmp_path / "demo" / "demo_vae.safetensors").is_file() and (tmp_path / "demo" / "demo.png").is_file()


@pytest.mark.slow
def test_planted_demo_full_size_finds_its_hole(tmp_path):
    proc = run_cli("demo", "--planted", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    report = strict_json(tmp_path / "demo" / "inspect" / "report.json")
    assert report["vae"]["config"]["base_channels"] == 128 and report["vae"]["config"]["channel_mult"] == [1, 2, 4, 4]
    assert [(a["y"], a["x"]) for a in report["images"][0]["anomalies"]] == [(9, 21)]
