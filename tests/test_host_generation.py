"""The pack inside real text-to-image graphs (issue 16): the SD1.5 example workflows run end to end
with a small checkpoint built by the host's own classes (tests/host_checkpoints.py), CPU-sized
(64 px, 4 steps; the workflow files unchanged), and the pack's nodes are drop-ins there."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from host_checkpoints import (cell_mask, cpu_sized, generation_models, node, save_latent, saved_latent,
                              vae_swapped_in, with_defaults)
from host_server import api_workflow, id_of, images_of, node_of, succeeded

pytestmark = pytest.mark.host
SWAP, EDIT = "SD1.5 text to image with a swapped VAE", "SD1.5 text to image with a channel edit"


@pytest.fixture(scope="session")
def sd15(host) -> dict:
    return generation_models(host, "sd15")


def shipped(name: str, models: dict) -> dict:
    """The workflow as shipped (its own file names: the fixture built them), CPU-sized."""
    prompt = api_workflow(name)
    assert node_of(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == models["checkpoint"]
    assert node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] == models["vae"]
    return cpu_sized(prompt)


def run_watched(host, prompt: dict) -> tuple[dict, set]:
    """(outputs, ids of the nodes that ran or came from the cache) of one run, seen on the websocket."""
    events = host.events()
    try:
        prompt_id = host.queue(prompt)
        entry = host.wait(prompt_id, timeout=600)
        events.wait_for(lambda: events.of("execution_success", prompt_id) or events.of("execution_error", prompt_id))
        ran = {e["node"] for e in events.of("executing", prompt_id) if e.get("node")}
        cached = {n for e in events.of("execution_cached", prompt_id) for n in e["nodes"]}
        return succeeded(entry), ran | cached
    finally:
        events.close()


def test_the_checkpoint_is_taken_for_sd15_by_the_host(sd15):
    assert sd15["detected"] == {"model": "BaseModel", "config": "SD15", "latent_format": "SD15",
                                "clip": "SD1ClipModel", "vae_channels": 4, "vae_downscale": 8}


def test_swap_workflow_decodes_pixel_for_pixel_as_core_load_vae(host, sd15):
    prompt = shipped(SWAP, sd15)
    outputs, ran = run_watched(host, prompt)
    assert ran == set(prompt)
    picture = images_of(host, outputs, id_of(prompt, "SaveImage"))[0]
    assert picture.shape == (64, 64, 3) and picture.std() > 1
    info = json.loads(outputs[id_of(prompt, "PreviewAny")]["text"][0])
    assert info["name"] == sd15["vae"] and info["latent_channels"] == 4 and info["layout"] == "compvis"
    core = vae_swapped_in(prompt, node("VAELoader", vae_name=sd15["vae"]))
    del core[id_of(prompt, "PreviewAny")]  # core's loader has no info output
    assert np.array_equal(picture, images_of(host, succeeded(host.run(core)), id_of(core, "SaveImage"))[0])
    own = dict(prompt, **{id_of(prompt, "VAEDecode"): node("VAEDecode", samples=["3", 0], vae=["4", 2])})
    own_picture = images_of(host, succeeded(host.run(own)), id_of(own, "SaveImage"))[0]
    assert not np.array_equal(picture, own_picture), "the swap changed nothing: same VAE as the checkpoint's?"


def test_edit_workflow_changes_only_the_chosen_channel_of_the_sampled_latent(host, sd15):
    prompt = shipped(EDIT, sd15)
    sampler, edit = id_of(prompt, "KSampler"), id_of(prompt, "VAEFixLatentChannelEdit")
    settings = prompt[edit]["inputs"]
    prompt["before"], prompt["after"] = save_latent([sampler, 0], "gen_before"), save_latent([edit, 0], "gen_after")
    outputs, ran = run_watched(host, prompt)
    assert ran == set(prompt)
    before, after = saved_latent(host, outputs, "before"), saved_latent(host, outputs, "after")
    assert before.shape == (1, 4, 8, 8) and settings["channels"] == "0"
    assert torch.allclose(after[:, 0], before[:, 0] + settings["offset"], atol=1e-4)
    assert torch.equal(after[:, 1:], before[:, 1:])
    edited = images_of(host, outputs, id_of(prompt, "SaveImage"))[0]
    plain = images_of(host, outputs, id_of(prompt, "PreviewImage"))[0]
    assert edited.shape == plain.shape == (64, 64, 3) and not np.array_equal(edited, plain)
    stats = [n for n in prompt if prompt[n]["class_type"] == "PreviewAny" and prompt[n]["inputs"]["source"][0] != edit]
    assert outputs[stats[0]]["text"][0].startswith("latent [1, 4, 8, 8]")


def sampler_on(model_prompt: dict, latent: list) -> dict:
    return node("KSampler", model=["4", 0], positive=["6", 0], negative=["7", 0], latent_image=latent, seed=9,
                steps=2, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=0.6)


def test_edit_keeps_noise_mask_and_batch_index_for_the_next_sampler(host, sd15):
    """A second sampler uses the latent's noise_mask (left half resampled, right half kept) and its
    batch_index (the noise of item 1 of the batch): editing before or after LatentFromBatch and
    SetLatentNoiseMask gives the same result only if the edit kept both."""
    prompt = shipped(SWAP, sd15)
    edit = lambda latent: with_defaults(host, "VAEFixLatentChannelEdit", latent=latent, operation="offset (+ offset)",
                                        channels="2", offset=1.5)
    prompt.update({
        "m0": node("SolidMask", value=0.0, width=8, height=8), "m1": node("SolidMask", value=1.0, width=4, height=8),
        "hm": node("MaskComposite", destination=["m0", 0], source=["m1", 0], x=0, y=0, operation="add"),
        "r": node("RepeatLatentBatch", samples=["3", 0], amount=3),
        "a1": node("LatentFromBatch", samples=["r", 0], batch_index=1, length=1),
        "a2": node("SetLatentNoiseMask", samples=["a1", 0], mask=["hm", 0]), "a3": edit(["a2", 0]),
        "a4": sampler_on(prompt, ["a3", 0]), "A": save_latent(["a4", 0], "mask_a"), "E": save_latent(["a3", 0], "mask_e"),
        "b1": edit(["r", 0]), "b2": node("LatentFromBatch", samples=["b1", 0], batch_index=1, length=1),
        "b3": node("SetLatentNoiseMask", samples=["b2", 0], mask=["hm", 0]),
        "b4": sampler_on(prompt, ["b3", 0]), "B": save_latent(["b4", 0], "mask_b"),
        "c1": node("SetLatentNoiseMask", samples=["3", 0], mask=["hm", 0]), "c2": edit(["c1", 0]),
        "c3": sampler_on(prompt, ["c2", 0]), "C": save_latent(["c3", 0], "mask_c"), "S": save_latent(["3", 0], "mask_s"),
    })
    outputs = succeeded(host.run(prompt, timeout=600))
    a, b, c, e, s = (saved_latent(host, outputs, k) for k in "ABCES")
    assert torch.allclose(e[:, 2], s[:, 2] + 1.5, atol=1e-4) and torch.equal(e[:, [0, 1, 3]], s[:, [0, 1, 3]])
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a[..., 4:], e[..., 4:], atol=1e-3), "the masked-out half was resampled: noise_mask lost"
    assert not torch.allclose(a[..., :4], e[..., :4], atol=1e-2)
    assert not torch.allclose(a[..., :4], c[..., :4], atol=1e-3), "batch index 1 got the noise of item 0"


def test_repair_latent_takes_a_spike_out_of_a_sampled_latent(host, sd15):
    prompt = shipped(SWAP, sd15)
    prompt.update(dict(cell_mask(8, 5, 3)))
    prompt.update({
        "sp": with_defaults(host, "VAEFixLatentChannelEdit", latent=["3", 0], operation="scale (x factor)",
                            channels="all", factor=100.0, mask=["cm2", 0]),  # sampled values are ~100 here
        "rp": with_defaults(host, "VAEFixRepairLatent", vae=["10", 0], latent=["sp", 0], source="latent outliers"),
        "rd": node("VAEDecode", samples=["rp", 0], vae=["10", 0]),
        "ri": node("SaveImage", images=["rd", 0], filename_prefix="vae_fix/gen_repaired"),
        "rr": node("PreviewAny", source=["rp", 2]),
        "SP": save_latent(["sp", 0], "spiked"), "RP": save_latent(["rp", 0], "repaired"),
    })
    outputs = succeeded(host.run(prompt, timeout=600))
    report = json.loads(outputs["rr"]["text"][0])
    assert report["source"] == "latent" and report["latent_shape"] == [1, 4, 8, 8]
    cells = [tuple(c) for c in report["images"][0]["cells"]]
    assert (5, 3) in cells
    spiked, repaired = saved_latent(host, outputs, "SP"), saved_latent(host, outputs, "RP")
    untouched = torch.ones(8, 8, dtype=torch.bool)
    for y, x in cells:
        untouched[y, x] = False
    assert torch.equal(repaired[..., untouched], spiked[..., untouched])
    assert repaired[0, :, 5, 3].abs().max() < spiked[0, :, 5, 3].abs().max() / 10
    assert images_of(host, outputs, "ri")[0].shape == (64, 64, 3) and outputs["rp"]["images"]


def test_inspect_vae_on_the_checkpoint_vae_and_on_the_swapped_one(host, sd15):
    prompt = shipped(SWAP, sd15)
    inspect = lambda vae, image: with_defaults(host, "VAEFixInspectVAE", vae=vae, image=image)
    prompt.update({"own": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
                   "i_own": inspect(["4", 2], ["own", 0]), "i_swap": inspect(["10", 0], ["8", 0]),
                   "r_own": node("PreviewAny", source=["i_own", 2]), "r_swap": node("PreviewAny", source=["i_swap", 2])})
    outputs = succeeded(host.run(prompt, timeout=600))
    reports = [json.loads(outputs[k]["text"][0]) for k in ("r_own", "r_swap")]
    for report, k in zip(reports, ("i_own", "i_swap")):
        assert report["schema"] == 2 and report["summary"]["images"] == 1 and "verdict" in report
        assert report["images"][0]["latent_size"] == [8, 8] and outputs[k]["images"]
    assert reports[0]["images"][0] != reports[1]["images"][0]  # two different VAEs, two different posteriors
