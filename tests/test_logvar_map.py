"""`python -m vae_fix logvar-map`: the Log-Variance Map node's values, reductions and ranges, checked
against the posterior computed by hand from the same VAE."""
import numpy as np
import pytest
from PIL import Image

from vae_fix.builders.planted import planted_vae
from vae_fix.cli import main
from vae_fix.images import load_image, save_png
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config
from vae_fix.posterior import read_posterior

from run_cli import run_cli, strict_json

CELL = (9, 21)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small SD-layout VAE (downscale 4) with a planted hole, its 128x128 demo PNG, an odd-sized PNG,
    and the raw posterior of the demo image computed directly."""
    d = tmp_path_factory.mktemp("logvar_map")
    planted = planted_vae(preset_config("sd", small=True), cell=CELL)
    vae = save_vae(planted.model, d / "planted.safetensors")
    demo = save_png(planted.image[0], d / "demo.png")
    Image.fromarray(np.zeros((37, 50, 3), np.uint8)).save(d / "odd.png")
    post = read_posterior(load_vae(vae).codec(), load_image(demo))
    return {"vae": vae, "demo": demo, "odd": d / "odd.png", "post": post}


def lv_map(files, out, *args):
    assert main(["logvar-map", "--vae", str(files["vae"]), "--image", str(files["demo"]), "--out", str(out),
                 "--quiet", *map(str, args)]) == 0
    return strict_json(out / "stats.json")


def picture(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def test_raw_minimum_map_shows_the_hole_as_its_lowest_cell(files, tmp_path):
    stats = lv_map(files, tmp_path, "--cmap", "gray", "--range-mode", "fixed", "--low", -60, "--high", -10,
                   "--no-colorbar")
    lv_min = files["post"].logvar_raw[0].amin(dim=0)  # [h, w]
    (image,) = stats["images"]
    assert image["min"] == pytest.approx(float(lv_min.min()), abs=1e-4) and image["min"] < -30
    assert image["median"] == pytest.approx(float(lv_min.median()), abs=1e-4)
    assert image["cells_below_clamp"] == 1 and stats["value"] == "raw" and stats["show"] == "min"
    pic = picture(tmp_path / "map.png")
    assert pic.shape == (32 * 4, 32 * 4)  # one 4x4 block per latent cell: lines up with the image
    cells = pic.reshape(32, 4, 32, 4).mean(axis=(1, 3))
    assert np.unravel_index(cells.argmin(), cells.shape) == CELL
    assert np.sort(cells.ravel())[1] > cells[CELL] + 20  # clearly darker than the next cell
    assert image["collapsed_cells"] == [list(CELL)] and "(9, 21)" in stats["verdict"]
    y, x = CELL  # boxed just outside its block, in white inside a black outline: the values stay visible
    assert pic[y * 4 + 1, x * 4 - 1] == 255 and pic[y * 4 + 1, x * 4 - 3] == 0 and pic[y * 4 + 1, x * 4 + 1] < 100


def test_percentile_range_comes_from_the_values_and_fixed_range_is_kept(files, tmp_path):
    stats = lv_map(files, tmp_path / "p", "--low", 5, "--high", 95)
    values = files["post"].logvar_raw[0].amin(dim=0).numpy()
    assert stats["range"] == pytest.approx([np.percentile(values, 5), np.percentile(values, 95)], abs=1e-4)
    stats = lv_map(files, tmp_path / "f", "--show", "grid", "--range-mode", "fixed", "--low", -30, "--high", -10)
    assert stats["range"] == [-30.0, -10.0] and stats["latent_channels"] == 4
    pic = picture(tmp_path / "f" / "map.png")
    assert pic.shape[1] > pic.shape[0]  # a 2x2 grid plus the colour bar on the right


def test_one_channel_and_clamped_values(files, tmp_path):
    stats = lv_map(files, tmp_path / "one", "--show", "one", "--channel", 2)
    lv = files["post"].logvar_raw[0, 2]
    assert stats["images"][0]["max"] == pytest.approx(float(lv.max()), abs=1e-4) and stats["channel"] == 2
    stats = lv_map(files, tmp_path / "clamped", "--value", "clamped", "--show", "mean")
    mean = files["post"].logvar_raw[0].clamp(-30, 20).mean(dim=0)
    assert stats["images"][0]["min"] == pytest.approx(float(mean.min()), abs=1e-4) and stats["images"][0]["min"] >= -30


def test_kl_per_cell_is_the_formula_on_the_moments(files, tmp_path):
    stats = lv_map(files, tmp_path, "--value", "kl")
    post = files["post"]
    mu, lv = post.mean[0].double(), post.logvar_raw[0].double().clamp(-30, 20)
    kl = 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(dim=0)
    image = stats["images"][0]
    assert image["min"] == pytest.approx(float(kl.min()), rel=1e-4)
    assert image["max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert image["median"] == pytest.approx(float(kl.flatten().median()), rel=1e-4)
    assert image["kl_total"] == pytest.approx(float(kl.sum()), rel=1e-4)


def test_a_batch_gets_one_map_per_image_and_a_summary(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["logvar-map", "--vae", str(files["vae"]), "--image", str(files["demo"]), "--image",
                 str(files["demo"]), "--out", str(out)]) == 0
    stats = strict_json(out / "stats.json")
    assert len(stats["images"]) == 2 and set(stats["files"]) == {"map_0", "map_1"}
    assert stats["images"][0] == stats["images"][1]
    printed = capsys.readouterr().out
    assert "raw log-variance, lowest over channels" in printed and "image 1: min" in printed


@pytest.mark.parametrize("args,fragment", [
    (["--show", "one", "--channel", 7], "--channel"),
    (["--value", "kl", "--show", "one", "--channel", 1], "--channel"),
    (["--range-mode", "fixed", "--low", 3, "--high", 3], "--low/--high"),
    (["--low", 5, "--high", 120], "--low/--high"),
    (["--image", "ODD"], "--image"),
])
def test_bad_options_exit_2_naming_the_flag(files, tmp_path, args, fragment):
    args = [files["odd"] if a == "ODD" else a for a in args]
    proc = run_cli("logvar-map", "--vae", files["vae"], "--image", files["demo"], "--out", tmp_path / "out", *args)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
