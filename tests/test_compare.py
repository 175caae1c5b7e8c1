import json

import pytest
import torch
from PIL import Image

from vae_fix.cli import main
from vae_fix.images import save_png
from vae_fix.loader import save_vae

from run_cli import run_cli
from vae_fix.codec import model_codec
from vae_fix.compare import compare_vaes
from vae_fix.errors import InputError
from vae_fix.model import preset_config
from vae_fix.builders.planted import planted_vae, smooth_vae

CELL = (9, 21)


@pytest.fixture(scope="module")
def pair():
    cfg = preset_config("sd", small=True)
    holed, smooth = planted_vae(cfg, cell=CELL), smooth_vae(cfg)
    return holed, smooth


def side(name, planted):
    return model_codec(planted.model, name)


def test_compare_a_holed_and_a_smooth_vae(pair):
    holed, smooth = pair
    images = torch.cat([holed.image, holed.image.flip(-1)])
    seen = []
    result = compare_vaes(side("holed", holed), side("smooth", smooth), images, window=3,
                          progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (8, 8)
    rep = result.report
    json.dumps(rep, allow_nan=False)
    assert [v["name"] for v in rep["vaes"]] == ["holed", "smooth"]
    first = rep["images"][0]
    holed_entry, smooth_entry = first["holed"], first["smooth"]
    assert (holed_entry["anomalies"][0]["y"], holed_entry["anomalies"][0]["x"]) == CELL
    assert holed_entry["anomalies"][0]["clamp_floor_hit"]
    assert smooth_entry["anomaly_count"] == 0
    assert holed_entry["logvar_raw_min"] < -40 < smooth_entry["logvar_raw_min"]
    assert holed_entry["kl_total"] > 0 and smooth_entry["kl_total"] > 0
    for e in (holed_entry, smooth_entry):
        assert isinstance(e["psnr_db"], float) and "max" in e["worst_reach"]
    assert first["b_minus_a"]["anomaly_count"] == -holed_entry["anomaly_count"]
    assert first["b_minus_a"]["kl_total"] == pytest.approx(smooth_entry["kl_total"] - holed_entry["kl_total"])
    assert rep["summary"]["holed"]["anomalies"] >= 1 and rep["summary"]["smooth"]["anomalies"] == 0
    verdicts = rep["verdicts"]  # the marker moves with the flip: a collapse in both images, at two cells
    assert verdicts["holed"]["black_hole"] is True and verdicts["holed"]["images_with_collapse"] == 2
    assert {(c["y"], c["x"]) for c in verdicts["holed"]["cells"]} == {CELL, (CELL[0], 31 - CELL[1])}
    assert verdicts["smooth"]["status"] == "none" and result.summary().startswith("holed: black hole in 2/2")
    pic = result.rows[0]
    assert len(result.rows) == 2
    assert pic.shape[0] == 3 and pic.shape[2] > 5 * images.shape[-1] and pic.shape[1] > 2 * images.shape[-2]
    assert [[r.shape for r in recon] for recon in result.reconstructions] == [[images.shape[1:]] * 2] * 2


def test_same_vae_twice_has_zero_difference(pair):
    holed, _ = pair
    result = compare_vaes(side("a", holed), side("b", holed), holed.image, reach=False)
    diff = result.report["images"][0]["b_minus_a"]
    assert diff == {"kl_total": 0.0, "anomaly_count": 0, "psnr_db": 0.0}
    assert "worst_reach" not in result.report["images"][0]["a"]


def test_encoder_only_side_and_same_names(pair):
    holed, smooth = pair
    from dataclasses import replace
    enc_only = replace(side("encoder-only", smooth), decode=None, decode_grad=None)
    result = compare_vaes(side("holed", holed), enc_only, holed.image, reach=False)
    assert result.reconstructions[1] is None and "psnr_db" not in result.report["images"][0]["encoder-only"]
    with pytest.raises(InputError, match="both VAEs are called"):
        compare_vaes(side("x", holed), side("x", smooth), holed.image)


# ---------------------------------------------------------------- CLI

def test_cli_compare(pair, tmp_path, capsys):
    holed, smooth = pair
    a, b = save_vae(holed.model, tmp_path / "holed.safetensors"), save_vae(smooth.model, tmp_path / "smooth.safetensors")
    image = save_png(holed.image[0], tmp_path / "demo.png")
    small = save_png(holed.image[0, :, :64, :96], tmp_path / "crop.png")  # another size
    out = tmp_path / "out"
    assert main(["compare", "--vae-a", str(a), "--vae-b", str(b), "--image", str(image), "--image", str(small),
                 "--out", str(out), "--no-reach"]) == 0
    rep = json.loads((out / "compare.json").read_text())
    assert [v["name"] for v in rep["vaes"]] == ["holed.safetensors", "smooth.safetensors"]
    assert [row["index"] for row in rep["images"]] == [0, 1]
    assert rep["images"][0]["path"] == str(image) and rep["images"][1]["holed.safetensors"]["latent_size"] == [16, 24]
    assert rep["summary"]["holed.safetensors"]["anomalies"] >= 1 and rep["summary"]["smooth.safetensors"]["anomalies"] == 0
    assert sorted(rep["files"]) == ["compare_0", "compare_1"]
    for f in rep["files"].values():
        with Image.open(f) as im:
            assert im.size[0] > 5 * 96
    assert "holed.safetensors:" in capsys.readouterr().out
    same = tmp_path / "same"
    assert main(["compare", "--vae-a", str(a), "--vae-b", str(a), "--image", str(small), "--out", str(same),
                 "--no-reach"]) == 0
    assert [v["name"] for v in json.loads((same / "compare.json").read_text())["vaes"]] == \
        ["A holed.safetensors", "B holed.safetensors"]


def test_cli_compare_bad_input(tmp_path, capsys):
    assert main(["compare", "--vae-a", "a.safetensors", "--vae-b", "b.safetensors", "--image",
                 str(tmp_path / "none.png"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    save_png(torch.rand(3, 32, 32), tmp_path / "x.png")
    assert main(["compare", "--vae-a", str(tmp_path / "missing.safetensors"), "--vae-b", "b", "--image",
                 str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 2
    assert "Cannot load VAE" in capsys.readouterr().err
    r = run_cli("compare", "--help")
    assert r.returncode == 0 and "--vae-b" in r.stdout


def test_a_negative_window_is_refused_not_skipped(tmp_path, capsys):
    from vae_fix.model import random_vae

    vae_a, vae_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_vae(random_vae(preset_config("sd", small=True), seed=0), vae_a)
    save_vae(random_vae(preset_config("sd", small=True), seed=1), vae_b)
    image = tmp_path / "img.png"
    save_png(torch.rand(3, 32, 32), image)
    code = main(["compare", "--vae-a", str(vae_a), "--vae-b", str(vae_b), "--image", str(image),
                 "--out", str(tmp_path / "out"), "--window", "-2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Invalid --window: -2" in err and "a whole number of cells >= 0" in err
    assert not (tmp_path / "out").exists(), "nothing written for a refused run"
