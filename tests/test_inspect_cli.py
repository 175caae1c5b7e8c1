import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from vae_fix.cli import main
from vae_fix.images import load_image, save_png
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config
from vae_fix.builders.planted import planted_vae
from vae_fix.codec import model_codec
from vae_fix.posterior import read_posterior

from run_cli import ROOT, run_cli, strict_json

CELL = (9, 21)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small SD-layout VAE with a planted hole, its 128x128 demo PNG and an odd-sized RGBA PNG."""
    d = tmp_path_factory.mktemp("inspect")
    planted = planted_vae(preset_config("sd", small=True), cell=CELL)
    vae = save_vae(planted.model, d / "planted.safetensors")
    demo = save_png(planted.image[0], d / "demo.png")
    rgba = np.random.default_rng(0).integers(0, 256, (37, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "odd.png")
    return {"vae": vae, "demo": demo, "odd": d / "odd.png", "dir": d}


def test_inspect_finds_the_planted_hole_and_writes_report_and_pictures(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", "--vae", str(files["vae"]), "--image", str(files["demo"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cell (y=9, x=21) logvar_low" in printed and "clamp floor hit" in printed
    report = strict_json(out / "report.json")
    assert report["schema"] == 2 and isinstance(report["version"], str)
    v = report["verdict"]
    assert v["black_hole"] is False and v["status"] == "single_image" and "cannot confirm" in v["line"]
    assert [(c["y"], c["x"], c["images"], c["of"]) for c in v["cells"]] == [(*CELL, 1, 1)]
    vae = report["vae"]
    assert vae["path"] == str(files["vae"]) and vae["layout"] == "compvis" and vae["latent_channels"] == 4
    (entry,) = report["images"]
    assert entry["path"] == str(files["demo"]) and entry["latent_size"] == [32, 32]
    assert all(isinstance(entry["logvar_raw"][k], float) for k in ("min", "median", "max"))
    assert entry["logvar_raw"]["min"] < -40 and isinstance(entry["kl_total"], float)
    top = entry["anomalies"][0]
    assert (top["y"], top["x"]) == CELL and top["clamp_floor_hit"] is True
    assert isinstance(top["score"], float) and top["score"] > 15 and top["logvar_raw_min"] < -40
    assert [(a["y"], a["x"]) for a in entry["anomalies"]] == [CELL]
    assert list(CELL) in entry["clamp_floor"]["list"]
    assert entry["size"]["changed"] is False and entry["tiling"] is None
    assert entry["thresholds"]["threshold"] == 4.0 and report["settings"]["size_policy"] == "crop"
    assert (out / "summary.txt").read_text().startswith("Verdict: log-variance collapse at (9, 21)")


def test_without_images_the_probe_set_judges_the_vae(tmp_path):
    """The health check: a hole at a fixed cell on every image is a black hole, found in every probe."""
    from vae_fix.builders.planted import corner_hole_vae
    vae = save_vae(corner_hole_vae(preset_config("sd", small=True)).model, tmp_path / "corner.safetensors")
    out = tmp_path / "out"
    assert main(["inspect", "--vae", str(vae), "--out", str(out), "--quiet"]) == 0
    report = strict_json(out / "report.json")
    v, n = report["verdict"], len(report["images"])
    assert n == 20 and v["black_hole"] is True and v["status"] == "black_hole"
    assert [(c["y"], c["x"], c["images"], c["of"]) for c in v["cells"]] == [(0, 0, n, n)]
    assert v["line"].startswith(f"black hole at (0, 0) in {n}/{n} probes")
    assert {e["path"].split("@")[1] for e in report["images"]} == {"128", "256"}
    with Image.open(out / "verdict.png") as im:
        assert im.width > 1000 and im.height > 256


def test_pictures_are_real_pngs_of_the_expected_sizes(files, tmp_path):
    out = tmp_path / "out"
    assert main(["inspect", "--vae", str(files["vae"]), "--image", str(files["demo"]), "--out", str(out)]) == 0
    names = strict_json(out / "report.json")["images"][0]["files"]
    assert set(names) == {"logvar_grid", "overlay", "kl"} | {f"logvar_c{c}" for c in range(4)}
    sizes = {}
    for name, path in names.items():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            im.verify()
            sizes[name] = im.size
    w, h = sizes["overlay"]
    assert h == 384 and w > 384  # the 128x128 image zoomed 3x, colour bar beside it
    for c in range(4):
        w, h = sizes[f"logvar_c{c}"]
        assert h > 192 and w > 192  # 32x32 cells at 6 px plus caption and colour bar
    w, h = sizes["logvar_grid"]
    assert w > 2 * 128 and h > 2 * 128


def test_a_batch_of_different_sizes_and_saved_moments(files, tmp_path):
    out, moments = tmp_path / "out", tmp_path / "m" / "moments.safetensors"
    rc = main(["inspect", "--vae", str(files["vae"]), "--image", str(files["demo"]), "--image", str(files["odd"]),
               "--out", str(out), "--save-moments", str(moments)])
    assert rc == 0
    report = strict_json(out / "report.json")
    demo, odd = report["images"]
    assert demo["latent_size"] == [32, 32] and odd["latent_size"] == [9, 12]  # 37x50 cropped to 36x48
    assert odd["size"]["changed"] and odd["size"]["processed"] == [36, 48] and "not a multiple" in odd["size"]["note"]
    assert report["summary"]["resized_images"] == 1
    # different latent sizes: one file per image, in order
    assert report["moments_files"] == [str(moments.with_name("moments-1.safetensors")),
                                       str(moments.with_name("moments-2.safetensors"))]
    model = load_vae(files["vae"]).model
    for path, image in zip(report["moments_files"], (files["demo"], files["odd"])):
        saved = load_file(path)
        post = read_posterior(model_codec(model), load_image(image))
        assert torch.equal(saved["mean"], post.mean) and torch.equal(saved["logvar"], post.logvar_raw)
        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["images"]) == [str(image)]


def test_images_of_one_size_share_one_moments_file_and_pad_policy(files, tmp_path):
    moments = tmp_path / "moments.safetensors"
    rc = main(["inspect", "--vae", str(files["vae"]), "--image", str(files["odd"]), "--image", str(files["odd"]),
               "--out", str(tmp_path / "out"), "--save-moments", str(moments), "--size-policy", "pad"])
    assert rc == 0
    saved = load_file(moments)
    assert saved["mean"].shape == saved["logvar"].shape == (2, 4, 10, 13)  # 37x50 padded to 40x52
    report = strict_json(tmp_path / "out" / "report.json")
    assert [e["size"]["padding"] for e in report["images"]] == [[3, 2], [3, 2]]
    files_written = [Path(f).name for e in report["images"] for f in e["files"].values()]
    assert len(set(files_written)) == len(files_written)  # same stem twice: numbered, nothing overwritten


@pytest.mark.parametrize("make_args,fragment", [
    (lambda f, t: ["--image", str(t / "missing.png")], "no such file"),
    (lambda f, t: ["--image", str(f["demo"]), "--vae-override", str(t / "junk.safetensors")], "Cannot load VAE"),
    (lambda f, t: ["--image", str(f["demo"]), "--save-moments", str(t / "m.pt")], ".safetensors"),
    (lambda f, t: ["--image", str(f["demo"]), "--tile", "13"], "tile"),
    (lambda f, t: ["--image", str(f["demo"]), "--threshold", "-1"], "threshold"),
    (lambda f, t: ["--image", str(f["demo"]), "--cmap", "jet"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_paragraph_and_no_traceback(files, tmp_path, make_args, fragment):
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    args = make_args(files, tmp_path)
    vae = str(files["vae"])
    if "--vae-override" in args:
        i = args.index("--vae-override")
        vae = args[i + 1]
        del args[i:i + 2]
    proc = run_cli("inspect", "--vae", vae, "--out", tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_out_that_is_a_file_is_refused(files, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    proc = run_cli("inspect", "--vae", files["vae"], "--image", files["demo"], "--out", target)
    assert proc.returncode == 2 and "existing file" in proc.stderr and target.read_text() == "x"


def test_kl_per_cell_is_the_formula_on_the_saved_moments(files, tmp_path):
    """KL per cell = 0.5 * sum_c (mu^2 + exp(lv) - 1 - lv), lv the raw log-variance clamped to -30..20."""
    out, moments = tmp_path / "out", tmp_path / "moments.safetensors"
    assert main(["inspect", "--vae", str(files["vae"]), "--image", str(files["demo"]), "--out", str(out),
                 "--save-moments", str(moments)]) == 0
    saved = load_file(moments)
    mu, lv = saved["mean"][0].double(), saved["logvar"][0].double().clamp(-30, 20)
    kl = 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(dim=0)  # [h, w]
    entry = strict_json(out / "report.json")["images"][0]
    cell = entry["kl_per_cell"]
    assert cell["min"] == pytest.approx(float(kl.min()), rel=1e-4)
    assert cell["max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert cell["mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert cell["median"] == pytest.approx(float(kl.flatten().median()), rel=1e-4)
    assert cell["max_at"] == list(divmod(int(kl.flatten().argmax()), kl.shape[1])) == list(CELL)  # the hole
    assert entry["kl_total"] == pytest.approx(float(kl.sum()), rel=1e-4)


def test_help_works():
    proc = run_cli("inspect", "--help")
    assert proc.returncode == 0 and "--save-moments" in proc.stdout and "--size-policy" in proc.stdout


def test_report_of_an_in_memory_batch_is_strict_json_even_with_nan():
    from vae_fix.anomaly import find_anomalies
    from vae_fix.posterior import SizeHandling, posterior_from_moments
    from vae_fix.report import build_report, image_entry, summary_text

    moments = torch.cat([torch.zeros(1, 4, 8, 8), torch.full((1, 4, 8, 8), -20.0)], dim=1)
    moments[0, 5, 2, 2] = float("nan")  # an overflowed half-precision model does this
    moments[0, 4:, 6, 1] = -60.0
    post = posterior_from_moments(moments, SizeHandling("crop", 8, (64, 64), (64, 64)))
    entry = image_entry(None, post, 0, find_anomalies(post))
    report = build_report({"path": "in-memory", "layout": "compvis", "latent_channels": 4}, [entry])
    text = json.dumps(report, allow_nan=False)  # raises on NaN / inf
    back = json.loads(text)["images"][0]
    assert back["path"] is None and back["anomalies"][0]["y"] == 6 and back["anomalies"][0]["x"] == 1
    assert any("not finite" in n for n in back["notes"])
    assert back["clamp_floor"]["cells"] == 1 and back["logvar_raw"]["outside_clamp"] == 4
    summary = summary_text(report)
    assert "image 0" in summary and "cell (y=6, x=1)" in summary and "1 clamp-floor cell" in summary


def test_without_torch_the_cli_names_the_install_command(tmp_path):
    import subprocess
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # a Python with none of the engine's dependencies
    python = tmp_path / "bare" / "bin" / "python"
    r = subprocess.run([str(python), "-m", "vae_fix", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "VAE Fix needs" in r.stderr and "pip install" in r.stderr
