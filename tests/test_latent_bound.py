"""The study's tanh-bounded latents (`--latent-tanh B`, TAESD's 3 tanh(x / 3)): the encoder's mean is
bounded before sampling and decoding, the log-variance is not. No weight can express the tanh, so the
file declares it in its metadata, loads as what it is, and is refused by the diffusers writer."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_fix.errors import InputError, VAELoadError
from vae_fix.loader import BOUND_META_KEY, load_vae, save_vae
from vae_fix.model import AutoencoderKL, VAEConfig
from vae_fix.probes import PHOTOS
from vae_fix.train import CHECKPOINT, TrainSettings, load_checkpoint, train
from vae_fix.train_data import load_images

SMALL = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)


def bounded_and_plain(bound: float = 0.5) -> tuple[AutoencoderKL, AutoencoderKL]:
    torch.manual_seed(0)
    plain = AutoencoderKL(VAEConfig(**SMALL)).eval()
    bounded = AutoencoderKL(VAEConfig(**SMALL, latent_bound=bound)).eval()
    bounded.load_state_dict(plain.state_dict())
    return bounded, plain


def test_only_the_mean_is_bounded_and_small_means_pass_almost_unchanged():
    bounded, plain = bounded_and_plain(0.5)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mb, mp = bounded.moments(x), plain.moments(x)
    assert mp[:, :4].abs().max() > 0.5, "the random encoder must give means beyond the bound for this test"
    assert mb[:, :4].abs().max() < 0.5 and torch.allclose(mb[:, :4], 0.5 * torch.tanh(mp[:, :4] / 0.5))
    assert torch.equal(mb[:, 4:], mp[:, 4:])  # the log-variance, raw
    small = mp[:, :4].abs() < 0.05
    assert torch.allclose(mb[:, :4][small], mp[:, :4][small], rtol=0.01, atol=0)  # tanh(t) = t - t^3/3 + ...


def test_the_file_declares_it_and_loads_as_it_is(tmp_path):
    model, _ = bounded_and_plain(3.0)
    path = save_vae(model, tmp_path / "tanh.safetensors")
    with safe_open(str(path), "pt") as f:
        assert float(f.metadata()[BOUND_META_KEY]) == 3.0
    loaded = load_vae(path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert loaded.model.config.latent_bound == 3.0 and torch.equal(loaded.model.moments(x), model.moments(x))
    with pytest.raises(InputError, match="diffusers"):
        save_vae(model, tmp_path / "d", layout="diffusers")
    for text in ("-3", "nan", "inf", "three", "1e9", "0.01"):
        bad = tmp_path / "bad.safetensors"
        save_file(load_file(str(path)), str(bad), {BOUND_META_KEY: text})
        with pytest.raises(VAELoadError, match=rf"bad\.safetensors.*latent_bound.*'{text}'.*0\.1 to 100"):
            load_vae(bad)


def test_a_run_trains_and_resumes_with_it(tmp_path):
    photos = load_images(sorted(PHOTOS.glob("*.jpg")), held_out=("chelsea",))
    settings = TrainSettings(**SMALL, crop=32, batch=2, steps=3, warmup=1, eval_every=1000, checkpoint_every=2,
                             eval_reach_size=128, latent_bound=3.0)
    train(tmp_path, settings, images=photos)
    run = load_checkpoint(tmp_path / CHECKPOINT, "cpu")
    assert run.settings.latent_bound == 3.0 and run.model.config.latent_bound == 3.0
    assert load_vae(tmp_path / "vae.safetensors").model.config.latent_bound == 3.0
    with safe_open(str(tmp_path / "vae.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["vae_fix.train_settings"])["latent_bound"] == 3.0
    with pytest.raises(InputError, match="latent_bound"):
        TrainSettings(latent_bound=-1).check()
