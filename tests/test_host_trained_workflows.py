"""The VAE-only example workflows on the two VAEs trained here (#14, #17), in a real ComfyUI
server, on a photo neither VAE saw in training: each node's numbers equal the engine's on the same
VAE and picture, and with VAEFIX_WRITE_THUMBNAILS=1 these runs are the templates' thumbnails. Neither
VAE has a black hole (docs/black-hole-study.md), so the pictures show a healthy VAE; the repair
template keeps its picture from the planted smuggler in test_host_latent.py (a healthy VAE has
nothing to repair: its before, after and difference would be the same picture and black)."""
from __future__ import annotations

import json

import pytest
import torch

from host_checkpoints import node, with_defaults
from host_prompts import fed_by, save_latent, saved_latent, text_of, use_models, write_thumbnail
from host_server import api_workflow, id_of, images_of, succeeded
from vae_fix.compare import compare_vaes
from vae_fix.demo import shipped_models
from vae_fix.images import load_image as read_png
from vae_fix.images import save_png
from vae_fix.inspect import inspect_vae
from vae_fix.loader import load_vae
from vae_fix.probes import photo
from vae_fix.reach import reach_map
from vae_fix.repair import repair

pytestmark = pytest.mark.host
SD, FLOOR = (f"vae_fix_trained/{p.name}" for p in shipped_models())  # listed by the pack: nothing to copy
PHOTO = "chelsea_unseen.png"


@pytest.fixture(scope="module")
def unseen(host):
    """A held-out photo (256 px) in the server's input/."""
    save_png(photo("chelsea", 256)[0], host.input_dir / PHOTO)
    return host


def engine_codec(name: str, label: str | None = None):
    return load_vae(next(p for p in shipped_models() if p.name == name.split("/")[-1])).codec(label)


def the_photo(host) -> torch.Tensor:
    return read_png(host.input_dir / PHOTO)  # [1, 3, 256, 256] 0..1


def test_inspect_workflow_on_the_trained_vae_gives_the_engines_verdict(unseen):
    prompt = use_models(api_workflow("Inspect a VAE for black holes"), SD, PHOTO)
    node = id_of(prompt, "VAEFixInspectVAE")
    prompt["report"] = {"class_type": "PreviewAny", "inputs": {"source": [node, 2]}}
    outputs = succeeded(unseen.run(prompt))
    report = json.loads(text_of(outputs, "report"))
    engine = inspect_vae(engine_codec(SD), [the_photo(unseen)]).to_json()
    assert report["verdict"]["line"] == engine["verdict"]["line"] and report["verdict"]["black_hole"] is False
    got, want = report["images"][0], engine["images"][0]
    assert got["anomaly_count"] == want["anomaly_count"] == 0 and got["clamp_floor"]["cells"] == 0
    assert abs(got["logvar_raw"]["median"] - want["logvar_raw"]["median"]) < 0.05
    assert -30 < got["logvar_raw"]["min"] < got["logvar_raw"]["median"] < -3  # learned, far from the floor
    write_thumbnail("Inspect a VAE for black holes", images_of(unseen, outputs, node)[0])


def test_find_workflow_on_the_trained_vae_ranks_cells_as_the_engine_does(unseen):
    prompt = use_models(api_workflow("Find the cell that smuggles"), SD, PHOTO)
    reach, encoder = id_of(prompt, "VAEFixLatentReachMap"), id_of(prompt, "VAEEncode")
    prompt["z"] = save_latent([encoder, 0], "trained_find")
    outputs = succeeded(unseen.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", reach, 2)))
    settings = {k: prompt[reach]["inputs"][k] for k in ("mode", "factor", "window", "blocks", "top")}
    engine = reach_map(engine_codec(SD), saved_latent(unseen, outputs, "z"), **settings).to_json()
    assert report["latent_size"] == engine["latent_size"] == [32, 32]
    cells = [(c["y"], c["x"]) for c in report["top_cells"]]
    assert cells == [(c["y"], c["x"]) for c in engine["top_cells"]]
    assert abs(report["max_over_median"] / engine["max_over_median"] - 1) < 0.02
    exact = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", id_of(prompt, "VAEFixLatentCellReach"), 2)))
    assert sorted((c["y"], c["x"]) for c in exact["cells"]) == sorted(cells)  # the map's top cells, measured exactly
    write_thumbnail("Find the cell that smuggles", images_of(unseen, outputs, fed_by(prompt, "SaveImage", reach, 1))[0])


def test_repair_workflow_leaves_the_trained_vaes_latent_alone(unseen):
    prompt = use_models(api_workflow("Repair a latent before decoding"), SD, PHOTO)
    node, encoder = id_of(prompt, "VAEFixRepairLatent"), id_of(prompt, "VAEEncode")
    prompt["before"], prompt["after"] = save_latent([encoder, 0], "trained_before"), save_latent([node, 0], "trained_after")
    outputs = succeeded(unseen.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", node, 2)))
    before = saved_latent(unseen, outputs, "before")
    assert report["images"][0]["cells"] == [] and torch.equal(saved_latent(unseen, outputs, "after"), before)
    engine = repair(engine_codec(SD), before, source="posterior", image=the_photo(unseen)).to_json()
    assert engine["images"][0]["cells"] == []  # the engine agrees: nothing collapsed, nothing to repair


def test_compare_workflow_sets_the_sd_recipe_against_the_floor_fix(unseen):
    prompt = use_models(api_workflow("Compare two VAEs"), SD, PHOTO)
    node = id_of(prompt, "VAEFixCompareVAEs")
    settings = prompt[node]["inputs"]
    prompt[settings["vae_b"][0]]["inputs"]["vae_name"] = FLOOR
    settings.update(name_a="SD recipe", name_b="log-variance floor")
    outputs = succeeded(unseen.run(prompt))
    report = json.loads(text_of(outputs, fed_by(prompt, "PreviewAny", node, 1)))
    engine = compare_vaes(engine_codec(SD, "SD recipe"), engine_codec(FLOOR, "log-variance floor"),
                          [the_photo(unseen)], window=settings["window"]).to_json()
    for name in ("SD recipe", "log-variance floor"):
        got, want = report["images"][0][name], engine["images"][0][name]
        assert abs(got["psnr_db"] - want["psnr_db"]) < 0.05 and got["anomaly_count"] == 0
        assert report["verdicts"][name]["status"] == "none"
    assert report["images"][0]["b_minus_a"]["psnr_db"] > 0  # the floor fix reconstructs this photo better
    write_thumbnail("Compare two VAEs", images_of(unseen, outputs, fed_by(prompt, "SaveImage", node, 0))[0])


def test_latent_nodes_with_defaults_fit_the_8x8_latent_of_a_64px_image(unseen):
    """#12: the defaults fit any latent size. The reach map's window 3 with 3x3 regions does not fit
    an 8x8 latent: it shrinks and says so; the RGB preview's 'auto' names the family it took."""
    save_png(photo("coffee", 64)[0], unseen.input_dir / "coffee64.png")
    prompt = {"1": with_defaults(unseen, "VAEFixLoadVAE", vae_name=SD), "2": node("LoadImage", image="coffee64.png"),
              "3": node("VAEEncode", pixels=["2", 0], vae=["1", 0]),
              "4": with_defaults(unseen, "VAEFixLatentReachMap", vae=["1", 0], latent=["3", 0]),
              "5": node("PreviewAny", source=["4", 2]),
              "6": with_defaults(unseen, "VAEFixLatentPreviewRGB", latent=["3", 0]), "7": node("PreviewAny", source=["6", 1])}
    outputs = succeeded(unseen.run(prompt))
    reach = json.loads(text_of(outputs, "5"))
    assert reach["latent_size"] == [8, 8] and reach["fitted_from"] == {"window": 3, "blocks": 3}
    assert (reach["window"], reach["blocks"]) == (1, 2)
    preview = json.loads(text_of(outputs, "7"))
    assert preview["source"] in ("sd1", "sdxl") and preview["chosen"].startswith(f"'auto' chose {preview['source']}")
