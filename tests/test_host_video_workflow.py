"""The video example workflow "Inspect a video VAE clip" (#12 item 5) in a real ComfyUI server: its API
twin as shipped, with a random-weight Wan 2.1 VAE (built by the host's own classes) in Load VAE
(strict) and a 6-frame animated WebP in Load Image. With VAEFIX_WRITE_THUMBNAILS=1 this run is the
template's thumbnail (random weights: its maps show that VAE, not a trained one)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from host_family_vaes import family_vae, write_clip
from host_prompts import fed_by, text_of, use_models, write_thumbnail
from host_server import api_workflow, id_of, images_of, succeeded

pytestmark = pytest.mark.host
WORKFLOW = "Inspect a video VAE clip"


def test_the_video_workflow_inspects_a_clip_frame_by_frame(host):
    vae, _ = family_vae(host, "wan21")
    prompt = use_models(api_workflow(WORKFLOW), vae, write_clip(host))
    outputs = succeeded(host.run(prompt, timeout=600))
    inspect = id_of(prompt, "VAEFixInspectVAE")
    summary = text_of(outputs, fed_by(prompt, "PreviewAny", inspect, 3))
    assert "latent frame 0 (input frame 0)" in summary and "latent frame 1 (input frames 1-4)" in summary
    verdict = text_of(outputs, fed_by(prompt, "PreviewAny", inspect, 4))
    assert verdict.lower().startswith(("no black hole", "black hole", "content")), verdict
    stats = text_of(outputs, fed_by(prompt, "PreviewAny", id_of(prompt, "VAEFixLatentStatistics"), 1))
    assert stats.startswith("video latent [1, 16, 2, 8, 8]"), stats   # 6 frames: 1 + 4 encoded, 1 left over
    previews = images_of(host, outputs, fed_by(prompt, "PreviewImage", id_of(prompt, "VAEFixLatentPreviewRGB"), 0))
    assert len(previews) == 2                                        # one picture per latent frame
    lowest = images_of(host, outputs, fed_by(prompt, "PreviewImage", id_of(prompt, "VAEFixLogVarianceMap"), 0))
    assert len(lowest) == 1                                          # the lowest over time: one map
    overlay = images_of(host, outputs, fed_by(prompt, "SaveImage", inspect, 0))
    assert len(overlay) == 2
    rows = [strip(overlay), strip([lowest[0], *previews], h=200)]  # the latent frames; over time, and in RGB
    width = max(r.shape[1] for r in rows)
    write_thumbnail(WORKFLOW, np.concatenate([np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                                              for r in rows]))


def strip(pictures: list, h: int = 256, gap: int = 8) -> np.ndarray:
    """Pictures side by side at one height on white, with gaps (so the card rewraps them into rows)."""
    parts = []
    for p in pictures:
        im = Image.fromarray(p)
        parts += [np.asarray(im.resize((max(1, round(im.width * h / im.height)), h), Image.NEAREST)),
                  np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate([np.full((h, gap, 3), 255, np.uint8), *parts], axis=1)


def test_the_video_workflows_note_matches_what_it_shows():
    from host_server import WORKFLOWS
    ui = json.loads((WORKFLOWS / f"{WORKFLOW}.json").read_text())
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    frames = {n["type"]: n["widgets_values"][-1] for n in ui["nodes"] if n["type"] in ("VAEFixInspectVAE", "VAEFixLogVarianceMap")}
    assert frames == {"VAEFixInspectVAE": "one clip (video VAEs)", "VAEFixLogVarianceMap": "lowest over time"}
    assert "lowest value over time" in note and "each later one the next 4 frames" in note
