"""Training (#17): a few steps on real photos — the loss falls, the checkpoint round-trips, resuming
gives the same weights as never stopping, the exported VAE loads strictly, the CLI resumes and
refuses a changed recipe. Full training runs are not tests (see docs/black-hole-study.md)."""
from __future__ import annotations

import json

import pytest
import torch

from run_cli import run_cli
from vae_fix.errors import InputError
from vae_fix.loader import load_vae
from vae_fix.probes import PHOTOS
from vae_fix.train import CHECKPOINT, TrainSettings, load_checkpoint, loss_terms, settings_for, train
from vae_fix.train_data import load_images, random_crops

TINY = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, crop=32, batch=2, lr=2e-3, warmup=2,
            eval_every=1000, checkpoint_every=2, eval_reach_size=128)


@pytest.fixture(scope="module")
def photos():
    """The three probe photos (real JPEGs shipped with the pack); chelsea is held out."""
    return load_images(sorted(PHOTOS.glob("*.jpg")), held_out=("chelsea",))


def _weights(folder):
    run = load_checkpoint(folder / CHECKPOINT, "cpu")
    return run.model.state_dict(), run


def test_photos_are_split_and_crops_are_seeded(photos):
    assert photos.held_names == ["chelsea"] and sorted(photos.train_names) == ["astronaut", "coffee"]
    a = random_crops(photos.train, 4, 32, torch.Generator().manual_seed(3))
    b = random_crops(photos.train, 4, 32, torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert -1 <= float(a.min()) < float(a.max()) <= 1
    assert not torch.equal(a, random_crops(photos.train, 4, 32, torch.Generator().manual_seed(4)))


def test_loss_falls_and_the_vae_loads_strictly(photos, tmp_path):
    settings = TrainSettings(**{**TINY, "steps": 60})
    batch = random_crops(photos.train, 16, 32, torch.Generator().manual_seed(123))  # fixed crops and noise:

    def l1(model):                                               # step-to-step batch noise averages out
        with torch.no_grad():
            return float(loss_terms(model, batch, settings, torch.Generator().manual_seed(7))["l1"])

    before = l1(load_checkpoint_or_init(settings))
    result = train(tmp_path, settings, images=photos)
    after = l1(_weights(tmp_path)[1].model)
    assert after < 0.8 * before, (before, after)
    assert [h["step"] for h in result.history] == [10, 20, 30, 40, 50, 60]
    final = result.evals[-1]
    assert final["step"] == 60 and final["images"] == ["chelsea"]
    assert final["psnr"]["256"]["mean"] > 10 and final["verdict"]["images"] == 10
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert loaded.config.base_channels == 32 and loaded.config.channel_mult == (1, 2, 2)
    ours = {k: v.half() for k, v in result_weights(tmp_path).items()}
    assert all(torch.equal(loaded.model.state_dict()[k].half(), v) for k, v in ours.items())


def load_checkpoint_or_init(settings):
    from vae_fix.train import _new_run
    return _new_run(settings, "cpu").model


def result_weights(folder):
    return _weights(folder)[0]


def test_checkpoint_round_trips(photos, tmp_path):
    train(tmp_path, TrainSettings(**{**TINY, "steps": 4}), images=photos)
    sd, run = _weights(tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    from vae_fix.train import save_checkpoint
    save_checkpoint(run, again)
    sd2, run2 = _weights(again)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert run2.step == 4 and run2.history == run.history and torch.equal(run.gen.get_state(), run2.gen.get_state())
    s1, s2 = run.opt.state_dict()["state"], run2.opt.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) and float(s1[i]["step"]) == 4 for i in s1)


def test_resuming_gives_the_weights_of_a_run_that_never_stopped(photos, tmp_path):
    settings = TrainSettings(**{**TINY, "steps": 6})
    train(tmp_path / "straight", settings, images=photos)

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "stopped", settings, images=photos, progress=stop_after_three)
    assert _weights(tmp_path / "stopped")[1].step == 3
    resumed = train(tmp_path / "stopped", settings, images=photos)
    assert resumed.step == 6
    a, b = result_weights(tmp_path / "straight"), result_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_its_recipe(photos, tmp_path):
    train(tmp_path, TrainSettings(**{**TINY, "steps": 2}), images=photos)
    assert settings_for(tmp_path, steps=10).steps == 10 and settings_for(tmp_path).base_channels == 32
    with pytest.raises(InputError, match="kl_weight.*differs from the run being resumed"):
        train(tmp_path, TrainSettings(**{**TINY, "steps": 4, "kl_weight": 1e-3}), images=photos)


def test_reading_training_images_bounds_their_size_without_touching_pillow(tmp_path, monkeypatch):
    # CI once failed because this module lowered PIL's global MAX_IMAGE_PIXELS for every other reader.
    from PIL import Image
    from vae_fix import train_data
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own bound, which the pack's image reader relies on
    monkeypatch.setattr(train_data, "MAX_PIXELS", 1000)
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"big\.png.*40x30 pixels"):
        train_data.read_uint8(tmp_path / "big.png")


def test_the_default_training_set_is_refused_when_a_source_is_missing(tmp_path, monkeypatch):
    # Without scikit-image a run once trained on the wallpapers alone: chelsea, coffee and rocket gone.
    from vae_fix import train_data
    monkeypatch.setattr(train_data, "skimage_files", lambda: [])
    monkeypatch.setattr(train_data, "wallpaper_files", lambda: [tmp_path / "Path.jpg"])
    with pytest.raises(InputError, match=r"incomplete: scikit-image's photographs \(pip install scikit-image\)"):
        train_data.load_images()
    monkeypatch.setattr(train_data, "wallpaper_files", lambda: [])
    with pytest.raises(InputError, match="scikit-image.* and Debian's wallpapers.*plasma-workspace-wallpapers"):
        train_data.load_images()


def test_settings_are_checked():
    with pytest.raises(InputError, match="crop"):
        TrainSettings(crop=100).check()
    with pytest.raises(InputError, match="base_channels"):
        TrainSettings(base_channels=48).check()


def test_cli_trains_resumes_and_refuses_a_changed_recipe(tmp_path):
    out = tmp_path / "run"
    flags = ["--images", str(PHOTOS), "--held-out", "chelsea", "--base-channels", "32", "--channel-mult", "1", "2", "2",
             "--blocks", "1", "--crop", "32", "--batch", "2", "--checkpoint-every", "1", "--eval-every", "100",
             "--eval-reach-size", "128"]
    r = run_cli("train", "--out", str(out), "--steps", "2", *flags)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train.json").read_text())["step"] == 2
    r = run_cli("train", "--out", str(out), "--steps", "3", "--images", str(PHOTOS), "--held-out", "chelsea", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["step"] == 3 and report["settings"]["base_channels"] == 32 and len(report["evals"]) == 2
    r = run_cli("train", "--out", str(out), "--kl-weight", "0.01", "--images", str(PHOTOS))
    assert r.returncode == 2 and "--kl-weight" in r.stderr and "differs from the run being resumed" in r.stderr
    r = run_cli("train", "--out", str(tmp_path / "none"), "--images", str(tmp_path / "missing"))
    assert r.returncode == 2 and "--images" in r.stderr and "not a folder" in r.stderr
