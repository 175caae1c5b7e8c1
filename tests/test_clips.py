"""A batch of images as one clip of a video VAE: latent frames, the input frames each covers, and the
verdict over latent frames (engine side; the host's video VAEs are tested in test_host_families)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vae_fix.clips import dropped_frames, frame_ranges, per_frame, read_clip
from vae_fix.codec import Codec
from vae_fix.errors import InputError
from vae_fix.inspect import inspect_vae
from vae_fix.probes import photo

HOLE = (2, 5)  # the fake video VAE's collapsed cell, in every latent frame


def causal_video_codec(per: int = 4, hole: bool = True) -> Codec:
    """A causal video 'VAE' at 8x: latent frame 0 is input frame 0, each later one the mean of the
    next `per` frames; log-variance -2 everywhere, -25 at HOLE when `hole`."""

    def latent(x):  # [N, 3, H, W] -> [N, 4, h, w]
        pooled = F.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def moments(x):  # each image a one-frame clip
        mean = latent(x)
        logvar = torch.full_like(mean, -2.0) + 0.05 * mean
        if hole:
            logvar[:, :, HOLE[0], HOLE[1]] = -25.0
        return torch.cat([mean, logvar], 1)

    def clip_moments(x):
        n = 1 + (x.shape[0] - 1) // per
        groups = [x[:1]] + [x[1 + per * i: 1 + per * (i + 1)].mean(0, keepdim=True) for i in range(n - 1)]
        return moments(torch.cat(groups))

    return Codec("fake video", 4, 8, torch.device("cpu"), torch.float32, moments=moments,
                 clip_moments=clip_moments, frame_step=(1, per), info={"kind": "fake causal video VAE"})


def clip_frames(n: int, size: int = 64) -> torch.Tensor:
    """`n` frames `[n, 3, size, size]`: a photo panning right 2 px a frame."""
    base = photo("coffee", size + 2 * n)[0]
    return torch.stack([base[:, :size, 2 * t:2 * t + size] for t in range(n)])


def test_frame_ranges_follow_the_causal_rule():
    frames = frame_ranges(9, (1, 4), 3)
    assert [(f.first, f.last) for f in frames] == [(0, 0), (1, 4), (5, 8)]
    assert frames[1].name() == "latent frame 1 (input frames 1-4)" and frames[0].name() == "latent frame 0 (input frame 0)"
    assert dropped_frames(11, frame_ranges(11, (1, 4), 3)) == [9, 10]  # 1 + 4k frames are encoded
    assert [(f.first, f.last) for f in frame_ranges(7, (1, 6), 2)] == [(0, 0), (1, 6)]


def test_read_clip_gives_one_posterior_per_latent_frame():
    codec, frames = causal_video_codec(), clip_frames(9)
    whole, ranges, shown = read_clip(codec, frames)
    posteriors = per_frame(whole)
    assert whole.batch == 3 and len(posteriors) == 3 and all(p.batch == 1 and p.latent_size == (8, 8) for p in posteriors)
    expected = F.avg_pool2d(frames[1:5].mean(0, keepdim=True) * 2 - 1, 8)  # the codec takes -1..1
    assert torch.allclose(posteriors[1].mean[:, :3], expected, atol=1e-6)  # latent frame 1 is input frames 1-4
    assert torch.equal(shown[2], frames[8])  # each latent frame is shown on the last frame it covers
    assert float(posteriors[2].logvar_raw[0, :, HOLE[0], HOLE[1]].max()) == -25.0


def test_inspecting_a_clip_judges_latent_frames_and_counts_what_recurs_over_time():
    codec, frames = causal_video_codec(), clip_frames(11)
    result = inspect_vae(codec, frames, as_clip=True, check_reach=False)
    report = result.to_json()
    clip = report["settings"]["clip"]
    assert clip["frames"] == 11 and clip["not_encoded"] == [9, 10] and clip["frame_step"] == [1, 4]
    assert [e["input_frames"] for e in clip["latent_frames"]] == [[0, 0], [1, 4], [5, 8]]
    assert [img["path"] for img in report["images"]] == [f.name() for f in frame_ranges(11, (1, 4), 3)]
    assert report["verdict"]["black_hole"] is True
    assert {(c["y"], c["x"]) for c in report["verdict"]["cells"]} == {HOLE}
    assert report["verdict"]["cells"][0]["images"] == 3  # in every latent frame
    assert report["verdict"]["line"].startswith("black hole at (2, 5) in 3/3 latent frames")


def test_a_clip_without_a_hole_has_no_verdict_cells():
    report = inspect_vae(causal_video_codec(hole=False), clip_frames(5), as_clip=True, check_reach=False).to_json()
    assert report["verdict"]["black_hole"] is False and not report["verdict"]["cells"]
    assert len(report["images"]) == 2


def test_an_image_vae_refuses_a_clip_by_name():
    codec = causal_video_codec()
    image_codec = Codec("image vae", 4, 8, codec.device, codec.dtype, moments=codec.moments, input_name="--vae")
    with pytest.raises(InputError, match="--vae.*not a video VAE"):
        inspect_vae(image_codec, clip_frames(5), as_clip=True)


@pytest.mark.parametrize("clip,maps,frames", [("every", 3, [[0], [1], [2]]), ("lowest", 1, [[0, 1, 2]]), ("1", 1, [[1]])])
def test_log_variance_maps_of_a_clip_per_frame_over_time_or_one_frame(clip, maps, frames):
    from vae_fix.logvar_map import logvar_map
    result = logvar_map(causal_video_codec(), clip_frames(9), clip=clip)
    stats = result.to_json()
    assert len(result.maps) == len(stats["images"]) == maps and stats["clip"]["maps_of_latent_frames"] == frames
    assert all(e["collapsed_cells"] == [list(HOLE)] for e in stats["images"])
    assert all(e["min"] == -25.0 for e in stats["images"])  # the hole is the lowest value of every map
    assert stats["clip"]["latent_frames"][2] == {"latent_frame": 2, "input_frames": [5, 8]}


def test_a_frame_outside_the_clip_is_refused_by_name():
    from vae_fix.logvar_map import logvar_map
    with pytest.raises(InputError, match="frame.*'3' for a clip of 2 latent frame"):
        logvar_map(causal_video_codec(), clip_frames(5), clip="3")
