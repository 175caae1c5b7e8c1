"""The latent nodes (edit, statistics, reach, preview, repair, compare) inside a real ComfyUI server
on the CPU, driven over HTTP like the browser drives it; the example workflows' API twins are run.

Needs a ComfyUI checkout: `COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/its/python pytest tests/test_host_latent.py`.
Without COMFYUI_PATH every test here is reported as skipped, by name. All host test files share one server per session (tests/conftest.py),
with VAEs and a tiny SD1.5-layout checkpoint built by the tests (tests/host_models.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from host_models import CLEAN, IMAGE, SMUGGLER, SMUGGLER_CELL, WIDE
from host_prompts import (fed_by, use_models, cpu_sized, write_thumbnail, channel_edit, encoded, preview_text, save_latent, saved_latent, text_of)
from host_server import (assert_registered_with_tooltips, PACK_FOLDER, api_workflow, id_of,
                         images_of, succeeded)
from run_cli import ROOT

from vae_fix.latent_preview import family_preview

NODE_IDS = ("VAEFixLatentChannelEdit", "VAEFixLatentStatistics", "VAEFixLatentReachMap", "VAEFixLatentCellReach",
            "VAEFixLatentPreviewRGB", "VAEFixRepairLatent", "VAEFixCompareVAEs")
pytestmark = pytest.mark.host


def test_latent_nodes_are_registered_with_tooltips(host):
    assert_registered_with_tooltips(host.get_json("/object_info"), NODE_IDS, PACK_FOLDER)


def test_latent_help_pages_are_served(host):
    for node_id in NODE_IDS:
        page = host.get(f"/extensions/{PACK_FOLDER}/docs/{node_id}.md").decode()
        assert page == (ROOT / "web" / "docs" / f"{node_id}.md").read_text()





# ---------------------------------------------------------------- workflow: find the cell that smuggles

FIND = "Find the cell that smuggles"


def test_find_workflow_points_at_the_smuggling_cell(host):
    prompt = use_models(api_workflow(FIND), SMUGGLER)
    reach, exact = id_of(prompt, "VAEFixLatentReachMap"), id_of(prompt, "VAEFixLatentCellReach")
    outputs = succeeded(host.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", reach, 2)))
    top = report["top_cells"][0]
    assert (top["y"], top["x"]) == SMUGGLER_CELL and report["latent_size"] == [32, 32] and report["downscale"] == 4
    assert report["max_over_median"] > 30 and report["backward_passes"] == 9
    assert top["value"] > 3 * report["top_cells"][1]["value"]
    cells = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", exact, 2)))["cells"]
    assert len(cells) == 5 and (cells[0]["y"], cells[0]["x"]) == SMUGGLER_CELL  # the reach map's top 5, measured
    assert all(cells[0]["mean_far"] > 10 * c["mean_far"] for c in cells[1:])
    reach_map = images_of(host, outputs, reach)[0]  # the node's preview: 128 px image enlarged to 256, colour bar
    assert reach_map.shape[0] == 256 and reach_map.shape[1] > 256
    y, x = SMUGGLER_CELL
    block = reach_map[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8].astype(float)  # 4 px cells, zoom 2
    assert block.mean() > reach_map[:256, :256].astype(float).mean() + 60, "the smuggling cell is not the bright one"
    overlay = images_of(host, outputs, fed_by(prompt, "SaveImage", reach, 1))[0]
    assert overlay.shape == (256, 256, 3)
    difference = images_of(host, outputs, fed_by(prompt, "PreviewImage", exact, 1))[0]
    assert difference.shape[0] == 256
    lv_map = images_of(host, outputs, fed_by(prompt, "PreviewImage", id_of(prompt, "VAEFixLogVarianceMap"), 0))[0]
    assert lv_map[y * 4:(y + 1) * 4, x * 4:(x + 1) * 4].mean() < lv_map[:128, :128].mean() - 40  # and the black hole


# ---------------------------------------------------------------- workflow: edit channels in text to image

EDIT = "SD1.5 text to image with a channel edit"



def test_edit_workflow_changes_exactly_the_chosen_channel(host, tiny_sd15):
    prompt = cpu_sized(use_models(api_workflow(EDIT), CLEAN), tiny_sd15)
    sampler, edit = id_of(prompt, "KSampler"), id_of(prompt, "VAEFixLatentChannelEdit")
    settings = prompt[edit]["inputs"]
    assert settings["operation"].startswith("offset") and settings["channels"] == "0"
    prompt["before"], prompt["after"] = save_latent([sampler, 0], "before"), save_latent([edit, 0], "after")
    outputs = succeeded(host.run(prompt, timeout=600))
    before, after = saved_latent(host, outputs, "before"), saved_latent(host, outputs, "after")
    assert before.shape == after.shape == (1, 4, 16, 16)
    assert torch.allclose(after[:, 0], before[:, 0] + settings["offset"], atol=1e-5)
    assert torch.equal(after[:, 1:], before[:, 1:])
    info = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", edit, 1)))
    assert info["operation"] == "offset" and [c["channel"] for c in info["channels"]] == [0]
    assert info["channels"][0]["values_changed"] == 256
    edited = images_of(host, outputs, id_of(prompt, "SaveImage"))[0]
    plain = images_of(host, outputs, id_of(prompt, "PreviewImage"))[0]
    assert edited.shape == plain.shape == (64, 64, 3)  # the small test VAE decodes 4x, not 8x
    assert not np.array_equal(edited, plain)
    stats = text_of(outputs, fed_by(prompt, "PreviewAny", id_of(prompt, "VAEFixLatentStatistics"), 1))
    assert stats.startswith("latent [1, 4, 16, 16]") and "SD1.x" in stats and "SDXL" in stats and "SD3" not in stats
    write_thumbnail(EDIT, edited)


def test_edit_keeps_the_noise_mask(host, tiny_sd15):
    """An all-zero noise mask tells the sampler to keep every cell: the sampler must return the edited
    latent unchanged, which it only does when the edit kept the mask."""
    prompt = encoded(CLEAN, IMAGE,
                     ("4", {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}}),
                     ("5", {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}}),
                     ("6", {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}}),
                     ("7", {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["3", 0], "mask": ["6", 0]}}),
                     ("8", channel_edit(["7", 0], operation="offset (+ offset)", channels="1", offset=1.0)),
                     ("9", {"class_type": "KSampler", "inputs": {
                         "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                         "model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["8", 0]}}),
                     ("10", save_latent(["9", 0], "sampled")), ("11", save_latent(["8", 0], "edited")),
                     ("12", save_latent(["3", 0], "encoded")))
    outputs = succeeded(host.run(prompt, timeout=600))
    encoded_, edited, sampled = (saved_latent(host, outputs, k) for k in ("12", "11", "10"))
    assert torch.allclose(edited[:, 1], encoded_[:, 1] + 1, atol=1e-5)
    assert torch.allclose(sampled, edited, atol=1e-4)


# ---------------------------------------------------------------- channel edit: mask, batch, 16 channels

def half_mask() -> tuple[tuple[str, dict], ...]:
    """Nodes "m0".."m2": a 128 px mask, 1 on the left half, 0 on the right."""
    return (("m0", {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}}),
            ("m1", {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 128}}),
            ("m2", {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0],
                                                              "x": 0, "y": 0, "operation": "add"}}))


def test_masked_edit_of_one_batch_item(host):
    prompt = encoded(CLEAN, IMAGE, *half_mask(),
                     ("4", {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["3", 0], "amount": 2}}),
                     ("5", channel_edit(["4", 0], operation="offset (+ offset)", channels="2", offset=1.5, batch="1")),
                     ("6", save_latent(["4", 0], "batch_before")), ("7", save_latent(["5", 0], "batch_after")))
    prompt["5"]["inputs"]["mask"] = ["m2", 0]
    outputs = succeeded(host.run(prompt))
    before, after = saved_latent(host, outputs, "6"), saved_latent(host, outputs, "7")
    assert before.shape == (2, 4, 32, 32)
    expected = before.clone()
    expected[1, 2, :, :16] += 1.5  # item 1, channel 2, the 16 cell columns under the mask's left half
    assert torch.allclose(after, expected, atol=1e-6)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1, :, :, 16:], before[1, :, :, 16:])


def test_statistics_of_a_16_channel_latent(host):
    prompt = encoded(WIDE, IMAGE,
                     ("4", {"class_type": "VAEFixLatentStatistics", "inputs": {"latent": ["3", 0], "bins": 32,
                                                                               "clip_percentile": 0.5, "columns": 4}}),
                     ("5", preview_text(["4", 0])), ("6", save_latent(["3", 0], "wide")))
    outputs = succeeded(host.run(prompt))
    stats = json.loads(text_of(outputs, "5"))
    z = saved_latent(host, outputs, "6").double()
    assert stats["shape"] == [1, 16, 32, 32] and len(stats["channels"]) == 16
    for row in stats["channels"]:
        values = z[:, row["channel"]].flatten()
        assert row["mean"] == pytest.approx(float(values.mean()), rel=1e-6, abs=1e-9)
        assert row["std"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-6)
    matching = {f["name"] for f in stats["families"] if f["channels_match"]}
    assert matching == {"sd3", "flux"}
    histogram = images_of(host, outputs, "4")[0]  # 4 x 4 panels
    assert histogram.shape[0] > 400 and histogram.shape[1] > 800 and histogram.std() > 5


# ---------------------------------------------------------------- workflow: repair before decoding

REPAIR = "Repair a latent before decoding"


def test_repair_workflow_takes_the_smuggling_cell_out(host):
    prompt = use_models(api_workflow(REPAIR), SMUGGLER)
    repair, encoder = id_of(prompt, "VAEFixRepairLatent"), id_of(prompt, "VAEEncode")
    prompt["before"], prompt["after"] = save_latent([encoder, 0], "repair_before"), save_latent([repair, 0], "repair_after")
    outputs = succeeded(host.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", repair, 2)))
    image = report["images"][0]
    assert report["source"] == "posterior" and image["cells"] == [list(SMUGGLER_CELL)]
    before, after = saved_latent(host, outputs, "before"), saved_latent(host, outputs, "after")
    assert (after != before).any(dim=1)[0].nonzero().tolist() == [list(SMUGGLER_CELL)]  # that cell only
    y, x = SMUGGLER_CELL
    neighbours = before[0, :, y - 1:y + 2, x - 1:x + 2].reshape(4, 9)[:, [0, 1, 2, 3, 5, 6, 7, 8]]
    assert torch.allclose(after[0, :, y, x], neighbours.median(dim=1).values)
    reach_before, reach_after = image["fast_reach_before"], image["fast_reach_after"]
    assert (reach_before["top_cells"][0]["y"], reach_before["top_cells"][0]["x"]) == SMUGGLER_CELL
    assert reach_after["max"] < reach_before["max"] / 5  # nothing reaches that far any more
    assert image["cell_reach_before"][0]["mean_far"] > 0.02 and image["image_change"]["far_mean_abs"] > 0.02
    picture = images_of(host, outputs, fed_by(prompt, "SaveImage", repair, 1))[0]
    assert picture.shape[0] > 128 and picture.shape[1] > 3 * 128  # before | after | difference
    decoded = images_of(host, outputs, fed_by(prompt, "SaveImage", id_of(prompt, "VAEDecode"), 0))[0]
    assert decoded.shape == (128, 128, 3)
    write_thumbnail(REPAIR, picture)


def test_rgb_previews_of_the_repair_workflow_use_the_sd1_factors(host):
    prompt = use_models(api_workflow(REPAIR), SMUGGLER)
    encoder = id_of(prompt, "VAEEncode")
    original = fed_by(prompt, "VAEFixLatentPreviewRGB", encoder, 0)
    prompt = {k: n for k, n in prompt.items() if k in (original, encoder) or n["class_type"] in ("VAEFixLoadVAE", "LoadImage")}
    prompt["info"], prompt["z"] = preview_text([original, 1]), save_latent([encoder, 0], "preview")
    outputs = succeeded(host.run(prompt))
    assert json.loads(text_of(outputs, "info"))["source"] == "sd1"
    z = saved_latent(host, outputs, "z")
    scale = prompt[original]["inputs"]["scale"]
    want = family_preview("sd1").image(z, scale)[0].permute(1, 2, 0).numpy()
    got = images_of(host, outputs, original)[0].astype(np.float32) / 255
    assert got.shape == want.shape == (32 * scale, 32 * scale, 3)
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("family,channels", [("fit from the VAE", 16), ("auto", 16)], ids=["fit", "auto_with_vae"])
def test_rgb_preview_fits_a_map_for_other_vaes(host, family, channels):
    prompt = encoded(WIDE, IMAGE, ("4", {"class_type": "VAEFixLatentPreviewRGB", "inputs": {
        "latent": ["3", 0], "family": family, "scale": 4, "vae": ["1", 0]}}), ("5", preview_text(["4", 1])))
    outputs = succeeded(host.run(prompt))
    info = json.loads(text_of(outputs, "5"))
    assert info["source"] == "fit" and info["channels"] == channels and len(info["r2"]) == 3
    assert images_of(host, outputs, "4")[0].shape == (128, 128, 3)


# ---------------------------------------------------------------- workflow: compare two VAEs

COMPARE = "Compare two VAEs"


def compare_prompt(vae_a: str, vae_b: str) -> dict:
    prompt = use_models(api_workflow(COMPARE), vae_a)
    node = prompt[id_of(prompt, "VAEFixCompareVAEs")]["inputs"]
    prompt[node["vae_b"][0]]["inputs"]["vae_name"] = vae_b
    return prompt


def test_compare_workflow_tells_the_smuggler_from_the_clean_vae(host):
    prompt = compare_prompt(SMUGGLER, CLEAN)
    compare = id_of(prompt, "VAEFixCompareVAEs")
    name_a, name_b = (prompt[compare]["inputs"][k] for k in ("name_a", "name_b"))
    outputs = succeeded(host.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", compare, 1)))
    row = report["images"][0]
    a, b = row[name_a], row[name_b]
    assert a["anomaly_count"] == 1 and (a["anomalies"][0]["y"], a["anomalies"][0]["x"]) == SMUGGLER_CELL
    assert a["clamp_floor_cells"] == 1 and a["logvar_raw_min"] < -40
    assert b["anomaly_count"] == 0 and b["clamp_floor_cells"] == 0 and row["b_minus_a"]["anomaly_count"] == -1
    top = a["worst_reach"]["top_cells"][0]
    assert (top["y"], top["x"]) == SMUGGLER_CELL
    assert a["psnr_db"] > 5 and b["psnr_db"] > 5
    summary = text_of(outputs, fed_by(prompt, "PreviewAny", compare, 2)).splitlines()
    assert summary[0].startswith(f"{name_a}: log-variance collapse at {SMUGGLER_CELL}")
    assert "4 channels, 1 collapsed cells" in summary[0] and summary[1].startswith(f"{name_b}: no black hole found")
    assert report["verdicts"][name_a]["status"] == "single_image" and report["verdicts"][name_b]["status"] == "none"
    picture = images_of(host, outputs, fed_by(prompt, "SaveImage", compare, 0))[0]
    assert picture.shape[0] >= 256 and picture.shape[1] > 5 * 256  # image, 2 reconstructions, 2 maps, colour bar


def test_compare_vaes_with_different_channel_counts(host):
    prompt = compare_prompt(SMUGGLER, WIDE)
    compare = id_of(prompt, "VAEFixCompareVAEs")
    prompt[compare]["inputs"]["reach"] = False
    prompt["a"], prompt["b"] = ({"class_type": "SaveImage", "inputs": {"images": [compare, slot], "filename_prefix": f"recon{slot}"}}
                                for slot in (3, 4))
    outputs = succeeded(host.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", compare, 1)))
    assert [v["latent_channels"] for v in report["vaes"]] == [4, 16]
    assert "worst_reach" not in report["images"][0][prompt[compare]["inputs"]["name_b"]]
    assert images_of(host, outputs, "a")[0].shape == images_of(host, outputs, "b")[0].shape == (128, 128, 3)


# ---------------------------------------------------------------- bad inputs: node errors, server keeps going
