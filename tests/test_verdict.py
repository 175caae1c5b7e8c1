"""The verdict never cries wolf: the false-alarm suite (smooth VAEs on every kind of content and
size: nothing) and the detection suite (planted holes: exactly their cell, nothing else)."""
import pytest
import torch

from vae_fix.builders.planted import corner_hole_vae, demo_image, paint_marker, planted_vae, smooth_vae, tamed_vae
from vae_fix.inspect import inspect_vae
from vae_fix.model import preset_config
from vae_fix.probes import PROCEDURAL, probe_images
from vae_fix.verdict import FAR_REACH, verdict

SMOOTH = [("smooth", "sd", 0), ("smooth", "sd3", 1), ("smooth", "retrained8", 2), ("tamed", "sd", 0), ("tamed", "sd3", 1)]


def build(kind, family, seed):
    make = {"smooth": smooth_vae, "tamed": tamed_vae}[kind]
    return make(preset_config(family, small=True), seed=seed)


def extra_content(size):
    """Cases beyond the probes: 1-cell objects at the border and corners, a one-pixel dot, a hard
    vertical edge, a saturated colour field."""
    img = torch.full((1, 3, size, size), 0.5)
    img[:, :, :4, :4] = 1.0          # one 4x4-VAE cell in the corner
    img[:, :, -4:, size // 2:size // 2 + 4] = 0.0   # one cell on the bottom border
    img[:, :, size // 3, size // 3] = 1.0            # one pixel
    edge = torch.zeros(1, 3, size, size)
    edge[:, :, :, size // 2:] = 1.0
    field = torch.zeros(1, 3, size, size)
    field[:, 0] = 1.0
    return [img, edge, field]


@pytest.mark.parametrize("kind,family,seed", SMOOTH, ids=[f"{k}-{f}" for k, f, _ in SMOOTH])
def test_smooth_vaes_show_no_anomaly_on_any_content_or_size(kind, family, seed):
    vae = build(kind, family, seed)
    images, _ = probe_images((64, 128, 256, 512))
    images += extra_content(64) + extra_content(256) + [vae.image, demo_image(256, 384, None, 4)]
    result = inspect_vae(vae.codec, images, check_reach=False)
    counts = [len(f.anomalies) for f in result.found]
    assert sum(counts) == 0, f"false alarms per image: {counts}"
    assert result.verdict.black_hole is False and result.verdict.status == "none"
    assert result.verdict.line().startswith(f"no black hole found ({len(images)} images")


def test_a_smooth_vae_at_1024_px_stays_quiet():
    images, _ = probe_images((1024,))
    keep = [images[i] for i, name in enumerate(PROCEDURAL) if name in ("flat", "lone_square", "lines")]
    result = inspect_vae(build("smooth", "sd", 0).codec, keep, check_reach=False)
    assert [len(f.anomalies) for f in result.found] == [0, 0, 0] and result.verdict.status == "none"


@pytest.mark.parametrize("family", ["sd", "sd3", "retrained8"])
@pytest.mark.parametrize("mean_spike", [0.0, 40.0], ids=["logvar-only", "with-mean"])
def test_a_hole_at_a_fixed_cell_is_found_there_in_every_probe_and_nothing_else(family, mean_spike):
    vae = corner_hole_vae(preset_config(family, small=True), mean_spike=mean_spike)
    result = inspect_vae(vae.codec)
    n = len(result.found)
    assert [f.marks() for f in result.found] == [[(0, 0)]] * n
    v = result.verdict
    assert v.black_hole and v.status == "black_hole" and len(v.cells) == 1
    cell = v.cells[0]
    assert (cell["y"], cell["x"], cell["images"], cell["of"]) == (0, 0, n, n)
    assert cell["drop"] > 25 and cell["clamp_floor_hit"]
    if mean_spike:
        assert cell["mean_support"] == n
    else:  # only where the content itself puts a large mean in the corner (the border frame, say)
        assert cell["mean_support"] <= n // 4
    assert v.reach["y"] == 0 and v.reach["x"] == 0 and v.reach["rank"] >= 1
    if mean_spike:  # what the decoder sees there is far from its neighbours: it moves the whole image
        assert v.reach["reach_ratio"] > FAR_REACH and v.reach["rank"] == 1 and "reaches far" in v.line()


def test_a_hole_on_one_image_only_is_listed_but_not_called_a_black_hole():
    """Content-triggered: the planted VAE's hole follows a red marker no probe carries."""
    cfg = preset_config("sd", small=True)
    vae = planted_vae(cfg, cell=(9, 21), spread=0.05)
    probes, names = probe_images()
    marked = paint_marker(demo_image(128, 128, None, 4), (20, 5), 4)
    result = inspect_vae(vae.codec, probes + [marked], names=names + ["marked"], check_reach=False)
    n = len(result.found)
    assert [f.marks() for f in result.found] == [[]] * (n - 1) + [[(20, 5)]]
    v = result.verdict
    assert v.black_hole is False and v.status == "content" and v.images_with_collapse == 1
    assert [(c["y"], c["x"], c["images"], c["of"], c["seen_in"]) for c in v.cells] == [(20, 5, 1, n, ["marked"])]
    assert "content-triggered" in v.line()


def test_one_image_cannot_confirm_a_black_hole():
    vae = planted_vae(preset_config("sd", small=True), cell=(9, 21))
    result = inspect_vae(vae.codec, [vae.image])
    v = result.verdict
    assert v.status == "single_image" and not v.black_hole and "cannot confirm" in v.line()
    assert [(c["y"], c["x"]) for c in v.cells] == [(9, 21)] and result.found[0].marks() == [(9, 21)]
    assert v.reach["image"] == "image 0" and v.reach["reach_ratio"] > 0


def test_verdict_of_no_reports_and_of_half_the_images():
    assert verdict([]).status == "none"
    vae = corner_hole_vae(preset_config("sd", small=True))
    with_hole = inspect_vae(vae.codec, [vae.image] * 2, check_reach=False).found
    smooth = smooth_vae(preset_config("sd", small=True))
    without = inspect_vae(smooth.codec, [smooth.image] * 2, check_reach=False).found
    assert verdict(with_hole + without).status == "black_hole"   # 2 of 4: half the images
    assert verdict(with_hole[:1] + without).status == "content"  # 1 of 3


def test_the_verdicts_reach_is_measured_on_an_8x_vaes_128px_probes():
    """An 8x VAE turns the 128 px probes into 16x16 latents, too small for window 3 with 3x3
    regions: the verdict's reach check fits its grid (window 2) instead of skipping it."""
    vae = corner_hole_vae(preset_config("sd", small=True, channel_mult=(1, 2, 2, 4)), mean_spike=True)
    v = inspect_vae(vae.codec).verdict
    assert v.black_hole and [(c["y"], c["x"]) for c in v.cells] == [(0, 0)]
    assert "skipped" not in v.reach, v.reach
    assert (v.reach["window"], v.reach["blocks"]) == (2, 3) and v.reach["reach_ratio"] > 0 and v.reach["rank"] >= 1
