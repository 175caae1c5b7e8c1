"""The pack in an SD3-style text-to-image graph (issue 16): a small MMDiT checkpoint the host
detects as SD3 (tests/host_checkpoints.py), its 16-channel latents sampled on the CPU (64 px, 4
steps), decoded by a VAE from Load VAE (strict) exactly as core Load VAE decodes the same file,
edited channel by channel, and inspected on the checkpoint's own VAE and on the swapped one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from host_checkpoints import generation_models, node, save_latent, saved_latent, vae_swapped_in, with_defaults
from host_server import images_of, succeeded

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def sd3(host) -> dict:
    return generation_models(host, "sd3")


def txt2img(host, models: dict) -> dict:
    """Checkpoint → prompts → EmptySD3LatentImage (64 px) → KSampler (4 steps) → VAE Decode with the
    strict loader's VAE → Save Image "9"; "3" is the sampled latent, "1" the checkpoint."""
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name=models["checkpoint"]),
        "2": node("CLIPTextEncode", text="a lighthouse at dusk", clip=["1", 1]),
        "4": node("CLIPTextEncode", text="", clip=["1", 1]),
        "5": node("EmptySD3LatentImage", width=64, height=64, batch_size=1),
        "3": with_defaults(host, "KSampler", model=["1", 0], positive=["2", 0], negative=["4", 0],
                           latent_image=["5", 0], seed=3, steps=4, cfg=4.0, sampler_name="euler", scheduler="simple"),
        "7": with_defaults(host, "VAEFixLoadVAE", vae_name=models["vae"]),
        "8": node("VAEDecode", samples=["3", 0], vae=["7", 0]),
        "9": node("SaveImage", images=["8", 0], filename_prefix="vae_fix/sd3_swap"),
    }


def test_the_checkpoint_is_taken_for_sd3_by_the_host(sd3):
    detected = sd3["detected"]
    assert detected["config"] == "SD3" and detected["latent_format"] == "SD3"
    assert detected["vae_channels"] == 16 and detected["vae_downscale"] == 8


def test_strict_vae_decodes_sd3_latents_pixel_for_pixel_as_core_load_vae(host, sd3):
    prompt = txt2img(host, sd3)
    picture = images_of(host, succeeded(host.run(prompt, timeout=600)), "9")[0]
    assert picture.shape == (64, 64, 3) and picture.std() > 1
    core = vae_swapped_in(prompt, node("VAELoader", vae_name=sd3["vae"]))
    assert np.array_equal(picture, images_of(host, succeeded(host.run(core, timeout=600)), "9")[0])
    own = dict(prompt, **{"8": node("VAEDecode", samples=["3", 0], vae=["1", 2])})
    assert not np.array_equal(picture, images_of(host, succeeded(host.run(own, timeout=600)), "9")[0]), \
        "the swap changed nothing: same VAE as the checkpoint's?"


def test_channel_edit_changes_only_the_chosen_channels_of_16(host, sd3):
    prompt = txt2img(host, sd3)
    prompt.update({"e": with_defaults(host, "VAEFixLatentChannelEdit", latent=["3", 0], operation="scale (x factor)",
                                      channels="8-15", factor=0.5),
                   "B": save_latent(["3", 0], "sd3_before"), "A": save_latent(["e", 0], "sd3_after")})
    prompt["8"]["inputs"]["samples"] = ["e", 0]
    outputs = succeeded(host.run(prompt, timeout=600))
    before, after = saved_latent(host, outputs, "B"), saved_latent(host, outputs, "A")
    assert before.shape == after.shape == (1, 16, 8, 8)
    assert torch.equal(after[:, :8], before[:, :8])
    assert torch.allclose(after[:, 8:], before[:, 8:] * 0.5, atol=1e-5) and before[:, 8:].abs().max() > 0


def test_inspect_vae_reads_both_16_channel_posteriors(host, sd3):
    prompt = txt2img(host, sd3)
    inspect = lambda vae: with_defaults(host, "VAEFixInspectVAE", vae=vae, image=["8", 0])
    prompt.update({"i_own": inspect(["1", 2]), "i_swap": inspect(["7", 0]),
                   "r_own": node("PreviewAny", source=["i_own", 2]), "r_swap": node("PreviewAny", source=["i_swap", 2])})
    outputs = succeeded(host.run(prompt, timeout=600))
    reports = [json.loads(outputs[k]["text"][0]) for k in ("r_own", "r_swap")]
    for report in reports:
        image = report["images"][0]
        assert image["latent_size"] == [8, 8] and image["latent_channels"] == 16, sorted(image)
        assert np.isfinite(image["logvar_raw"]["median"])
    assert reports[0]["images"][0]["logvar_raw"] != reports[1]["images"][0]["logvar_raw"]  # two VAEs, two posteriors
