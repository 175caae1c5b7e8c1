"""Bad inputs to the latent nodes inside a real ComfyUI: clear node errors, the server keeps serving;
VAEs without a posterior (TAESD) where one is needed; progress and cancel of long exact reach."""
from __future__ import annotations

import json

import pytest

from host_models import CLEAN, IMAGE, SMUGGLER, SMUGGLER_CELL
from host_prompts import (cell_reach,
                          channel_edit, compare_node, encode, encoded, load_image, ours, preview_text, repair_node,
                          reach_map, server_still_serves, text_of)
from host_server import (failed, interrupt_after_progress, status_messages, succeeded)


pytestmark = pytest.mark.host


@pytest.mark.parametrize("nodes,node_type,words", [
    ((("4", channel_edit(["3", 0], channels="5")),), "VAEFixLatentChannelEdit", ("channels", "channel 5", "4 channels")),
    ((("4", channel_edit(["3", 0], operation="swap with target", channels="0,1", target="1,2")),),
     "VAEFixLatentChannelEdit", ("target", "overlap")),
    ((("m", {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 32}}),
      ("4", channel_edit(["3", 0], operation="zero", mask=["m", 0]))),
     "VAEFixLatentChannelEdit", ("mask", "aspect")),
    ((("4", cell_reach(["1", 0], ["3", 0], cells="9,21; 40,3")),), "VAEFixLatentCellReach", ("cells", "(40, 3)", "32x32")),
    ((("4", {"class_type": "VAEFixLatentPreviewRGB", "inputs": {"latent": ["3", 0], "family": "SD3", "scale": 4}}),),
     "VAEFixLatentPreviewRGB", ("family", "16 channels", "this one has 4")),
    ((("4", {"class_type": "VAEFixLatentPreviewRGB", "inputs": {"latent": ["3", 0], "family": "fit from the VAE",
                                                              "scale": 4}}),), "VAEFixLatentPreviewRGB", ("vae",)),
    ((("4", repair_node(["1", 0], ["3", 0], source="posterior anomalies (needs image)")),), "VAEFixRepairLatent", ("image",)),
    ((("4", compare_node(["1", 0], ["1", 0], ["2", 0], name_b="A")),), "VAEFixCompareVAEs", ("names", "'A'")),
], ids=["channel_out_of_range", "swap_overlap", "mask_wrong_shape", "cell_outside",
        "preview_wrong_family", "fit_without_vae", "posterior_without_image", "same_names"])
def test_bad_inputs_are_node_errors(host, nodes, node_type, words):
    prompt = encoded(CLEAN, IMAGE, *nodes, ("out", preview_text(["4", 0])))
    err = failed(host.run(prompt))
    assert err["node_type"] == node_type and err["exception_type"].endswith("InputError")
    for word in words:
        assert word in err["exception_message"], err["exception_message"]
    server_still_serves(host)


def test_reach_refuses_a_vae_that_decodes_no_image_latents(host):
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}, "2": load_image(IMAGE),
              "3": encode(["2", 0], ["1", 0]),
              "4": reach_map(["1", 0], ["3", 0]),
              "5": preview_text(["4", 2])}
    err = failed(host.run(prompt))
    assert err["node_type"] == "VAEFixLatentReachMap" and "pixel-space" in err["exception_message"]
    server_still_serves(host)


@pytest.mark.parametrize("node", ["repair", "compare"])
def test_taesd_has_no_posterior_for_repair_and_compare(host, node):
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}, "2": load_image(IMAGE),
              "3": encode(["2", 0], ["1", 0]), "b": ours(CLEAN),
              "4": repair_node(["1", 0], ["3", 0], image=["2", 0]) if node == "repair" else
              compare_node(["b", 0], ["1", 0], ["2", 0]),
              "5": preview_text(["4", 2])}
    err = failed(host.run(prompt))
    assert err["node_type"] == prompt["4"]["class_type"] and err["exception_type"].endswith("InputError")
    assert "TAESD" in err["exception_message"] and "no posterior variance" in err["exception_message"]
    server_still_serves(host)


def test_repair_of_latent_outliers_runs_with_taesd(host):
    """Without an image, cells come from the latent alone: any decoder will do (TAESD here)."""
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}, "2": load_image(IMAGE),
              "3": encode(["2", 0], ["1", 0]),
              "4": repair_node(["1", 0], ["3", 0], fast_map=False), "5": preview_text(["4", 2])}
    report = json.loads(text_of(succeeded(host.run(prompt)), "5"))
    assert report["source"] == "latent" and report["latent_shape"] == [1, 4, 16, 16]


def test_reach_map_runs_with_taesd(host):
    """TAESD has no posterior but a decoder: the reach map works on it (gradients through the host's model)."""
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}, "2": load_image(IMAGE),
              "3": encode(["2", 0], ["1", 0]),
              "4": reach_map(["1", 0], ["3", 0], mode="zero", window=2, top=3),
              "5": preview_text(["4", 2])}
    report = json.loads(text_of(succeeded(host.run(prompt)), "5"))
    assert report["latent_size"] == [16, 16] and report["downscale"] == 8 and len(report["top_cells"]) == 3
    assert report["median"] > 0


# ---------------------------------------------------------------- progress and cancel

def test_exact_reach_of_every_cell_states_its_cost_shows_progress_and_stops_on_interrupt(host):
    prompt = encoded(SMUGGLER, IMAGE, ("4", cell_reach(["1", 0], ["3", 0], cells="all", batch_size=1)),
                     ("5", preview_text(["4", 2])))
    texts = []
    entry, seen = interrupt_after_progress(host, prompt, "4", texts=texts)
    assert any("all 1024 cells of the 32x32 latent: 1025 decodes" in t for t in texts), texts
    messages = status_messages(entry)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in messages
    assert messages["execution_interrupted"]["node_id"] == "4"
    assert all(p["max"] == 32 * 32 for p in seen)  # one step per cell
    assert max(p["value"] for p in seen) < 300, "the run went on long after the interrupt"
    server_still_serves(host)


def test_exact_reach_by_default_measures_the_reach_maps_top_cells_not_every_cell(host):
    prompt = encoded(SMUGGLER, IMAGE, ("4", cell_reach(["1", 0], ["3", 0])), ("5", preview_text(["4", 2])))
    report = json.loads(succeeded(host.run(prompt))["5"]["text"][0])
    assert report["selection"] == "reach map top 8" and len(report["cells"]) == 8 and report["decodes"] == 9
    assert (report["cells"][0]["y"], report["cells"][0]["x"]) == SMUGGLER_CELL
