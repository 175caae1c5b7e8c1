"""The command line on video latent files [B, C, T, h, w] (#12): read and written as ComfyUI's
Save/Load Latent do, and stats, edit, preview, repair and reach-map round trips."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from run_cli import strict_json
from vae_fix.images import load_image
from vae_fix.cli import main
from vae_fix.errors import InputError
from vae_fix.latent_io import read_latent, write_latent
from vae_fix.latent_preview import family_preview
from vae_fix.loader import save_vae
from vae_fix.model import preset_config, random_vae


def video(c=4, b=1, t=3, h=8, w=8, seed=0):
    return torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("video_cli")
    spiked = video(c=4, t=2, h=16, w=16)
    spiked[0, :, 1, 5, 5] = 40.0
    return {"z": write_latent(video(), d / "video.latent"), "spiked": write_latent(spiked, d / "spiked.latent"),
            "wan22": write_latent(video(c=48, t=2, h=4, w=6), d / "wan22.latent"),
            "vae": save_vae(random_vae(preset_config("sd", small=True), seed=1), d / "random.safetensors")}


def test_video_latent_files_round_trip_as_comfyui_latents(tmp_path):
    z = video()
    path = write_latent(z, tmp_path / "v.latent")
    raw = load_file(str(path))
    assert raw["latent_tensor"].shape == (1, 4, 3, 8, 8) and "latent_format_version_0" in raw  # Load Latent reads it
    assert torch.equal(read_latent(path), z)
    save_file({"samples": z}, str(tmp_path / "plain.safetensors"))
    save_file({"clip": z}, str(tmp_path / "lone.safetensors"))  # a single tensor of any name
    assert torch.equal(read_latent(tmp_path / "plain.safetensors"), z) and torch.equal(read_latent(tmp_path / "lone.safetensors"), z)


@pytest.mark.parametrize("shape,needle", [((1, 4, 2, 2, 8, 8), r"has shape \[1, 4, 2, 2, 8, 8\]"),
                                          ((1, 4, 0, 8, 8), "with no empty dimension")])
def test_other_ranks_and_empty_frames_are_refused(tmp_path, shape, needle):
    save_file({"latent_tensor": torch.zeros(shape), "latent_format_version_0": torch.tensor([])},
              str(tmp_path / "bad.latent"))
    with pytest.raises(InputError, match=needle):
        read_latent(tmp_path / "bad.latent")


def test_cli_stats_of_a_video_latent(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["stats", "--latent", str(files["z"]), "--out", str(out)]) == 0
    data = strict_json(out / "stats.json")
    z = read_latent(files["z"])
    assert data["shape"] == [1, 4, 3, 8, 8] and data["video"] == {"items": 1, "frames": 3}
    assert len(data["per_frame"]) == 3
    assert data["per_frame"][2]["overall"]["mean"] == pytest.approx(float(z[0, :, 2].double().mean()))
    printed = capsys.readouterr().out
    assert printed.startswith("video latent [1, 4, 3, 8, 8] (B, C, T, h, w), 3 frames") and "item 0, frame 2:" in printed


def test_cli_edit_of_chosen_frames_round_trips(files, tmp_path):
    out = tmp_path / "e"
    assert main(["edit", "--latent", str(files["z"]), "--operation", "zero", "--channels", "0-1", "--frames", "1",
                 "--out", str(out)]) == 0
    z, edited = read_latent(files["z"]), read_latent(out / "edited.latent")
    assert edited.shape == z.shape == (1, 4, 3, 8, 8)
    assert (edited[:, 0:2, 1] == 0).all() and torch.equal(edited[:, 2:], z[:, 2:])
    assert torch.equal(edited[:, :, 0], z[:, :, 0]) and torch.equal(edited[:, :, 2], z[:, :, 2])
    info = strict_json(out / "info.json")
    assert info["frames"] == [1] and info["latent_shape"] == [1, 4, 3, 8, 8]


@pytest.mark.parametrize("latent,frames,needle", [
    ("image", "0", "Invalid --frames: '0' chosen on an image latent"),
    ("z", "5", "Invalid --frames: frame 5 is out of range for 3 frames"),
])
def test_cli_edit_bad_frames_exit_2(files, tmp_path, capsys, latent, frames, needle):
    path = write_latent(torch.randn(1, 4, 8, 8), tmp_path / "image.latent") if latent == "image" else files[latent]
    assert main(["edit", "--latent", str(path), "--operation", "zero", "--frames", frames,
                 "--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_preview_of_a_wan22_latent_writes_one_picture_per_frame(files, tmp_path):
    out = tmp_path / "p"
    assert main(["preview", "--latent", str(files["wan22"]), "--out", str(out), "--scale", "4"]) == 0
    info = strict_json(out / "info.json")
    assert info["source"] == "wan22" and info["video"]["frames"] == 2 and "chosen" not in info
    z = read_latent(files["wan22"])
    want = family_preview("wan22").image(z, scale=4)
    for t in range(2):
        got = load_image(out / f"preview_item0_frame{t}.png")[0]  # [3, H, W] in 0..1
        assert tuple(got.shape[1:]) == (4 * 4, 6 * 4)
        assert float((got - want[t]).abs().max()) <= 1 / 255 + 1e-6


def test_cli_repair_of_a_video_latent_round_trips(files, tmp_path):
    out = tmp_path / "r"
    assert main(["repair", "--vae", str(files["vae"]), "--latent", str(files["spiked"]), "--out", str(out),
                 "--window", "2", "--no-fast-map", "--measure-cells", "1"]) == 0
    rep = json.loads((out / "repair.json").read_text())
    assert rep["latent_shape"] == [1, 4, 2, 16, 16] and rep["video"]["decoded"].startswith("frames are decoded one")
    assert [(e["item"], e["frame"], e["cells"]) for e in rep["images"]] == [(0, 0, []), (0, 1, [[5, 5]])]
    fixed, z = read_latent(out / "repaired.latent"), read_latent(files["spiked"])
    assert fixed.shape == z.shape and torch.equal(fixed[:, :, 0], z[:, :, 0]) and fixed.abs().max() < 10
    assert (out / "repair_item0_frame1.png").is_file()


def test_cli_reach_map_of_a_video_frame(files, tmp_path):
    out = tmp_path / "m"
    assert main(["reach-map", "--vae", str(files["vae"]), "--latent", str(files["spiked"]), "--index", "1",
                 "--window", "2", "--out", str(out)]) == 0
    data = json.loads((out / "reach_map.json").read_text())
    assert data["item"] == 0 and data["frame"] == 1 and data["latent_size"] == [16, 16]
    assert (data["top_cells"][0]["y"], data["top_cells"][0]["x"]) == (5, 5)
    out2 = tmp_path / "m2"
    assert main(["reach-map", "--vae", str(files["vae"]), "--latent", str(files["spiked"]), "--index", "2",
                 "--window", "2", "--out", str(out2)]) == 2
