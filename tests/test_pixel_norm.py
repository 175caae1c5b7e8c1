"""The study's decoder whose last stage cannot be steered by one cell (`--decoder-norm pixel`): each
pixel normalised alone, GroupNorm's parameters, declared in the file's metadata so it loads as what
it is (and is refused where ComfyUI's KL model would run it with GroupNorm)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_fix.errors import InputError, VAELoadError
from vae_fix.loader import NORM_META_KEY, load_vae, save_vae
from vae_fix.model import AutoencoderKL, PixelNorm, VAEConfig
from vae_fix.train import CHECKPOINT, TrainSettings, load_checkpoint, train
from vae_fix.train_data import load_images
from vae_fix.probes import PHOTOS

SMALL = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, decoder_norm="pixel")


def test_only_the_decoders_last_level_and_norm_out_normalise_each_pixel():
    model = AutoencoderKL(SMALL)
    pixel = {n for n, m in model.named_modules() if isinstance(m, PixelNorm)}
    assert pixel == {f"decoder.up.0.block.{b}.norm{k}" for b in (0, 1) for k in (1, 2)} | {"decoder.norm_out"}
    assert set(model.state_dict()) == set(AutoencoderKL(VAEConfig(**{**SMALL.to_dict(), "decoder_norm": "group"})).state_dict())


def test_one_cell_moves_only_its_own_pixel_where_groupnorm_moves_every_pixel():
    x = torch.randn(1, 64, 16, 16)
    spiked = x.clone()
    spiked[0, :, 5, 7] *= 50
    for norm, moved_elsewhere in ((PixelNorm(64), False), (torch.nn.GroupNorm(32, 64, eps=1e-6), True)):
        change = (norm(spiked) - norm(x)).abs().amax(1)[0]  # [16, 16]
        change[5, 7] = 0
        assert bool(change.max() > 1e-3) == moved_elsewhere, norm


def test_the_file_declares_it_and_loads_as_it_is(tmp_path):
    model = AutoencoderKL(SMALL).eval()
    path = save_vae(model, tmp_path / "pixel.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()[NORM_META_KEY] == "pixel"
    loaded = load_vae(path)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert loaded.model.config.decoder_norm == "pixel" and torch.equal(loaded.model.decode(z), model.decode(z))
    with pytest.raises(InputError, match="diffusers"):
        save_vae(model, tmp_path / "d", layout="diffusers")
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), {NORM_META_KEY: "instance"})
    with pytest.raises(VAELoadError, match=r"bad\.safetensors.*decoder_norm.*'instance'"):
        load_vae(bad)


def test_a_run_trains_and_resumes_with_it(tmp_path):
    photos = load_images(sorted(PHOTOS.glob("*.jpg")), held_out=("chelsea",))
    settings = TrainSettings(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, crop=32, batch=2, steps=3,
                             warmup=1, eval_every=1000, checkpoint_every=2, eval_reach_size=128, decoder_norm="pixel")
    train(tmp_path, settings, images=photos)
    run = load_checkpoint(tmp_path / CHECKPOINT, "cpu")
    assert run.settings.decoder_norm == "pixel" and isinstance(run.model.decoder.norm_out, PixelNorm)
    assert load_vae(tmp_path / "vae.safetensors").model.config.decoder_norm == "pixel"
    with safe_open(str(tmp_path / "vae.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["vae_fix.train_settings"])["decoder_norm"] == "pixel"
    with pytest.raises(InputError, match="decoder_norm"):
        TrainSettings(decoder_norm="instance").check()
