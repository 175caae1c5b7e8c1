"""A real video latent inside ComfyUI (#12): core Load VAE of a Wan 2.1 VAE file (random weights, built
by the host's own classes: tests/host_family_vaes.py), a 5-frame image batch through core VAE Encode
(a [1, 16, 2, 8, 8] latent at 64 px: the first frame alone, then 4 frames per latent frame), then
Latent Statistics, Latent Channel Edit and Latent Preview (RGB) with their default settings.

Needs a ComfyUI checkout: `COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/its/python pytest tests/test_host_video_latents.py`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from host_family_vaes import family_vae
from host_prompts import EDIT_DEFAULTS, channel_edit, core, load_image, preview_text, save_latent, saved_latent, text_of
from host_server import images_of, succeeded

from vae_fix.latent_preview import family_preview

pytestmark = pytest.mark.host
PHOTO = "video_photo_64.png"
FRAMES = 5


@pytest.fixture(scope="module")
def encoded(host) -> dict:
    """Wan 2.1 VAE "1" → a 64 px photo "2" repeated as 5 frames "3" → VAE Encode "4" → Save Latent "z"."""
    from vae_fix.images import save_png
    from vae_fix.probes import photo

    save_png(photo("coffee", 64)[0], host.input_dir / PHOTO)
    name, _ = family_vae(host, "wan21")
    return {"1": core(name), "2": load_image(PHOTO),
            "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": FRAMES}},
            "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 0]}},
            "z": save_latent(["4", 0], "wan_video")}


@pytest.fixture(scope="module")
def ran(host, encoded) -> tuple[dict, torch.Tensor]:
    """One prompt: the three nodes at their defaults (and one frame-limited edit) on the video latent."""
    prompt = dict(encoded)
    prompt.update({
        "stats": {"class_type": "VAEFixLatentStatistics",
                  "inputs": {"latent": ["4", 0], "bins": 64, "clip_percentile": 0.5, "columns": 4}},
        "stats_json": preview_text(["stats", 0]), "stats_text": preview_text(["stats", 1]),
        "edit": channel_edit(["4", 0]), "edit_info": preview_text(["edit", 1]), "edited": save_latent(["edit", 0], "wan_edit"),
        "edit1": channel_edit(["4", 0], operation="offset (+ offset)", channels="0-3", offset=1.5, frames="1"),
        "edit1_info": preview_text(["edit1", 1]), "edited1": save_latent(["edit1", 0], "wan_edit1"),
        "preview": {"class_type": "VAEFixLatentPreviewRGB", "inputs": {"latent": ["4", 0], "family": "auto", "scale": 8}},
        "preview_info": preview_text(["preview", 1]),
    })
    outputs = succeeded(host.run(prompt, timeout=600))
    return outputs, saved_latent(host, outputs, "z")


def test_core_vae_encode_makes_a_video_latent(ran):
    _, z = ran
    assert z.shape == (1, 16, 2, 8, 8) and torch.isfinite(z).all()


def test_statistics_of_the_video_latent(ran):
    outputs, z = ran
    stats = json.loads(text_of(outputs, "stats_json"))
    assert stats["shape"] == [1, 16, 2, 8, 8] and stats["values_per_channel"] == 2 * 64
    assert stats["video"] == {"items": 1, "frames": 2}
    for row in stats["channels"]:
        values = z[:, row["channel"]].double().flatten()  # both frames
        assert row["mean"] == pytest.approx(float(values.mean()), rel=1e-6, abs=1e-9)
        assert row["std"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-6)
    for entry in stats["per_frame"]:
        frame = z[0, :, entry["frame"]].double()
        assert entry["item"] == 0 and entry["overall"]["mean"] == pytest.approx(float(frame.mean()), rel=1e-6, abs=1e-9)
        assert entry["overall"]["max"] == pytest.approx(float(frame.max()), rel=1e-6)
    assert {f["name"] for f in stats["families"] if f["channels_match"]} == {"wan21", "hunyuan_video"}
    summary = text_of(outputs, "stats_text")
    assert summary.startswith("video latent [1, 16, 2, 8, 8] (B, C, T, h, w), 2 frames, 128 values per channel")
    assert "item 0, frame 1:" in summary


def test_channel_edit_keeps_the_video_shape_and_its_unchosen_frames(host, ran):
    outputs, z = ran
    assert "frames" not in EDIT_DEFAULTS  # an optional widget: API prompts without it still run
    unchanged = saved_latent(host, outputs, "edited")
    assert unchanged.shape == z.shape and torch.equal(unchanged, z)  # scale x 1, the default, changes nothing
    info = json.loads(text_of(outputs, "edit_info"))
    assert info["latent_shape"] == [1, 16, 2, 8, 8] and info["frames"] == [0, 1] and info["operation"] == "scale"
    edited = saved_latent(host, outputs, "edited1")
    assert edited.shape == z.shape
    assert torch.equal(edited[:, :, 0], z[:, :, 0]) and torch.equal(edited[:, 4:], z[:, 4:])
    assert torch.allclose(edited[:, :4, 1], z[:, :4, 1] + 1.5, atol=1e-5)
    info1 = json.loads(text_of(outputs, "edit1_info"))
    assert info1["frames"] == [1] and all(c["values_changed"] == 64 for c in info1["channels"])


def test_preview_shows_each_frame_with_the_likelier_video_family(host, ran):
    outputs, z = ran
    info = json.loads(text_of(outputs, "preview_info"))
    assert info["source"] in ("wan21", "hunyuan_video") and info["channels"] == 16
    assert info["chosen"].startswith(f"'auto' chose {info['source']} of wan21, hunyuan_video")
    assert info["video"]["items"] == 1 and info["video"]["frames"] == 2
    want = family_preview(info["source"]).image(z, 8).permute(0, 2, 3, 1).numpy()
    got = np.stack(images_of(host, outputs, "preview")).astype(np.float32) / 255
    assert got.shape == want.shape == (2, 64, 64, 3)  # one picture per latent frame
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
