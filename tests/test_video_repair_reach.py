"""Repair Latent, Latent Reach Map and Latent Cell Reach on video latents [B, C, T, h, w] (#12):
frames join the batch, each is decoded alone (as the host adapter decodes a video VAE's latent
frame: a one-frame clip), and the reports name item and frame."""
import json
from dataclasses import replace

import pytest
import torch

from vae_fix.codec import model_codec
from vae_fix.errors import InputError
from vae_fix.model import preset_config, random_vae
from vae_fix.reach import cell_reach, cost_text, reach_map
from vae_fix.repair import repair

SPIKE = (1, 2, (5, 5), 40.0)  # item, frame, cell, value


@pytest.fixture(scope="module")
def codec():
    return model_codec(random_vae(preset_config("sd", small=True), seed=1))


def spiked_video(b=2, t=3, h=16, w=16):
    z = torch.randn(b, 4, t, h, w, generator=torch.Generator().manual_seed(0))
    item, frame, (y, x), value = SPIKE
    z[item, :, frame, y, x] = value
    return z


def counting(codec):
    """The codec with its decoder noting how many latents each call is given."""
    seen = []

    def counted(z):
        seen.append(z.shape[0])
        return codec.decode(z)

    return replace(codec, decode=counted), seen


def test_repair_of_a_video_latent_repairs_the_spiked_frame_only(codec):
    z = spiked_video()
    before = z.clone()
    result = repair(codec, z, window=2, measure_cells=1)
    assert torch.equal(z, before) and result.latent.shape == z.shape
    item, frame, (y, x), _ = SPIKE
    rep = result.report
    json.dumps(rep, allow_nan=False)
    assert rep["latent_shape"] == [2, 4, 3, 16, 16] and rep["source"] == "latent" and rep["repaired_cells"] == 1
    assert rep["video"]["items"] == 2 and rep["video"]["frames"] == 3
    assert rep["video"]["decoded"].startswith("frames are decoded one at a time")
    entries = {(e["item"], e["frame"]): e for e in rep["images"]}
    assert len(entries) == 6 and entries[(item, frame)]["cells"] == [[y, x]]
    assert all(e["repaired_cells"] == 0 for k, e in entries.items() if k != (item, frame))
    assert abs(float(result.latent[item, :, frame, y, x].abs().max())) < 10
    untouched = torch.ones_like(z, dtype=torch.bool)
    untouched[item, :, frame, y, x] = False
    assert torch.equal(result.latent[untouched], z[untouched])
    assert result.before.shape == (6, 3, 64, 64) and result.mask.shape == (6, 16, 16)
    assert list(result.pictures())[:2] == ["repair_item0_frame0", "repair_item0_frame1"]
    text = result.summary()
    assert "in a video latent of 3 frames; frames are decoded one at a time" in text
    assert f"item {item}, frame {frame}: 1 cells repaired" in text


def test_repair_of_a_video_equals_the_repair_of_its_frames(codec):
    z = spiked_video()[1:]  # the spiked item alone
    video = repair(codec, z, window=2, fast_map=False, measure_cells=0)
    frames = repair(codec, z[0].movedim(1, 0), window=2, fast_map=False, measure_cells=0)  # [T, C, h, w]
    assert video.report["repaired_cells"] == frames.report["repaired_cells"] == 1
    assert torch.equal(video.latent[0].movedim(1, 0), frames.latent)
    assert torch.equal(video.before, frames.before)


def test_video_frames_are_decoded_as_a_batch_of_single_frames(codec):
    counted, seen = counting(codec)
    repair(counted, spiked_video()[1:], window=2, fast_map=False, measure_cells=0)
    assert seen == [3, 3]  # before and after: the 3 frames, each its own latent of the batch


@pytest.mark.parametrize("kwargs,needle", [
    ({"image": torch.rand(1, 3, 64, 64)}, "Invalid image: a video latent's cells cannot come from the posterior"),
    ({"source": "posterior"}, "Invalid source: a video latent's cells cannot come from the posterior"),
])
def test_repair_refuses_the_posterior_for_a_video_latent(codec, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        repair(codec, spiked_video(), **kwargs)


def test_reach_map_of_a_video_frame_is_that_frames_map(codec):
    z = spiked_video()
    item, frame, (y, x), _ = SPIKE
    index = item * 3 + frame
    result = reach_map(codec, z, window=2, index=index)
    alone = reach_map(codec, z[item, :, frame][None], window=2)
    torch.testing.assert_close(result.reach, alone.reach)
    assert result.top_cells[0] == (y, x)
    data = result.to_json()
    assert data["index"] == index and data["item"] == item and data["frame"] == frame
    assert data["video"]["decoded"].startswith("frames are decoded one at a time")
    assert "video" not in alone.to_json() and "item" not in alone.to_json()
    assert f"(item {item}, frame {frame} of a video latent, decoded alone)" in result.headline()


def test_reach_index_outside_the_frames_is_refused(codec):
    with pytest.raises(InputError, match=r"Invalid index: 6 is outside the 6 frames of the video latent "
                                         r"\(2 item\(s\) of 3 frames\)"):
        reach_map(codec, spiked_video(), window=2, index=6)


def test_cell_reach_on_a_video_frame(codec):
    z = spiked_video()
    item, frame, (y, x), _ = SPIKE
    result = cell_reach(codec, z, [(y, x), (12, 3)], window=2, index=item * 3 + frame)
    alone = cell_reach(codec, z[item, :, frame][None], [(y, x), (12, 3)], window=2)
    assert [(r.y, r.x) for r in result.cells] == [(r.y, r.x) for r in alone.cells] and result.cells[0].y == y
    assert result.cells[0].mean_far == pytest.approx(alone.cells[0].mean_far, rel=1e-5)
    assert result.to_json()["frame"] == frame and "of a video latent, decoded alone" in result.summary()
    assert cost_text(z, [(y, x)]) == "1 chosen cells: 2 decodes (one per cell, one of the latent itself)"
