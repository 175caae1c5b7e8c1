import pytest
import torch

from vae_fix.edit import OPS, edit_channels, mask_to_grid, parse_batch, parse_channels
from vae_fix.errors import InputError


def latent(b=2, c=4, h=6, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g) * 2 + 0.5


@pytest.mark.parametrize("spec,count,expected", [
    ("all", 4, [0, 1, 2, 3]), ("0,2", 4, [0, 2]), ("1-3", 4, [1, 2, 3]), (" 0, 4-6 ", 16, [0, 4, 5, 6]),
    ("3,1", 4, [3, 1]), (2, 4, [2]), ([0, 1], 4, [0, 1]), ("*", 2, [0, 1]),
])
def test_parse_channels(spec, count, expected):
    assert parse_channels(spec, count) == expected


def test_parse_batch_empty_means_all():
    assert parse_batch("", 3) == [0, 1, 2]
    assert parse_batch("0,2-3", 4) == [0, 2, 3]


@pytest.mark.parametrize("spec,needle", [("5", "channel 5 is out of range for 4 channels"),
                                         ("a", "cannot read 'a'"), ("3-1", "runs backwards"), ("", "no channel")])
def test_bad_channels_name_input_problem_expected(spec, needle):
    with pytest.raises(InputError) as e:
        parse_channels(spec, 4)
    msg = str(e.value)
    assert msg.startswith("Invalid channels:") and needle in msg and "Expected" in msg


def test_channel_5_on_4_channel_latent_through_edit():
    with pytest.raises(InputError, match=r"channels.*channel 5 is out of range.*Expected indices 0-3"):
        edit_channels(latent(), "zero", "5").latent


@pytest.mark.parametrize("c", [4, 8, 16])
def test_each_op_on_any_channel_count(c):
    z = latent(c=c)
    before = z.clone()
    last = c - 1
    results = {
        "scale": edit_channels(z, "scale", str(last), factor=3.0).latent,
        "offset": edit_channels(z, "offset", "0", offset=-1.5).latent,
        "clamp": edit_channels(z, "clamp", "all", low=-1.0, high=1.0).latent,
        "soft_clamp": edit_channels(z, "soft_clamp", "all", limit=2.0).latent,
        "normalize": edit_channels(z, "normalize", f"1-{last}", mean=0.25, std=0.5).latent,
        "zero": edit_channels(z, "zero", "1").latent,
        "invert": edit_channels(z, "invert", "0").latent,
        "swap": edit_channels(z, "swap", "0", target=str(last)).latent,
        "copy": edit_channels(z, "copy", "1", target="0").latent,
    }
    assert set(results) == set(OPS)
    assert torch.equal(z, before), "input modified"
    torch.testing.assert_close(results["scale"][:, last], z[:, last] * 3)
    torch.testing.assert_close(results["scale"][:, :last], z[:, :last])
    torch.testing.assert_close(results["offset"][:, 0], z[:, 0] - 1.5)
    assert results["clamp"].abs().max() <= 1.0
    soft = results["soft_clamp"]
    assert soft.abs().max() < 2.0
    torch.testing.assert_close(soft, 2.0 * torch.tanh(z / 2.0))
    norm = results["normalize"][:, 1:]
    torch.testing.assert_close(norm.mean(dim=(2, 3)), torch.full((2, c - 1), 0.25), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.std(dim=(2, 3), correction=0), torch.full((2, c - 1), 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(results["normalize"][:, 0], z[:, 0])
    assert results["zero"][:, 1].abs().max() == 0 and torch.equal(results["zero"][:, 0], z[:, 0])
    torch.testing.assert_close(results["invert"][:, 0], -z[:, 0])
    torch.testing.assert_close(results["swap"][:, 0], z[:, last])
    torch.testing.assert_close(results["swap"][:, last], z[:, 0])
    torch.testing.assert_close(results["copy"][:, 0], z[:, 1])
    torch.testing.assert_close(results["copy"][:, 1], z[:, 1])


def test_batch_selection_leaves_other_items():
    z = latent(b=4)
    out = edit_channels(z, "zero", "all", batch="0,2-3").latent
    assert out[[0, 2, 3]].abs().max() == 0
    torch.testing.assert_close(out[1], z[1])


def test_mask_in_image_pixels_soft_blend():
    z = latent(b=1, h=4, w=4)
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1.0            # left half of the image (8x downscale)
    out = edit_channels(z, "offset", "all", offset=10.0, mask=mask).latent
    torch.testing.assert_close(out[..., :2], z[..., :2] + 10)
    torch.testing.assert_close(out[..., 3:], z[..., 3:])
    half = torch.full((1, 4, 4), 0.5)  # latent-grid mask: half the edit everywhere
    torch.testing.assert_close(edit_channels(z, "offset", "all", offset=2.0, mask=half).latent, z + 1.0)


def test_mask_resizes_soft_and_per_item():
    grid = mask_to_grid(torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]]]).expand(2, 8, 2), 2, 4, 1)
    assert grid.shape == (2, 1, 4, 1)
    assert 0.3 < float(grid[0].mean()) < 0.7 and float(grid[1].min()) == 1.0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(op="clamp"), "at least one bound"), (dict(op="clamp", low=2, high=1), "low 2 is above high 1"),
    (dict(op="soft_clamp", limit=0), "not positive"), (dict(op="normalize", std=-1), "negative"),
    (dict(op="swap", target="0"), "overlap"), (dict(op="copy"), "needs target"),
    (dict(op="copy", channels="0,1", target="2"), "1 target channels for 2"), (dict(op="blur"), "unknown operation"),
    (dict(op="zero", mask=torch.ones(3, 8, 8)), "3 masks for 2 latents"),
    (dict(op="zero", mask=torch.ones(64, 8)), "aspect"), (dict(op="zero", batch="7"), "batch item 7"),
])
def test_bad_arguments(kwargs, needle):
    kwargs = {"channels": "0", **kwargs}
    with pytest.raises(InputError, match=needle):
        edit_channels(latent(), kwargs.pop("op"), **kwargs).latent


def test_edit_does_not_modify_its_input_and_reports_the_touched_channels():
    z = latent(b=2)
    snapshot = z.clone()
    result = edit_channels(z, "scale", "0", factor=0.5)
    assert torch.equal(z, snapshot) and result.latent is not z
    torch.testing.assert_close(result.latent[:, 0], z[:, 0] * 0.5)
    torch.testing.assert_close(result.latent[:, 1:], z[:, 1:])
    row = result.to_json()["channels"][0]
    assert row["channel"] == 0 and row["mean_after"] == pytest.approx(row["mean_before"] * 0.5, rel=1e-5)
    assert row["values_changed"] == z[:, 0].numel() and len(result.to_json()["channels"]) == 1
    assert "ch 0" in result.summary()


def test_edit_rejects_non_latent():
    with pytest.raises(InputError, match="latent"):
        edit_channels(torch.zeros(1), "zero").latent


def test_half_precision_kept():
    z = latent().half()
    out = edit_channels(z, "scale", "all", factor=2.0).latent
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, z * 2)


def test_cli_edit_writes_the_edited_latent_and_leaves_other_channels(tmp_path):
    from run_cli import run_cli, strict_json
    from vae_fix.latent_io import read_latent, write_latent

    z = latent(b=2)
    path = write_latent(z, tmp_path / "z.latent")
    r = run_cli("edit", "--latent", path, "--operation", "offset", "--channels", "1-2", "--offset", "-1.5",
                "--batch", "1", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    edited = read_latent(tmp_path / "out" / "edited.latent")
    torch.testing.assert_close(edited[1, 1:3], z[1, 1:3] - 1.5)
    torch.testing.assert_close(edited[0], z[0])
    torch.testing.assert_close(edited[1, [0, 3]], z[1, [0, 3]])
    info = strict_json(tmp_path / "out" / "info.json")
    assert [c["channel"] for c in info["channels"]] == [1, 2] and info["batch_items"] == [1]
    bad = run_cli("edit", "--latent", path, "--operation", "zero", "--channels", "9", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "channels" in bad.stderr and not (tmp_path / "bad").exists()
