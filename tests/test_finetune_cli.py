"""`python -m vae_fix finetune` as a user runs it (#17): the fixed file is written beside a report,
the input is untouched, the decoder is the input's, and two `torchrun` processes (gloo, CPU) train
what one process trains."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from run_cli import ROOT, run_cli, strict_json
from vae_fix.builders.planted import demo_image, planted_vae
from vae_fix.images import save_png
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config

ARGS = ["--steps", "10", "--batch", "4", "--eval-size", "128", "--mean-weight", "200", "--device", "cpu"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(a small SD-layout VAE file with a planted hole, stored in fp16; a folder with its image)."""
    folder = tmp_path_factory.mktemp("finetune")
    cfg = preset_config("sd", small=True)
    image = demo_image(128, 128, (9, 11), cfg.downscale)
    model = planted_vae(cfg, image=image, cell=(9, 11), seed=0).model.half()
    (folder / "images").mkdir()
    save_png(image[0], folder / "images" / "demo.png")
    return save_vae(model, folder / "planted.safetensors"), folder / "images"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_writes_the_fixed_vae_and_its_report_and_leaves_the_input_alone(planted, tmp_path):
    vae, images = planted
    before = _digest(vae)
    out = tmp_path / "fixed.safetensors"
    done = run_cli("finetune", "--vae", vae, "--images", images, "--out", out, *ARGS, "--steps", "40")
    assert done.returncode == 0, done.stderr
    assert "before: log-variance collapse at (9, 11)" in done.stdout and "after:  no black hole found" in done.stdout
    assert "step 40/40" in done.stderr and _digest(vae) == before

    report = tmp_path / "fixed_finetune_report"
    result = strict_json(report / "finetune.json")
    assert result["before"]["anomalies"] >= 1 and result["after"]["anomalies"] == 0
    assert {"verdict_before.png", "verdict_after.png", "summary.txt"} <= {p.name for p in report.iterdir()}
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # readable like any written file

    original, fixed = load_vae(vae), load_vae(out)  # strict: every key
    assert fixed.config == original.config
    for key, value in original.file.state_dict.items():
        assert fixed.file.state_dict[key].dtype == value.dtype == torch.float16  # the input's dtype
        if key.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(fixed.file.state_dict[key], value), key
    with safe_open(str(out), "pt") as f:
        note = json.loads(f.metadata()["vae_fix.finetune"])
    assert note["after"].startswith("no black hole found") and note["drift"]["mean_rms_over_std"] < 0.2


def test_finetune_refuses_to_overwrite_and_names_the_flag(planted):
    vae, images = planted
    before = _digest(vae)
    done = run_cli("finetune", "--vae", vae, "--images", images, "--out", vae, *ARGS)
    assert done.returncode == 2 and "--out" in done.stderr and "exists" in done.stderr
    assert _digest(vae) == before
    wrong = run_cli("finetune", "--vae", vae, "--images", images, "--out", vae.with_suffix(".pt"), *ARGS)
    assert wrong.returncode == 2 and "does not end in .safetensors" in wrong.stderr
    (empty := vae.parent / "empty").mkdir(exist_ok=True)
    nothing = run_cli("finetune", "--vae", vae, "--images", empty, "--out", vae.with_name("x.safetensors"), *ARGS)
    assert nothing.returncode == 2 and "--images" in nothing.stderr and "at least 128 px" in nothing.stderr
    steps = run_cli("finetune", "--vae", vae, "--images", images, "--out", vae.with_name("x.safetensors"), "--steps", "0")
    assert steps.returncode == 2 and "--steps" in steps.stderr and "at least 1" in steps.stderr
    assert not vae.with_name("x.safetensors").exists() and _digest(vae) == before


def test_two_torchrun_processes_train_what_one_process_trains(planted, tmp_path):
    vae, images = planted
    one = run_cli("finetune", "--vae", vae, "--images", images, "--out", tmp_path / "one.safetensors", *ARGS, "--json")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "vae_fix", "finetune", "--vae", str(vae),
                          "--images", str(images), "--out", str(tmp_path / "two.safetensors"), *ARGS, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads(r.stdout) for r in (one, two))  # one JSON document: rank 0 alone reports
    for key in ("loss", "mean", "keep", "lift"):  # the full batch's loss, on both: same gradients, same steps
        assert b["history"][0][key] == pytest.approx(a["history"][0][key], rel=2e-3, abs=1e-6), key
    assert b["after"]["logvar_min"] == pytest.approx(a["after"]["logvar_min"], abs=1.0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == ["one.safetensors", "two.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left by any rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
