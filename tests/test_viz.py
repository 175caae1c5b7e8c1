import pytest
import torch

from vae_fix import viz
from vae_fix.errors import InputError

# Entries of matplotlib's own 256-entry tables (lib/matplotlib/_cm_listed.py), anchors and between.
MATPLOTLIB_ENTRIES = [
    ("viridis", 0, (0.267004, 0.004874, 0.329415)),
    ("viridis", 100, (0.166617, 0.463708, 0.558119)),
    ("viridis", 255, (0.993248, 0.906157, 0.143936)),
    ("magma", 37, (0.140858, 0.068654, 0.324538)),
    ("magma", 200, (0.992785, 0.594891, 0.410283)),
    ("inferno", 60, (0.316282, 0.053490, 0.425116)),
    ("inferno", 173, (0.938675, 0.430091, 0.130438)),
    ("inferno", 255, (0.988362, 0.998364, 0.644924)),
]


def assert_picture(img, h=None, w=None):
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.dim() == 3
    assert img.shape[0] == 3 and float(img.min()) >= 0 and float(img.max()) <= 1
    if h is not None:
        assert img.shape[1] == h
    if w is not None:
        assert img.shape[2] == w


@pytest.mark.parametrize("name,index,rgb", MATPLOTLIB_ENTRIES)
def test_colormaps_follow_matplotlibs_tables(name, index, rgb):
    lut = viz.colormap_lut(name)
    assert lut.shape == (256, 3)
    assert torch.allclose(lut[index], torch.tensor(rgb), atol=0.008)


@pytest.mark.parametrize("name", ["viridis", "magma", "inferno", "gray"])
def test_colormaps_get_brighter_from_low_to_high(name):
    lum = viz.colormap_lut(name) @ torch.tensor([0.2126, 0.7152, 0.0722])
    assert (lum[32:] > lum[:-32]).all()  # monotone at any 32-entry distance


def test_gray_is_a_straight_ramp_and_unknown_names_are_refused():
    assert torch.allclose(viz.colormap_lut("gray")[:, 0], torch.linspace(0, 1, 256), atol=1e-6)
    with pytest.raises(InputError, match="cmap"):
        viz.heatmap(torch.zeros(2, 2), cmap="jet")


def test_value_range_percentiles_fixed_and_degenerate():
    v = torch.arange(101, dtype=torch.float32).view(1, 101)
    assert viz.value_range(v) == pytest.approx((1.0, 99.0))
    assert viz.value_range(v, percentiles=(0, 100)) == (0.0, 100.0)
    assert viz.value_range(v, vmin=-5.0) == pytest.approx((-5.0, 99.0))
    assert viz.value_range(torch.full((3, 3), 7.0)) == (6.5, 7.5)
    with pytest.raises(InputError):
        viz.value_range(v, vmin=3.0, vmax=1.0)


def test_heatmap_maps_the_range_ends_to_the_colormap_ends_in_crisp_cells():
    v = torch.tensor([[-30.0, -20.0], [-10.0, float("nan")]])
    img = viz.heatmap(v, "viridis", vmin=-30, vmax=-10, scale=5)
    assert_picture(img, 10, 10)
    lut = viz.colormap_lut("viridis")
    assert torch.allclose(img[:, 0, 0], lut[0]) and torch.allclose(img[:, 9, 0], lut[255])
    assert torch.allclose(img[:, 9, 9], torch.tensor(viz.NAN_COLOR))
    block = img[:, :5, 5:]
    assert (block == block[:, :1, :1]).all()  # one colour per cell


def test_percentile_range_clips_outliers():
    v = torch.zeros(10, 10)
    v[0, 0] = -1000.0
    img = viz.heatmap(v, "gray")  # 1..99 percentile: the outlier clips, the rest is not squashed
    assert img[0, 0, 0] == 0 and img[0, 5, 5] > 0.4


def test_colorbar_has_the_ramp_and_numbers():
    bar = viz.colorbar("viridis", -30, -10, length=200, label="nats")
    assert_picture(bar, 200)
    lut = viz.colormap_lut("viridis")
    column = bar[:, :, 8].T  # [200, 3]
    coloured = [i for i, c in enumerate(column) if 0.05 < float(c.sum()) < 2.9]
    assert len(coloured) > 150  # the ramp fills most of the length
    top, bottom = column[coloured[0]], column[coloured[-1]]
    assert torch.allclose(top, lut[255], atol=0.01) and torch.allclose(bottom, lut[0], atol=0.01)
    text = bar[:, :, 22:]  # right of the ramp: tick labels and the rotated label, in black
    assert (text.sum(0) < 0.3).sum() > 50
    # different ranges write different numbers
    assert not torch.equal(bar, viz.colorbar("viridis", -3, -1, length=200, label="nats"))


@pytest.mark.parametrize("channels,grid", [(4, (2, 2)), (8, (2, 4)), (12, (3, 4)), (16, (4, 4)), (5, (1, 5)), (1, (1, 1))])
def test_channel_grid_lays_out_any_channel_count(channels, grid):
    assert viz.grid_shape(channels) == grid
    maps = torch.randn(channels, 6, 10)
    img = viz.channel_grid(maps, scale=4, bar=False, gap=4)
    rows, cols = grid
    assert_picture(img)
    assert img.shape[2] == cols * 40 + (cols - 1) * 4
    assert img.shape[1] > rows * 24 + (rows - 1) * 4  # tiles plus a caption strip each


def test_channel_grid_titles_each_tile_with_its_index():
    img = viz.channel_grid(torch.zeros(2, 4, 8), scale=4, bar=False)
    caption_h = img.shape[1] - 16
    c0, c1 = img[:, :caption_h, :32], img[:, :caption_h, 36:68]
    assert (c0.sum(0) < 1.0).any() and not torch.equal(c0, c1)


def test_channel_grid_with_bar_is_wider_and_refuses_bad_input():
    maps = torch.randn(4, 8, 8)
    assert viz.channel_grid(maps).shape[2] > viz.channel_grid(maps, bar=False).shape[2]
    with pytest.raises(InputError, match="maps"):
        viz.channel_grid(torch.zeros(8, 8))
    with pytest.raises(InputError, match="labels"):
        viz.channel_grid(maps, labels=["a"])


def test_overlay_blends_and_boxes_the_marked_cells():
    image = torch.full((3, 32, 48), 0.25)
    values = torch.zeros(4, 6)
    plain = viz.overlay(image, values, alpha=0.0)
    assert torch.allclose(plain, image, atol=1 / 255)
    marked = viz.overlay(image, values, alpha=0.0, marks=[(1, 2)], cell=8)
    # box 2 px outside cell (1, 2) = pixels rows 8..15, cols 16..23: white ring, black outline
    assert torch.allclose(marked[:, 7, 20], torch.ones(3)) and torch.allclose(marked[:, 5, 20], torch.zeros(3))
    assert torch.allclose(marked[:, 11, 20], image[:, 11, 20], atol=1 / 255)  # cell itself visible
    far = marked[:, 24:, :8]
    assert torch.allclose(far, image[:, 24:, :8], atol=1 / 255)


def test_overlay_zoom_offset_and_colour():
    image = torch.zeros(3, 20, 20)
    out = viz.overlay(image, torch.ones(2, 2), alpha=1.0, cmap="gray", vmin=0, vmax=1, offset=(2, 2), zoom=2)
    assert_picture(out, 40, 40)
    assert torch.allclose(out[:, 5, 5], torch.ones(3)) and torch.allclose(out[:, 1, 1], torch.zeros(3))
    assert torch.allclose(out[:, 39, 39], torch.zeros(3))  # outside the 2x2 cells: the image
    with pytest.raises(InputError, match="alpha"):
        viz.overlay(image, torch.ones(2, 2), alpha=2.0)
    with pytest.raises(InputError, match="image"):
        viz.overlay(torch.zeros(20, 20), torch.ones(2, 2))


def test_with_colorbar_and_caption_keep_the_picture():
    img = torch.rand(3, 40, 60)
    out = viz.with_colorbar(img, "inferno", 0, 1, "x")
    assert_picture(out, 128)
    top = (128 - 40) // 2
    assert torch.allclose(out[:, top:top + 40, :60], img, atol=1e-6)
    cap = viz.caption(img, "c3")
    assert_picture(cap, w=60) and cap.shape[1] > 40
    assert torch.allclose(cap[:, -40:, :60], img, atol=1e-6)
