"""Reflection padding for KL VAEs retrained with it (EQ-VAE style): `load_vae(padding="reflect")`
and the commands' `--padding reflect` switch every padded convolution, so a flat latent decodes to a
flat picture (zero padding draws a frame around it); anything else is refused before any reading."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from run_cli import run_cli
from vae_files import write_vae

from vae_fix.errors import InputError
from vae_fix.loader import load_vae
from vae_fix.model import set_padding


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    return write_vae(tmp_path_factory.mktemp("vae"), "sd", name="tiny")


def spread(picture: torch.Tensor) -> float:
    """The largest difference between two pixels of one channel (0 for a flat picture)."""
    flat = picture.flatten(2)
    return float((flat.max(-1).values - flat.min(-1).values).max())


def test_a_flat_latent_decodes_flat_only_with_reflect_padding(vae_path):
    z = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        zeros = load_vae(vae_path).model.decode(z)
        reflect = load_vae(vae_path, padding="reflect").model.decode(z)
    assert spread(reflect) < 1e-5   # no border anywhere
    assert spread(zeros) > 1e-2     # zero padding: a frame


def test_every_padded_convolution_is_switched_and_the_info_says_so(vae_path):
    vae = load_vae(vae_path, padding="reflect")
    convs = [m for m in vae.model.modules() if isinstance(m, torch.nn.Conv2d)]
    padded = [m for m in convs if m.padding != (0, 0)]
    assert padded and all(m.padding_mode == "reflect" for m in padded)
    assert all(m.padding_mode == "zeros" for m in convs if m.padding == (0, 0))  # 1x1 and the strided downsample
    assert vae.info()["padding"] == "reflect" and load_vae(vae_path).info()["padding"] == "zeros"
    assert set_padding(vae.model, "zeros") == len(padded)  # and back


def test_an_unknown_padding_is_refused_before_the_file_is_read(tmp_path):
    with pytest.raises(InputError) as e:
        load_vae(tmp_path / "does_not_exist.safetensors", padding="circular")
    assert "padding" in str(e.value) and "'zeros' or 'reflect'" in str(e.value)


def test_cli_padding_flag_decodes_a_flat_latent_flat(vae_path, tmp_path):
    latent = tmp_path / "flat.latent"
    save_file({"latent_tensor": torch.zeros(1, 4, 8, 8)}, str(latent))
    spreads = {}
    for padding in ("zeros", "reflect"):
        out = tmp_path / padding
        r = run_cli("decode", "--vae", vae_path, "--latent", latent, "--padding", padding, "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        (png,) = out.glob("*.png")
        picture = np.asarray(Image.open(png).convert("RGB")).astype(int)
        spreads[padding] = np.ptp(picture, axis=(0, 1)).max()
    assert spreads["reflect"] <= 1 and spreads["zeros"] > 2


def test_compare_takes_a_padding_for_each_vae(vae_path, tmp_path):
    r = run_cli("compare", "--help")
    assert "--padding-a" in r.stdout and "--padding-b" in r.stdout
    r = run_cli("decode", "--vae", vae_path, "--latent", tmp_path / "x.latent", "--padding", "mirror", "--out", tmp_path / "o")
    assert r.returncode != 0 and "--padding" in r.stderr and "reflect" in r.stderr
