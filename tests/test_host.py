"""Inspection nodes and the inspect / swap workflows inside a real ComfyUI server (CPU), over HTTP.

Needs a ComfyUI checkout: `COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/its/python pytest tests/test_host.py`.
Without COMFYUI_PATH every test here is reported as skipped, by name. One server is started for the
session with this repository symlinked into its custom_nodes/ and VAEs built by the tests in its
models/vae; it is stopped at the end. The example workflows' API twins are what the tests run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from host_models import PLANTED_CELL, PLANTED16_CELL
from host_prompts import core, lv_map, ours, server_still_serves, write_thumbnail
from host_server import (api_workflow, failed, id_of,
                         images_of, interrupt_after_progress, node_of, status_messages, succeeded)
from vae_files import reference_model

from vae_fix.images import load_image as read_png


pytestmark = pytest.mark.host


@pytest.mark.parametrize("loader,name,cell_px", [(ours, "planted_sd", 4), (ours, "full_sd", 8), (core, "full_sd", 8)],
                         ids=["strict_loader_small", "strict_loader_full", "core_loader_full"])
def test_log_variance_map_shows_the_planted_hole(host, loader, name, cell_px):
    outputs = succeeded(host.run(lv_map(loader(f"{name}.safetensors"), f"{name}.png", colormap="gray")))
    stats = json.loads(outputs["4"]["text"][0])
    picture = images_of(host, outputs, "3")[0]
    assert picture.shape == (32 * cell_px, 32 * cell_px, 3)  # one block per latent cell: lines up with the image
    y, x = PLANTED_CELL
    assert picture[y * cell_px:(y + 1) * cell_px, x * cell_px:(x + 1) * cell_px].max() == 0, "the hole is not the darkest cell"
    assert picture.max() > 100, "on a black map any cell would be the darkest"
    image = stats["images"][0]
    assert image["min"] < -40 and -23 < image["median"] < -17  # planted: typical -20, hole ~30 nats deeper
    assert image["cells_below_clamp"] == 1 and stats["latent_channels"] == 4


def test_log_variance_grid_of_16_channels_with_fixed_range(host):
    prompt = lv_map(ours("planted_16ch.safetensors"), "planted_16ch.png", show="every channel (grid)",
                    range_mode="fixed", low=-30.0, high=-10.0, colorbar=True)
    outputs = succeeded(host.run(prompt))
    stats = json.loads(outputs["4"]["text"][0])
    assert stats["latent_channels"] == 16 and stats["range"] == [-30.0, -10.0]
    picture = images_of(host, outputs, "3")[0]
    assert picture.shape[1] > picture.shape[0]  # a 4x4 grid plus the colour bar on the right


def test_kl_map_and_pad_policy(host):
    """A 125x126 image (not a multiple of 4) padded by repeating its edge: the stats say so, the map
    covers the padded 32x32 grid, and its numbers are the KL computed here from the raw moments."""
    prompt = lv_map(ours("tiny_sd.safetensors"), "gradient.png", value="KL per cell (nats)", size_policy="pad")
    prompt["c"] = {"class_type": "ImageCrop", "inputs": {"image": ["2", 0], "width": 125, "height": 126, "x": 0, "y": 0}}
    prompt["3"]["inputs"]["image"] = ["c", 0]
    outputs = succeeded(host.run(prompt))
    stats = json.loads(outputs["4"]["text"][0])
    size = stats["size"]
    assert size["policy"] == "pad" and size["changed"] and size["downscale"] == 4
    assert size["original"] == [126, 125] and size["processed"] == [128, 128] and size["padding"] == [2, 3]
    assert stats["latent_size"] == [32, 32] and images_of(host, outputs, "3")[0].shape == (128, 128, 3)
    x = F.pad(read_png(host.input_dir / "gradient.png")[:, :, :126, :125], (0, 3, 0, 2), mode="replicate")
    with torch.no_grad():
        moments = reference_model("sd", seed=0).moments(x * 2 - 1).double()
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=1)[0]  # [h, w] nats
    image = stats["images"][0]
    assert image["min"] == pytest.approx(float(kl.min()), rel=1e-3, abs=1e-4)
    assert image["max"] == pytest.approx(float(kl.max()), rel=1e-3)
    assert image["median"] == pytest.approx(float(kl.flatten().kthvalue((kl.numel() + 1) // 2).values), rel=1e-3)
    assert image["kl_total"] == pytest.approx(float(kl.sum()), rel=1e-3)
    assert image["max"] > image["min"] + 0.1, "a constant map would match a wrong formula"


# ---------------------------------------------------------------- VAEs without a variance, wrong images

@pytest.mark.parametrize("vae_name,kind", [("taesd", "TAESD"), ("pixel_space", "pixel-space")])
def test_vae_without_variance_is_refused_by_kind(host, vae_name, kind):
    err = failed(host.run(lv_map(core(vae_name), "gradient.png")))
    assert err["node_type"] == "VAEFixLogVarianceMap" and err["exception_type"].endswith("InputError")
    assert kind in err["exception_message"] and "no posterior variance" in err["exception_message"]
    server_still_serves(host)


def test_image_smaller_than_a_latent_cell_is_refused(host):
    prompt = lv_map(ours("tiny_sd.safetensors"), "gradient.png")
    prompt["2"] = {"class_type": "EmptyImage", "inputs": {"width": 3, "height": 3, "batch_size": 1, "color": 0}}
    err = failed(host.run(prompt))
    assert err["node_type"] == "VAEFixLogVarianceMap" and "smaller than one latent cell" in err["exception_message"]
    server_still_serves(host)


# ---------------------------------------------------------------- progress and cancel

def test_long_inspect_shows_progress_and_stops_on_interrupt(host):
    prompt = {"1": ours("full_sd.safetensors"), "2": {"class_type": "LoadImage", "inputs": {"image": "gradient.png"}},
              "5": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 400}},
              "3": {"class_type": "VAEFixInspectVAE", "inputs": {"vae": ["1", 0], "image": ["5", 0], "threshold": 5.0,
                                                                 "min_drop": 3.0, "colormap": "magma", "size_policy": "crop"}}}
    entry, seen = interrupt_after_progress(host, prompt, "3")
    messages = status_messages(entry)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in messages
    assert messages["execution_interrupted"]["node_id"] == "3"
    assert seen and all(p["max"] == 401 for p in seen)  # one step per image and the verdict (all() of nothing is true)
    assert max(p["value"] for p in seen) < 100, "the run went on long after the interrupt"
    server_still_serves(host)


# ---------------------------------------------------------------- the example workflows, as the tests run them

INSPECT = "Inspect a VAE for black holes"
SWAP = "SD1.5 text to image with a swapped VAE"


@pytest.mark.parametrize("name,cell", [("planted_sd", PLANTED_CELL), ("planted_16ch", PLANTED16_CELL), ("full_sd", PLANTED_CELL)])
def test_inspect_workflow_finds_the_planted_black_hole(host, name, cell):
    prompt = api_workflow(INSPECT)
    node_of(prompt, "LoadImage")["inputs"]["image"] = f"{name}.png"
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = f"{name}.safetensors"
    inspect_id = id_of(prompt, "VAEFixInspectVAE")
    prompt["report"] = {"class_type": "PreviewAny", "inputs": {"source": [inspect_id, 2]}}
    outputs = succeeded(host.run(prompt))
    report = json.loads(outputs["report"]["text"][0])
    assert report["schema"] == 2 and report["summary"]["images"] == 1
    verdict = report["verdict"]  # one image: the collapse is listed, recurrence is not claimed
    assert verdict["status"] == "single_image" and [(c["y"], c["x"]) for c in verdict["cells"]] == [cell]
    assert outputs["10"]["text"][0] == verdict["line"] and "cannot confirm" in verdict["line"]
    image = report["images"][0]
    worst = image["anomalies"][0]
    assert (worst["y"], worst["x"]) == cell and worst["kind"] == "logvar_low" and worst["clamp_floor_hit"]
    assert worst["logvar_raw_min"] < -40 and image["groups"][0]["cells"] == 1
    assert image["clamp_floor"]["cells"] == 1 and image["latent_size"] == [32, 32]
    summary = outputs["6"]["text"][0]
    assert summary.startswith("Verdict: log-variance collapse at") and f"cell (y={cell[0]}, x={cell[1]})" in summary and "clamp floor hit" in summary
    overlay = images_of(host, outputs, id_of(prompt, "SaveImage"))[0]
    assert np.array_equal(overlay, images_of(host, outputs, id_of(prompt, "VAEFixInspectVAE"))[0])  # the node's preview
    previews = [k for k, n in prompt.items() if n["class_type"] == "PreviewImage"]
    assert len(previews) == 2 and all(len(outputs[k]["images"]) == 1 for k in previews)  # channel maps, KL map
    assert overlay.shape[0] >= 256
    assert (host.output_dir / "vae_fix").is_dir()


def test_inspect_negative_control_finds_nothing(host):
    prompt = api_workflow(INSPECT)
    node_of(prompt, "LoadImage")["inputs"]["image"] = "smooth_sd.png"
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = "smooth_sd.safetensors"
    prompt["report"] = {"class_type": "PreviewAny", "inputs": {"source": [id_of(prompt, "VAEFixInspectVAE"), 2]}}
    outputs = succeeded(host.run(prompt))
    report = json.loads(outputs["report"]["text"][0])
    image = report["images"][0]
    assert image["anomaly_count"] == 0 and image["clamp_floor"]["cells"] == 0
    assert report["verdict"]["black_hole"] is False and outputs["10"]["text"][0].startswith("no black hole found")
    assert -21 < image["logvar_raw"]["median"] < -19


def test_swap_workflow_runs_the_sd15_graph_with_the_strict_vae(host, tiny_sd15):
    """The whole text-to-image graph of the template, with a tiny SD1.5-layout checkpoint (no VAE
    inside), CPU-sized: 128 px, 4 steps. Our VAE decodes exactly as core's loader of the same file."""
    prompt = api_workflow(SWAP)
    node_of(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] = tiny_sd15
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = "full_sd.safetensors"
    node_of(prompt, "EmptyLatentImage")["inputs"].update(width=128, height=128)
    node_of(prompt, "KSampler")["inputs"]["steps"] = 4
    outputs = succeeded(host.run(prompt, timeout=600))
    picture = images_of(host, outputs, id_of(prompt, "SaveImage"))[0]
    assert picture.shape == (128, 128, 3) and picture.std() > 1
    info = json.loads(outputs[id_of(prompt, "PreviewAny")]["text"][0])
    assert info["latent_channels"] == 4 and info["layout"] == "compvis" and info["name"] == "full_sd.safetensors"
    del prompt[id_of(prompt, "PreviewAny")]
    prompt[id_of(prompt, "VAEFixLoadVAE")] = core("full_sd.safetensors")  # the sampler's output is cached
    again = images_of(host, succeeded(host.run(prompt, timeout=600)), id_of(prompt, "SaveImage"))[0]
    assert np.array_equal(picture, again)
    write_thumbnail(SWAP, picture)
