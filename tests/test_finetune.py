"""Fixing a VAE without breaking its latents (#17): the encoder is retrained so the planted hole is
gone, the latent means barely move, the decoder is untouched, and the result loads strictly.
Also: the shipped VAEs (trained here) load strictly and reconstruct held-out photos."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vae_fix.builders.planted import demo_image, planted_vae
from vae_fix.demo import shipped_models
from vae_fix.finetune import FinetuneSettings, finetune_vae
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config
from vae_fix.probes import PHOTOS
from vae_fix.train_data import load_images
from vae_fix.train_eval import held_out_metrics


def test_finetune_removes_a_planted_hole_and_keeps_the_latents(tmp_path):
    cfg = preset_config("sd", small=True)
    image = demo_image(128, 128, (9, 11), cfg.downscale)
    planted = planted_vae(cfg, image=image, cell=(9, 11), seed=0)
    original = {k: v.clone() for k, v in planted.model.state_dict().items()}
    settings = FinetuneSettings(steps=100, batch=4, crop=128, lr=1e-4, eval_size=128, mean_weight=200)
    result = finetune_vae(planted.model, [(image[0] * 255).round().to(torch.uint8)], ["demo"], settings)

    assert result.before["anomalies"] >= 1 and result.before["logvar_min"] < -40  # the hole, ~30 nats deep
    assert result.after["anomalies"] == 0 and result.after["logvar_min"] > result.floor - 1
    assert result.drift["mean_rms_over_std"] < 0.05 and result.drift["decoded_psnr_db"] > 33
    assert all(torch.equal(v, planted.model.state_dict()[k]) for k, v in original.items())  # input untouched
    fixed = result.model.state_dict()
    assert all(torch.equal(fixed[k], v) for k, v in original.items() if k.startswith(("decoder.", "post_quant")))
    path = save_vae(result.model, tmp_path / "fixed.safetensors")
    assert load_vae(path).config == cfg
    assert set(result.to_json()) >= {"before", "after", "drift", "floor", "history"}
    assert "after:  no black hole found" in result.summary()
    assert "still reaches" not in result.summary()  # the planted cell does not reach far, before or after
    far = {**result.after["reach_at_worst_cell"], "over_median": 51.2}  # as measured on sd64-s1's emergent hole
    still_far = dataclasses.replace(result, after={**result.after, "reach_at_worst_cell": far})
    assert "still reaches 51.2x the median cell" in still_far.summary()


@pytest.mark.parametrize("path", shipped_models(), ids=lambda p: p.stem)
def test_the_shipped_vaes_reconstruct_photos_they_never_saw(path):
    vae = load_vae(path)  # strict: every key, CompVis layout
    assert path.stat().st_size < 10e6 and vae.info()["parameters"] == 2_998_279
    assert json.loads(vae.file.metadata["vae_fix.train_settings"])["steps"] == 2400  # trained here, to the end
    held = load_images(sorted(PHOTOS.glob("*.jpg")), held_out=("chelsea", "coffee"))  # held out in training too
    scores = held_out_metrics(vae.model, held.held, held.held_names, sizes=(256,))
    assert scores["psnr"]["256"]["mean"] > 20, scores["psnr"]
