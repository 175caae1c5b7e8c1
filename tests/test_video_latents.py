"""Video latents [B, C, T, h, w] across the engine (#12): folding frames, Latent Statistics, Latent
Channel Edit and Latent Preview on every frame. Repair and reach are in test_video_repair_reach.py,
the command line in test_video_latents_cli.py."""
import json

import pytest
import torch

from vae_fix.edit import edit_channels
from vae_fix.errors import InputError
from vae_fix.frames import FrameLayout, check_any_latent, describe, fold
from vae_fix.stats import channel_stats, histogram_image, latent_statistics


def video(b=2, c=4, t=3, h=6, w=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, t, h, w, generator=g) * 2 + 0.5).to(dtype)


# ---------------------------------------------------------------- folding

def test_fold_puts_the_frames_of_each_item_in_order_and_unfold_restores_the_latent():
    z = video()
    before = z.clone()
    frames, layout = fold(z)
    assert frames.shape == (6, 4, 6, 8) and layout == FrameLayout(2, 3, True) and layout.count == 6
    for i in range(6):
        b, t = layout.where(i)
        assert layout.index(b, t) == i and layout.label(i) == f"item {b}, frame {t}"
        assert torch.equal(frames[i], z[b, :, t])
    assert torch.equal(layout.unfold(frames), z) and torch.equal(z, before)
    assert torch.equal(layout.per_frame(torch.tensor([7, 9])), torch.tensor([7, 7, 7, 9, 9, 9]))


def test_an_image_latent_folds_to_itself():
    z = torch.randn(2, 4, 6, 8)
    frames, layout = fold(z)
    assert frames is z and layout == FrameLayout(2) and not layout.video and layout.label(1) == "latent 1"
    assert layout.unfold(frames) is z
    assert describe(z.shape) == "latent [2, 4, 6, 8] (B, C, h, w)"
    assert describe(video().shape) == "video latent [2, 4, 3, 6, 8] (B, C, T, h, w), 3 frames"


@pytest.mark.parametrize("z,needle", [
    (torch.zeros(4, 6, 8), r"Invalid latent: got shape \[4, 6, 8\].*\[B, C, T, h, w\]"),
    (torch.zeros(1, 4, 2, 2, 6, 8), r"got shape \[1, 4, 2, 2, 6, 8\]"),
    (torch.zeros(1, 4, 0, 6, 8), r"shape \[1, 4, 0, 6, 8\].*no empty dimension"),
    (torch.zeros(1, 4, 2, 6, 8, dtype=torch.int64), "not floating point"),
])
def test_bad_latents_are_refused_by_name(z, needle):
    with pytest.raises(InputError, match=needle):
        check_any_latent(z)


# ---------------------------------------------------------------- Latent Statistics

def test_video_stats_cover_all_frames_and_each_frame_alone():
    z = video(b=2, c=4, t=3)
    s = channel_stats(z)
    json.dumps(s)
    assert s["shape"] == [2, 4, 3, 6, 8] and s["values_per_channel"] == 2 * 3 * 6 * 8
    assert s["video"] == {"items": 2, "frames": 3}
    for row in s["channels"]:
        vals = z[:, row["channel"]].double().flatten().numpy()  # every item and frame
        assert row["mean"] == pytest.approx(vals.mean()) and row["std"] == pytest.approx(vals.std())
        assert row["min"] == pytest.approx(vals.min()) and row["max"] == pytest.approx(vals.max())
    assert [(f["item"], f["frame"]) for f in s["per_frame"]] == [(b, t) for b in range(2) for t in range(3)]
    for entry in s["per_frame"]:
        alone = channel_stats(z[entry["item"], :, entry["frame"]][None])  # that frame as an image latent
        assert entry["overall"] == alone["overall"]
        for got, want in zip(entry["channels"], alone["channels"]):
            assert got == {k: want[k] for k in ("channel", "mean", "std", "min", "max", "nonfinite")}


def test_video_stats_compare_with_the_video_families_and_say_so():
    mean = torch.tensor([float(i % 5) for i in range(16)]).view(1, 16, 1, 1, 1)
    z = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 + mean
    result = latent_statistics(z)
    names = [f["name"] for f in result.stats["families"]]
    assert names == ["wan21", "wan22", "hunyuan_video", "mochi", "ltxv"]
    wan = result.stats["families"][0]
    assert wan["channels_match"] and wan["video"] and len(wan["channel_mean"]) == 16
    model = (z - torch.tensor(wan["channel_mean"]).view(1, 16, 1, 1, 1)) / torch.tensor(wan["channel_std"]).view(1, 16, 1, 1, 1)
    assert wan["model_space_mean"] == pytest.approx(float(model.double().mean()), rel=1e-6)
    assert wan["model_space_std"] == pytest.approx(float(model.double().std(unbiased=False)), rel=1e-6)
    assert wan["scale_ratio"] == pytest.approx(1 / wan["model_space_std"])
    hunyuan = result.stats["families"][2]
    assert hunyuan["scale_ratio"] == pytest.approx(result.stats["overall"]["implied_scale"] / 0.476986)
    text = result.summary()
    assert text.startswith("video latent [1, 16, 4, 8, 8] (B, C, T, h, w), 4 frames, 256 values per channel (all frames)")
    assert "Wan 2.1" in text and "HunyuanVideo" in text and "SD3" not in text and "Mochi" not in text
    assert "item 0, frame 3: mean" in text


def test_image_stats_keep_their_schema():
    s = channel_stats(torch.randn(2, 4, 8, 8))
    assert "video" not in s and "per_frame" not in s
    assert [f["name"] for f in s["families"]] == ["sd1", "sdxl", "sd3", "flux", "hunyuan_image21"]
    assert all(set(f) >= {"name", "label", "channels", "scale", "shift", "channels_match"} for f in s["families"])


def test_video_histogram_has_a_panel_per_channel_over_all_frames():
    z = video(b=1, c=12, t=2)
    assert histogram_image(z).shape == histogram_image(fold(z)[0]).shape == (3, 3 * 170, 4 * 300)
    assert torch.equal(histogram_image(z), histogram_image(fold(z)[0]))


# ---------------------------------------------------------------- Latent Channel Edit

def test_edit_on_chosen_frames_leaves_the_others_bit_identical():
    z = video(b=2, c=4, t=4)
    before = z.clone()
    r = edit_channels(z, "offset", "1,3", offset=2.5, frames="1-2")
    assert r.latent.shape == z.shape and r.latent.dtype == z.dtype and torch.equal(z, before)
    for t in (0, 3):
        assert torch.equal(r.latent[:, :, t], z[:, :, t])
    torch.testing.assert_close(r.latent[:, [1, 3], 1:3], z[:, [1, 3], 1:3] + 2.5)
    assert torch.equal(r.latent[:, [0, 2]], z[:, [0, 2]])
    info = r.to_json()
    assert info["frames"] == [1, 2] and info["latent_shape"] == [2, 4, 4, 6, 8] and info["batch_items"] == [0, 1]
    assert [c["values_changed"] for c in info["channels"]] == [2 * 2 * 6 * 8] * 2
    assert r.summary().startswith("offset on video latent [2, 4, 4, 6, 8] (B, C, T, h, w), batch items [0, 1], frames [1, 2]")


def test_edit_batch_and_frames_together_in_half_precision():
    z = video(b=3, c=4, t=3, dtype=torch.float16)
    r = edit_channels(z, "zero", "all", batch="1", frames="0,2")
    assert r.latent.dtype == torch.float16
    changed = torch.zeros(3, 3, dtype=torch.bool)
    changed[1, 0] = changed[1, 2] = True
    for b in range(3):
        for t in range(3):
            want = torch.zeros_like(z[b, :, t]) if changed[b, t] else z[b, :, t]
            assert torch.equal(r.latent[b, :, t], want), (b, t)


def test_normalize_takes_each_items_chosen_frames_together():
    z = video(b=2, c=4, t=4)
    r = edit_channels(z, "normalize", "0", mean=0.25, std=0.5, frames="0-1")
    for b in range(2):
        chosen = r.latent[b, 0, 0:2].double()
        assert float(chosen.mean()) == pytest.approx(0.25, abs=1e-5)
        assert float(chosen.std(unbiased=False)) == pytest.approx(0.5, abs=1e-5)
        assert torch.equal(r.latent[b, 0, 2:], z[b, 0, 2:])


def test_masks_apply_per_frame():
    z = video(b=1, c=4, t=3, h=4, w=4)
    masks = torch.zeros(3, 4, 4)
    masks[0, 0, 0] = masks[1, 1, 1] = masks[2, 2, 2] = 1.0  # one mask per frame, each a different cell
    r = edit_channels(z, "zero", "all", mask=masks)
    for t in range(3):
        hit = r.latent[0, :, t] != z[0, :, t]
        assert hit.any(0).nonzero().tolist() == [[t, t]], t
    one = edit_channels(z, "zero", "all", mask=masks[1])  # one mask: every frame
    assert (one.latent[0, :, :, 1, 1] == 0).all() and torch.equal(one.latent[0, :, :, 0, 0], z[0, :, :, 0, 0])


def test_one_mask_per_item_covers_its_frames():
    z = video(b=2, c=4, t=3, h=4, w=4)
    masks = torch.zeros(2, 4, 4)
    masks[0, 0, 0] = masks[1, 3, 3] = 1.0
    r = edit_channels(z, "zero", "all", mask=masks)
    assert (r.latent[0, :, :, 0, 0] == 0).all() and torch.equal(r.latent[0, :, :, 3, 3], z[0, :, :, 3, 3])
    assert (r.latent[1, :, :, 3, 3] == 0).all() and torch.equal(r.latent[1, :, :, 0, 0], z[1, :, :, 0, 0])


@pytest.mark.parametrize("kwargs,needle", [
    ({"frames": "3"}, r"Invalid frames: frame 3 is out of range for 3 frames.*Expected indices 0-2"),
    ({"frames": "2-1"}, "Invalid frames: range '2-1' runs backwards"),
    ({"mask": torch.ones(4, 6, 8)}, r"Invalid mask: 4 masks for 2 video latent\(s\) of 3 frames.*1 mask, 2 \(one per item\) or 6"),
])
def test_bad_video_edits_are_refused_by_name(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        edit_channels(video(), "zero", "all", **kwargs)


def test_a_frame_selection_on_an_image_latent_is_refused_unless_all():
    z = torch.randn(2, 4, 6, 8)
    with pytest.raises(InputError, match=r"Invalid frames: '0' chosen on an image latent \[B, C, h, w\], which has no frames"):
        edit_channels(z, "zero", "all", frames="0")
    plain = edit_channels(z, "scale", "1", factor=2.0)
    for spec in ("all", "", None, "ALL"):
        r = edit_channels(z, "scale", "1", factor=2.0, frames=spec)
        assert torch.equal(r.latent, plain.latent) and r.to_json() == plain.to_json() and "frames" not in r.to_json()
