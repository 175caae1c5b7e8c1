"""The VAEs trained here, inside a real ComfyUI server (#17): the shipped SD-recipe VAE and a file
written by `python -m vae_fix finetune` load through Load VAE (strict) into the host's own VAE
class with every weight, run in core VAE Encode / VAE Decode exactly as the engine runs them, and
the Health Check node gives the engine's verdict. (Core Load VAE builds only SD's full widths, so
these small files are for the strict loader; see the README.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from host_prompts import encode_decode, ours, write_thumbnail
from host_server import api_workflow, images_of, node_of, succeeded
from run_cli import run_cli
from vae_fix.builders.planted import demo_image, planted_vae
from vae_fix.demo import shipped_models
from vae_fix.images import load_image as read_png
from vae_fix.images import save_png
from vae_fix.inspect import inspect_vae
from vae_fix.loader import load_vae, save_vae
from vae_fix.model import preset_config
from vae_fix.probes import photo
from vae_fix.train_eval import psnr, reconstruct

pytestmark = pytest.mark.host
SHIPPED = "vae_fix_trained/sd_recipe_small.safetensors"  # listed from the pack: nothing to copy
FINETUNED = "finetuned_small.safetensors"


@pytest.fixture(scope="module")
def trained(host, tmp_path_factory):
    """A fine-tuned VAE in the server's models/vae, a photo in its input/."""
    work = tmp_path_factory.mktemp("finetune_for_host")
    cfg = preset_config("sd", small=True)
    image = demo_image(128, 128, (9, 11), cfg.downscale)
    planted = save_vae(planted_vae(cfg, image=image, cell=(9, 11), seed=0).model.half(), work / "planted.safetensors")
    (work / "images").mkdir()
    save_png(image[0], work / "images" / "demo.png")
    done = run_cli("finetune", "--vae", planted, "--images", work / "images", "--out", host.vae_dir / FINETUNED,
                   "--steps", "10", "--batch", "4", "--eval-size", "128", "--device", "cpu", "--quiet",
                   "--report", work / "report")
    assert done.returncode == 0, done.stderr
    save_png(photo("chelsea", 256)[0], host.input_dir / "chelsea256.png")
    return host


def test_the_loader_lists_every_shipped_vae(host):
    options = host.get_json("/object_info/VAEFixLoadVAE")["VAEFixLoadVAE"]["input"]["required"]["vae_name"][1]["options"]
    assert [o for o in options if o.startswith("vae_fix_trained/")] == ["vae_fix_trained/" + p.name for p in shipped_models()]
    core = host.get_json("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert not [o for o in core if "sd_recipe_small" in o], "core cannot build these widths: not offered there"


def _file(host, name: str):
    return next(p for p in shipped_models() if p.name == name.split("/")[-1]) if name == SHIPPED else host.vae_dir / name


@pytest.mark.parametrize("name", [SHIPPED, FINETUNED])
def test_trained_and_finetuned_vaes_run_in_core_nodes_as_in_the_engine(trained, name):
    outputs = succeeded(trained.run(encode_decode(ours(name), "chelsea256.png")))
    got = images_of(trained, outputs, "5")[0].astype(np.float32) / 255   # [H, W, 3]
    x = read_png(trained.input_dir / "chelsea256.png")                     # [1, 3, H, W] 0..1
    with torch.no_grad():
        want = reconstruct(load_vae(_file(trained, name)).model, x)[0][0].permute(1, 2, 0).numpy()
    assert got.shape == want.shape == (256, 256, 3)
    assert np.abs(got - want).max() <= 2 / 255  # PNG rounding only: the host ran every weight of the file
    if name == SHIPPED:  # a photo it never saw in training
        assert psnr(torch.from_numpy(got), x[0].permute(1, 2, 0)) > 19.5


def test_health_check_node_gives_the_engines_verdict_on_the_shipped_vae(trained):
    prompt = api_workflow("VAE Health Check")
    node_of(prompt, "VAEFixLoadVAE")["inputs"]["vae_name"] = SHIPPED
    outputs = succeeded(trained.run(prompt))
    line = outputs["3"]["text"][0]
    write_thumbnail("VAE Health Check", images_of(trained, outputs, "2")[0])  # the card: a VAE trained here
    engine = inspect_vae(load_vae(_file(trained, SHIPPED)).codec(), None, check_reach=False).verdict.line()
    assert line == engine, (line, engine)
