"""The strict Load VAE inside a real ComfyUI server (CPU): a drop-in for core's loader, layouts
core cannot build, and broken files refused as node errors while the server keeps serving.

Needs a ComfyUI checkout (`COMFYUI_PATH`, see tests/conftest.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from host_prompts import core, encode_decode, ours, preview_text, server_still_serves, text_of
from host_server import failed, images_of, succeeded
from vae_files import reference_model

from vae_fix.images import load_image as read_png

pytestmark = pytest.mark.host


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
    assert pictures[0].std() > 1, "a flat picture would match anything"
    assert np.array_equal(pictures[0], pictures[1])


@pytest.mark.parametrize("name,family,seed", [("tiny_sd.safetensors", "sd", 0), ("tiny_sd3_16ch.safetensors", "sd3", 3),
                                              ("diffusers_sd/", "sd", 1)])
def test_loader_builds_other_layouts_exactly(host, name, family, seed):
    """Widths core cannot guess (and 16 channels without quant convs) decode as the reference model does."""
    outputs = succeeded(host.run(encode_decode(ours(name), "gradient.png")))
    got = images_of(host, outputs, "5")[0].astype(np.float32) / 255
    model = reference_model(family, seed=seed)
    x = read_png(host.input_dir / "gradient.png")
    with torch.no_grad():
        want = ((model.decode(model.encode(x * 2 - 1)) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert want.std() > 0.01, "the reference decodes a flat picture: the comparison would prove nothing"
    assert np.abs(got - want).max() <= 1.5 / 255  # PNG rounding only


def test_loader_info_and_dtype(host):
    prompt = {"1": ours("diffusers_sd/", "fp16"), "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    outputs = succeeded(host.run(prompt))
    info = json.loads(outputs["2"]["text"][0])
    assert info["layout"] == "diffusers" and info["container"] == "diffusers-folder"
    assert info["latent_channels"] == 4 and info["comfyui"]["dtype"] == "float16"
    assert any("diffusers" in note for note in info["notes"])


def test_truncated_file_is_a_clear_node_error(host):
    err = failed(host.run(encode_decode(ours("truncated.safetensors"), "gradient.png")))
    assert err["node_type"] == "VAEFixLoadVAE" and err["exception_type"].endswith("VAELoadError")
    message = err["exception_message"]
    assert "truncated.safetensors" in message and "truncated: its header describes" in message  # the file named, then why
    server_still_serves(host)


def test_missing_keys_refused_where_core_runs_half_loaded(host):
    succeeded(host.run(encode_decode(core("missing_keys.safetensors"), "gradient.png")))
    assert "Missing VAE keys" in host.log()  # core only warns and decodes with unset weights
    err = failed(host.run(encode_decode(ours("missing_keys.safetensors"), "gradient.png")))
    assert "missing" in err["exception_message"] and "decoder.up.0.block.1.conv2.weight" in err["exception_message"]
    server_still_serves(host)


@pytest.mark.parametrize("variant", [{"decoder_norm": "pixel"}, {"latent_bound": 0.5}])
def test_a_study_variant_runs_in_core_nodes_as_the_file_declares(host, variant):
    """A pixel-norm decoder or tanh-bounded means: the host's KL model computes the engine's pixels, not
    the plain KL model's that the same weights would give."""
    from dataclasses import replace

    from vae_fix.loader import load_vae, save_vae
    from vae_fix.model import AutoencoderKL, VAEConfig
    from vae_fix.train_eval import reconstruct

    name = f"variant_{next(iter(variant))}.safetensors"
    torch.manual_seed(0)
    save_vae(AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, **variant)), host.vae_dir / name)
    outputs = succeeded(host.run(encode_decode(ours(name), "gradient.png")))
    got = images_of(host, outputs, "5")[0].astype(np.float32) / 255  # [H, W, 3]
    x = read_png(host.input_dir / "gradient.png")                      # [1, 3, H, W] 0..1
    model = load_vae(host.vae_dir / name).model
    plain = AutoencoderKL(replace(model.config, decoder_norm="group", latent_bound=0.0))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        want, plain_out = (reconstruct(m, x)[0][0].permute(1, 2, 0).numpy() for m in (model, plain))
    assert np.abs(got - want).max() <= 2 / 255  # PNG rounding only
    assert np.abs(got - plain_out).max() > 10 / 255, "the variant must change this model's pixels"


def convert_prompt(vae_name: str, layout: str, filename: str) -> dict:
    return {"1": {"class_type": "VAEFixConvertVAE", "inputs": {"vae_name": vae_name, "layout": layout, "filename": filename}},
            "2": preview_text(["1", 0])}


def test_convert_node_writes_a_file_the_strict_loader_reads_bit_for_bit(host):
    from vae_fix.loader import read_vae

    info = json.loads(text_of(succeeded(host.run(convert_prompt("diffusers_sd/", "compvis", "converted_sd.safetensors"))), "2"))
    assert info["read"]["layout"] == "diffusers" and info["wrote"]["layout"] == "compvis"
    written, source = read_vae(host.vae_dir / "converted_sd.safetensors"), read_vae(host.vae_dir / "diffusers_sd")
    assert written.state_dict.keys() == source.state_dict.keys()
    assert all(torch.equal(written.state_dict[k], v) for k, v in source.state_dict.items())
    succeeded(host.run(encode_decode(ours("converted_sd.safetensors"), "gradient.png")))
    folder = json.loads(text_of(succeeded(host.run(convert_prompt("tiny_sd.safetensors", "diffusers", "converted_dir"))), "2"))
    assert folder["wrote"]["layout"] == "diffusers" and (host.vae_dir / "converted_dir" / "config.json").is_file()


@pytest.mark.parametrize("vae_name,filename,words", [
    ("tiny_sd.safetensors", "full_sd.safetensors", "already exists"),
    ("tiny_sd.safetensors", "../escape.safetensors", "models/vae"),
    ("truncated.safetensors", "from_truncated.safetensors", "truncated"),
], ids=["existing", "escape", "broken_source"])
def test_convert_node_refuses_bad_targets_and_sources(host, vae_name, filename, words):
    err = failed(host.run(convert_prompt(vae_name, "compvis", filename)))
    assert err["node_type"] == "VAEFixConvertVAE" and words in err["exception_message"]
    assert not (host.vae_dir / filename).exists() or filename == "full_sd.safetensors"
    assert not (host.base / "models" / "escape.safetensors").exists()
    server_still_serves(host)
