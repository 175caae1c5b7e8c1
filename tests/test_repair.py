import json

import pytest
import torch

from vae_fix.cli import main
from vae_fix.latent_io import read_latent, write_latent
from vae_fix.images import save_png
from vae_fix.loader import save_vae

from vae_fix.anomaly import find_anomalies
from vae_fix.errors import InputError
from vae_fix.model import preset_config, random_vae
from vae_fix.builders.planted import planted_vae
from vae_fix.posterior import read_posterior
from run_cli import run_cli
from vae_fix.codec import model_codec
from vae_fix.repair import anomaly_mask, latent_outliers, neutralise, repair, repair_picture

SPIKES = [((5, 5), 40.0), ((15, 16), -25.0)]


def spiked(seed=0, b=1, h=24, w=24):
    z = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))
    for (y, x), s in SPIKES:
        z[0, :, y, x] = s
    return z


def test_latent_outliers_find_spikes_only():
    z = spiked(b=2)
    flagged, score = latent_outliers(z)
    assert sorted(map(tuple, torch.nonzero(flagged[0]).tolist())) == sorted(c for c, _ in SPIKES)
    assert not flagged[1].any(), "a plain normal latent has no outliers"
    assert float(score[0, 5, 5]) > float(score[0, 15, 16]) > 8


def test_neutralise_single_cells_and_groups():
    z = spiked()
    snapshot = z.clone()
    mask = torch.zeros(1, 24, 24, dtype=torch.bool)
    mask[0, 5, 5] = True
    mask[0, 10:12, 10:12] = True  # a 2x2 group: filled from the outside in
    z[0, :, 10:12, 10:12] = 30.0
    snapshot = z.clone()
    fixed = neutralise(z, mask)
    assert torch.equal(z, snapshot), "input modified"
    neighbours = torch.cat([z[0, :, 4, 4:7], z[0, :, 6, 4:7], z[0, :, 5, [4, 6]]], dim=1)
    torch.testing.assert_close(fixed[0, :, 5, 5], neighbours.median(dim=1).values)
    assert fixed[0, :, 10:12, 10:12].abs().max() < 5
    untouched = ~mask[0]
    torch.testing.assert_close(fixed[0][:, untouched], z[0][:, untouched])
    everything = neutralise(z, torch.ones(24, 24, dtype=torch.bool))
    torch.testing.assert_close(everything, z)


def test_repair_removes_the_reach_of_spikes():
    vae = random_vae(preset_config("sd", small=True), seed=1)
    z = spiked()
    result = repair(model_codec(vae), z, window=2)
    rep = result.report
    json.dumps(rep, allow_nan=False)
    (entry,) = rep["images"]
    assert entry["repaired_cells"] == 2 and entry["cells"][0] == [5, 5]
    before_cells = {(r["y"], r["x"]): r for r in entry["cell_reach_before"]}
    assert before_cells[(5, 5)]["mean_far"] > 0
    before, after = entry["fast_reach_before"], entry["fast_reach_after"]
    assert (before["top_cells"][0]["y"], before["top_cells"][0]["x"]) in before_cells
    assert after["max"] < before["max"] / 5, (before, after)
    change = entry["image_change"]
    assert change["mean_abs"] > 0 and change["far_mean_abs"] < change["mean_abs"]
    assert result.latent.shape == z.shape and result.after.shape == result.before.shape
    assert 0 <= float(result.after.min()) and float(result.after.max()) <= 1
    pic = repair_picture(result)
    assert pic.shape[0] == 3 and pic.shape[2] > 3 * result.before.shape[-1]


def test_repair_from_the_posterior_of_a_planted_hole():
    planted = planted_vae(preset_config("sd", small=True), cell=(9, 21))
    post = read_posterior(planted.codec, planted.image)
    found = find_anomalies(post, 0)
    mask = anomaly_mask(found, 1, *post.latent_size)
    assert mask[0, 9, 21]
    result = repair(planted.codec, post.mean, image=planted.image, window=3, fast_map=False)
    assert torch.equal(result.mask, mask), "the engine chooses the cells the detector finds"
    assert result.report["source"] == "posterior" and result.report["repaired_cells"] == int(mask.sum())
    assert not torch.equal(result.latent[0, :, 9, 21], post.mean[0, :, 9, 21])


def test_progress_and_bad_mask():
    vae = random_vae(preset_config("sd", small=True), seed=1)
    z = spiked()
    seen = []
    repair(model_codec(vae), z, window=2, fast_map=False, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    with pytest.raises(InputError, match=r"mask of shape \[3, 3\]"):
        neutralise(z, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="Invalid source: 'posterior anomalies' needs the image"):
        repair(model_codec(vae), z, source="posterior")


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("repair_cli")
    planted = planted_vae(preset_config("sd", small=True), cell=(9, 21))
    return {"planted": save_vae(planted.model, d / "planted.safetensors"),
            "image": save_png(planted.image[0], d / "demo.png"),
            "random": save_vae(random_vae(preset_config("sd", small=True), seed=1), d / "random.safetensors"),
            "latent": write_latent(spiked(), d / "spiked.latent")}


def test_cli_repair_from_an_image(cli_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["repair", "--vae", str(cli_files["planted"]), "--image", str(cli_files["image"]),
                 "--out", str(out), "--no-fast-map"]) == 0
    rep = json.loads((out / "repair.json").read_text())
    assert rep["source"] == "posterior" and [9, 21] in rep["images"][0]["cells"]
    fixed = read_latent(out / "repaired.latent")
    assert fixed.shape == (1, 4, 32, 32)
    assert (out / "repair_0.png").is_file() and "cells repaired" in capsys.readouterr().out


def test_cli_repair_from_a_latent(cli_files, tmp_path):
    out = tmp_path / "out"
    assert main(["repair", "--vae", str(cli_files["random"]), "--latent", str(cli_files["latent"]),
                 "--out", str(out), "--window", "2"]) == 0
    rep = json.loads((out / "repair.json").read_text())
    assert rep["source"] == "latent" and sorted(map(tuple, rep["images"][0]["cells"])) == sorted(c for c, _ in SPIKES)
    fixed = read_latent(out / "repaired.latent")
    assert fixed.abs().max() < 10 and rep["images"][0]["fast_reach_after"]["max"] < rep["images"][0]["fast_reach_before"]["max"]


@pytest.mark.parametrize("args,needle", [
    (["--source", "posterior"], "Invalid --source"), (["--threshold", "-1"], "Invalid --threshold"),
    (["--measure-cells", "-2"], "Invalid --measure-cells"),
])
def test_cli_repair_bad_input_exits_2(cli_files, tmp_path, capsys, args, needle):
    assert main(["repair", "--vae", str(cli_files["random"]), "--latent", str(cli_files["latent"]),
                 "--out", str(tmp_path / "o"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "a failing run leaves nothing behind"


def test_cli_repair_wrong_channel_count_and_help(cli_files, tmp_path, capsys):
    wrong = write_latent(torch.randn(1, 16, 8, 8), tmp_path / "z16.latent")
    assert main(["repair", "--vae", str(cli_files["random"]), "--latent", str(wrong), "--out", str(tmp_path / "o")]) == 2
    assert "16 channels, but the VAE's latents have 4" in capsys.readouterr().err
    r = run_cli("repair", "--help")
    assert r.returncode == 0 and "--source" in r.stdout
