"""Latent Preview (RGB) of video latents [B, C, T, h, w] (#12): the host's latent formats for Wan
2.1/2.2, HunyuanVideo, Mochi, LTXV and Hunyuan Image 2.1, one picture per frame, and 'auto' by
channel count."""
import ast
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vae_fix.errors import InputError
from vae_fix.families import FAMILIES, families_with_channels, get_family
from vae_fix.latent_preview import family_preview, fit_preview, latent_preview

VIDEO = ["wan21", "wan22", "hunyuan_video", "mochi", "ltxv"]
HOST_CLASSES = {"wan21": "Wan21", "wan22": "Wan22", "hunyuan_video": "HunyuanVideo", "mochi": "Mochi",
                "ltxv": "LTXV", "hunyuan_image21": "HunyuanImage21"}


def published(fam):
    """(factors [C, 3], bias [3], model-space map) as ComfyUI's latent format defines them."""
    factors, bias = torch.tensor(fam.rgb_factors, dtype=torch.float64), torch.tensor(fam.rgb_bias, dtype=torch.float64)
    if fam.channel_mean is None:
        return factors, bias, lambda z: (z - fam.shift) * fam.scale
    view = (1, fam.channels, 1, 1, 1)
    mean, std = torch.tensor(fam.channel_mean).view(view), torch.tensor(fam.channel_std).view(view)
    return factors, bias, lambda z: (z - mean) * fam.scale / std


def latent(c, b=2, t=3, h=5, w=7, seed=0, spread=2.0):
    return torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread + 0.3


@pytest.mark.parametrize("name", VIDEO + ["hunyuan_image21"])
def test_video_preview_is_the_published_map_on_every_frame(name):
    fam = FAMILIES[name]
    z = latent(fam.channels)
    factors, bias, model_space = published(fam)
    expected = torch.einsum("bcthw,cr->brthw", model_space(z), factors) + bias.view(1, 3, 1, 1, 1)
    prev = family_preview(name)
    got = prev.rgb(z.float())
    assert got.shape == (2, 3, 3, 5, 7)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
    pictures = prev.image(z.float(), scale=4)
    assert pictures.shape == (6, 3, 20, 28)  # one per frame, item by item
    for i in range(6):
        b, t = divmod(i, 3)
        want = ((expected[b, :, t] + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(pictures[i, :, ::4, ::4].double(), want, atol=2e-5, rtol=0)


def test_the_numbers_are_the_hosts():
    """Each family's factors, bias, scale and per-channel mean/std equal ComfyUI 0.3.64's latent
    formats, read as data from its source (skipped without COMFYUI_PATH)."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH not set: the host's latent formats are not here to compare with")
    formats = host_formats(Path(root) / "comfy" / "latent_formats.py")
    for name, cls in HOST_CLASSES.items():
        fam, host = FAMILIES[name], formats[cls]
        assert fam.channels == host["latent_channels"] == len(fam.rgb_factors), name
        assert [list(r) for r in fam.rgb_factors] == host["latent_rgb_factors"], name
        assert list(fam.rgb_bias) == host["latent_rgb_factors_bias"], name
        assert fam.scale == host.get("scale_factor", 1.0) and fam.shift == 0.0, name
        assert fam.video == (host["latent_dimensions"] == 3), name
        assert list(fam.channel_mean or []) == host.get("latents_mean", []), name
        assert list(fam.channel_std or []) == host.get("latents_std", []), name


def host_formats(path: Path) -> dict:
    """{class: {attribute: number or list}} of the latent format classes, read with `ast` (not imported)."""
    out = {}
    for cls in ast.parse(path.read_text()).body:
        if isinstance(cls, ast.ClassDef):
            attrs = {}
            for base in cls.bases:  # Wan22 inherits from Wan21
                attrs.update(out.get(getattr(base, "id", ""), {}))
            for node in ast.walk(cls):
                if isinstance(node, ast.Assign):
                    target = node.targets[0]
                    name = getattr(target, "attr", getattr(target, "id", None))
                    value = node.value
                    while isinstance(value, ast.Call):  # torch.tensor([...]).view(...)
                        value = value.func.value if getattr(value.func, "attr", "") == "view" else value.args[0]
                    try:
                        attrs[name] = ast.literal_eval(value)
                    except ValueError:
                        pass
            out[cls.name] = attrs
    return out


@pytest.mark.parametrize("channels,want", [(48, "wan22"), (12, "mochi"), (128, "ltxv")])
def test_auto_takes_the_only_video_family_with_the_channel_count(channels, want):
    z = latent(channels, b=1, t=2).float()
    result = latent_preview(z, "auto", scale=2)
    assert result.map.source == want and result.chosen == ""
    assert result.images.shape == (2, 3, 10, 14)
    info = result.to_json()
    assert info["video"]["items"] == 1 and info["video"]["frames"] == 2 and "item by item" in info["video"]["pictures"]
    assert "a video latent (1 item(s) of 2 frames: 2 pictures, a batch of one picture per frame" in result.summary()
    assert list(result.pictures()) == ["preview_item0_frame0", "preview_item0_frame1"]


@pytest.mark.parametrize("family", ["wan21", "hunyuan_video"])
def test_auto_on_16_channel_video_takes_the_likelier_of_wan_and_hunyuan_and_says_which(family):
    """A latent spread as the family's own latents (model space mean 0, std 1) is previewed with its factors."""
    fam = get_family(family)
    model = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    z = fam.to_raw(model)
    result = latent_preview(z, "auto")
    assert result.map.source == family
    note = result.to_json()["chosen"]
    assert note.startswith(f"'auto' chose {family} of wan21, hunyuan_video: in {family}'s model space the latent's spread is")
    assert result.summary().splitlines()[-1] == note
    assert torch.equal(result.images, latent_preview(z, family).images)


def test_sixteen_channel_images_still_choose_between_sd3_and_flux():
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)) / 0.3611
    assert [f.name for f in families_with_channels(16)] == ["sd3", "flux"]
    assert [f.name for f in families_with_channels(16, video=True)] == ["wan21", "hunyuan_video"]
    assert latent_preview(z, "auto").map.source == "flux"


def test_a_named_family_needs_only_the_channel_count():
    z5, z4 = latent(16, b=1, t=2).float(), torch.randn(1, 16, 4, 4)
    assert latent_preview(z4, "wan21").map.source == "wan21"   # Qwen-Image latents use Wan 2.1's format
    assert latent_preview(z5, "sd3").images.shape == (2, 3, 40, 56)
    assert latent_preview(torch.randn(1, 64, 4, 4), "auto").map.source == "hunyuan_image21"


@pytest.mark.parametrize("z,family,needle", [
    (torch.randn(1, 16, 2, 4, 4), "wan22", "Invalid family: wan22 latents have 48 channels, this one has 16"),
    (torch.randn(1, 16, 2, 4, 4), "fit", "Invalid vae: a fitted preview map needs a VAE"),
])
def test_video_preview_refusals_are_named(z, family, needle):
    with pytest.raises(InputError, match=needle):
        latent_preview(z, family)


def test_auto_on_a_video_latent_no_family_describes_shows_principal_components_and_says_so():
    result = latent_preview(torch.randn(1, 64, 2, 4, 4), "auto")   # the Hunyuan Image refiner's packed latent
    assert result.map.source == "principal components" and result.images.shape[0] == 2
    assert "knows no video family with 64 channels (known: wan21 16, wan22 48" in result.chosen


def test_a_fit_on_a_video_latent_decodes_the_first_frame_alone():
    weight = torch.randn(6, 3, generator=torch.Generator().manual_seed(5)) * 0.2
    bias = torch.tensor([0.1, -0.05, 0.2])
    seen = []

    def decode(z):  # a per-frame decoder, as the host adapter's for a video VAE
        seen.append(z.clone())
        rgb = torch.einsum("bchw,cr->brhw", z, weight) + bias.view(1, 3, 1, 1)
        return F.interpolate(rgb, scale_factor=8, mode="nearest")

    z = torch.randn(2, 6, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    prev = fit_preview(z, decode, index=1)
    assert len(seen) == 1 and torch.equal(seen[0], z[1:2, :, 0])
    torch.testing.assert_close(prev.weight, weight, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="Invalid index: 2"):
        fit_preview(z, decode, index=2)
