import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vae_fix.cli import main
from vae_fix.latent_io import read_latent, write_latent

from vae_fix.errors import InputError
from vae_fix.families import FAMILIES, families_with_channels, get_family
from run_cli import run_cli
from vae_fix.stats import channel_stats, histogram_image


def test_stats_match_numpy_and_imply_scale():
    g = torch.Generator().manual_seed(1)
    # channel c has mean c and std 1/0.18215 → SD1-like scale
    z = torch.randn(3, 4, 16, 16, generator=g) / 0.18215 + torch.arange(4.0).view(1, 4, 1, 1)
    s = channel_stats(z)
    json.dumps(s)  # JSON-safe
    assert s["shape"] == [3, 4, 16, 16] and s["values_per_channel"] == 3 * 256
    for ch in s["channels"]:
        vals = z[:, ch["channel"]].double().flatten().numpy()
        assert ch["mean"] == pytest.approx(vals.mean())
        assert ch["std"] == pytest.approx(vals.std())
        assert ch["min"] == pytest.approx(vals.min()) and ch["max"] == pytest.approx(vals.max())
        assert ch["percentiles"]["50"] == pytest.approx(np.median(vals))
        assert ch["percentiles"]["1"] < ch["percentiles"]["5"] < ch["percentiles"]["95"] < ch["percentiles"]["99"]
        assert ch["implied_shift"] == pytest.approx(ch["mean"])
        assert ch["implied_scale"] == pytest.approx(0.18215, rel=0.1)
    sd1 = next(f for f in s["families"] if f["name"] == "sd1")
    assert sd1["channels_match"] and sd1["scale"] == 0.18215
    flux = next(f for f in s["families"] if f["name"] == "flux")
    assert not flux["channels_match"]


def test_stats_count_nonfinite_and_skip_them():
    z = torch.zeros(1, 2, 4, 4)
    z[0, 1, 0, 0] = float("nan")
    z[0, 1, 0, 1] = float("inf")
    s = channel_stats(z)
    assert s["channels"][1]["nonfinite"] == 2 and s["overall"]["nonfinite"] == 2
    assert s["channels"][1]["max"] == 0.0 and s["channels"][1]["implied_scale"] is None
    json.dumps(s)


def test_stats_reject_bad_latent():
    with pytest.raises(InputError, match="latent"):
        channel_stats(torch.zeros(4, 8, 8))


@pytest.mark.parametrize("c", [4, 12])
def test_histogram_image_has_a_panel_per_channel(c):
    z = torch.randn(1, c, 8, 8)
    z[0, 0, 0, 0] = 500.0  # a spike must not squash the other panels
    img = histogram_image(z, columns=4)
    assert img.shape[0] == 3 and img.shape[1] == -(-c // 4) * 170 and img.shape[2] == 4 * 300
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    bars = (img[2] > 0.7) & (img[0] < 0.4)  # bar blue
    for i in range(c):
        r, col = divmod(i, 4)
        assert bars[r * 170:(r + 1) * 170, col * 300:(col + 1) * 300].sum() > 200, f"panel {i} has no bars"


def test_families_data():
    assert [f.name for f in families_with_channels(4)] == ["sd1", "sdxl"]
    assert [f.name for f in families_with_channels(16)] == ["sd3", "flux"]
    for f in FAMILIES.values():
        assert len(f.rgb_factors) == f.channels and all(len(r) == 3 for r in f.rgb_factors)
    assert get_family("SD15").name == "sd1" and get_family("flux").shift == 0.1159
    z = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(get_family("sd3").to_raw(get_family("sd3").to_model_space(z)), z)
    with pytest.raises(InputError, match="unknown latent family 'sd9'"):
        get_family("sd9")


# ---------------------------------------------------------------- CLI

def test_cli_stats_on_a_latent_file(tmp_path, capsys):
    z = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0)) / 0.18215
    path = write_latent(z, tmp_path / "z.latent")
    torch.testing.assert_close(read_latent(path), z)
    out = tmp_path / "out"
    assert main(["stats", "--latent", str(path), "--out", str(out)]) == 0
    data = json.loads((out / "stats.json").read_text())
    assert data["shape"] == [2, 4, 16, 12]
    assert data["overall"]["implied_scale"] == pytest.approx(0.18215, rel=0.1)
    with Image.open(out / "histogram.png") as im:
        assert im.size == (4 * 300, 170)
    printed = capsys.readouterr().out
    assert "implied scale 1/std" in printed and "SD1.x" in printed
    assert (out / "summary.txt").read_text().strip() in printed


def test_cli_stats_reads_comfyui_latent_files(tmp_path):
    z = torch.randn(1, 4, 8, 8)
    save_file({"latent_tensor": z * 0.18215}, str(tmp_path / "old.latent"))  # pre-version SD1 file
    torch.testing.assert_close(read_latent(tmp_path / "old.latent"), z)
    save_file({"samples": z[0]}, str(tmp_path / "plain.safetensors"))
    assert read_latent(tmp_path / "plain.safetensors").shape == (1, 4, 8, 8)


def test_cli_stats_too_few_bins_exits_2(tmp_path, capsys):
    path = write_latent(torch.randn(1, 4, 8, 8), tmp_path / "z.latent")
    assert main(["stats", "--latent", str(path), "--out", str(tmp_path / "o"), "--bins", "1"]) == 2
    assert "Invalid --bins" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_stats_bad_sources_exit_2(tmp_path, capsys):
    save_file({"a": torch.zeros(1, 4, 2, 2), "b": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.latent").write_bytes(b"not a safetensors file")
    cases = [(["--latent", str(tmp_path / "missing.latent")], "no such file"),
             (["--latent", str(tmp_path / "two.safetensors")], "cannot tell which tensor"),
             (["--latent", str(tmp_path / "junk.latent")], "not a readable safetensors file"),
             (["--image", str(tmp_path / "x.png")], "an image needs a VAE")]
    for args, needle in cases:
        assert main(["stats", *args, "--out", str(tmp_path / "o")]) == 2
        assert needle in capsys.readouterr().err


def test_cli_stats_help():
    r = run_cli("stats", "--help")
    assert r.returncode == 0 and "--bins" in r.stdout and "--json" in r.stdout


def test_latent_files_with_nan_are_refused_by_name_except_by_stats(tmp_path):
    z = torch.randn(1, 4, 8, 8)
    z[0, 2, 3, 3] = float("nan")
    path = write_latent(z, tmp_path / "nan.latent")
    with pytest.raises(InputError, match="1 non-finite values"):
        read_latent(path)
    assert torch.isnan(read_latent(path, allow_nonfinite=True)).sum() == 1
    with pytest.raises(InputError, match="non-finite"):
        read_latent(write_latent(torch.full((1, 4, 8, 8), float("nan")), tmp_path / "all_nan.latent"), allow_nonfinite=True)
