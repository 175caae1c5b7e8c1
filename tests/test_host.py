"""The pack inside a real ComfyUI server (CPU), driven over HTTP like the browser drives it.

Needs a ComfyUI checkout: `COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/its/python pytest tests/test_host.py`.
Without COMFYUI_PATH every test here is reported as skipped, by name. One server is started for the
session with this repository symlinked into its custom_nodes/ and VAEs built by the tests in its
models/vae; it is stopped at the end. The example workflows' API twins are what the tests run.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from host_models import PLANTED_CELL, PLANTED16_CELL
from host_server import (assert_registered_with_tooltips, API_WORKFLOWS, PACK_FOLDER, WORKFLOWS, HostServer, api_workflow, failed, id_of,
                         images_of, interrupt_after_progress, node_of, status_messages, succeeded)
from run_cli import ROOT
from vae_files import reference_model

from vae_fix.images import load_image

NODE_IDS = ("VAEFixLoadVAE", "VAEFixInspectVAE", "VAEFixLogVarianceMap")
pytestmark = pytest.mark.host


TILES = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}  # 8-cell tiles, 3 passes


def encode_decode(vae_loader: dict, image: str, tiled: bool = False) -> dict:
    """Core VAE Encode → VAE Decode (or VAE Decode (Tiled)) → Save Image, with the given loader."""
    dec, extra = ("VAEDecodeTiled", TILES) if tiled else ("VAEDecode", {})
    return {
        "1": vae_loader,
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": dec, "inputs": {"samples": ["3", 0], "vae": ["1", 0], **extra}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "roundtrip"}},
    }


def ours(name: str, dtype: str = "auto") -> dict:
    return {"class_type": "VAEFixLoadVAE", "inputs": {"vae_name": name, "dtype": dtype}}


def core(name: str) -> dict:
    return {"class_type": "VAELoader", "inputs": {"vae_name": name}}


# ---------------------------------------------------------------- registration

def test_every_node_is_registered_with_tooltips(host):
    assert_registered_with_tooltips(host.get_json("/object_info"), NODE_IDS, PACK_FOLDER)


def test_pack_imported_without_errors(host):
    pack_lines = [line for line in host.log().splitlines() if PACK_FOLDER in line]
    assert any("seconds" in line and "IMPORT FAILED" not in line for line in pack_lines), "pack missing from import times"
    bad = [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line or "Error while calling" in line]
    assert not bad, "\n".join(bad)


def test_help_pages_are_served_where_the_frontend_looks(host):
    for node_id in NODE_IDS:  # the frontend fetches /extensions/<pack folder>/docs/<node id>.md
        page = host.get(f"/extensions/{PACK_FOLDER}/docs/{node_id}.md").decode()
        assert page == (ROOT / "web" / "docs" / f"{node_id}.md").read_text()


def test_example_workflows_are_templates(host):
    listed = host.get_json("/api/workflow_templates")
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert sorted(listed.get(PACK_FOLDER, [])) == names, listed  # the UI workflows, and nothing else
    for name in names:
        ui = json.loads(host.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json"))
        assert ui["nodes"] and ui["links"]
        thumb = Image.open(io.BytesIO(host.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")))
        assert thumb.format == "JPEG" and min(thumb.size) >= 64


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend queues for a UI-format workflow: links by node id and widget values by name."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] not in object_info:
            continue
        spec = object_info[node["type"]]
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                kind, options = (spec["input"][section][name] + [{}])[:2]
                widget = isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN")
                if name in inputs or not widget or options.get("forceInput"):
                    continue
                inputs[name] = values.pop(0)
                if options.get("control_after_generate"):
                    values.pop(0)  # the "fixed/randomize" widget the frontend adds after a seed
                if options.get("image_upload"):
                    values.pop(0)  # the upload button's placeholder value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_ui_workflows_match_their_api_twins(host):
    info = host.get_json("/object_info")
    for ui_path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(ui_path.read_text())
        twin = json.loads((API_WORKFLOWS / ui_path.name).read_text())
        assert ui_to_api(ui, info) == twin, f"{ui_path.name} and its API twin differ"


# ---------------------------------------------------------------- the strict loader

def test_loader_lists_files_and_diffusers_folders(host):
    options = host.get_json("/object_info/VAEFixLoadVAE")["VAEFixLoadVAE"]["input"]["required"]["vae_name"][1]["options"]
    assert "diffusers_sd/" in options and "tiny_sd.safetensors" in options and "full_sd.safetensors" in options
    assert not any(o.startswith("diffusers_sd/") and o != "diffusers_sd/" for o in options), "weights inside a folder listed twice"


@pytest.mark.parametrize("tiled", [False, True], ids=["plain", "tiled"])
def test_loader_vae_is_a_drop_in_for_core_vae(host, tiled):
    """Same file, core's Load VAE vs ours, through core VAE Encode/Decode: identical pictures."""
    pictures = []
    for loader in (core("full_sd.safetensors"), ours("full_sd.safetensors")):
        outputs = succeeded(host.run(encode_decode(loader, "gradient64.png" if tiled else "gradient.png", tiled)))
        pictures.append(images_of(host, outputs, "5")[0])
    assert pictures[0].shape == ((64, 64, 3) if tiled else (128, 128, 3))
    assert np.array_equal(pictures[0], pictures[1])


@pytest.mark.parametrize("name,family,seed", [("tiny_sd.safetensors", "sd", 0), ("tiny_sd3_16ch.safetensors", "sd3", 3),
                                              ("diffusers_sd/", "sd", 1)])
def test_loader_builds_other_layouts_exactly(host, name, family, seed):
    """Widths core cannot guess (and 16 channels without quant convs) decode as the reference model does."""
    outputs = succeeded(host.run(encode_decode(ours(name), "gradient.png")))
    got = images_of(host, outputs, "5")[0].astype(np.float32) / 255
    model = reference_model(family, seed=seed)
    x = load_image(host.input_dir / "gradient.png")
    with torch.no_grad():
        want = ((model.decode(model.encode(x * 2 - 1)) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1.5 / 255  # PNG rounding only


def test_loader_info_and_dtype(host):
    prompt = {"1": ours("diffusers_sd/", "fp16"), "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    outputs = succeeded(host.run(prompt))
    info = json.loads(outputs["2"]["text"][0])
    assert info["layout"] == "diffusers" and info["container"] == "diffusers-folder"
    assert info["latent_channels"] == 4 and info["comfyui"]["dtype"] == "float16"
    assert any("diffusers" in note for note in info["notes"])


# ---------------------------------------------------------------- bad inputs: node errors, server keeps going

def server_still_serves(host: HostServer) -> None:
    assert host.alive()
    assert "system" in host.get_json("/system_stats")
    succeeded(host.run(encode_decode(ours("tiny_sd.safetensors"), "gradient.png")))


def test_truncated_file_is_a_clear_node_error(host):
    err = failed(host.run(encode_decode(ours("truncated.safetensors"), "gradient.png")))
    assert err["node_type"] == "VAEFixLoadVAE" and err["exception_type"].endswith("VAELoadError")
    assert "truncated.safetensors" in err["exception_message"] and "truncated" in err["exception_message"]
    server_still_serves(host)


def test_missing_keys_refused_where_core_runs_half_loaded(host):
    succeeded(host.run(encode_decode(core("missing_keys.safetensors"), "gradient.png")))
    assert "Missing VAE keys" in host.log()  # core only warns and decodes with unset weights
    err = failed(host.run(encode_decode(ours("missing_keys.safetensors"), "gradient.png")))
    assert "missing" in err["exception_message"] and "decoder.up.0.block.1.conv2.weight" in err["exception_message"]
    server_still_serves(host)


# ---------------------------------------------------------------- log-variance maps

def lv_map(vae: dict, image: str, **widgets) -> dict:
    inputs = {"value": "log-variance (raw)", "show": "lowest over channels", "channel": 0, "colormap": "magma",
              "range_mode": "percentile", "low": 1.0, "high": 99.0, "colorbar": False, "size_policy": "crop"}
    inputs.update(widgets)
    return {"1": vae, "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "VAEFixLogVarianceMap", "inputs": {"vae": ["1", 0], "image": ["2", 0], **inputs}},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}}


@pytest.mark.parametrize("loader,name,cell_px", [(ours, "planted_sd", 4), (ours, "full_sd", 8), (core, "full_sd", 8)],
                         ids=["strict_loader_small", "strict_loader_full", "core_loader_full"])
def test_log_variance_map_shows_the_planted_hole(host, loader, name, cell_px):
    outputs = succeeded(host.run(lv_map(loader(f"{name}.safetensors"), f"{name}.png", colormap="gray")))
    stats = json.loads(outputs["4"]["text"][0])
    picture = images_of(host, outputs, "3")[0]
    assert picture.shape == (32 * cell_px, 32 * cell_px, 3)  # one block per latent cell: lines up with the image
    y, x = PLANTED_CELL
    assert picture[y * cell_px:(y + 1) * cell_px, x * cell_px:(x + 1) * cell_px].max() == 0, "the hole is not the darkest cell"
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
    prompt = lv_map(ours("tiny_sd.safetensors"), "gradient.png", value="KL per cell (nats)", size_policy="pad")
    outputs = succeeded(host.run(prompt))
    stats = json.loads(outputs["4"]["text"][0])
    assert stats["size"]["policy"] == "pad" and stats["images"][0]["min"] >= 0  # KL is never negative


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
    assert "smaller than one latent cell" in err["exception_message"]
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
    assert all(p["max"] == 400 for p in seen)  # one step per image
    assert max(p["value"] for p in seen) < 100, "the run went on long after the interrupt"
    server_still_serves(host)


# ---------------------------------------------------------------- the example workflows, as the tests run them

INSPECT = "vae_fix_inspect_black_holes"
SWAP = "vae_fix_swap_vae_sd15_txt2img"


def write_thumbnail(name: str, picture: np.ndarray, min_side: int = 256) -> None:
    """With VAEFIX_WRITE_THUMBNAILS=1, the picture a workflow produced becomes its template thumbnail."""
    if not os.environ.get("VAEFIX_WRITE_THUMBNAILS"):
        return
    im = Image.fromarray(picture)
    zoom = max(1, -(-min_side // min(im.size)))
    im.resize((im.width * zoom, im.height * zoom), Image.NEAREST).save(WORKFLOWS / f"{name}.jpg", quality=90)


@pytest.mark.parametrize("name,cell", [("planted_sd", PLANTED_CELL), ("planted_16ch", PLANTED16_CELL), ("full_sd", PLANTED_CELL)])
def test_inspect_workflow_finds_the_planted_black_hole(host, name, cell):
    prompt = api_workflow(INSPECT)
    node_of(prompt, "LoadImage")["inputs"]["image"] = f"{name}.png"
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = f"{name}.safetensors"
    inspect_id = id_of(prompt, "VAEFixInspectVAE")
    prompt["report"] = {"class_type": "PreviewAny", "inputs": {"source": [inspect_id, 2]}}
    outputs = succeeded(host.run(prompt))
    report = json.loads(outputs["report"]["text"][0])
    assert report["schema"] == 1 and report["summary"]["images"] == 1
    image = report["images"][0]
    worst = image["anomalies"][0]
    assert (worst["y"], worst["x"]) == cell and worst["kind"] == "logvar_low" and worst["clamp_floor_hit"]
    assert worst["logvar_raw_min"] < -40 and image["groups"][0]["cells"] == 1
    assert image["clamp_floor"]["cells"] == 1 and image["latent_size"] == [32, 32]
    summary = outputs[id_of(prompt, "PreviewAny")]["text"][0]
    assert f"cell (y={cell[0]}, x={cell[1]})" in summary and "clamp floor hit" in summary
    overlay = images_of(host, outputs, id_of(prompt, "SaveImage"))[0]
    assert np.array_equal(overlay, images_of(host, outputs, id_of(prompt, "VAEFixInspectVAE"))[0])  # the node's preview
    previews = [k for k, n in prompt.items() if n["class_type"] == "PreviewImage"]
    assert len(previews) == 2 and all(len(outputs[k]["images"]) == 1 for k in previews)  # channel maps, KL map
    assert overlay.shape[0] >= 256
    assert (host.output_dir / "vae_fix").is_dir()
    if name == "full_sd":
        write_thumbnail(INSPECT, overlay)


def test_inspect_negative_control_finds_nothing(host):
    prompt = api_workflow(INSPECT)
    node_of(prompt, "LoadImage")["inputs"]["image"] = "smooth_sd.png"
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = "smooth_sd.safetensors"
    prompt["report"] = {"class_type": "PreviewAny", "inputs": {"source": [id_of(prompt, "VAEFixInspectVAE"), 2]}}
    image = json.loads(succeeded(host.run(prompt))["report"]["text"][0])["images"][0]
    assert image["anomaly_count"] == 0 and image["clamp_floor"]["cells"] == 0
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
