import json

import pytest
import torch

from vae_fix.anomaly import Baseline, find_anomalies
from vae_fix.errors import InputError
from vae_fix.model import preset_config
from vae_fix.builders.planted import demo_image, paint_marker, planted_vae, smooth_vae
from vae_fix.posterior import SizeHandling, posterior_from_moments, read_posterior


def synthetic(logvar, mean=None):
    """A Posterior straight from `[C, h, w]` maps (batch of one)."""
    mean = torch.zeros_like(logvar) if mean is None else mean
    h, w = logvar.shape[1:]
    size = SizeHandling("crop", 8, (8 * h, 8 * w), (8 * h, 8 * w))
    return posterior_from_moments(torch.cat([mean, logvar])[None], size)


def noisy_map(c=4, h=32, w=32, typical=-20.0, spread=1.5, seed=0):
    return typical + spread * torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed))


def far_from(cells, cell, radius=1):
    return [c for c in cells if max(abs(c[0] - cell[0]), abs(c[1] - cell[1])) > radius]


@pytest.mark.parametrize("family,cell,seed", [("sd", (9, 21), 0), ("sd3", (0, 0), 1), ("retrained8", (31, 16), 2)])
def test_planted_hole_is_found_at_exactly_its_cell(family, cell, seed):
    planted = planted_vae(preset_config(family, small=True), cell=cell, seed=seed)
    report = find_anomalies(read_posterior(planted.codec, planted.image))
    top = report.anomalies[0]
    assert (top.y, top.x) == cell and top.kind == "logvar_low"
    assert top.clamp_floor_hit and top.logvar_raw_min < -40 and top.score > 15
    assert cell in report.floor_hits and report.floor_hit_elements >= 1
    assert far_from(report.marks(), cell) == [] and far_from(report.floor_hits, cell) == []
    assert report.groups[0]["peak"]["y"] == cell[0] and report.groups[0]["peak"]["x"] == cell[1]


def test_the_hole_follows_the_marker_not_a_fixed_position():
    cfg = preset_config("sd", small=True)
    planted = planted_vae(cfg, cell=(9, 21))
    moved = paint_marker(demo_image(128, 128, None, 4), (20, 5), 4)  # same weights, marker elsewhere
    report = find_anomalies(read_posterior(planted.codec, moved))
    assert report.marks()[0] == (20, 5) and far_from(report.marks(), (20, 5)) == []


def test_smooth_vae_gives_no_anomalies_and_no_floor_hits():
    smooth = smooth_vae(preset_config("sd", small=True))
    post = read_posterior(smooth.codec, smooth.image)
    report = find_anomalies(post)
    assert report.anomalies == [] and report.floor_hits == [] and report.groups == []
    assert float(post.logvar_raw.std()) < 0.2  # the map is nearly constant around -20
    assert report.baseline["logvar_raw_min_median"] == pytest.approx(-20.0, abs=0.5)


def test_a_global_shift_of_the_log_variance_changes_nothing_but_the_floor():
    cfg = preset_config("sd", small=True)
    deep = planted_vae(cfg, typical=-20.0)
    shallow = planted_vae(cfg, typical=-5.0)  # same weights but for the bias: hole at about -35
    r_deep = find_anomalies(read_posterior(deep.codec, deep.image))
    r_shallow = find_anomalies(read_posterior(shallow.codec, shallow.image))
    assert r_deep.marks() == r_shallow.marks() == [(9, 21)]
    assert r_shallow.anomalies[0].score == pytest.approx(r_deep.anomalies[0].score, rel=1e-3)


def test_relative_outlier_above_the_floor_is_found_but_not_listed_as_floor_hit():
    lv = noisy_map(typical=-5.0)
    lv[:, 4, 7] = -16.0  # 11 nats under a -5 map: an outlier, nowhere near the -30 floor
    report = find_anomalies(synthetic(lv))
    assert report.marks() == [(4, 7)]
    assert report.anomalies[0].clamp_floor_hit is False and report.floor_hits == []
    assert report.anomalies[0].channels == [0, 1, 2, 3]


def test_floor_hits_are_listed_even_when_not_outliers():
    lv = noisy_map(typical=-31.0, spread=0.3)  # a whole map at the floor: nothing stands out
    report = find_anomalies(synthetic(lv))
    assert report.anomalies == []
    assert len(report.floor_hits) == int((lv.amin(0) <= -30).sum()) > 900


def test_outlier_channels_are_named():
    lv = noisy_map()
    lv[2, 10, 10] = -45.0
    report = find_anomalies(synthetic(lv))
    assert report.marks() == [(10, 10)] and report.anomalies[0].channels == [2]


def test_near_constant_maps_need_a_real_drop():
    lv = torch.full((4, 16, 16), -20.0)
    lv[:, 3, 3] = -20.5  # infinite z against a zero MAD, but only half a nat
    assert find_anomalies(synthetic(lv)).anomalies == []
    lv[:, 5, 5] = -26.0  # 6 nats: below the 8-nat minimum drop
    assert find_anomalies(synthetic(lv)).anomalies == []
    lv[:, 6, 6] = -29.0
    assert find_anomalies(synthetic(lv)).marks() == [(6, 6)]


def test_a_large_mean_alone_is_content_not_an_anomaly():
    lv = noisy_map()
    mean = noisy_map(typical=0.0, spread=2.0, seed=1)
    mean[1, 20, 3] = 60.0
    report = find_anomalies(synthetic(lv, mean))
    assert report.anomalies == []
    assert [(c["y"], c["x"], c["channels"]) for c in report.content_outliers] == [(20, 3, [1])]
    assert report.to_dict()["content_outliers"]["count"] == 1


def test_a_large_mean_at_a_collapsed_cell_is_supporting_evidence():
    lv, mean = noisy_map(), noisy_map(typical=0.0, spread=2.0, seed=1)
    lv[:, 20, 3], mean[1, 20, 3] = -45.0, 60.0
    report = find_anomalies(synthetic(lv, mean))
    a = report.anomalies[0]
    assert report.marks() == [(20, 3)] and report.content_outliers == []
    assert a.kind == "logvar_low" and a.kinds == ["logvar_low", "mean_magnitude"]
    assert a.mean_abs_max == pytest.approx(60.0) and a.mean_score > 8


def test_a_whole_image_that_sits_low_is_not_a_cell():
    lv = noisy_map(typical=-40.0, spread=1.0)
    baseline = Baseline(median=-20.0, sigma=1.5, images=8)  # the VAE's other images sit at -20
    assert find_anomalies(synthetic(lv), baseline=baseline).anomalies == []
    lv[:, 7, 7] = -60.0
    assert find_anomalies(synthetic(lv), baseline=baseline).marks() == [(7, 7)]


def test_the_vae_typical_range_decides_not_the_image():
    lv = noisy_map(typical=-10.0, spread=0.5)
    lv[:, 3, 3] = -22.0  # 12 nats under this image, but inside the VAE's usual range
    assert find_anomalies(synthetic(lv)).marks() == [(3, 3)]
    assert find_anomalies(synthetic(lv), baseline=Baseline(-20.0, 1.5, 8)).anomalies == []


def test_adjacent_cells_form_one_group():
    lv = noisy_map()
    for cell in ((5, 5), (5, 6), (6, 7), (25, 25)):
        lv[:, cell[0], cell[1]] = -40.0
    lv[:, 6, 7] = -50.0
    report = find_anomalies(synthetic(lv))
    assert len(report.anomalies) == 4 and len(report.groups) == 2
    big = report.groups[0]
    assert big["cells"] == 3 and big["bbox"] == [5, 5, 6, 7] and (big["peak"]["y"], big["peak"]["x"]) == (6, 7)
    assert {a.group for a in report.anomalies if (a.y, a.x) == (25, 25)} == {1}


def test_threshold_is_adjustable_and_report_is_json():
    lv = noisy_map()
    lv[:, 4, 4] = -31.0  # 9.5 nats under the per-cell minimum's median (-21.5)
    assert find_anomalies(synthetic(lv)).marks() == [(4, 4)]
    assert find_anomalies(synthetic(lv), threshold=10.0).marks() == []
    assert find_anomalies(synthetic(lv), min_drop=10.0).marks() == []
    d = find_anomalies(synthetic(lv)).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["anomalies"][0]["y"] == 4 and d["thresholds"]["threshold"] == 4.0


def test_bad_arguments_raise_input_error():
    post = synthetic(noisy_map())
    with pytest.raises(InputError, match="index"):
        find_anomalies(post, 1)
    with pytest.raises(InputError, match="threshold"):
        find_anomalies(post, threshold=-1)
    with pytest.raises(InputError, match="posterior"):
        find_anomalies(torch.zeros(1, 8, 4, 4))


def test_planting_refuses_an_image_without_the_marker():
    with pytest.raises(InputError, match="stand out"):
        planted_vae(preset_config("sd", small=True), image=demo_image(128, 128, None, 4), cell=(3, 3))
