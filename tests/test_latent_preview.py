import pytest
import torch
import torch.nn.functional as F

from vae_fix.images import load_image
from vae_fix.cli import main
from vae_fix.latent_io import write_latent

from run_cli import strict_json
from vae_fix.errors import InputError
from vae_fix.families import FAMILIES
from vae_fix.latent_preview import family_preview, fit_linear, fit_preview, latent_preview, pooled_target
from vae_fix.model import preset_config, random_vae


def published_model_space(fam, z):
    """ComfyUI's process_in: (z - shift) * scale, or (z - mean_c) * scale / std_c (Wan, Mochi)."""
    if fam.channel_mean is None:
        return (z - fam.shift) * fam.scale
    view = (1, fam.channels) + (1,) * (z.dim() - 2)
    return (z - torch.tensor(fam.channel_mean).view(view)) * fam.scale / torch.tensor(fam.channel_std).view(view)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_preview_is_the_published_map_on_model_space(name):
    fam = FAMILIES[name]
    z = torch.randn(2, fam.channels, 5, 7, generator=torch.Generator().manual_seed(0)) * 4 + 0.3
    model = published_model_space(fam, z)                             # what the sampler sees
    expected = torch.einsum("bchw,cr->brhw", model, torch.tensor(fam.rgb_factors))
    expected = expected + torch.tensor(fam.rgb_bias).view(1, 3, 1, 1)
    prev = family_preview(name)
    torch.testing.assert_close(prev.rgb(z), expected, atol=1e-5, rtol=1e-5)
    img = prev.image(z, scale=8)
    assert img.shape == (2, 3, 40, 56) and 0 <= float(img.min()) and float(img.max()) <= 1
    torch.testing.assert_close(img[:, :, ::8, ::8], ((expected + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_sd1_preview_colours():
    """SD1.x channel 0 is brightness: a positive channel-0 latent previews lighter than a negative one."""
    z = torch.zeros(2, 4, 1, 1)
    z[0, 0], z[1, 0] = 5.0, -5.0
    light, dark = family_preview("sd1").image(z)
    assert (light > dark).all()


def test_fit_recovers_a_linear_decoder_exactly():
    weight = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2],
                           [-0.1, 0.0, 0.6], [0.3, -0.3, 0.0], [0.05, 0.1, -0.2], [0.0, 0.0, 0.1], [0.2, 0.0, 0.0]])
    bias = torch.tensor([0.1, -0.05, 0.2])

    def decode(z):
        rgb = torch.einsum("bchw,cr->brhw", z, weight) + bias.view(1, 3, 1, 1)
        return F.interpolate(rgb, scale_factor=8, mode="nearest")

    z = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    prev = fit_preview(z, decode)
    torch.testing.assert_close(prev.weight, weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(prev.bias, bias, atol=1e-4, rtol=0)
    assert min(prev.r2) > 0.9999 and prev.source == "fit"


def test_fit_on_a_real_12_channel_decoder_reports_its_quality():
    """A random-weight VAE is not linear per cell, so the fit is partial; r2 must say how partial."""
    vae = random_vae(preset_config("retrained8", small=True, z_channels=12, latent_channels=12), seed=0)
    z = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(2))
    prev = fit_preview(z, vae.decode, index=1)
    with torch.no_grad():
        truth = pooled_target(vae.decode(z[1:]), 16, 16)
    resid = (prev.rgb(z[1:]) - truth).pow(2).sum(dim=(0, 2, 3))
    total = (truth - truth.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum(dim=(0, 2, 3))
    torch.testing.assert_close(torch.tensor(prev.r2), (1 - resid / total).float(), atol=1e-3, rtol=0)
    assert all(0 < r < 1 for r in prev.r2) and prev.weight.shape == (12, 3)


def test_latent_preview_chooses_and_checks():
    z4, z16, z8 = torch.zeros(1, 4, 4, 4), torch.zeros(1, 16, 4, 4), torch.randn(1, 8, 4, 4)
    assert latent_preview(z4, "sdxl").map.source == "sdxl"
    assert latent_preview(z16, "flux").map.source == "flux"
    with pytest.raises(InputError, match=r"sd3 latents have 16 channels, this one has 4.*sd1, sdxl"):
        latent_preview(z4, "sd3")
    unknown = latent_preview(z8, "auto")  # no known family, no VAE to fit with: principal components, said
    assert unknown.map.source == "principal components" and "knows no family with 8 channels" in unknown.chosen
    with pytest.raises(InputError, match="Invalid vae: a fitted preview map needs a VAE"):
        latent_preview(z8, "fit")
    with pytest.raises(InputError, match="8 channels for a sd1 preview of 4"):
        family_preview("sd1").rgb(z8)


def test_principal_components_show_the_latents_own_structure():
    """A 5-channel latent built from three known patterns: the map's RGB spans exactly those patterns
    (each output channel is a combination of them and a constant), centred, two standard deviations at +-1."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(3, 16, 16, generator=g)           # [3, h, w]
    mix = torch.randn(5, 3, generator=g)                      # each channel a mix of the patterns
    z = torch.einsum("cp,phw->chw", mix, patterns)[None] + 0.5
    result = latent_preview(z, "auto")
    rgb = result.map.rgb(z)[0].reshape(3, -1).double()       # [3, h*w]
    basis = torch.cat([patterns.reshape(3, -1), torch.ones(1, 256)]).double()  # the patterns, and a constant
    coef = torch.linalg.lstsq(basis.T, rgb.T).solution        # rgb explained by the patterns alone
    assert float((basis.T @ coef - rgb.T).abs().max()) < 1e-4
    assert torch.allclose(rgb.std(dim=1), torch.full((3,), 0.5, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(rgb.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-5)


def test_fit_linear_checks_shapes():
    with pytest.raises(InputError, match="target"):
        fit_linear(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 2, 2))
    with pytest.raises(InputError, match="usable cells"):
        fit_linear(torch.zeros(1, 4, 1, 2), torch.zeros(1, 3, 1, 2))


# ---------------------------------------------------------------- CLI

def test_cli_preview_of_an_sd1_latent_uses_the_sd1_factors(tmp_path):
    z = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0)) / 0.18215
    out = tmp_path / "prev"
    assert main(["preview", "--latent", str(write_latent(z, tmp_path / "z.latent")), "--out", str(out),
                 "--family", "sd1"]) == 0
    data = strict_json(out / "info.json")
    assert data["source"] == "sd1" and data["channels"] == 4 and data["r2"] is None
    torch.testing.assert_close(torch.tensor(data["weight"]), family_preview("sd1").weight)
    want = family_preview("sd1").image(z, scale=8)
    for i in range(2):
        got = load_image(out / f"preview_{i}.png")[0]  # [3, H, W] in 0..1
        assert tuple(got.shape[1:]) == (16 * 8, 12 * 8)
        assert float((got - want[i]).abs().max()) <= 1 / 255 + 1e-6


@pytest.mark.parametrize("channels,spread,want", [(4, 1 / 0.18215, "sd1"), (4, 1 / 0.13025, "sdxl"),
                                                   (16, 1 / 1.5305, "sd3"), (16, 1 / 0.3611, "flux")])
def test_auto_picks_the_family_whose_scale_fits_the_latent_and_says_so(channels, spread, want):
    """Without a VAE, 'auto' on 4 or 16 channels takes the family whose sampler scale (1 / std of its
    raw latents) fits this latent's spread, instead of refusing every SD1.x and SDXL latent."""
    z = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(1)) * spread
    result = latent_preview(z, "auto")
    assert result.map.source == want and result.to_json()["chosen"].startswith(f"'auto' chose {want} of ")
    assert result.summary().splitlines()[-1] == result.to_json()["chosen"]
    assert torch.equal(result.images, latent_preview(z, want).images)  # exactly that family's published map
    assert "chosen" not in latent_preview(z, want).to_json()  # a named family needs no note


def test_cli_preview_auto_without_a_vae_names_its_choice(tmp_path, capsys):
    path = write_latent(torch.randn(1, 4, 8, 8) * 5.5, tmp_path / "z.latent")
    assert main(["preview", "--latent", str(path), "--out", str(tmp_path / "o")]) == 0
    assert strict_json(tmp_path / "o" / "info.json")["chosen"].startswith("'auto' chose sd1 of sd1, sdxl")
    path8 = write_latent(torch.randn(1, 8, 8, 8), tmp_path / "z8.latent")
    assert main(["preview", "--latent", str(path8), "--out", str(tmp_path / "o8")]) == 0
    assert strict_json(tmp_path / "o8" / "info.json")["source"] == "principal components"
    assert main(["preview", "--latent", str(path8), "--out", str(tmp_path / "o9"), "--family", "fit"]) == 2
    assert "needs a VAE" in capsys.readouterr().err and not (tmp_path / "o9").exists()
    path16 = write_latent(torch.randn(1, 16, 8, 8), tmp_path / "z16.latent")
    assert main(["preview", "--latent", str(path16), "--out", str(tmp_path / "o16"), "--family", "flux"]) == 0
    assert strict_json(tmp_path / "o16" / "info.json")["source"] == "flux"


@pytest.mark.parametrize("args,needle", [(["--family", "sd3"], "Invalid --family: sd3 latents have 16 channels"),
                                         (["--family", "fit"], "Invalid --vae: a fitted preview map needs a VAE")])
def test_cli_preview_bad_input_exits_2(tmp_path, capsys, args, needle):
    path = write_latent(torch.randn(1, 4, 8, 8), tmp_path / "z.latent")
    assert main(["preview", "--latent", str(path), "--out", str(tmp_path / "o"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
